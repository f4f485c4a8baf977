"""SAMPLE: F_i = (1/(N k)) sum_x sum_{j<=k} g_{y_j}(x)_i^2 with labels y_j ~ p(.|x).

g_y = J^T (e_y - p), so each draw is one output cotangent e_y - p: k columns per input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..outputs import ModelOutputs
from .base import Estimator


class SampleEstimator(Estimator):
    name = "sample"
    per_input = True
    option_names = ("max_samples", "mc_samples")

    def columns(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, float]:
        k = self.options.mc_samples
        if k < 1:
            raise ValueError(f"mc_samples must be at least 1; got {k}.")
        flat = p.reshape(-1, p.shape[-1])
        draws = torch.multinomial(flat.float(), k, replacement=True, generator=generator)  # (n, k)
        onehot = F.one_hot(draws.T, p.shape[-1]).to(p.dtype).reshape(k, *p.shape)
        return onehot - p.unsqueeze(0), 1.0 / k
