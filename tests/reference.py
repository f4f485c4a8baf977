"""Brute-force dense Fisher: full per-input Jacobians of tiny models, in float64.

Everything here is deliberately naive (a Python loop over inputs, dense C x P Jacobians) so that it
is obviously the formula of docs/math.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev


def per_input_jacobians(
    model: nn.Module, call: Any, batches: list[Any], token_level: bool = False
) -> tuple[list[Tensor], list[Tensor], list[int | None]]:
    """For every input: J (C x P, d logits / d flat trainable params), logits z (C) and its label.

    ``call(model_fn, batch_row)`` must return logits of shape (1, C) or (1, T, C) for one row.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}
    was = model.training
    model.eval()
    js, zs, ys = [], [], []
    try:
        for batch in batches:
            x, labels, mask = batch["x"], batch.get("y"), batch.get("mask")
            for i in range(len(labels) if labels is not None else x.shape[0]):
                row = {k: (v[i : i + 1] if isinstance(v, Tensor) else v) for k, v in batch.items()}

                def f(p: dict[str, Tensor], row: dict = row) -> Tensor:
                    return call(
                        lambda *a, **kw: functional_call(model, {**p, **buffers}, a, kw), row
                    )

                z = f(params)
                jac = jacrev(f)(params)
                flat = torch.cat(
                    [jac[n].reshape(*z.shape, -1) for n in params], -1
                )  # (1, [T,] C, P)
                if token_level:
                    for t in range(z.shape[1]):
                        if mask is not None and not mask[i, t]:
                            continue
                        if labels is not None and labels[i, t] == -100:
                            continue
                        js.append(flat[0, t].double())
                        zs.append(z[0, t].double())
                        ys.append(int(labels[i, t]) if labels is not None else None)
                else:
                    js.append(flat[0].double())
                    zs.append(z[0].double())
                    ys.append(int(labels[i]) if labels is not None else None)
    finally:
        model.train(was)
    return js, zs, ys


def unflatten(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n] = flat[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
    return out


def dense_fisher(
    js: list[Tensor], zs: list[Tensor], kernel: str = "fisher", rank: int = 1
) -> Tensor:
    """(1/N) sum_x J^T K(p) J with K = I(p), diag(p) or the rank-k part of I(p); dense P x P."""
    total = None
    for j, z in zip(js, zs):
        p = torch.softmax(z, -1)
        kernel_matrix = torch.diag(p) - torch.outer(p, p)
        if kernel == "fisher":
            K = kernel_matrix
        elif kernel == "dg":
            K = torch.diag(p)
        elif kernel == "lr":
            vals, vecs = torch.linalg.eigh(kernel_matrix)
            vals, vecs = vals.flip(0)[:rank], vecs.flip(1)[:, :rank]
            K = (vecs * vals) @ vecs.T
        else:
            raise ValueError(kernel)
        term = j.T @ K @ j
        total = term if total is None else total + term
    assert total is not None
    return total / len(js)


def fisher_diagonal(js: list[Tensor], zs: list[Tensor]) -> Tensor:
    """The diagonal of ``dense_fisher(js, zs)`` without the P x P matrix:
    (1/N) sum_x [sum_c p_c J_c^2 - (sum_c p_c J_c)^2], the diagonal of J^T (diag(p) - p p^T) J."""
    total = torch.zeros(js[0].shape[1], dtype=js[0].dtype)
    for j, z in zip(js, zs):
        p = torch.softmax(z, -1)[:, None]
        total += (p * j**2).sum(0) - (p * j).sum(0) ** 2
    return total / len(js)


def per_label_grads(js: list[Tensor], zs: list[Tensor], labels: list[int]) -> Tensor:
    """g_y = J^T (e_y - p) for the given labels, stacked (N, P)."""
    rows = []
    for j, z, y in zip(js, zs, labels):
        p = torch.softmax(z, -1)
        e = torch.zeros_like(p)
        e[y] = 1
        rows.append(j.T @ (e - p))
    return torch.stack(rows)
