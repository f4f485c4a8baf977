"""Kernel-space Fisher of the softmax, I(p) = diag(p) - p p^T, and its spectrum.

For a classifier with logits z and p = softmax(z), the Fisher of the model is
F = (1/N) sum_x J^T I(p) J with J = dz/dtheta. This module holds the C x C part:

* ``softmax_fisher(p)``: the dense I(p) (small C only);
* ``softmax_fisher_sqrt(p)``: L = diag(sqrt p) - p sqrt(p)^T with L L^T = I(p);
* ``softmax_fisher_matvec(p, v)``: I(p) v = p * v - p (p . v) in O(C), never forming I(p);
* ``top_eigenpairs(p, k)``: the k largest eigenpairs, by ``eigh`` for small C and by power
  (subspace) iteration on matvecs for large C;
* ``kernel_statistics(p)``: trace 1 - ||p||^2, the largest eigenvalue and its bounds
  max_i p_i (1 - p_i) <= lambda_max <= p_(1) and lambda_max >= p_(2) (Cauchy interlacing).

Every function works on a batch: ``p`` has shape ``(..., C)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Above this many classes ``top_eigenpairs(method="auto")`` switches from eigh to power iteration.
EIGH_MAX_CLASSES = 64


#: Up to this many logits per batch, ``probabilities`` computes p in float64.
FLOAT64_MAX_ELEMENTS = 2**25


def probabilities(logits: Tensor) -> Tensor:
    """p = softmax(z) in the precision every formula of this module needs.

    For a confident prediction, 1 - p_c is far below float32's resolution near 1 (6e-8): with
    p_c = 1 - 1e-6 in float32, I(p)_cc = p_c (1 - p_c), column c of L and the entry c of
    e_c - p lose several percent. In float64 they keep float32 accuracy down to
    1 - p_c ~ 1e-9, and the cotangents built from them are exact to float32 after the cast back.
    Batches of more than ``FLOAT64_MAX_ELEMENTS`` logits (vocabulary-scale token outputs) and
    devices without float64 keep float32 (or the logits' wider dtype).
    """
    z = logits.detach()
    wide = z.numel() <= FLOAT64_MAX_ELEMENTS and z.device.type != "mps"
    dtype = torch.float64 if wide else torch.promote_types(z.dtype, torch.float32)
    return torch.softmax(z.to(dtype), -1)


def softmax_fisher(p: Tensor) -> Tensor:
    """Dense I(p) = diag(p) - p p^T, shape ``(..., C, C)``."""
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def softmax_fisher_sqrt(p: Tensor, sqrt_p: Tensor | None = None) -> Tensor:
    """L = diag(sqrt p) - p sqrt(p)^T, shape ``(..., C, C)``, so that L L^T = I(p).

    Column c of L is the cotangent u_c = sqrt(p_c) (e_c - p): J^T u_c = sqrt(p_c) g_c, hence
    sum_c (J^T u_c)^2 = sum_c p_c g_c^2, the exact Fisher diagonal of one input. ``sqrt_p``: the
    caller's ``p.clamp_min(0).sqrt()``, when it has one.
    """
    s = p.clamp_min(0).sqrt() if sqrt_p is None else sqrt_p
    return torch.diag_embed(s) - p.unsqueeze(-1) * s.unsqueeze(-2)


def softmax_fisher_sqrt_apply(p: Tensor, xi: Tensor) -> Tensor:
    """L xi = sqrt(p) * xi - p (sqrt(p) . xi), in O(C); ``xi`` has the shape of ``p``."""
    s = p.clamp_min(0).sqrt()
    return s * xi - p * (s * xi).sum(-1, keepdim=True)


def softmax_fisher_matvec(p: Tensor, v: Tensor) -> Tensor:
    """I(p) v = p * v - p (p . v); ``v`` has shape ``(..., C)`` or ``(..., C, m)``."""
    if v.ndim == p.ndim:
        return p * v - p * (p * v).sum(-1, keepdim=True)
    pc = p.unsqueeze(-1)
    return pc * v - pc * (pc * v).sum(-2, keepdim=True)


def _eigh_top(p: Tensor, k: int) -> tuple[Tensor, Tensor]:
    vals, vecs = torch.linalg.eigh(softmax_fisher(p.double()))
    vals = vals.flip(-1)[..., :k].clamp_min(0)
    vecs = vecs.flip(-1)[..., :k]
    return vals.to(p.dtype), vecs.to(p.dtype)


def _power_top(
    p: Tensor, k: int, iters: int, tol: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Subspace iteration with Rayleigh-Ritz on I(p), using matvecs only (no C x C matrix)."""
    pd = p.double()
    C = p.shape[-1]
    m = min(C, k + 2)  # two guard vectors speed up convergence of the k-th pair
    # Start from the coordinate directions of the largest probabilities: the top eigenvectors of
    # diag(p) - pp^T concentrate there (interlacing), so convergence takes few iterations.
    order = pd.argsort(-1, descending=True)[..., :m]
    q = torch.zeros(*p.shape, m, dtype=torch.float64, device=p.device)
    q.scatter_(-2, order.unsqueeze(-2), 1.0)
    if generator is None:  # a fixed start: the same eigenpairs every call, global RNG untouched
        generator = torch.Generator(device=p.device).manual_seed(0)
    noise = torch.rand(q.shape, dtype=torch.float64, device=p.device, generator=generator)
    q = q + 1e-3 * noise
    q, _ = torch.linalg.qr(q)
    prev = None
    for _ in range(iters):
        q, _ = torch.linalg.qr(softmax_fisher_matvec(pd, q))
        ritz = (q * softmax_fisher_matvec(pd, q)).sum(-2)
        if prev is not None and (ritz - prev).abs().max() <= tol * ritz.abs().max().clamp_min(
            1e-30
        ):
            break
        prev = ritz
    aq = softmax_fisher_matvec(pd, q)
    small = q.transpose(-1, -2) @ aq
    vals, rot = torch.linalg.eigh((small + small.transpose(-1, -2)) / 2)
    vecs = q @ rot
    vals = vals.flip(-1)[..., :k].clamp_min(0)
    vecs = vecs.flip(-1)[..., :k]
    return vals.to(p.dtype), vecs.to(p.dtype)


def top_eigenpairs(
    p: Tensor,
    k: int = 1,
    method: str = "auto",
    iters: int = 200,
    tol: float = 1e-10,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs of I(p) for every row of ``p``.

    Returns ``(values, vectors)`` with shapes ``(..., k)`` (descending) and ``(..., C, k)``.
    ``method`` is ``"eigh"`` (dense, exact), ``"power"`` (subspace iteration on O(C) matvecs) or
    ``"auto"`` (eigh up to ``EIGH_MAX_CLASSES`` classes).
    """
    C = p.shape[-1]
    if not 1 <= k <= C:
        raise ValueError(f"k must be between 1 and the number of classes ({C}); got {k}.")
    if method == "auto":
        method = "eigh" if C <= EIGH_MAX_CLASSES else "power"
    if method == "eigh":
        return _eigh_top(p, k)
    if method == "power":
        return _power_top(p, k, iters, tol, generator)
    raise ValueError(f"Unknown eigen method {method!r}; use 'auto', 'eigh' or 'power'.")


def kernel_statistics(p: Tensor, lambda_max: Tensor | None = None) -> dict[str, Tensor]:
    """Per-row spectral facts of I(p).

    Returns a dict of ``(...)``-shaped tensors: ``trace`` = 1 - ||p||^2 (sum of eigenvalues),
    ``lambda_max``, ``lambda_max_lower`` = max(max_i p_i (1 - p_i), p_(2)),
    ``lambda_max_upper`` = p_(1), and ``one_minus_pmax`` = 1 - p_(1).
    """
    if lambda_max is None:
        lambda_max = top_eigenpairs(p, 1)[0][..., 0]
    top2 = p.topk(min(2, p.shape[-1]), dim=-1).values
    second = top2[..., 1] if p.shape[-1] > 1 else torch.zeros_like(top2[..., 0])
    return {
        "trace": 1 - (p * p).sum(-1),
        "lambda_max": lambda_max,
        "lambda_max_lower": torch.maximum((p * (1 - p)).amax(-1), second),
        "lambda_max_upper": top2[..., 0],
        "one_minus_pmax": 1 - top2[..., 0],
    }
