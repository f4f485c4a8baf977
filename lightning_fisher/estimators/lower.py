"""LOWER (rank k): the deterministic lower bound
L_i = (1/N) sum_x sum_{j<=k} lambda_j(x) (J_x^T v_j(x))_i^2,
with (lambda_j, v_j) the k largest eigenpairs of I(p) = diag(p) - p p^T.

I(p) = sum_j lambda_j v_j v_j^T, so I(p) minus its rank-k part is the positive semi-definite tail
sum_{j>k} lambda_j v_j v_j^T and L <= F entry by entry. I(p) has rank C - 1 (its null vector is
the all-ones vector), so rank k >= C - 1 gives ``exact``, and with two classes k = 1 already does.
The columns are sqrt(lambda_j) v_j: k backward columns per input, the cost of ``empirical`` for
k = 1.

Every estimate carries a certificate (``FisherDiagonal.certificate``) computed from the
kernel-space spectrum in the same pass; see ``LowerEstimator.certificate``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..fisher_diagonal import FisherDiagonal
from ..kernel import EIGH_MAX_CLASSES, softmax_fisher, top_eigenpairs
from ..outputs import FisherInputError, ModelOutputs
from .base import Estimator, FisherOptions

#: ``lower`` with rank 1 and ``eigen_method="auto"`` solves the secular equation above this many
#: classes (below, batched ``eigh`` is as fast).
SECULAR_MIN_CLASSES = 16


def _secular_root(p2: Tensor, lo: Tensor, hi: Tensor, iters: int = 64) -> Tensor:
    """The root in (lo, hi) of g(t) = sum_i p_i^2 / (p_i - t) - 1, by bisection.

    g increases from -inf to +inf between consecutive distinct probabilities (its poles), so
    each such interval holds exactly one eigenvalue of diag(p) - p p^T; 64 halvings reach the
    float64 resolution of the interval."""
    p = p2
    for _ in range(iters):
        mid = (lo + hi) / 2
        g = (p * p / (p - mid.unsqueeze(-1))).sum(-1) - 1
        up = g > 0  # root below mid
        hi = torch.where(up, mid, hi)
        lo = torch.where(up, lo, mid)
    return (lo + hi) / 2


def _top1_secular(p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """lambda_1, v_1 and lambda_2 of I(p) in O(C) per row, from the secular equation of the
    rank-one downdate: lambda is an eigenvalue iff sum_i p_i^2 / (p_i - lambda) = 1, with
    p_(2) < lambda_1 < p_(1) < ... and eigenvector v_i proportional to p_i / (p_i - lambda).
    Returns them with a mask of the rows whose eigenpair passed a residual check (ties and
    near-ties among the largest probabilities do not, and go to ``eigh``)."""
    pd = p.double()
    top = pd.topk(min(3, pd.shape[-1]), dim=-1).values
    third = top[..., 2] if top.shape[-1] > 2 else torch.zeros_like(top[..., 0])
    lam1 = _secular_root(pd, top[..., 1], top[..., 0])
    lam2 = _secular_root(pd, third, top[..., 1])
    with torch.no_grad():
        v = pd / (pd - lam1.unsqueeze(-1))
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        iv = pd * v - pd * (pd * v).sum(-1, keepdim=True)
        resid = (iv - lam1.unsqueeze(-1) * v).abs().amax(-1)
        ok = torch.isfinite(resid) & (resid <= 1e-11) & (top[..., 0] - top[..., 1] > 1e-12)
        ok &= (top.shape[-1] < 3) | (top[..., 1] - third > 1e-12)
    return lam1, v, lam2, ok


def kernel_spectrum(p: Tensor, k: int, method: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The top-``k`` eigenpairs of I(p) and the next eigenvalue, for every row of ``p``.

    Returns ``(values (..., k) descending, vectors (..., C, k), next (...))`` where ``next`` is
    lambda_{k+1} (0 when k + 1 = C: the smallest eigenvalue of I(p) is 0). ``method="auto"``:
    for k = 1 above ``SECULAR_MIN_CLASSES`` classes the secular equation (O(C) per row, rows
    failing its residual check redone by ``eigh``), else dense ``eigh`` in float64 up to
    ``EIGH_MAX_CLASSES`` classes and subspace iteration on O(C) matvecs above; ``"eigh"`` and
    ``"power"`` force one of the latter.
    """
    C = p.shape[-1]
    if method == "auto" and k == 1 and C > SECULAR_MIN_CLASSES:
        # The top pair by the secular equation (O(C) per input, the cost of `empirical`'s
        # column); rows that fail its residual check are redone by eigh.
        lam1, v1, lam2, ok = _top1_secular(p)
        if not bool(ok.all()):
            bad = ~ok
            vals, vecs, nxt = kernel_spectrum(p[bad], 1, "eigh")
            lam1, v1, lam2 = lam1.clone(), v1.clone(), lam2.clone()
            lam1[bad], v1[bad], lam2[bad] = (
                vals[..., 0].double(),
                vecs[..., 0].double(),
                nxt.double(),
            )
        return (
            lam1.clamp_min(0).unsqueeze(-1).to(p.dtype),
            v1.unsqueeze(-1).to(p.dtype),
            lam2.clamp_min(0).to(p.dtype),
        )
    if method == "auto":
        method = "eigh" if C <= EIGH_MAX_CLASSES else "power"
    if method == "eigh":
        vals, vecs = torch.linalg.eigh(softmax_fisher(p.double()))
        vals, vecs = vals.flip(-1).clamp_min(0), vecs.flip(-1)
        nxt = vals[..., k] if k < C else torch.zeros_like(vals[..., 0])
        return vals[..., :k].to(p.dtype), vecs[..., :k].to(p.dtype), nxt.to(p.dtype)
    vals, vecs = top_eigenpairs(p, min(k + 1, C), method=method)
    nxt = vals[..., k] if k < C else torch.zeros_like(vals[..., 0])
    return vals[..., :k], vecs[..., :k], nxt


class LowerEstimator(Estimator):
    name = "lower"
    per_input = True
    option_names = ("max_samples", "rank", "eigen_method")

    def __init__(self, options: FisherOptions) -> None:
        rank = options.rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise FisherInputError(
                f"`lower` needs an integer rank k >= 1 (the number of eigenpairs of I(p) it "
                f"keeps); got rank={rank!r}. rank=1 costs what `empirical` costs, rank >= C-1 "
                "gives `exact`."
            )
        super().__init__(options)
        # float64 sums over inputs: count, tr I(p), kept eigenvalues, tail mass, lambda_{k+1};
        # then the maxima over inputs of the tail mass and of lambda_{k+1}.
        self._sums = torch.zeros(5, dtype=torch.float64)
        self._maxima = torch.zeros(2, dtype=torch.float64)
        self._n_classes = 0

    def columns(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, float]:
        C = p.shape[-1]
        k = min(self.options.rank, C - 1)
        vals, vecs, nxt = kernel_spectrum(p, k, self.options.eigen_method)
        self._observe(p, vals, nxt, out.mask, k == C - 1)
        self._n_classes = C
        cols = vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)  # (..., C, k)
        return cols.movedim(-1, 0), 1.0

    def _observe(self, p: Tensor, vals: Tensor, nxt: Tensor, mask: Tensor, full: bool) -> None:
        m = mask.to(torch.float64)
        trace = 1 - (p.double() ** 2).sum(-1)
        kept = vals.double().sum(-1)
        # rank C-1 keeps every non-zero eigenvalue: the tail is exactly zero, not rounding noise.
        tail = torch.zeros_like(trace) if full else (trace - kept).clamp_min(0)
        nxt64 = torch.zeros_like(trace) if full else nxt.double()
        sums = torch.stack([m.sum(), (m * trace).sum(), (m * kept).sum(), (m * tail).sum()])
        sums = torch.cat([sums, (m * nxt64).sum().reshape(1)])
        self._sums = self._sums.to(sums.device) + sums
        maxima = torch.stack([(m * tail).max(), (m * nxt64).max()])
        self._maxima = torch.maximum(self._maxima.to(maxima.device), maxima)

    def certificate(self) -> dict[str, Any]:
        """What the kernel-space spectrum proves about the gap F - L (docs/math.md).

        With tau_k(x) = sum_{j>k} lambda_j(x) = tr I(p) - sum_{j<=k} lambda_j and
        Pi = I - 1 1^T / C:

        * ``tail_eigen_mass`` = (1/N) sum_x tau_k(x): the kernel trace the bound drops
          (``kernel_gap_fraction`` = that over (1/N) sum_x tr I(p));
        * ``tail_eigenvalue_max`` = max_x lambda_{k+1}(x) =: c, with
          0 <= F - L <= (1/N) sum_x lambda_{k+1}(x) J_x^T Pi J_x <= c Gamma in the Loewner order,
          Gamma = (1/N) sum_x J_x^T Pi J_x, so 0 <= F_i - L_i <= c Gamma_ii for every entry;
        * ``exact``: the tail is zero for every input (rank >= C - 1), so L = F.
        """
        sums, maxima = self._sums.clone(), self._maxima.clone()
        distributed = dist.is_available() and dist.is_initialized()
        if self.options.sync_distributed and distributed and dist.get_world_size() > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        n, trace, kept, tail, nxt = sums.tolist()
        n_safe = max(n, 1.0)
        C = self._n_classes
        return {
            "rank": int(self.options.rank),
            "rank_used": int(min(self.options.rank, C - 1)) if C else int(self.options.rank),
            "n_classes": int(C),
            "n_inputs": int(n),
            "kernel_trace": trace / n_safe,
            "kernel_trace_lower": kept / n_safe,
            "tail_eigen_mass": tail / n_safe,
            "tail_eigen_mass_max": maxima[0].item(),
            "kernel_gap_fraction": tail / trace if trace > 0 else 0.0,
            "tail_eigenvalue_mean": nxt / n_safe,
            "tail_eigenvalue_max": maxima[1].item(),
            "exact": bool(C and self.options.rank >= C - 1),
        }

    def finish(self, fd: FisherDiagonal) -> None:
        """Attach the certificate to the estimate this estimator produced."""
        fd.certificate = self.certificate()
