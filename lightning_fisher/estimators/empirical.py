"""EMPIRICAL: F_i = (1/N) sum_x g_{y_true}(x)_i^2, with the data set's labels.

One output cotangent e_y - p per input. Inputs without a label (-100) do not count.

Token-level outputs (B, T, C): ``granularity="token"`` (the default) squares every position's
gradient g_{s,t} on its own, F = (1/N_tokens) sum_{s,t} g_{s,t}^2, so the columns are split by
position. ``granularity="sequence"`` takes one gradient per sequence,
G_s = sum_t g_{s,t} = grad of the sequence's log-likelihood over its counted positions, and
F_seq = (1/N_seq) sum_s G_s^2 = (1/N_seq) sum_s [sum_t g_{s,t}^2 + sum_{t != t'} g_{s,t} g_{s,t'}]:
the token sums plus cross terms, which do not vanish (the labels are fixed), so it is a different
quantity, not an estimate of the token-level one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..outputs import FisherInputError, ModelOutputs
from .base import Estimator


def true_label_cotangent(out: ModelOutputs, p: Tensor) -> Tensor:
    """e_y - p for the true labels (zero where the label is ignored), shaped like the logits."""
    if out.label_error is not None:
        raise FisherInputError(out.label_error)
    if out.labels is None:
        raise FisherInputError(
            "This estimator needs labels, but the batch has none (expected `batch[1]` or a "
            "`labels` entry shaped like the logits without their class dimension)."
        )
    C = p.shape[-1]
    too_big = out.n_labels_too_big
    if too_big is None:
        too_big = int(((out.labels >= C) & out.mask).sum())
    if too_big:
        found = out.labels[(out.labels >= C) & out.mask]
        raise FisherInputError(
            f"Found labels {sorted(set(found[:5].tolist()))} >= the number of classes "
            f"C = {C} of the logits; expected class indices in [0, {C}). "
            "Check the number of output units (or `classes=`) against the data's labels."
        )
    # Inputs that do not count (label -100, masked positions) get any valid index: the caller
    # zeroes their columns.
    return minus_p_plus_one_at(p, out.labels.clamp(0, C - 1))


def minus_p_plus_one_at(p: Tensor, index: Tensor) -> Tensor:
    """e_index - p along the last dimension, ``index`` shaped like ``p`` without it (or with a
    leading dimension of draws, broadcast against ``p``): ones scattered into zeros, minus p, as
    ``one_hot(index) - p`` rounds it, with no int64 one-hot tensor as large as ``p``."""
    e = torch.zeros((*index.shape, p.shape[-1]), dtype=p.dtype, device=p.device)
    return e.scatter_(-1, index.unsqueeze(-1), 1.0) - p


class EmpiricalEstimator(Estimator):
    name = "empirical"
    per_input = True
    option_names = ("max_samples", "granularity")
    granularities = ("token", "sequence")

    def columns(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, float]:
        return true_label_cotangent(out, p).unsqueeze(0), 1.0
