"""EXACT: the true Fisher diagonal, F_i = (1/N) sum_x sum_y p(y|x) g_y(x)_i^2.

With L = diag(sqrt p) - p sqrt(p)^T (L L^T = I(p)), column c of L as output cotangent gives
J^T L e_c = sqrt(p_c) g_c, so summing the squares of the C columns gives sum_y p_y g_y^2: C
vector-Jacobian products per input, computed as one batched backward. ``max_samples=n`` gives
van de Ven's EXACT(n): the same over n random inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernel import softmax_fisher_sqrt
from ..outputs import FisherInputError, ModelOutputs
from .base import Estimator

#: Above this many classes ``exact`` refuses to run (C backward columns per input).
EXACT_MAX_CLASSES = 1024


class ExactEstimator(Estimator):
    name = "exact"
    per_input = True
    option_names = ("max_samples",)

    def validate(self, n_classes: int) -> None:
        limit = self.options.extra.get("exact_max_classes", EXACT_MAX_CLASSES)
        if n_classes > limit:
            raise FisherInputError(
                f"`exact` needs one backward column per class and the output has {n_classes} classes "
                f"(more than {limit}). Use method='sample' (k draws per input), 'hutchinson' (one "
                "backward per batch, unbiased), or 'empirical'; or raise the limit with "
                "`exact_max_classes=` if you really want C columns."
            )

    def columns(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, float]:
        return softmax_fisher_sqrt(p).movedim(-1, 0), 1.0
