"""Spectral facts of I(p) = diag(p) - pp^T on random p."""

from __future__ import annotations

import pytest
import torch

from lightning_fisher.kernel import (
    kernel_statistics,
    softmax_fisher,
    softmax_fisher_matvec,
    softmax_fisher_sqrt,
    softmax_fisher_sqrt_apply,
    top_eigenpairs,
)


def random_p(n: int, C: int, seed: int = 0, temperature: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(temperature * torch.randn(n, C, generator=gen, dtype=torch.float64), -1)


@pytest.mark.parametrize("C", [2, 3, 10, 100])
def test_spectrum_facts(C: int) -> None:
    p = random_p(50, C)
    vals, _vecs = torch.linalg.eigh(softmax_fisher(p))
    ones = torch.ones(C, dtype=p.dtype) / C**0.5
    assert vals[:, 0].abs().max() < 1e-12  # smallest eigenvalue 0 ...
    torch.testing.assert_close(
        softmax_fisher(p) @ ones, torch.zeros(50, C, dtype=p.dtype)
    )  # ... on all-ones
    torch.testing.assert_close(vals.sum(-1), 1 - (p * p).sum(-1))
    lam = vals[:, -1]
    srt = p.sort(-1, descending=True).values
    assert ((p * (1 - p)).amax(-1) <= lam + 1e-12).all()
    assert (lam <= srt[:, 0] + 1e-12).all()
    if C > 1:
        assert (lam >= srt[:, 1] - 1e-12).all()  # Cauchy interlacing
    stats = kernel_statistics(p)
    torch.testing.assert_close(stats["lambda_max"], lam)
    assert (stats["lambda_max_lower"] <= lam + 1e-12).all() and (
        lam <= stats["lambda_max_upper"] + 1e-12
    ).all()


@pytest.mark.parametrize("C", [2, 7, 300])
def test_square_root_and_matvec(C: int) -> None:
    p = random_p(8, C, seed=1)
    L = softmax_fisher_sqrt(p)
    torch.testing.assert_close(L @ L.transpose(-1, -2), softmax_fisher(p))
    xi = torch.randn(8, C, dtype=p.dtype, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(softmax_fisher_sqrt_apply(p, xi), (L @ xi.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(
        softmax_fisher_matvec(p, xi), (softmax_fisher(p) @ xi.unsqueeze(-1)).squeeze(-1)
    )


@pytest.mark.parametrize(("C", "k"), [(2, 1), (5, 2), (80, 1), (500, 3)])
def test_power_iteration_matches_eigh(C: int, k: int) -> None:
    p = random_p(6, C, seed=3, temperature=3.0)
    v1, _ = top_eigenpairs(p, k, method="eigh")
    v2, vec2 = top_eigenpairs(p, k, method="power")
    torch.testing.assert_close(v2, v1, rtol=1e-7, atol=1e-10)
    # The vectors are eigenvectors: I(p) v = lambda v.
    Iv = softmax_fisher_matvec(p, vec2)
    torch.testing.assert_close(Iv, vec2 * v2.unsqueeze(-2), rtol=1e-6, atol=1e-9)


def test_large_vocabulary_never_forms_a_dense_matrix() -> None:
    p = random_p(2, 50_000, seed=4, temperature=4.0)
    vals, vecs = top_eigenpairs(p, 1)  # auto -> power iteration; 50k x 50k would need 20 GB
    srt = p.sort(-1, descending=True).values
    assert (vals[:, 0] <= srt[:, 0]).all() and (vals[:, 0] >= srt[:, 1]).all()
    assert vecs.shape == (2, 50_000, 1)


def test_bad_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="k must be between"):
        top_eigenpairs(random_p(1, 3), 4)
