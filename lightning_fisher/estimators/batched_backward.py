"""Backwards of many cotangents at once through a graph the model has already recorded.

``batched_grad`` returns, for cotangents ``V`` of shape ``(K, *outputs.shape)``, the K
vector-Jacobian products ``d(V_k . outputs)/d inputs``, stacked on a leading dimension: one walk
of the graph under ``torch.func.vmap``. It replaces ``torch.autograd.grad(...,
is_grads_batched=True)``, which runs the legacy vmap prototype: that one has no batching rule for
the backward of layer norm, tanh, softmax or fused attention, so it loops over the K cotangents at
each of those operations.

``batched_attention`` runs ``F.scaled_dot_product_attention`` through its MATH backend (matmul,
softmax, dropout) while a Fisher pass records its graphs: the fused kernels' backward
(flash, memory-efficient, the CPU flash kernel) has no batching rule either. The two backends
compute the same attention; their results differ by floating-point rounding only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def batched_grad(
    outputs: Tensor, inputs: Sequence[Tensor], cotangents: Tensor
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, cotangents, is_grads_batched=True,
    retain_graph=True, allow_unused=True)`` by ``torch.func.vmap``: entry i is the
    ``(K, *inputs[i].shape)`` stack of the K products, or None when ``outputs`` does not depend on
    ``inputs[i]``. One cotangent takes a plain backward (no vmap around it)."""
    if cotangents.shape[0] == 1:
        grads = torch.autograd.grad(
            outputs, inputs, cotangents[0], retain_graph=True, allow_unused=True
        )
        return tuple(None if g is None else g.unsqueeze(0) for g in grads)
    used: list[bool] = []

    def one(v: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(outputs, inputs, v, retain_graph=True, allow_unused=True)
        used[:] = [g is not None for g in grads]  # the graph's structure, not the values
        return tuple(g for g in grads if g is not None)

    found = iter(torch.func.vmap(one)(cotangents))
    return tuple(next(found) if u else None for u in used)


@contextmanager
def batched_attention() -> Iterator[None]:
    """Scaled dot-product attention through the MATH backend while the block runs; the backend
    choice in force before is restored afterwards."""
    with sdpa_kernel(SDPBackend.MATH):
        yield
