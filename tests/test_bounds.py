"""Deterministic bounds: ``upper`` and ``lower`` against a dense reference, the order
lower <= F <= upper, two classes, and the certificate of ``lower``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import Case, make_case
from reference import dense_fisher, per_input_jacobians, unflatten
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fisher as lf
from lightning_fisher.diagnostics import (
    certificate_scalars,
    lower_gap_bound,
    lower_relative_difference,
    order_violations,
)
from lightning_fisher.estimators.lower import kernel_spectrum


def assert_close(fd: lf.FisherDiagonal, model: nn.Module, flat_ref: torch.Tensor) -> None:
    ref = unflatten(model, flat_ref)
    assert set(fd) == set(ref)
    for name, want in ref.items():
        err = (fd[name].double() - want).abs().max() / want.abs().max().clamp_min(1e-12)
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_upper_matches_dense_reference(case: Case) -> None:
    js, zs, _ = case.jacobians()
    fd = lf.estimate_fisher(case.model, case.loader, method="upper")
    assert fd.method == "upper" and fd.n_samples == len(js) and fd.certificate is None
    assert_close(fd, case.model, dense_fisher(js, zs, "dg").diagonal())


@pytest.mark.parametrize("k", [1, 2, "C-1"])
def test_lower_matches_dense_reference(case: Case, k: Any) -> None:
    js, zs, _ = case.jacobians()
    C = zs[0].numel()
    rank = C - 1 if k == "C-1" else k
    fd = lf.estimate_fisher(case.model, case.loader, method="lower", rank=rank)
    assert fd.method == "lower" and fd.options["rank"] == rank
    assert_close(fd, case.model, dense_fisher(js, zs, "lr", rank).diagonal())
    assert fd.certificate is not None and fd.certificate["exact"] == (rank == C - 1)


def test_lower_of_rank_c_minus_1_or_more_is_exact() -> None:
    c = make_case("mlp")  # C = 4
    exact, *lowers = lf.estimate_fishers(
        c.model, c.loader, ["exact", {"method": "lower", "rank": 3}, {"method": "lower", "rank": 9}]
    )
    for fd in lowers:
        for name in exact:
            torch.testing.assert_close(fd[name], exact[name], rtol=1e-6, atol=0)
        assert fd.certificate is not None and fd.certificate["tail_eigen_mass"] == 0.0


@pytest.mark.parametrize("name", ["mlp", "transformer_tokens"])
def test_two_classes_make_rank_1_exact(name: str) -> None:
    c = make_case(name, n_classes=2)
    exact, lower, upper = lf.estimate_fishers(c.model, c.loader, ["exact", "lower", "upper"])
    assert lower_relative_difference(lower, exact) < 1e-6
    assert lower.certificate is not None and lower.certificate["exact"] is True
    assert lower.certificate["kernel_gap_fraction"] == 0.0
    # The upper bound is not tight with two classes: it keeps (1/N) sum_x (J^T p)^2.
    assert upper.trace() > exact.trace() * (1 + 1e-3)


def random_case(seed: int, dtype: torch.dtype) -> tuple[nn.Module, DataLoader, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    C = [2, 3, 5, 7][seed % 4]
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C))
    torch.manual_seed(seed)
    scale = 0.3 + 2.0 * torch.rand(1, generator=gen).item()  # from flat to peaked p
    for p in model.parameters():
        nn.init.normal_(p, std=scale)
    model = model.to(dtype)
    x = torch.randn(12, 4, generator=gen, dtype=dtype)
    y = torch.randint(0, C, (12,), generator=gen)
    return model, DataLoader(TensorDataset(x, y), batch_size=5), [{"x": x, "y": y}]


@pytest.mark.parametrize("seed", range(8))
def test_lower_below_f_below_upper_entrywise(seed: int) -> None:
    model, loader, _ = random_case(seed, torch.float32)
    C = model[-1].out_features
    specs: list[Any] = ["upper", "exact"] + [{"method": "lower", "rank": k} for k in range(1, C)]
    upper, exact, *lowers = lf.estimate_fishers(model, loader, specs)
    for lower in lowers:
        assert order_violations(upper, exact, lower) == {"upper": 0, "lower": 0, "total": 0}
    # The ranks are nested: a larger k drops less of I(p).
    for small, large in itertools.pairwise(lowers):
        assert order_violations(exact, large, small)["total"] == 0


def test_order_violations_counts_broken_entries() -> None:
    f = {"w": torch.tensor([1.0, 2.0, 3.0])}
    upper = {"w": torch.tensor([1.0, 1.5, 3.0])}  # one entry below F
    lower = {"w": torch.tensor([1.2, 2.0, 2.0])}  # one entry above F
    assert order_violations(upper, f, lower) == {"upper": 1, "lower": 1, "total": 2}


def gram_and_tails(
    js: list[torch.Tensor], zs: list[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Dense Gamma = (1/N) sum_x J^T Pi J, the bound (1/N) sum_x tau_k ||Pi J||_2^2 on the trace
    gap, and the certificate's numbers recomputed by eigvalsh."""
    C = zs[0].numel()
    pi = torch.eye(C, dtype=torch.float64) - 1.0 / C
    gram = sum(j.T @ pi @ j for j in js) / len(js)
    trace_bound = torch.zeros((), dtype=torch.float64)
    tails, nexts, traces, kept = [], [], [], []
    for j, z in zip(js, zs):
        p = torch.softmax(z, -1)
        lam = torch.linalg.eigvalsh(torch.diag(p) - torch.outer(p, p)).flip(0).clamp_min(0)
        tau = lam[k:].sum()
        trace_bound += tau * torch.linalg.matrix_norm(pi @ j, 2) ** 2
        tails.append(tau)
        nexts.append(lam[k])
        traces.append(1 - (p * p).sum())
        kept.append(lam[:k].sum())
    want = {
        "tail_eigen_mass": float(torch.stack(tails).mean()),
        "tail_eigen_mass_max": float(torch.stack(tails).max()),
        "tail_eigenvalue_max": float(torch.stack(nexts).max()),
        "tail_eigenvalue_mean": float(torch.stack(nexts).mean()),
        "kernel_trace": float(torch.stack(traces).mean()),
        "kernel_trace_lower": float(torch.stack(kept).mean()),
    }
    return gram, trace_bound / len(js), want


@pytest.mark.parametrize("seed", range(8))
def test_certificate_holds_on_random_models(seed: int) -> None:
    model, loader, refs = random_case(seed, torch.float64)
    js, zs, _ = per_input_jacobians(model, lambda f, r: f(r["x"]), refs)
    C = zs[0].numel()
    for k in range(1, C):
        upper, lower = lf.estimate_fishers(model, loader, ["upper", {"method": "lower", "rank": k}])
        cert = lower.certificate
        assert cert is not None and cert["rank"] == k and cert["n_inputs"] == len(js)
        F = dense_fisher(js, zs)
        gram, trace_bound, want = gram_and_tails(js, zs, k)
        if k == C - 1:  # no tail: the certificate says L = F, and it is
            assert cert["exact"] and cert["tail_eigen_mass"] == 0.0
            assert cert["tail_eigenvalue_max"] == 0.0
        else:
            for key, value in want.items():
                assert cert[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert cert["tail_eigen_mass"] == pytest.approx(
            cert["kernel_trace"] - cert["kernel_trace_lower"], abs=1e-12
        )
        gap = F.diagonal() - lower.flatten().double()
        tol = 1e-6 * F.diagonal().max()
        # Entrywise: 0 <= F_i - L_i <= c Gamma_ii (also with the upper bound's U - L).
        bound = lower_gap_bound(lower, unflatten(model, gram.diagonal()), upper)
        assert (gap >= -tol).all()
        assert (gap <= bound.flatten().double() + tol).all()
        assert (gap <= cert["tail_eigenvalue_max"] * gram.diagonal() + tol).all()
        # Trace: tr(F - L) <= (1/N) sum_x tau_k(x) ||Pi J_x||_2^2.
        assert gap.sum() <= trace_bound + tol
        # Loewner: F - L_dense <= c Gamma as matrices (the statement the entrywise one follows from).
        L_dense = dense_fisher(js, zs, "lr", k)
        slack = cert["tail_eigenvalue_max"] * gram - (F - L_dense)
        assert torch.linalg.eigvalsh(slack).min() >= -1e-10 * F.abs().max()


def test_certificate_is_saved_loaded_and_dropped_by_arithmetic(tmp_path: Any) -> None:
    c = make_case("cnn")
    fd = lf.estimate_fisher(c.model, c.loader, method="lower", rank=1)
    cert = fd.certificate
    assert cert is not None and 0 < cert["kernel_gap_fraction"] < 1 and not cert["exact"]
    fd.save(tmp_path / "lower.safetensors")
    back = lf.FisherDiagonal.load(tmp_path / "lower.safetensors")
    assert back.certificate == cert and back.method == "lower"
    state = lf.FisherDiagonal.from_state_dict(fd.state_dict())
    assert state.certificate == cert
    assert fd.to(torch.float32).certificate == cert
    assert fd.scale(2.0).certificate is None and (fd + fd).certificate is None
    plain = lf.estimate_fisher(c.model, c.loader, method="exact")
    plain.save(tmp_path / "exact.safetensors")
    assert lf.FisherDiagonal.load(tmp_path / "exact.safetensors").certificate is None
    scalars = certificate_scalars(fd)
    assert scalars["certificate/tail_eigen_mass"] == cert["tail_eigen_mass"]
    assert scalars["certificate/exact"] == 0.0 and certificate_scalars(plain) == {}


class NeverIterated:
    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("the loader must not be touched when the options are invalid")


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "2"])
def test_lower_refuses_a_bad_rank_before_the_pass(rank: Any) -> None:
    with pytest.raises(lf.FisherInputError, match="rank k >= 1"):
        lf.estimate_fisher(make_case("mlp").model, NeverIterated(), method="lower", rank=rank)


def test_upper_refuses_too_many_classes_unless_allowed() -> None:
    c = make_case("mlp")  # C = 4
    with pytest.raises(lf.FisherInputError, match="`upper` needs one backward column per class"):
        lf.estimate_fisher(c.model, c.loader, method="upper", exact_max_classes=3)
    assert lf.estimate_fisher(c.model, c.loader, method="upper", exact_max_classes=4).trace() > 0


def test_rank_1_spectrum_by_the_secular_equation_matches_eigh() -> None:
    gen = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(40, 30, generator=gen, dtype=torch.float64) * 3, -1)
    p[0] = 0.0
    p[0, :2] = 0.5  # a tie at the top: the secular route hands this row to eigh
    p[1] = torch.full((30,), 1 / 30, dtype=torch.float64)  # all equal
    for q in (p, p.float()):
        got = kernel_spectrum(q, 1, "auto")
        want = kernel_spectrum(q, 1, "eigh")
        tol = 1e-12 if q.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=tol)
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=tol)
        # Eigenvectors up to sign (and within the eigenspace of a tie): compare v v^T lambda.
        outer = [vals[..., None] * vecs @ vecs.transpose(-1, -2) for vals, vecs, _ in (got, want)]
        torch.testing.assert_close(outer[0], outer[1], rtol=0, atol=10 * tol)


def test_lower_by_power_iteration_matches_eigh_for_many_classes() -> None:
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 70)).double()
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64) * 2
    loader = DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=3)
    for k in (1, 2):
        power = lf.estimate_fisher(model, loader, method="lower", rank=k, eigen_method="power")
        eigh = lf.estimate_fisher(model, loader, method="lower", rank=k, eigen_method="eigh")
        auto = lf.estimate_fisher(model, loader, method="lower", rank=k)  # k = 1: secular
        for name in eigh:
            torch.testing.assert_close(power[name], eigh[name], rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(auto[name], eigh[name], rtol=1e-5, atol=1e-9)
        assert power.certificate is not None and eigh.certificate is not None
        assert power.certificate["tail_eigen_mass"] == pytest.approx(
            eigh.certificate["tail_eigen_mass"], rel=1e-6
        )
