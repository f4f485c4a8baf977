"""Hutchinson estimators of the Fisher diagonal and of its deterministic bounds (Sun 2026).

One backward per batch and probe: v = grad_theta h with h = sum_x u_x . z(x), and the estimate is
(1/(N P)) sum_batches sum_probes v * v. With independent zero-mean, unit-variance probes xi the
cross terms between inputs vanish in expectation, so E[v v^T] = sum_x J^T E[u u^T] J:

* ``hutchinson``:    u = L(p~) xi = sqrt(p~) * xi - p~ (sqrt(p~) . xi), E[u u^T] = I(p)   -> F
  (equivalently h = sum_y sqrt(p~_y) xi_y log p(y|x)); note sqrt(p~), not p~, makes it unbiased;
* ``hutchinson_upper``: u = sqrt(p~) * xi,  E[u u^T] = diag(p)  -> J^T diag(p) J >= F (upper bound);
* ``hutchinson_lower``: u = sum_{j<=k} sqrt(lambda_j) xi_j v_j with (lambda_j, v_j) the top-k
  eigenpairs of I(p~), E[u u^T] = sum_j lambda_j v_j v_j^T <= I(p)  -> lower bound (= F if C = 2).

p~ is detached. With Rademacher probes each diagonal entry's coefficient of variation is at most
sqrt(2) (Sun 2026); Gaussian probes are available for comparison.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..kernel import softmax_fisher_sqrt_apply, top_eigenpairs
from ..outputs import ModelOutputs
from .base import Estimator


def draw_probes(
    shape: tuple[int, ...],
    distribution: str,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Zero-mean, unit-variance probes: ``rademacher`` (+-1) or ``gaussian``."""
    if distribution == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    raise ValueError(
        f"Unknown probe distribution {distribution!r}; use 'rademacher' or 'gaussian'."
    )


class HutchinsonEstimator(Estimator):
    """Unbiased estimate of the Fisher diagonal."""

    name = "hutchinson"
    per_input = False
    option_names: ClassVar[tuple[str, ...]] = ("max_samples", "probes", "probe_distribution")

    def prepare(self, p: Tensor) -> Any:
        """What every probe of a batch shares (computed once per batch)."""
        return None

    def kernel_cotangent(self, p: Tensor, prepared: Any, generator: torch.Generator) -> Tensor:
        xi = draw_probes(
            tuple(p.shape), self.options.probe_distribution, generator, p.device, p.dtype
        )
        return softmax_fisher_sqrt_apply(p, xi)

    def batch_cotangents(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, float]]:
        probes = self.options.probes
        if probes < 1:
            raise ValueError(f"probes must be at least 1; got {probes}.")
        prepared = self.prepare(p)
        for _ in range(probes):
            yield self.kernel_cotangent(p, prepared, generator), 1.0

    @property
    def cotangents_per_batch(self) -> int:
        return int(self.options.probes)

    def normaliser(self, n_inputs: int, n_batches: int) -> float:
        return float(n_inputs * self.options.probes)


class HutchinsonUpperEstimator(HutchinsonEstimator):
    """Unbiased estimate of diag(J^T diag(p) J), an upper bound of F in the Loewner order."""

    name = "hutchinson_upper"

    def prepare(self, p: Tensor) -> Any:
        return p.clamp_min(0).sqrt()

    def kernel_cotangent(self, p: Tensor, prepared: Any, generator: torch.Generator) -> Tensor:
        xi = draw_probes(
            tuple(p.shape), self.options.probe_distribution, generator, p.device, p.dtype
        )
        return prepared * xi


class HutchinsonLowerEstimator(HutchinsonEstimator):
    """Unbiased estimate of diag(J^T (sum_j lambda_j v_j v_j^T) J), a lower bound of F."""

    name = "hutchinson_lower"
    option_names = ("max_samples", "probes", "probe_distribution", "rank", "eigen_method")

    def prepare(self, p: Tensor) -> Any:
        # The eigenpairs depend on p only: once per batch, not once per probe.
        vals, vecs = top_eigenpairs(p, self.options.rank, method=self.options.eigen_method)
        return vals.sqrt(), vecs  # (..., k), (..., C, k)

    def kernel_cotangent(self, p: Tensor, prepared: Any, generator: torch.Generator) -> Tensor:
        sqrt_vals, vecs = prepared
        xi = draw_probes(
            tuple(sqrt_vals.shape), self.options.probe_distribution, generator, p.device, p.dtype
        )
        return (vecs * (sqrt_vals * xi).unsqueeze(-2)).sum(-1)
