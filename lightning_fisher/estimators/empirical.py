"""EMPIRICAL: F_i = (1/N) sum_x g_{y_true}(x)_i^2, with the data set's labels.

One output cotangent e_y - p per input. Inputs without a label (-100) do not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..outputs import FisherInputError, ModelOutputs
from .base import Estimator


def true_label_cotangent(out: ModelOutputs, p: Tensor) -> Tensor:
    """e_y - p for the true labels (zero where the label is ignored), shaped like the logits."""
    if out.labels is None:
        raise FisherInputError(
            "This estimator needs labels, but the batch has none (expected `batch[1]` or a "
            "`labels` entry shaped like the logits without their class dimension)."
        )
    labels = out.labels.clamp_min(0)
    if (out.labels[out.mask] >= p.shape[-1]).any():
        raise FisherInputError(f"Some labels are >= the number of classes ({p.shape[-1]}).")
    return F.one_hot(labels, p.shape[-1]).to(p.dtype) - p


class EmpiricalEstimator(Estimator):
    name = "empirical"
    per_input = True
    option_names = ("max_samples",)

    def columns(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, float]:
        return true_label_cotangent(out, p).unsqueeze(0), 1.0
