"""Diagnostics statistics and figures (plain torch, no Lightning): what the callback logs is built here."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from conftest import make_case
from PIL import Image

import lightning_fisher as lf
from lightning_fisher.diagnostics import (
    compute_diagnostics,
    empirical_gap,
    fraction_below,
    kernel_summary,
    mean_fisher,
    plot_bounds_history,
    plot_layer_density,
    probe_cv,
    save_png,
    statistics,
)
from lightning_fisher.kernel import kernel_statistics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Keeps the Hutchinson estimators as named, whatever the number of classes.
HUTCHINSON = {"deterministic_bounds_max_classes": 0}


def assert_png(data: bytes) -> tuple[int, int]:
    """The bytes are a PNG that decodes; returns its size."""
    assert data[:8] == PNG_MAGIC
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.width > 100 and img.height > 100
        return img.size


@pytest.fixture(scope="module")
def mlp_case():  # type: ignore[no-untyped-def]
    return make_case("mlp", dtype=torch.float32)


def test_traces_are_estimate_fisher_with_the_same_seeds(mlp_case) -> None:  # type: ignore[no-untyped-def]
    model, loader = mlp_case.model, mlp_case.loader
    res = compute_diagnostics(model, loader, probes=3, max_batches=2, seed=7, **HUTCHINSON)
    for method in ("hutchinson", "hutchinson_upper", "hutchinson_lower"):
        runs = [
            lf.estimate_fisher(model, loader, method, probes=1, seed=7 + i, max_batches=2)
            for i in range(3)
        ]
        want = sum(fd.trace() for fd in runs) / 3
        assert res.values[f"{method}/trace"] == pytest.approx(want, rel=1e-6)
        assert res.fishers[method].options["probes"] == 3
        for name in runs[0]:
            torch.testing.assert_close(
                res.fishers[method][name], torch.stack([fd[name] for fd in runs]).mean(0)
            )
    emp = lf.estimate_fisher(model, loader, "empirical", max_batches=2)
    assert res.values["empirical/trace"] == pytest.approx(emp.trace(), rel=1e-6)
    # Per-layer scalars add up to the global trace, and name every layer.
    scalars = res.scalars("fisher")
    layers = {name.rsplit(".", 1)[0] for name in dict(model.named_parameters())}
    for method in res.fishers:
        per_layer = [scalars[f"fisher/{method}/trace/{layer}"] for layer in layers]
        assert sum(per_layer) == pytest.approx(scalars[f"fisher/{method}/trace"], rel=1e-5)
    assert {f"fisher/frac_below/{layer}" for layer in layers} <= set(scalars)
    # The same seed gives the same numbers; another seed other probes.
    again = compute_diagnostics(model, loader, probes=3, max_batches=2, seed=7, **HUTCHINSON)
    assert again.values == res.values
    other = compute_diagnostics(model, loader, probes=3, max_batches=2, seed=8, **HUTCHINSON)
    assert other.values["hutchinson/trace"] != res.values["hutchinson/trace"]


def test_bound_ratios_order_the_exact_fisher(mlp_case) -> None:  # type: ignore[no-untyped-def]
    """With F exact and enough probes the estimated bounds sit on their side of F."""
    res = compute_diagnostics(
        mlp_case.model,
        mlp_case.loader,
        ("exact", "hutchinson_upper", "hutchinson_lower", "empirical"),
        probes=16,
        max_batches=None,
        **HUTCHINSON,
    )
    assert res.reference == "exact"
    exact = lf.estimate_fisher(mlp_case.model, mlp_case.loader, "exact")
    assert res.values["exact/trace"] == pytest.approx(exact.trace(), rel=1e-6)
    assert 0 < res.values["bounds/lower_over_f"] < 1
    assert 0 < res.values["bounds/f_over_upper"] < 1
    assert (
        res.values["hutchinson_lower/trace"]
        <= res.values["exact/trace"]
        <= res.values["hutchinson_upper/trace"]
    )


def test_two_classes_lower_bound_equals_fisher() -> None:
    """For C = 2, I(p) has rank 1, so the lower bound is F itself: the ratio tends to 1."""
    case = make_case("mlp", dtype=torch.float32, n_classes=2)
    res = compute_diagnostics(
        case.model,
        case.loader,
        ("exact", "hutchinson_lower"),
        probes=64,
        max_batches=None,
        kernel=False,
        **HUTCHINSON,
    )
    assert res.values["bounds/lower_over_f"] == pytest.approx(1.0, abs=0.1)


def test_kernel_summary_is_the_mean_of_kernel_statistics(mlp_case, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, loader = mlp_case.model, mlp_case.loader
    summary = kernel_summary(model, loader, max_batches=2)
    batches = list(loader)[:2]
    with torch.no_grad():
        p = torch.softmax(torch.cat([model(x) for x, _ in batches]).double(), -1)
    stats = kernel_statistics(p)
    assert summary["n_inputs"] == p.shape[0]
    for key in ("lambda_max", "trace", "one_minus_pmax", "lambda_max_lower", "lambda_max_upper"):
        assert summary[key] == pytest.approx(float(stats[key].mean()), rel=1e-9)
    assert 0 < summary["lower_over_lambda_max"] <= 1
    assert 0 < summary["lambda_max_over_upper"] <= 1
    # Rows are processed in chunks (large vocabularies); chunking changes nothing.
    monkeypatch.setattr(statistics, "KERNEL_CHUNK_ELEMENTS", 3 * p.shape[-1])
    chunked = kernel_summary(model, loader, max_batches=2)
    assert chunked == pytest.approx(summary, rel=1e-12)


def test_kernel_statistics_of_the_shared_pass_equal_kernel_summary(mlp_case) -> None:  # type: ignore[no-untyped-def]
    """compute_diagnostics takes p from the Fisher pass's forward, not from a forward of its own."""
    res = compute_diagnostics(mlp_case.model, mlp_case.loader, probes=2, max_batches=2)
    summary = kernel_summary(mlp_case.model, mlp_case.loader, max_batches=2)
    for key, value in summary.items():
        if key != "n_inputs":
            assert res.values[f"kernel/{key}"] == pytest.approx(value, rel=1e-12)


def test_passes_leave_the_model_as_they_found_it(mlp_case) -> None:  # type: ignore[no-untyped-def]
    model = mlp_case.model
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compute_diagnostics(model, mlp_case.loader, probes=2)
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_probe_cv_is_std_over_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    fds = [
        lf.FisherDiagonal({"w": torch.rand(5, 3, generator=gen), "b": torch.rand(3, generator=gen)})
        for _ in range(4)
    ]
    fds[0]._tensors["b"][0] = 0.0
    stack = torch.stack([fd.flatten() for fd in fds]).double()
    cv = stack.std(0) / stack.mean(0)
    traces = stack.sum(1)
    got = probe_cv(fds)
    assert got["cv"] == pytest.approx(float(cv.mean()), rel=1e-5)
    assert got["cv_max"] == pytest.approx(float(cv.max()), rel=1e-5)
    assert got["cv_trace"] == pytest.approx(float(traces.std() / traces.mean()), rel=1e-9)
    assert probe_cv([fds[0], fds[0]])["cv"] == 0.0
    # Given the traces and the mean (as compute_diagnostics does), and for P = 2 (closed form).
    for group in (fds, fds[:3], fds[:2]):
        want = probe_cv(group)
        given = probe_cv(group, [fd.trace() for fd in group], mean_fisher(group))
        assert given == pytest.approx(want, rel=1e-6)
        stack = torch.stack([fd.flatten() for fd in group]).double()
        cv = (stack.std(0) / stack.mean(0)).nan_to_num(0.0)
        assert want["cv"] == pytest.approx(float(cv.sum() / (stack.mean(0) > 0).sum()), rel=1e-5)
        assert want["cv_max"] == pytest.approx(float(cv.max()), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        probe_cv(fds[:1])


def test_rademacher_cv_respects_sqrt2_on_one_input() -> None:
    """One input, one batch: each entry's CV over many Rademacher probes is at most sqrt(2)."""
    case = make_case("mlp", dtype=torch.float64)
    x, y = next(iter(case.loader))
    one = [(x[:1], y[:1])]
    res = compute_diagnostics(
        case.model, one, ("hutchinson",), probes=400, kernel=False, **HUTCHINSON
    )
    assert 0.3 < res.values["hutchinson/cv"] <= 2**0.5 * 1.05


def test_fraction_below_and_empirical_gap() -> None:
    fd = lf.FisherDiagonal(
        {
            "a.weight": torch.tensor([0.0, 1e-7, 1e-3, 2.0]),
            "a.bias": torch.tensor([1e-6]),
            "b.weight": torch.ones(3),
        }
    )
    frac = fraction_below(fd, 1e-5)
    assert frac["a"] == pytest.approx(3 / 5) and frac["b"] == 0.0
    assert fraction_below(fd, 3.0) == {"a": 1.0, "b": 1.0}
    assert empirical_gap(fd, fd) == {"rel_gap": 0.0, "trace_ratio": 1.0}
    doubled = empirical_gap(fd * 2.0, fd)
    assert doubled["rel_gap"] == pytest.approx(1.0) and doubled["trace_ratio"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="different parameters"):
        empirical_gap(lf.FisherDiagonal({"a.weight": torch.ones(2)}), fd)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"methods": ("hutchinson", "fisher_magic")}, "fisher_magic"),
        ({"methods": ()}, "empty"),
        ({"probes": 0}, "probes"),
        ({"max_batches": 0}, "max_batches"),
    ],
)
def test_bad_arguments_raise_clear_errors(mlp_case, kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        compute_diagnostics(mlp_case.model, mlp_case.loader, **kwargs)


def test_layer_density_figure(tmp_path, mlp_case) -> None:  # type: ignore[no-untyped-def]
    fd = lf.estimate_fisher(mlp_case.model, mlp_case.loader, "exact")
    fd._tensors["0.bias"].zero_()  # a layer with zero entries is drawn and labelled, not dropped
    fig = plot_layer_density(fd, threshold=1e-5)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert len(labels) == len(fd.layer_traces()) + 1  # one curve a layer, plus the threshold
    assert any("zero" in label for label in labels if label.startswith("0 "))
    assert "exact" in ax.get_title() and "log10" in ax.get_xlabel()
    path = save_png(fig, tmp_path / "sub" / "density.png")
    assert_png(Path(path).read_bytes())
    zero = plot_layer_density(lf.FisherDiagonal({"w": torch.zeros(3)}))
    assert_png(_png_bytes(zero))


def test_bounds_figure(tmp_path, mlp_case) -> None:  # type: ignore[no-untyped-def]
    history = [
        {
            "step": float(s),
            **compute_diagnostics(
                mlp_case.model, mlp_case.loader, probes=2, seed=s, **HUTCHINSON
            ).values,
        }
        for s in range(3)
    ]
    fig = plot_bounds_history(history)
    left, right = fig.axes
    assert {"F  (hutchinson)", "empirical Fisher"} <= {
        line.get_label() for line in left.get_lines()
    }
    assert {"tr(lower) / tr(F)", "tr(F) / tr(upper)"} <= {
        line.get_label() for line in right.get_lines()
    }
    assert list(left.get_lines()[0].get_xdata()) == [0.0, 1.0, 2.0]
    assert_png(Path(save_png(fig, tmp_path / "bounds.png")).read_bytes())
    assert_png(_png_bytes(plot_bounds_history(history[:1])))


def _png_bytes(fig) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_every_method_sees_the_same_batches_of_a_shuffling_loader(mlp_case) -> None:  # type: ignore[no-untyped-def]
    """The loader is iterated once per evaluation, so a shuffling loader cannot give the bounds and
    F different data."""
    x, y = mlp_case.loader.dataset.tensors
    shuffled = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(3),
    )
    first = [
        next(
            iter(
                torch.utils.data.DataLoader(
                    shuffled.dataset,
                    batch_size=4,
                    shuffle=True,
                    generator=torch.Generator().manual_seed(3),
                )
            )
        )
    ]
    res = compute_diagnostics(mlp_case.model, shuffled, ("exact", "empirical"), max_batches=1)
    for method in ("exact", "empirical"):
        want = lf.estimate_fisher(mlp_case.model, first, method)
        assert res.values[f"{method}/trace"] == pytest.approx(want.trace(), rel=1e-6)


def test_deterministic_bounds_below_the_class_limit(mlp_case) -> None:  # type: ignore[no-untyped-def]
    """With C <= the limit the default methods run as exact, upper and lower: the values are
    estimate_fisher's, the order holds entry by entry and the certificate is logged."""
    model, loader = mlp_case.model, mlp_case.loader
    res = compute_diagnostics(model, loader, probes=3, max_batches=2)
    assert set(res.fishers) == {"exact", "upper", "lower", "empirical"}
    assert res.reference == "exact"
    v = res.values
    assert v["n_classes"] == 4 and v["bounds/deterministic"] == 1.0
    upper, f, lower = lf.estimate_fishers(
        model, loader, ["upper", "exact", {"method": "lower", "rank": 1}], max_batches=2
    )
    for method, want in (("upper", upper), ("exact", f), ("lower", lower)):
        assert v[f"{method}/trace"] == pytest.approx(want.trace(), rel=1e-6)
    assert v["lower/trace"] <= v["exact/trace"] <= v["upper/trace"]
    assert v["bounds/order_violations"] == 0.0
    assert 0 < v["bounds/lower_over_f"] <= 1 and 0 < v["bounds/f_over_upper"] <= 1
    assert lower.certificate is not None
    for key in ("tail_eigen_mass", "kernel_gap_fraction", "tail_eigenvalue_max"):
        assert v[f"certificate/{key}"] == pytest.approx(lower.certificate[key], rel=1e-9)
    assert not any(k.startswith("hutchinson") for k in v)
    assert "bounds/lower_over_f_se" not in v  # nothing stochastic, no standard error
    # rank 2 keeps more of I(p): a tighter lower bound, still below F.
    two = compute_diagnostics(model, loader, ("hutchinson_lower", "exact"), rank=2, max_batches=2)
    assert v["bounds/lower_over_f"] < two.values["bounds/lower_over_f"] <= 1
    assert two.values["certificate/rank"] == 2.0

    # One class above the limit: the Hutchinson estimates, with standard errors over probes.
    above = compute_diagnostics(
        model, loader, probes=3, max_batches=2, deterministic_bounds_max_classes=3
    )
    assert set(above.fishers) == {"hutchinson", "hutchinson_upper", "hutchinson_lower", "empirical"}
    assert above.values["bounds/deterministic"] == 0.0
    for method in ("hutchinson", "hutchinson_upper", "hutchinson_lower"):
        runs = [
            lf.estimate_fisher(model, loader, method, probes=1, seed=i, max_batches=2).trace()
            for i in range(3)
        ]
        want_se = float(torch.tensor(runs, dtype=torch.float64).std()) / 3**0.5
        assert above.values[f"{method}/trace_se"] == pytest.approx(want_se, rel=1e-5)
    r, a, b = (
        above.values[k]
        for k in ("bounds/lower_over_f", "hutchinson_lower/trace", "hutchinson/trace")
    )
    sa, sb = above.values["hutchinson_lower/trace_se"], above.values["hutchinson/trace_se"]
    assert above.values["bounds/lower_over_f_se"] == pytest.approx(
        r * ((sa / a) ** 2 + (sb / b) ** 2) ** 0.5, rel=1e-9
    )


def test_two_classes_deterministic_lower_over_f_is_one() -> None:
    """For C = 2 the deterministic rank-1 lower bound is F: the logged ratio is 1 to rounding."""
    case = make_case("mlp", dtype=torch.float32, n_classes=2)
    res = compute_diagnostics(case.model, case.loader, max_batches=None)
    assert res.values["bounds/deterministic"] == 1.0
    assert res.values["bounds/lower_over_f"] == pytest.approx(1.0, abs=1e-5)
    assert res.values["bounds/lower_f_rel_diff"] < 1e-4
    assert res.values["certificate/exact"] == 1.0
    assert res.values["bounds/order_violations"] == 0.0


def test_spectrum_options_match_a_dense_eigendecomposition() -> None:
    from reference import dense_fisher

    case = make_case("mlp")  # float64
    js, zs, _ = case.jacobians()
    F = dense_fisher(js, zs)
    want = torch.linalg.eigvalsh(F).flip(0)
    res = compute_diagnostics(
        case.model,
        case.loader,
        ("exact",),
        max_batches=None,
        kernel=False,
        eigenvalues=3,
        density=True,
        slq_starts=6,
        slq_iters=40,  # more than rank(F) + 1: the quadrature resolves the zero eigenvalue
    )
    got = torch.tensor([res.values[f"eig_{i}"] for i in (1, 2, 3)], dtype=torch.float64)
    torch.testing.assert_close(got, want[:3], rtol=1e-8, atol=1e-12 * float(want[0]))
    assert res.spectrum is not None and res.values["eig_iterations"] >= 3
    assert all(res.values[f"eig_residual_{i}"] <= 1e-6 * float(want[0]) for i in (1, 2, 3))
    # SLQ's mean is an unbiased estimate of tr(F) / P: within a few standard errors of it.
    assert res.density is not None
    tr = float(F.trace())
    assert res.values["exact/trace"] == pytest.approx(tr, rel=1e-8)
    se = res.values["spectral_mean_se"] * F.shape[0]
    assert abs(res.values["spectral_trace"] - tr) <= 4 * se
    assert 0 < res.values["spectral_mass_below"] < 1  # F has rank at most N (C - 1) < P
    off = compute_diagnostics(case.model, case.loader, ("exact",), kernel=False)
    assert off.spectrum is None and not any(k.startswith(("eig_", "spectral_")) for k in off.values)


def test_bounds_figure_says_when_the_order_is_broken() -> None:
    from lightning_fisher.diagnostics.figures import order_breaks

    def row(step: int, lower: float, f: float, upper: float, se: float) -> dict[str, float]:
        return {
            "step": float(step),
            "hutchinson_lower/trace": lower,
            "hutchinson/trace": f,
            "hutchinson_upper/trace": upper,
            "hutchinson_lower/trace_se": se,
            "hutchinson/trace_se": se,
            "hutchinson_upper/trace_se": se,
            "bounds/lower_over_f": lower / f,
            "bounds/lower_over_f_se": 0.05,
            "bounds/deterministic": 0.0,
        }

    history = [
        row(0, 1.0, 2.0, 3.0, 0.1),  # ordered
        row(1, 2.1, 2.0, 3.0, 0.1),  # lower above F by 0.1 < 2 s.e. (0.28)
        row(2, 3.0, 2.0, 3.5, 0.1),  # lower above F by 1.0: beyond 2 s.e.
        row(3, 1.0, 2.0, 1.9, 0.1),  # F above upper by 0.1: noise
    ]
    breaks = order_breaks(history)
    assert breaks == {
        "noise": [(1, "lower"), (3, "upper")],
        "beyond": [(2, "lower")],
        "unknown": [],
    }
    fig = plot_bounds_history(history)
    left, right = fig.axes
    labels = {line.get_label() for line in left.get_lines()}
    assert {"order broken, within 2 s.e.", "order broken, beyond 2 s.e."} <= labels
    note = left.get_legend().get_title().get_text()
    assert "Hutchinson" in note and "broken" in note
    assert "2 within 2 s.e. (probe noise)" in note and "1 beyond 2 s.e." in note
    assert len(left.collections) >= 4 and len(right.collections) >= 1  # the +-2 s.e. bands
    # Deterministic bounds: no band, no marker, and the note says the order holds.
    det = [
        {
            "step": 0.0,
            "lower/trace": 1.0,
            "exact/trace": 1.0,
            "upper/trace": 2.0,
            "bounds/deterministic": 1.0,
        }
    ]
    assert order_breaks(det) == {"noise": [], "beyond": [], "unknown": []}
    left = plot_bounds_history(det).axes[0]
    note = left.get_legend().get_title().get_text()
    assert "deterministic" in note and "lower <= F <= upper at every evaluation" in note
    assert "F  (exact)" in {line.get_label() for line in left.get_lines()}
