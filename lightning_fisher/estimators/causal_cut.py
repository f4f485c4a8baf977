"""The causal cut of the per-position route: each block of positions through its own prefix.

In a causal model the logits at position t depend on the inputs at positions <= t only, so the
gradient of position t's column is the same whether the model read the whole sequence or only
its first t + 1 inputs. The per-position route runs one backward column per position; through a
forward of the whole sequence each column's backward costs the whole length T, although it is
zero after t. Cut the positions into blocks [a, b): the columns of a block need only the prefix
[0, b) (plus the one input ``shift_labels`` drops), so a block's backward costs b instead of T.
With n equal blocks the columns' arithmetic is T^2 (n + 1) / (2n) instead of T^2, for n - 1
extra forwards of the prefixes (the last block is the whole sequence, whose forward the pass
already ran): n ~ sqrt(T / 2) balances the two, about half the work of a long sequence.

The cut is exact (the same per-position gradients, up to floating-point rounding) only for a
causal model and a batch whose sequence tensors are (B, T, ...) with the positions on dim 1.
Both are checked per block: the prefix's logits, through their log-sum-exp at every position,
must match the whole sequence's to rounding (``check_prefix``), which a model that reads ahead or
a batch cut wrongly fails.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..outputs import FisherInputError, rebuilt

#: relative tolerance of the prefix check per logits dtype. Two forwards of different lengths
#: round differently (float32 matmuls possibly in TF32), and a float64 model may compute parts in
#: float32 (Llama's RMSNorm and rotary embeddings), where a float64 difference of one ulp becomes
#: one of float32 (measured: 1.4e-9 on a float64 Llama); a model that reads ahead differs at O(1).
PREFIX_RTOL = {torch.float64: 1e-5, torch.float32: 1e-2}
PREFIX_RTOL_LOW_PRECISION = 5e-2


def causal_blocks(T: int) -> list[tuple[int, int]]:
    """Blocks [a, b) of positions 0..T-1, about sqrt(T / 2) of them, of near-equal size (one
    block, no cut, for T < 8)."""
    n = max(1, round(math.sqrt(T / 2))) if T >= 8 else 1
    edges = [round(i * T / n) for i in range(n + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def prefix_batch(batch: Any, length: int, full: int) -> Any:
    """``batch`` with every tensor whose dim 1 has the sequence length ``full`` cut to its
    first ``length`` positions (mappings, tuples and lists of tensors recursively)."""
    found = False

    def cut(x: Any) -> Any:
        nonlocal found
        if isinstance(x, Tensor):
            if x.ndim >= 2 and x.shape[1] == full:
                found = True
                return x[:, :length]
            return x
        if isinstance(x, Mapping):
            return type(x)({k: cut(v) for k, v in x.items()})  # type: ignore[call-arg]
        if isinstance(x, (tuple, list)):
            return rebuilt(x, [cut(v) for v in x])
        return x

    out = cut(batch)
    if not found:
        raise FisherInputError(
            f"causal=True cuts each batch's sequences to prefixes, but the batch holds no "
            f"(B, T, ...) tensor with T = {full} positions on dim 1 (the logits' positions, "
            "plus one under shift_labels). Pass causal=False for this batch layout."
        )
    return out


#: bytes of float32 logits converted at once by ``position_lse`` (a (B, T, C) float32 copy of a
#: vocabulary-sized output would be as large as the logits twice over)
LSE_CHUNK_BYTES = 64 * 2**20


def position_lse(logits: Tensor) -> Tensor:
    """log-sum-exp over the classes at every position, (B, T), in float32 or wider: the
    fingerprint of the logits that ``check_prefix`` compares. Converted a chunk of positions at
    a time."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    B, T, C = logits.shape
    step = max(1, LSE_CHUNK_BYTES // max(1, B * C * dtype.itemsize))
    z = logits.detach()
    return torch.cat(
        [torch.logsumexp(z[:, t : t + step].to(dtype), -1) for t in range(0, T, step)], 1
    )


def check_prefix(prefix_logits: Tensor, full_lse: Tensor, b: int) -> None:
    """Refuse the cut unless the prefix's logits at positions < b equal the whole sequence's to
    rounding (their log-sum-exp within ``PREFIX_RTOL`` of the logits dtype, relative to
    1 + |lse|)."""
    B = full_lse.shape[0]
    if prefix_logits.ndim != 3 or prefix_logits.shape[0] != B or prefix_logits.shape[1] < b:
        raise FisherInputError(
            f"causal=True: the forward of a {b}-position prefix gave logits of shape "
            f"{tuple(prefix_logits.shape)}, not ({B}, >= {b}, C): the batch's sequences are not "
            "on dim 1 of its tensors (sequence-first inputs?), so they were not cut where the "
            "logits' positions are. Pass causal=False."
        )
    if prefix_logits.shape[1] > b:
        warnings.warn(
            f"causal=True: the forward of a {b}-position prefix still gave "
            f"{prefix_logits.shape[1]} positions, so the model's inputs were not cut (only other "
            "tensors of the batch were) and every block costs the whole sequence. The Fisher is "
            "right; pass causal=False to skip the prefix forwards.",
            stacklevel=4,
        )
    rtol = PREFIX_RTOL.get(prefix_logits.dtype, PREFIX_RTOL_LOW_PRECISION)
    got, want = position_lse(prefix_logits[:, :b]), full_lse[:, :b]
    err = ((got - want).abs() / (1 + want.abs())).max()
    if not bool(err <= rtol):
        raise FisherInputError(
            f"causal=True, but the logits at positions < {b} changed by {float(err):.2e} "
            f"(relative; rounding allows {rtol:.0e}) when the inputs from position {b} on were "
            "cut: the model reads ahead (it is not causal) or the batch's tensors are not "
            "(B, T, ...) sequences. Pass causal=False."
        )
