"""SAMPLE: F_i = (1/(N k)) sum_x sum_{j<=k} g_{y_j}(x)_i^2 with labels y_j ~ p(.|x).

g_y = J^T (e_y - p), so each draw is one output cotangent e_y - p: k columns per input.

Token-level outputs (B, T, C) draw y_t ~ p_t at every position independently. By default
(``token_route="sequence"``) each draw is one column over the whole sequence s, whose gradient is
G_s = sum_t g_{y_t}(s, t): one backward per sequence and draw instead of one per position. For
t != t' the draws are independent with E[g_{y_t}] = J_t^T (p_t - p_t) = 0, so
E[G_s^2] = sum_t E[g_{y_t}^2]: divided by the number of tokens N, (1/(N k)) sum_s sum_j G_{s,j}^2
is an unbiased estimate of the token-level Fisher, with the cross terms' extra variance.
``token_route="position"`` squares every position's gradient on its own (the per-position
estimate). ``granularity="sequence"`` keeps the sequence columns and divides by the number of
sequences instead: E = (1/N_seq) sum_s sum_t F_{s,t}.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..outputs import ModelOutputs
from .base import Estimator
from .empirical import minus_p_plus_one_at


class SampleEstimator(Estimator):
    name = "sample"
    per_input = True
    option_names = ("max_samples", "mc_samples", "granularity", "token_route")
    granularities = ("token", "sequence")
    default_token_route = "sequence"
    token_routes = ("sequence", "position")

    def columns(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, float]:
        k = self.options.mc_samples
        if k < 1:
            raise ValueError(f"mc_samples must be at least 1; got {k}.")
        flat = p.reshape(-1, p.shape[-1])
        draws = torch.multinomial(flat.float(), k, replacement=True, generator=generator)  # (n, k)
        return minus_p_plus_one_at(p, draws.T.reshape(k, *p.shape[:-1])), 1.0 / k
