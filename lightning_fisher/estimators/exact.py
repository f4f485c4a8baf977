"""EXACT: the true Fisher diagonal, F_i = (1/N) sum_x sum_y p(y|x) g_y(x)_i^2.

With L = diag(sqrt p) - p sqrt(p)^T (L L^T = I(p)), column c of L as output cotangent gives
J^T L e_c = sqrt(p_c) g_c, so summing the squares of the C columns gives sum_y p_y g_y^2: C
vector-Jacobian products per input, computed as one batched backward. ``max_samples=n`` gives
van de Ven's EXACT(n): the same over n random inputs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..kernel import softmax_fisher_sqrt
from ..outputs import FisherInputError, ModelOutputs
from .base import Estimator


class ColumnPerClassEstimator(Estimator):
    """A per-input estimator with about one backward column per class: refused above
    ``exact_max_classes`` classes, with a message naming the cheaper ``alternatives``."""

    per_input = True
    option_names = ("max_samples",)
    alternatives: ClassVar[str]

    def validate(self, n_classes: int) -> None:
        limit = self.options.exact_max_classes
        if n_classes > limit:
            raise FisherInputError(
                f"`{self.name}` needs one backward column per class and the output has "
                f"{n_classes} classes (more than {limit}). {self.alternatives}; or raise the "
                "limit with `exact_max_classes=` if you really want C columns."
            )


class ExactEstimator(ColumnPerClassEstimator):
    name = "exact"
    alternatives = (
        "Use method='sample' (k draws per input), 'hutchinson' (one backward per batch, "
        "unbiased), or 'empirical'"
    )

    def columns(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, float]:
        return reduced_fisher_sqrt(p).movedim(-1, 0), 1.0


def reduced_fisher_sqrt(p: Tensor) -> Tensor:
    """A C x (C-1) factor M with M M^T = I(p): one backward column fewer than L.

    L sqrt(p) = 0, so L L^T = L Q Q^T L^T keeps its value when the column of an orthogonal Q that
    is +-sqrt(p) is dropped. The Householder reflection R = I - 2 w w^T / w^T w with
    w = sqrt(p) + e_C maps sqrt(p) to -e_C (w^T w = 2 + 2 sqrt(p_C) >= 2: always stable), so
    M = (L R)[:, :C-1] = L[:, :C-1] - 2 L[:, C] w[:C-1]^T / w^T w, using L w = L e_C. C = 2 needs
    one column instead of two, C = 10 nine instead of ten.
    """
    s = p.clamp_min(0).sqrt()
    L = softmax_fisher_sqrt(p, s)  # sqrt(p) shared with w
    if p.shape[-1] < 2:
        return L
    head = s[..., :-1]  # w[:-1]
    w = torch.cat([head, s[..., -1:] + 1], -1)  # sqrt(p) + e_C
    scale = 2 / (w * w).sum(-1, keepdim=True)  # (..., 1)
    return L[..., :, :-1] - (scale.unsqueeze(-1) * L[..., :, -1:]) * head.unsqueeze(-2)
