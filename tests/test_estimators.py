"""Every deterministic estimator equals its formula on a brute-force dense Fisher."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Case, make_case
from reference import dense_fisher, per_label_grads, unflatten
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import lightning_fisher as lf


def assert_matches(
    fd: lf.FisherDiagonal, model: torch.nn.Module, flat_ref: torch.Tensor, rtol: float = 1e-5
) -> None:
    ref = unflatten(model, flat_ref)
    assert set(fd) == set(ref)
    for name, want in ref.items():
        got = fd[name].double()
        assert got.dtype == torch.float64 and fd[name].dtype == torch.float32
        scale = want.abs().max().clamp_min(1e-12)
        err = (got - want).abs().max() / scale
        assert err < rtol, f"{name}: relative error {err:.2e}"


def test_exact_matches_dense_reference(case: Case) -> None:
    js, zs, _ = case.jacobians()
    fd = lf.estimate_fisher(case.model, case.loader, method="exact")
    assert fd.n_samples == len(js) and fd.method == "exact"
    assert_matches(fd, case.model, dense_fisher(js, zs).diagonal())


def test_empirical_matches_dense_reference(case: Case) -> None:
    js, zs, ys = case.jacobians()
    fd = lf.estimate_fisher(case.model, case.loader, method="empirical")
    g = per_label_grads(js, zs, ys)  # type: ignore[arg-type]
    assert_matches(fd, case.model, g.pow(2).mean(0))


def test_batched_is_mean_of_squared_batch_mean_gradients() -> None:
    c = make_case("mlp")
    js, zs, ys = c.jacobians()
    g = per_label_grads(js, zs, ys)  # type: ignore[arg-type]
    sizes = [len(b[1]) for b in c.loader]
    chunks = torch.split(g, sizes)
    want = torch.stack([ch.mean(0).pow(2) for ch in chunks]).mean(0)
    fd = lf.estimate_fisher(c.model, c.loader, method="batched")
    assert_matches(fd, c.model, want)


@pytest.mark.parametrize("k", [1, 3])
def test_sample_matches_reference_with_the_same_draws(k: int) -> None:
    c = make_case("cnn", dtype=torch.float32)
    js, zs, _ = c.jacobians()
    gen = torch.Generator().manual_seed(5)
    draws = []
    with torch.no_grad():
        c.model.eval()
        for x, _ in c.loader:
            p = torch.softmax(c.model(x).float(), -1)
            draws.append(torch.multinomial(p, k, replacement=True, generator=gen))
    draws_t = torch.cat(draws)
    want = sum(per_label_grads(js, zs, draws_t[:, j].tolist()).pow(2).sum(0) for j in range(k)) / (
        k * len(js)
    )
    fd = lf.estimate_fisher(c.model, c.loader, method="sample", mc_samples=k, seed=5)
    assert_matches(fd, c.model, want, rtol=2e-5)


def test_sample_converges_to_exact() -> None:
    c = make_case("mlp")
    exact = lf.estimate_fisher(c.model, c.loader, method="exact").flatten()
    est = lf.estimate_fisher(c.model, c.loader, method="sample", mc_samples=4000, seed=3).flatten()
    rel = (est - exact).norm() / exact.norm()
    assert rel < 0.05


def test_exact_n_uses_n_random_inputs() -> None:
    c = make_case("mlp")
    js, zs, _ = c.jacobians()
    fd = lf.estimate_fisher(c.model, c.loader, method="exact", max_samples=5, seed=2)
    assert fd.n_samples == 5 and fd.options["max_samples"] == 5
    idx = torch.randperm(10, generator=torch.Generator().manual_seed(2))[:5].tolist()
    assert_matches(fd, c.model, dense_fisher([js[i] for i in idx], [zs[i] for i in idx]).diagonal())


def test_max_samples_larger_than_data_uses_all_with_a_warning() -> None:
    c = make_case("mlp")
    full = lf.estimate_fisher(c.model, c.loader, method="exact")
    with pytest.warns(UserWarning, match="larger than the data"):
        fd = lf.estimate_fisher(c.model, iter(list(c.loader)), method="exact", max_samples=50)
    assert fd.n_samples == 10
    torch.testing.assert_close(fd.flatten(), full.flatten())


def test_active_classes_restrict_the_softmax() -> None:
    c = make_case("mlp", n_classes=6)
    head = [2, 3]
    x, y = c.ref_batches[0]["x"], c.ref_batches[0]["y"]
    y = torch.tensor([2, 3] * 5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    js, zs, _ = make_case("mlp", n_classes=6).jacobians()
    js = [j[head] for j in js]
    zs = [z[head] for z in zs]
    fd = lf.estimate_fisher(c.model, loader, method="exact", classes=head)
    assert_matches(fd, c.model, dense_fisher(js, zs).diagonal())
    emp = lf.estimate_fisher(c.model, loader, method="empirical", classes=head)
    assert_matches(
        emp, c.model, per_label_grads(js, zs, [h - 2 for h in y.tolist()]).pow(2).mean(0)
    )
    with pytest.raises(lf.FisherInputError, match="outside the active classes"):
        lf.estimate_fisher(c.model, loader, method="empirical", classes=[0, 1])


def test_pass_restores_modes_and_keeps_batchnorm_statistics() -> None:
    c = make_case("cnn")
    c.model.train()
    c.model.bn.eval()  # a frozen BatchNorm inside a training model keeps its own mode
    stats = (
        c.model.bn.running_mean.clone(),
        c.model.bn.running_var.clone(),
        int(c.model.bn.num_batches_tracked),
    )
    for method in ("exact", "hutchinson"):
        lf.estimate_fisher(c.model, c.loader, method=method)
    assert c.model.training and c.model.conv.training and not c.model.bn.training
    assert torch.equal(c.model.bn.running_mean, stats[0]) and torch.equal(
        c.model.bn.running_var, stats[1]
    )
    assert int(c.model.bn.num_batches_tracked) == stats[2]


def test_only_trainable_parameters_and_filter() -> None:
    c = make_case("mlp")
    c.model[0].weight.requires_grad_(False)
    full = lf.estimate_fisher(c.model, c.loader)
    assert "0.weight" not in full and "0.bias" in full
    only = lf.estimate_fisher(c.model, c.loader, param_filter=lambda n: n.startswith("4."))
    assert set(only) == {"4.weight", "4.bias"}
    torch.testing.assert_close(only["4.weight"], full["4.weight"])


def test_chunking_under_a_memory_cap_gives_the_same_result(case: Case) -> None:
    big = lf.estimate_fisher(case.model, case.loader, method="exact")
    small = lf.estimate_fisher(case.model, case.loader, method="exact", max_memory_mib=1e-3)
    torch.testing.assert_close(small.flatten(), big.flatten(), rtol=1e-6, atol=1e-9)


def test_tied_and_reused_weights() -> None:
    """A weight used twice has its per-input gradients summed before squaring."""

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(7, 4)
            self.mix = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.emb(ids).mean(1)
            return self.out(torch.tanh(self.mix(torch.tanh(self.mix(h)))))

    torch.manual_seed(0)
    model = Tied().double()
    ids = torch.randint(0, 7, (5, 3))
    y = torch.randint(0, 7, (5,))
    js, zs, ys = per_input_jacobians_for(model, ids, y)
    fd = lf.estimate_fisher(model, [(ids, y)], method="exact")
    assert_matches(fd, model, dense_fisher(js, zs).diagonal())
    emp = lf.estimate_fisher(model, [(ids, y)], method="empirical")
    assert_matches(emp, model, per_label_grads(js, zs, ys).pow(2).mean(0))


def per_input_jacobians_for(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    from reference import per_input_jacobians

    return per_input_jacobians(model, lambda f, r: f(r["x"]), [{"x": x, "y": y}])


def test_low_precision_models_accumulate_in_float32() -> None:
    c = make_case("mlp", dtype=torch.float32)
    ref = lf.estimate_fisher(c.model, c.loader, method="exact")
    model16 = make_case("mlp", dtype=torch.bfloat16).model
    loader16 = [(x.bfloat16(), y) for x, y in c.loader]
    fd = lf.estimate_fisher(model16, loader16, method="exact")
    assert all(t.dtype == torch.float32 for t in fd.values())
    rel = (fd.flatten() - ref.flatten()).norm() / ref.flatten().norm()
    assert rel < 0.05  # bf16 forward/backward, float32 accumulation


def test_one_pass_for_several_methods_equals_separate_passes() -> None:
    """estimate_fishers shares the forwards only: every result equals its own estimate_fisher
    (bitwise under the same attention backend; a one-probe pass alone keeps the fused kernel,
    which agrees to rounding)."""
    c = make_case("transformer_tokens")
    specs = [
        "exact",
        "empirical",
        {"method": "hutchinson", "seed": 3},
        {"method": "hutchinson", "seed": 4},
        {"method": "hutchinson_lower", "seed": 3, "rank": 2},
        {"method": "sample", "seed": 5, "mc_samples": 2},
    ]
    together = lf.estimate_fishers(c.model, c.loader, specs)
    for spec, fd in zip(specs, together):
        spec = {"method": spec} if isinstance(spec, str) else spec
        with sdpa_kernel(SDPBackend.MATH):  # the shared pass's backend
            alone = lf.estimate_fisher(c.model, c.loader, **spec)  # type: ignore[arg-type]
        assert fd.method == alone.method and fd.options == alone.options
        assert all(torch.equal(fd[k], alone[k]) for k in alone)
        fused = lf.estimate_fisher(c.model, c.loader, **spec)  # type: ignore[arg-type]
        for k in alone:
            torch.testing.assert_close(fused[k], alone[k], rtol=1e-4, atol=1e-10)
    with pytest.raises(ValueError, match="Per-method options"):
        lf.estimate_fishers(c.model, c.loader, [{"method": "exact", "classes": [0]}])


@pytest.mark.parametrize("method", ["exact", "empirical", "sample", "lower", "upper", "batched"])
def test_confident_float32_model_matches_its_float64_twin(method: str) -> None:
    """1 - p_c is below float32's resolution near 1 for a confident prediction (p_c = 1 - 1e-6):
    the cotangents must still be accurate, so a float32 model gives its float64 twin's Fisher."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([14.0, 0.0, 0.0]))  # p_0 about 1 - 2e-6 on every input
    x, y = torch.randn(16, 6), torch.zeros(16, dtype=torch.long)
    got = lf.estimate_fisher(model, [(x, y)], method=method, progress=False)
    want = lf.estimate_fisher(
        copy.deepcopy(model).double(), [(x.double(), y)], method, progress=False
    )
    assert 1e-7 < float(torch.softmax(model(x), -1)[:, 1:].sum(-1).max()) < 1e-5
    for name, w in want.items():
        rel = float((got[name].double() - w).abs().max() / w.abs().max())
        assert rel < 1e-4, (name, rel)


@pytest.mark.parametrize("draws", [None, 3])
def test_label_cotangent_equals_one_hot_minus_p_bitwise(draws: int | None) -> None:
    from lightning_fisher.estimators.empirical import minus_p_plus_one_at

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 6, 11, generator=gen, dtype=torch.float64).softmax(-1)
    shape = (4, 6) if draws is None else (draws, 4, 6)
    index = torch.randint(0, 11, shape, generator=gen)
    want = torch.nn.functional.one_hot(index, 11).to(p.dtype) - p
    got = minus_p_plus_one_at(p, index)
    assert got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(
        p, torch.randn(4, 6, 11, generator=gen.manual_seed(0), dtype=p.dtype).softmax(-1)
    )  # p untouched
