"""BATCHED (van de Ven 2025): F_i = (1/M) sum_{m<=M} (grad_theta (1/|B_m|) sum_{x in B_m} log p(y_x|x))_i^2.

The mean over mini-batches of the squared gradient of the batch-mean log-likelihood with the true
labels: what many continual-learning libraries compute. Cross terms between inputs make it about
1/|B| of the other estimators' scale, which is why it needs a far larger EWC lambda.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..outputs import ModelOutputs
from .base import Estimator
from .empirical import true_label_cotangent


class BatchedEstimator(Estimator):
    name = "batched"
    per_input = False
    per_input_likelihood = False  # a batch gradient: defined whatever couples the batch
    option_names = ("max_samples",)

    def batch_cotangents(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, float]]:
        yield true_label_cotangent(out, p) / out.n_inputs, 1.0

    def normaliser(self, n_inputs: int, n_batches: int) -> float:
        return float(n_batches)
