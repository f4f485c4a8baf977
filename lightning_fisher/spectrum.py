"""The Fisher's own spectrum in parameter space, from exact Fisher-vector products (plain torch).

F = (1/N) sum_x J_x^T I(p_x) J_x is never formed. ``FisherOperator`` applies it to a vector v:
per batch one forward, J v by double backward (the gradient of u -> J^T u, a linear map, taken
with respect to u), the kernel I(p) v' = p * v' - p (p . v') per input, and one vector-Jacobian
product J^T back; the batch sums are divided by the number of inputs N.

* ``lanczos``: Lanczos with full reorthogonalisation on any symmetric matvec;
* ``top_eigenvalues``: the k largest eigenvalues of F by Lanczos;
* ``spectral_density``: the spectral density of F by stochastic Lanczos quadrature (SLQ): for
  random unit vectors q, the m-step Lanczos tridiagonal T = S diag(theta) S^T gives the Gauss
  quadrature q^T f(F) q ~ sum_i S_{0i}^2 f(theta_i), so (1/n_q) sum_q sum_i S_{0i}^2
  delta(t - theta_i) estimates the density (1/P) sum_j delta(t - lambda_j); it is smoothed by a
  Gaussian in log10(t) on a log grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .estimators.base import eval_mode, trainable_parameters
from .kernel import probabilities, softmax_fisher_matvec
from .options import check
from .outputs import ClassSelector, FisherInputError, OutputFn, model_outputs, move_batch

Matvec = Callable[[Tensor], Tensor]


class FisherOperator:
    """The Fisher F = (1/N) sum_x J_x^T I(p_x) J_x of ``model`` on ``dataloader`` as a linear map
    on flat parameter vectors (trainable parameters in ``named_parameters`` order).

    Each product walks the whole loader (the batches are not kept), in eval mode; inputs masked
    out (attention mask 0, label -100) do not count, as in ``estimate_fisher``.
    """

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any],
        output_fn: OutputFn | None = None,
        classes: ClassSelector | None = None,
        shift_labels: bool = False,
        param_filter: Callable[[str], bool] | None = None,
        max_batches: int | None = None,
    ) -> None:
        self.model = model
        self.dataloader = dataloader
        self.output_fn, self.classes, self.shift_labels = output_fn, classes, shift_labels
        self.max_batches = max_batches
        self.params = trainable_parameters(model, param_filter)
        self.names = list(self.params)
        first = next(iter(self.params.values()))
        self.device = first.device
        self.dtype = torch.promote_types(first.dtype, torch.float32)
        self.dim = sum(p.numel() for p in self.params.values())
        self.n_inputs: int | None = None  # known after the first product
        self.n_products = 0

    def _batches(self) -> Iterable[Any]:
        for i, batch in enumerate(self.dataloader):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield move_batch(batch, self.device)

    def _split(self, v: Tensor) -> list[Tensor]:
        parts, i = [], 0
        for p in self.params.values():
            parts.append(v[i : i + p.numel()].view(p.shape).to(p.dtype))
            i += p.numel()
        return parts

    def matvec(self, v: Tensor) -> Tensor:
        """F v for a flat vector ``v`` of length ``dim`` (returned in ``v``'s dtype)."""
        if v.shape != (self.dim,):
            raise FisherInputError(
                f"FisherOperator.matvec expects a flat vector of {self.dim} entries (the model's "
                f"trainable parameters); got shape {tuple(v.shape)}."
            )
        tangents = self._split(v)
        params = list(self.params.values())
        acc = [torch.zeros(p.shape, dtype=self.dtype, device=self.device) for p in params]
        n = 0
        # The math attention kernel: the fused ones have no double backward (J v needs one).
        with eval_mode(self.model), sdpa_kernel(SDPBackend.MATH):
            for batch in self._batches():
                out = model_outputs(
                    self.model, batch, self.output_fn, self.classes, self.shift_labels
                )
                n += out.n_inputs
                if out.n_inputs == 0:
                    continue
                z = out.logits
                # J v: u -> J^T u is linear, so the derivative of <J^T u, v> in u is J v.
                u = torch.zeros_like(z, requires_grad=True)
                jtu = torch.autograd.grad(
                    z, params, grad_outputs=u, create_graph=True, allow_unused=True
                )
                used = [(g, t) for g, t in zip(jtu, tangents) if g is not None]
                if not used:
                    continue
                (jv,) = torch.autograd.grad(
                    [g for g, _ in used], u, grad_outputs=[t for _, t in used]
                )
                p = probabilities(z)
                w = softmax_fisher_matvec(p, jv.to(p.dtype)) * out.mask.unsqueeze(-1)
                grads = torch.autograd.grad(
                    z, params, grad_outputs=w.to(z.dtype), allow_unused=True
                )
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.to(self.dtype))
        if n == 0:
            raise FisherInputError(
                "The dataloader gave no inputs that count (empty, or every input masked out), so "
                "the Fisher is undefined."
            )
        self.n_inputs = n
        self.n_products += 1
        return torch.cat([a.reshape(-1) for a in acc]).div_(n).to(v.dtype)

    __call__ = matvec

    def dense(self) -> Tensor:
        """The dense P x P matrix, one product per column (small models only: tests, checks)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        cols = [self.matvec(eye[i]) for i in range(self.dim)]
        m = torch.stack(cols, 1)
        return (m + m.T) / 2


@dataclass
class LanczosResult:
    """``eigenvalues``: the k largest Ritz values, descending (float64); ``ritz_values``: all of
    them; ``residuals``: |beta_m s_{m,i}| per returned value, the norm of F y - theta y for its
    Ritz vector y (small means converged); ``iterations``: Lanczos steps taken (fewer than asked
    when the Krylov space became invariant, in which case the values are exact)."""

    eigenvalues: Tensor
    ritz_values: Tensor
    residuals: Tensor
    iterations: int
    vectors: Tensor | None = None


def _lanczos_tridiagonal(
    matvec: Matvec,
    q0: Tensor,
    iters: int,
    basis_dtype: torch.dtype,
    tol: float,
    stop: Callable[[list[float], list[float], float], bool] | None = None,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """m-step Lanczos from the unit vector q0 with full reorthogonalisation (twice, "twice is
    enough"). Returns alpha (m), beta (m - 1) in float64, the basis Q (m x P) and the last beta.
    ``stop(alphas, betas, beta)``, checked after every step, ends the iteration early."""
    dim = q0.numel()
    m = min(iters, dim)
    Q = torch.zeros(m, dim, dtype=basis_dtype, device=q0.device)
    alphas: list[float] = []
    betas: list[float] = []
    q = q0.to(basis_dtype)
    Q[0] = q
    beta_last = 0.0
    scale = 0.0
    for j in range(m):
        w = matvec(Q[j]).to(basis_dtype)
        alpha = float(torch.dot(Q[j].double(), w.double()))
        alphas.append(alpha)
        basis = Q[: j + 1]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        beta = float(torch.linalg.vector_norm(w.double()))
        scale = max(scale, abs(alpha), beta)
        beta_last = beta
        if j + 1 == m:
            break
        if beta <= tol * max(scale, 1e-300):
            beta_last = 0.0  # invariant subspace: the Ritz values are eigenvalues
            break
        if stop is not None and stop(alphas, betas, beta):
            break
        betas.append(beta)
        Q[j + 1] = w / beta
    k = len(alphas)
    return (
        torch.tensor(alphas, dtype=torch.float64),
        torch.tensor(betas, dtype=torch.float64),
        Q[:k],
        beta_last,
    )


def _tridiagonal_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    T = torch.diag(alpha)
    if beta.numel():
        T = T + torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(T)


def lanczos(
    matvec: Matvec,
    dim: int,
    k: int = 5,
    iters: int | None = None,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-10,
    rtol: float | None = None,
    return_vectors: bool = False,
    start: Tensor | None = None,
) -> LanczosResult:
    """The ``k`` largest eigenvalues of a symmetric positive semi-definite operator by Lanczos
    with full reorthogonalisation.

    Args:
        matvec: v -> A v on flat vectors of length ``dim``.
        k: how many of the largest eigenvalues to return.
        iters: Lanczos steps m (Krylov dimension; default max(2k + 20, 40), at most ``dim``). The
            basis holds m vectors of ``dim`` entries in ``dtype``.
        seed: seeds the Gaussian start vector (or pass ``start``).
        dtype: of the Krylov basis (float64 by default; float32 halves its memory on large
            models); the tridiagonal matrix is always float64.
        tol: relative breakdown threshold on beta (an invariant subspace was found).
        rtol: stop early once every one of the top k Ritz residuals is at most ``rtol`` times
            the largest Ritz value (``None``: run all ``iters`` steps).
        return_vectors: also return the k Ritz vectors (k x dim).
    """
    if not isinstance(k, int) or k < 1:
        raise FisherInputError(f"lanczos needs k >= 1 eigenvalues; got k={k!r}.")
    if k > dim:
        raise FisherInputError(f"lanczos: k={k} is more than the dimension {dim}.")
    m = min(dim, iters if iters is not None else max(2 * k + 20, 40))
    if m < k:
        raise FisherInputError(f"lanczos needs iters >= k; got iters={iters}, k={k}.")
    if start is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        start = torch.randn(dim, generator=gen, dtype=torch.float64)
    q0 = start.to(device=device, dtype=dtype)
    q0 = q0 / torch.linalg.vector_norm(q0)

    def converged(alphas: list[float], betas: list[float], beta: float) -> bool:
        if rtol is None or len(alphas) < k:
            return False
        a = torch.tensor(alphas, dtype=torch.float64)
        b = torch.tensor(betas, dtype=torch.float64)
        theta, S = _tridiagonal_eigh(a, b)
        top = theta.argsort(descending=True)[:k]
        return bool((beta * S[-1, top].abs() <= rtol * theta[top[0]].abs()).all())

    alpha, beta, Q, beta_last = _lanczos_tridiagonal(matvec, q0, m, dtype, tol, converged)
    theta, S = _tridiagonal_eigh(alpha, beta)
    order = theta.argsort(descending=True)
    top = order[:k]
    residuals = (beta_last * S[-1, top]).abs()
    vectors = None
    if return_vectors:
        vectors = S[:, top].T.to(Q.dtype).to(Q.device) @ Q
    return LanczosResult(
        eigenvalues=theta[top],
        ritz_values=theta[order],
        residuals=residuals,
        iterations=int(alpha.numel()),
        vectors=vectors,
    )


def top_eigenvalues(
    model: nn.Module,
    dataloader: Iterable[Any],
    k: int = 5,
    iters: int | None = None,
    *,
    seed: int = 0,
    rtol: float | None = 1e-8,
    dtype: torch.dtype | None = None,
    output_fn: OutputFn | None = None,
    classes: ClassSelector | None = None,
    shift_labels: bool = False,
    param_filter: Callable[[str], bool] | None = None,
    max_batches: int | None = None,
) -> LanczosResult:
    """The ``k`` largest eigenvalues of F = (1/N) sum_x J^T I(p) J of ``model`` on
    ``dataloader`` by Lanczos on exact Fisher-vector products (at most ``iters`` products, each
    one pass over the loader; fewer once the top-k residuals are below ``rtol`` times the
    largest value). ``dtype`` of the Krylov basis: float64 unless the model has more than
    10 million trainable parameters (then float32)."""
    check(
        "top_eigenvalues",
        model=("module", model),
        dataloader=("batches", dataloader),
        k=("positive_int", k),
        iters=("positive_int_or_none", iters),
        seed=("integer", seed),
        rtol=("positive_number_or_none", rtol),
        max_batches=("positive_int_or_none", max_batches),
    )
    op = FisherOperator(
        model, dataloader, output_fn, classes, shift_labels, param_filter, max_batches
    )
    dtype = krylov_dtype(op, dtype)
    return lanczos(op.matvec, op.dim, k, iters, seed=seed, device=op.device, dtype=dtype, rtol=rtol)


def krylov_dtype(op: FisherOperator, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype``, or by default float64 for the Krylov basis unless the model has more than 10
    million trainable parameters (then float32: the basis holds ``iters`` parameter vectors)."""
    if dtype is not None:
        return dtype
    return torch.float64 if op.dim <= 10_000_000 else torch.float32


@dataclass
class SpectralDensity:
    """The SLQ spectral density of F, smoothed on a log grid.

    ``density`` is a density in log10(t) over ``grid`` (t values, log-spaced): the integral of
    ``density`` d log10 t over the grid plus ``mass_below`` (the quadrature weight on nodes
    below ``floor``, i.e. the share of eigenvalues that are zero for practical purposes) is 1.
    ``density_se`` is its standard error over the random starts, ``per_start`` one row per
    start. ``mean`` = (1/n) sum_q sum_i w_i theta_i, an unbiased estimate of tr(F) / P (exact
    quadrature of q^T F q), with standard error ``mean_se``.
    """

    grid: Tensor
    density: Tensor
    density_se: Tensor
    per_start: Tensor
    nodes: list[Tensor]
    weights: list[Tensor]
    mass_below: float
    floor: float
    sigma: float
    mean: float
    mean_se: float
    dim: int

    def integral(self) -> float:
        """Integral of ``density`` over log10 of the grid (trapezoid rule)."""
        return float(torch.trapezoid(self.density, self.grid.log10()))


def slq_nodes(
    matvec: Matvec,
    dim: int,
    starts: int = 8,
    iters: int = 40,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[list[Tensor], list[Tensor]]:
    """Gauss quadrature nodes theta_i and weights S_{0i}^2 (summing to 1) of ``starts``
    Rademacher start vectors, ``iters`` Lanczos steps each (full reorthogonalisation)."""
    if starts < 1 or iters < 1:
        raise FisherInputError(f"SLQ needs starts >= 1 and iters >= 1; got {starts}, {iters}.")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nodes, weights = [], []
    for _ in range(starts):
        v = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.float64) * 2 - 1
        q0 = (v / math.sqrt(dim)).to(device=device, dtype=dtype)
        alpha, beta, _, _ = _lanczos_tridiagonal(matvec, q0, iters, dtype, 1e-10)
        theta, S = _tridiagonal_eigh(alpha, beta)
        nodes.append(theta.clamp_min(0))
        weights.append(S[0] ** 2)
    return nodes, weights


def density_from_nodes(
    nodes: list[Tensor],
    weights: list[Tensor],
    dim: int,
    points: int = 256,
    decades: float = 8.0,
    sigma: float = 0.1,
) -> SpectralDensity:
    """Smooth quadrature nodes into a density in log10(t) on a log grid.

    Nodes below ``floor`` = max node x 10^-``decades`` count as ``mass_below``; the others put
    their weight in a Gaussian of standard deviation ``sigma`` (in decades) around log10(theta).
    The grid runs from log10(floor) - 4 sigma to log10(max node) + 4 sigma, so that the smoothed
    mass stays on it.
    """
    top = max(float(t.max()) for t in nodes)
    if top <= 0:
        top = 1.0
    floor = top * 10.0 ** (-decades)
    lo, hi = math.log10(floor) - 4 * sigma, math.log10(top) + 4 * sigma
    logt = torch.linspace(lo, hi, points, dtype=torch.float64)
    rows, below, means = [], [], []
    for theta, w in zip(nodes, weights):
        theta, w = theta.double().cpu(), w.double().cpu()
        keep = theta >= floor
        below.append(float(w[~keep].sum()))
        means.append(float((w * theta).sum()))
        centres = theta[keep].log10()
        kern = torch.exp(-0.5 * ((logt[:, None] - centres[None, :]) / sigma) ** 2)
        rows.append(kern @ w[keep] / (sigma * math.sqrt(2 * math.pi)))
    per_start = torch.stack(rows)
    n = per_start.shape[0]
    se = per_start.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.zeros(points)
    mean_t = torch.tensor(means, dtype=torch.float64)
    return SpectralDensity(
        grid=10.0**logt,
        density=per_start.mean(0),
        density_se=se,
        per_start=per_start,
        nodes=[t.double().cpu() for t in nodes],
        weights=[w.double().cpu() for w in weights],
        mass_below=sum(below) / n,
        floor=floor,
        sigma=sigma,
        mean=float(mean_t.mean()),
        mean_se=float(mean_t.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan"),
        dim=dim,
    )


def spectral_density(
    model: nn.Module,
    dataloader: Iterable[Any],
    starts: int = 8,
    iters: int = 40,
    *,
    points: int = 256,
    decades: float = 8.0,
    sigma: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    output_fn: OutputFn | None = None,
    classes: ClassSelector | None = None,
    shift_labels: bool = False,
    param_filter: Callable[[str], bool] | None = None,
    max_batches: int | None = None,
) -> SpectralDensity:
    """The spectral density of F by stochastic Lanczos quadrature: ``starts`` Rademacher start
    vectors, ``iters`` Fisher-vector products each, smoothed on a log grid (see
    ``density_from_nodes``)."""
    check(
        "spectral_density",
        model=("module", model),
        dataloader=("batches", dataloader),
        starts=("positive_int", starts),
        iters=("positive_int", iters),
        points=("positive_int", points),
        decades=("positive_number", decades),
        sigma=("positive_number", sigma),
        seed=("integer", seed),
        max_batches=("positive_int_or_none", max_batches),
    )
    op = FisherOperator(
        model, dataloader, output_fn, classes, shift_labels, param_filter, max_batches
    )
    dtype = krylov_dtype(op, dtype)
    nodes, weights = slq_nodes(
        op.matvec, op.dim, starts, iters, seed=seed, device=op.device, dtype=dtype
    )
    return density_from_nodes(nodes, weights, op.dim, points, decades, sigma)


__all__ = [
    "FisherOperator",
    "LanczosResult",
    "SpectralDensity",
    "density_from_nodes",
    "lanczos",
    "slq_nodes",
    "spectral_density",
    "top_eigenvalues",
]
