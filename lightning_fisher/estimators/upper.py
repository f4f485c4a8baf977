"""UPPER: the deterministic upper bound U_i = (1/N) sum_x sum_c p_c(x) (J_x^T e_c)_i^2.

U is the diagonal of (1/N) sum_x J_x^T diag(p) J_x. Since diag(p) - I(p) = p p^T is positive
semi-definite, U - F = (1/N) sum_x (J_x^T p)(J_x^T p)^T is too, so U >= F entry by entry. The
columns sqrt(p_c) e_c (one per class) give sum_c (J^T sqrt(p_c) e_c)^2 = the summand above.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..outputs import ModelOutputs
from .exact import ColumnPerClassEstimator


class UpperEstimator(ColumnPerClassEstimator):
    name = "upper"
    alternatives = (
        "Use method='hutchinson_upper' (an unbiased estimate of the same bound, one backward "
        "per batch and probe)"
    )

    def columns(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, float]:
        return torch.diag_embed(p.clamp_min(0).sqrt()).movedim(-1, 0), 1.0
