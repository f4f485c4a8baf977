"""The Fisher's parameter-space spectrum: exact Fisher-vector products, Lanczos against a dense
eigendecomposition, and stochastic Lanczos quadrature."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Case, make_case
from reference import dense_fisher

import lightning_fisher as lf
from lightning_fisher.diagnostics import plot_spectrum, save_png, spectrum_scalars
from lightning_fisher.spectrum import density_from_nodes, slq_nodes


def test_fisher_vector_products_equal_the_dense_fisher(case: Case) -> None:
    js, zs, _ = case.jacobians()
    F = dense_fisher(js, zs)
    op = lf.FisherOperator(case.model, case.loader)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), F @ v, rtol=1e-10, atol=1e-12)
    assert op.n_inputs == len(js)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_lanczos_top_k_matches_eigvalsh(name: str) -> None:
    c = make_case(name)
    js, zs, _ = c.jacobians()
    want = torch.linalg.eigvalsh(dense_fisher(js, zs)).flip(0)[:5]
    got = lf.top_eigenvalues(c.model, c.loader, k=5)
    torch.testing.assert_close(got.eigenvalues, want, rtol=1e-8, atol=1e-12 * float(want[0]))
    assert (got.residuals <= 1e-8 * want[0]).all()


def test_lanczos_with_fewer_steps_than_the_dimension() -> None:
    # A spectrum with a few well separated top eigenvalues and a bulk: 40 steps on P = 300.
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64))
    values = torch.cat([torch.tensor([50.0, 20.0, 10.0]), torch.rand(297, generator=gen)])
    A = (q * values.double()) @ q.T
    res = lf.lanczos(lambda v: A @ v, 300, k=3, iters=40, return_vectors=True)
    assert res.iterations == 40
    torch.testing.assert_close(res.eigenvalues, torch.tensor([50.0, 20.0, 10.0]).double())
    assert res.vectors is not None
    resid = torch.linalg.vector_norm(
        res.vectors @ A - res.eigenvalues[:, None] * res.vectors, dim=1
    )
    torch.testing.assert_close(resid, res.residuals, rtol=1e-6, atol=1e-10)
    # With a residual tolerance it stops as soon as the top 3 have converged.
    early = lf.lanczos(lambda v: A @ v, 300, k=3, iters=40, rtol=1e-6)
    assert early.iterations < 40 and (early.residuals <= 1e-6 * 50).all()
    torch.testing.assert_close(early.eigenvalues, res.eigenvalues, rtol=1e-6, atol=0)


def test_lanczos_refuses_bad_arguments() -> None:
    with pytest.raises(lf.FisherInputError, match="k >= 1"):
        lf.lanczos(lambda v: v, 10, k=0)
    with pytest.raises(lf.FisherInputError, match="more than the dimension"):
        lf.lanczos(lambda v: v, 3, k=4)
    op = lf.FisherOperator(make_case("mlp").model, make_case("mlp").loader)
    with pytest.raises(lf.FisherInputError, match="flat vector"):
        op.matvec(torch.zeros(3, dtype=torch.float64))


def test_slq_density_integrates_to_one_and_its_mean_is_the_trace_over_p() -> None:
    c = make_case("mlp")
    js, zs, _ = c.jacobians()
    F = dense_fisher(js, zs)
    P = F.shape[0]
    starts = 6
    density = lf.spectral_density(c.model, c.loader, starts=starts, iters=40, seed=3)
    assert density.integral() + density.mass_below == pytest.approx(1.0, abs=1e-3)
    # F has rank <= N (C - 1) = 30 of P = 164: most of the spectrum is (numerically) zero.
    assert density.mass_below > 0.5
    # Gauss quadrature is exact for t and t^2: its mean is q^T F q for the same start vectors.
    gen = torch.Generator().manual_seed(3)
    qs = [
        (torch.randint(0, 2, (P,), generator=gen).double() * 2 - 1) / math.sqrt(P)
        for _ in range(starts)
    ]
    exact_mean = sum(float(q @ F @ q) for q in qs) / starts
    assert density.mean == pytest.approx(exact_mean, rel=1e-8)
    second = sum(float((w * t**2).sum()) for t, w in zip(density.nodes, density.weights)) / starts
    assert second == pytest.approx(sum(float(q @ F @ F @ q) for q in qs) / starts, rel=1e-6)
    # ... and an unbiased estimate of tr(F) / P.
    assert abs(density.mean - float(F.trace()) / P) < 4 * density.mean_se
    # The density's first moment in t matches the mean up to the smoothing.
    logt = density.grid.log10()
    first = float(torch.trapezoid(density.density * density.grid, logt))
    shift = math.exp((density.sigma * math.log(10)) ** 2 / 2)  # E[10^(sigma Z)]
    assert first == pytest.approx(density.mean * shift, rel=0.02)


def test_slq_on_a_known_spectrum() -> None:
    values = torch.logspace(-3, 1, 50, dtype=torch.float64)
    nodes, weights = slq_nodes(lambda v: values * v, 50, starts=4, iters=50, seed=0)
    for t, w in zip(nodes, weights):
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(t.sort().values, values, rtol=1e-6, atol=1e-9)
    density = density_from_nodes(nodes, weights, 50, decades=6, sigma=0.05)
    assert density.mass_below == 0.0
    assert density.integral() == pytest.approx(1.0, abs=1e-3)
    # Uniform in log10 over 4 decades: density 1/4 per decade inside the range.
    middle = (density.grid > 1e-2) & (density.grid < 1.0)
    assert density.density[middle].mean() == pytest.approx(0.25, rel=0.05)


def test_spectrum_figure_and_scalars(tmp_path: object) -> None:
    c = make_case("cnn")
    top = lf.top_eigenvalues(c.model, c.loader, k=3)
    density = lf.spectral_density(c.model, c.loader, starts=3, iters=20)
    scalars = spectrum_scalars(top, density)
    assert scalars["spectrum/lambda_1"] == float(top.eigenvalues[0])
    assert scalars["spectrum/slq_mean"] == density.mean
    fig = plot_spectrum(top, density)
    assert len(fig.axes) == 2
    assert fig.axes[1].get_xscale() == "log"
    path = save_png(fig, f"{tmp_path}/spectrum.png")
    with open(path, "rb") as f:
        assert f.read(4) == b"\x89PNG"
