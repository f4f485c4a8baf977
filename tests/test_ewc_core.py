"""The plain-torch EWC core (``lf.ElasticWeightConsolidation``) without Lightning: the gradient
route equals autograd of the penalty, each fast path equals the formula, state round trips, the
separate -> online conversion, a plain training loop, and an import with Lightning unimportable."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher import _ewc_fused_cpu
from lightning_fisher import ewc as ewc_module
from lightning_fisher.ewc import ElasticWeightConsolidation

LAM, GAMMA = 37.5, 0.7
ROOT = Path(__file__).resolve().parents[1]


def mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def perturb(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))


def random_fisher(model: nn.Module, gen: torch.Generator) -> lf.FisherDiagonal:
    return lf.FisherDiagonal(
        {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()},
        method="exact",
    )


def consolidated(
    mode: str, dtype: torch.dtype = torch.float32, n_tasks: int = 3, **kw: Any
) -> tuple[nn.Module, ElasticWeightConsolidation, torch.Generator]:
    """A model moved away from the anchors of ``n_tasks`` consolidated tasks."""
    model, gen = mlp(dtype), torch.Generator().manual_seed(1)
    ewc = ElasticWeightConsolidation(model, lam=LAM, mode=mode, gamma=GAMMA, **kw)
    for _ in range(n_tasks):
        perturb(model, gen)
        ewc.consolidate(random_fisher(model, gen))
    perturb(model, gen)
    return model, ewc, gen


def grads_after(model: nn.Module, start: dict[str, Tensor], route: Any) -> dict[str, Tensor]:
    """The gradients after ``route()`` runs on gradients set to ``start``."""
    for n, p in model.named_parameters():
        p.grad = start[n].clone()
    route()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def start_grads(model: nn.Module, gen: torch.Generator) -> dict[str, Tensor]:
    return {n: torch.randn(p.shape, generator=gen).to(p.dtype) for n, p in model.named_parameters()}


def formula(
    model: nn.Module, ewc: ElasticWeightConsolidation, start: dict[str, Tensor]
) -> dict[str, Tensor]:
    """g + (lam F_t) (theta - theta*_t), task after task, each step rounded in the parameter's
    dtype as the loss's gradient rounds it: the plain formula, written without the core's code."""
    out = {n: g.clone() for n, g in start.items()}
    params = dict(model.named_parameters())
    for fisher, anchor in zip(ewc.fishers, ewc.anchors):
        for n, f in fisher.items():
            p = params[n].detach()
            c = ewc.lam * f.to(torch.promote_types(f.dtype, p.dtype))
            out[n] = out[n] + (c * (p - anchor[n])).to(p.dtype)
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the C loop is used only with one CPU thread
    yield
    torch.set_num_threads(threads)


# The two routes ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["separate", "online"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_gradient_route_equals_autograd_of_the_penalty(
    mode: str, dtype: torch.dtype, rtol: float
) -> None:
    model, ewc, gen = consolidated(mode, dtype)
    assert ewc.task_count == 3 and len(ewc.fishers) == (3 if mode == "separate" else 1)
    start = start_grads(model, gen)
    by_loss = grads_after(model, start, lambda: ewc.penalty().backward())
    by_grad = grads_after(model, start, ewc.add_penalty_grad)
    for n, g in by_loss.items():
        assert by_grad[n].dtype == dtype
        # relative to the largest entry: bf16 rounds the two routes' sums differently
        scale = float(g.abs().max())
        torch.testing.assert_close(by_grad[n], g, rtol=0, atol=rtol * scale)
        assert not torch.equal(g, start[n])  # the penalty acts


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_penalty_value_and_gradient_follow_the_formula_in_float64(mode: str) -> None:
    model, ewc, gen = consolidated(mode, torch.float64)
    # the reference state, rebuilt from the per-task estimates by hand
    if mode == "online":
        assert len(ewc.fishers) == 1
    params = {n: p.detach() for n, p in model.named_parameters()}
    want = (
        0.5
        * LAM
        * sum(
            float((f[n].double() * (params[n] - a[n]) ** 2).sum())
            for f, a in zip(ewc.fishers, ewc.anchors)
            for n in f
        )
    )
    assert float(ewc.penalty().detach()) == pytest.approx(want, rel=1e-12)
    start = start_grads(model, gen)
    value = ewc.add_penalty_grad(with_penalty=True)
    assert value is not None and float(value) == pytest.approx(want, rel=1e-6)
    got = grads_after(model, start, ewc.add_penalty_grad)
    for n, g in formula(model, ewc, start).items():
        torch.testing.assert_close(got[n], g, rtol=1e-12, atol=0)


def test_online_arithmetic_and_new_parameters_count_as_zero() -> None:
    model, gen = mlp(torch.float64), torch.Generator().manual_seed(3)
    ewc = ElasticWeightConsolidation(model, lam=1.0, gamma=GAMMA)
    f0 = random_fisher(model, gen)
    f0_head_less = lf.FisherDiagonal({n: v for n, v in f0.items() if not n.startswith("2.")})
    ewc.consolidate(f0_head_less)
    first_anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model, gen)
    f1 = random_fisher(model, gen)
    ewc.consolidate(f1)
    (fisher,), (anchor,) = ewc.fishers, ewc.anchors
    for n, p in model.named_parameters():
        old = GAMMA * f0[n] if n in f0_head_less else torch.zeros_like(f0[n])
        torch.testing.assert_close(fisher[n], old + f1[n], rtol=0, atol=0)
        assert torch.equal(anchor[n], p.detach()) and not torch.equal(anchor[n], first_anchor[n])


# The fast paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_cpu_two_pass_and_foreach_paths_equal_the_formula(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, ewc, gen = consolidated(mode)
    start = start_grads(model, gen)
    want = formula(model, ewc, start)
    two_pass = grads_after(model, start, ewc.add_penalty_grad)
    monkeypatch.setattr(ewc_module, "_use_foreach", lambda device: True)
    ewc.invalidate_caches()
    foreach = grads_after(model, start, ewc.add_penalty_grad)
    for n, g in want.items():
        torch.testing.assert_close(two_pass[n], g, rtol=1e-6, atol=1e-6 * float(g.abs().max()))
        # the same ops in one multi-tensor call: the same roundings as the per-tensor pass
        assert torch.equal(foreach[n], two_pass[n])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_foreach_path_equals_the_formula() -> None:
    model, ewc, gen = consolidated("separate")
    model.cuda()
    ewc.invalidate_caches()
    start = {n: g.cuda() for n, g in start_grads(model, gen).items()}
    got = grads_after(model, start, ewc.add_penalty_grad)
    for n, g in formula(model, ewc, start).items():
        torch.testing.assert_close(got[n], g, rtol=1e-6, atol=1e-6 * float(g.abs().max()))


@pytest.mark.skipif(_ewc_fused_cpu.load() is None, reason="no C compiler")
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_c_loop_equals_the_formula_bitwise(
    mode: str, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, ewc, gen = consolidated(mode, cpu_kernel=True)
    assert ewc.prepare_cpu_kernel()
    kernel, calls = _ewc_fused_cpu.load(), []

    def counted(*args: Any) -> None:
        calls.append(1)
        kernel(*args)  # type: ignore[misc]

    monkeypatch.setattr(_ewc_fused_cpu, "_kernel", counted)
    start = start_grads(model, gen)
    got = grads_after(model, start, ewc.add_penalty_grad)
    assert len(calls) == 4 * len(ewc.fishers)  # one call per parameter and task
    for n, g in formula(model, ewc, start).items():
        assert torch.equal(got[n], g)
    # with the penalty's value (a logging step) the torch ops run: same update, to rounding
    calls.clear()
    value = grads_after(model, start, lambda: ewc.add_penalty_grad(with_penalty=True))
    assert not calls
    for n, g in got.items():
        torch.testing.assert_close(value[n], g, rtol=1e-6, atol=1e-6 * float(g.abs().max()))


def test_c_loop_is_skipped_where_it_does_not_apply(
    one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(_ewc_fused_cpu, "load", lambda: lambda *a: calls.append(1))
    model, ewc, gen = consolidated("online", torch.float64, cpu_kernel=True)
    start = start_grads(model, gen)
    got = grads_after(model, start, ewc.add_penalty_grad)
    assert not calls  # float64: not the C loop's dtype
    for n, g in formula(model, ewc, start).items():
        torch.testing.assert_close(got[n], g, rtol=1e-12, atol=0)


def test_missing_compiler_warns_once_and_falls_back(
    one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ewc_fused_cpu, "load", lambda: None)
    model, ewc, gen = consolidated("online", cpu_kernel=True)
    start = start_grads(model, gen)
    with pytest.warns(UserWarning, match="no C compiler"):
        got = grads_after(model, start, ewc.add_penalty_grad)
    for n, g in formula(model, ewc, start).items():
        torch.testing.assert_close(got[n], g, rtol=1e-6, atol=1e-6 * float(g.abs().max()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads_after(model, start, ewc.add_penalty_grad)
    assert not ewc.prepare_cpu_kernel()


# Caches, optimizer subsets, devices ----------------------------------------------------------
def test_cache_follows_new_consolidations_and_optimizer_subsets() -> None:
    model, ewc, gen = consolidated("separate", n_tasks=1)
    start = start_grads(model, gen)
    grads_after(model, start, ewc.add_penalty_grad)  # builds the cache for one task
    perturb(model, gen)
    ewc.consolidate(random_fisher(model, gen))
    perturb(model, gen)
    got = grads_after(model, start, ewc.add_penalty_grad)
    for n, g in formula(model, ewc, start).items():  # both tasks count
        torch.testing.assert_close(got[n], g, rtol=1e-6, atol=1e-6 * float(g.abs().max()))
    # only the optimizer's parameters; a parameter without a gradient gets one
    head = model[2]
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = None
    ewc.add_penalty_grad(optimizer=opt)
    assert model[0].weight.grad is None and head.weight.grad is not None
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    want = formula(model, ewc, zero)
    assert torch.allclose(head.weight.grad, want["2.weight"], rtol=1e-6, atol=1e-6)
    # a new optimizer at a reused id does not see the old one's terms
    del opt
    other = torch.optim.SGD(model[0].parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = None
    ewc.add_penalty_grad(optimizer=other)
    assert model[0].weight.grad is not None and head.weight.grad is None


def test_nothing_consolidated_adds_nothing_and_penalty_is_zero() -> None:
    model = mlp()
    ewc = ElasticWeightConsolidation(model, lam=LAM)
    assert float(ewc.penalty()) == 0.0
    start = start_grads(model, torch.Generator().manual_seed(0))
    value = None

    def route() -> None:
        nonlocal value
        value = ewc.add_penalty_grad(with_penalty=True)

    got = grads_after(model, start, route)
    assert value is not None and float(value) == 0.0
    assert all(torch.equal(got[n], start[n]) for n in start)


# State ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_dict_round_trip_is_bitwise(mode: str) -> None:
    model, ewc, gen = consolidated(mode)
    state = copy.deepcopy(ewc.state_dict())
    assert state["method"] == "exact" and state["mode"] == mode and state["task_count"] == 3
    restored = ElasticWeightConsolidation(model, lam=LAM, mode=mode, gamma=GAMMA)
    restored.load_state_dict(state)
    assert restored.task_count == 3 and restored.method == "exact"
    for a, b in zip(restored.fishers + restored.anchors, ewc.fishers + ewc.anchors):  # type: ignore[operator]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert torch.equal(restored.penalty(), ewc.penalty())
    start = start_grads(model, gen)
    first = grads_after(model, start, ewc.add_penalty_grad)
    second = grads_after(model, start, restored.add_penalty_grad)
    assert all(torch.equal(first[n], second[n]) for n in first)
    # the state is a copy: later training does not move the saved anchors
    perturb(model, gen)
    assert all(
        torch.equal(a, b)
        for a, b in zip(state["tasks"][0]["anchor"].values(), ewc.anchors[0].values())
    )


def test_separate_state_loads_into_online_mode_converted() -> None:
    _model, separate, _gen = consolidated("separate")
    online = ElasticWeightConsolidation(mlp(), lam=LAM, mode="online", gamma=GAMMA)
    with pytest.warns(UserWarning, match="converted"):
        online.load_state_dict(separate.state_dict())
    f0, f1, f2 = separate.fishers
    assert online.task_count == 3 and len(online.fishers) == 1
    for n in f0:
        torch.testing.assert_close(
            online.fishers[0][n], GAMMA**2 * f0[n] + GAMMA * f1[n] + f2[n], rtol=1e-6, atol=0
        )
        assert torch.equal(online.anchors[0][n], separate.anchors[2][n])
    # the same as online EWC fed the same estimates
    model, gen = mlp(), torch.Generator().manual_seed(1)
    direct = ElasticWeightConsolidation(model, lam=LAM, mode="online", gamma=GAMMA)
    for _ in range(3):
        perturb(model, gen)
        direct.consolidate(random_fisher(model, gen))
    for n in f0:
        assert torch.equal(online.fishers[0][n], direct.fishers[0][n])


def test_bad_state_raises_and_keeps_state() -> None:
    model, online, _gen = consolidated("online", n_tasks=2)
    before = copy.deepcopy(online.state_dict())
    separate = ElasticWeightConsolidation(model, lam=LAM, mode="separate")
    with pytest.raises(lf.FisherInputError, match="cannot be split"):
        separate.load_state_dict(before)
    other_method = ElasticWeightConsolidation(model, lam=LAM, method="empirical")
    with pytest.raises(lf.FisherInputError, match=r"method='exact'.*method='empirical'"):
        other_method.load_state_dict(before)
    small = nn.Sequential(nn.Linear(7, 3))
    with pytest.raises(lf.FisherInputError, match="not parameters of the model"):
        online.load_state_dict(
            ElasticWeightConsolidation(small, lam=1.0).state_dict() | {"tasks": before["tasks"]},
            small,
        )
    corrupt = copy.deepcopy(before)
    corrupt["tasks"][0]["anchor"].pop("0.bias")
    with pytest.raises(lf.FisherInputError, match="anchor and Fisher names differ"):
        online.load_state_dict(corrupt)
    after = online.state_dict()
    assert after["task_count"] == before["task_count"]
    assert all(
        torch.equal(after["tasks"][0]["fisher"]["tensors"][k], v)
        for k, v in before["tasks"][0]["fisher"]["tensors"].items()
    )


def test_bad_arguments_and_missing_module_raise() -> None:
    for kw, match in (
        ({"lam": -1.0}, "lam"),
        ({"lam": float("inf")}, "lam"),
        ({"lam": 1.0, "mode": "both"}, "mode"),
        ({"lam": 1.0, "gamma": -0.5}, "gamma"),
        ({"lam": 1.0, "method": ""}, "method"),
    ):
        with pytest.raises(lf.FisherInputError, match=match):
            ElasticWeightConsolidation(mlp(), **kw)
    with pytest.raises(lf.FisherInputError, match=r"torch\.nn\.Module"):
        ElasticWeightConsolidation("model", lam=1.0)  # type: ignore[arg-type]
    unbound = ElasticWeightConsolidation(lam=1.0)
    with pytest.raises(lf.FisherInputError, match="no module given"):
        unbound.penalty()
    model = mlp()
    with pytest.raises(lf.FisherInputError, match="FisherDiagonal"):
        unbound.consolidate({"0.weight": torch.ones(5, 7)}, model)  # type: ignore[arg-type]
    nan = lf.FisherDiagonal(
        {n: torch.full_like(p, float("nan")) for n, p in model.named_parameters()}
    )
    with pytest.raises(lf.FisherInputError, match="NaN"):
        unbound.consolidate(nan, model)
    assert unbound.task_count == 0 and unbound.fishers == []


# A plain training loop -----------------------------------------------------------------------
def test_plain_loop_both_routes_give_the_same_training() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 7, generator=gen)
    task_a, task_b = (x, (x[:, 0] > 0).long()), (x, (x[:, 1] > 0).long())

    def train(model: nn.Module, data: tuple[Tensor, Tensor], step: Any = None) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(0, 64, 16):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data[0][i : i + 16]), data[1][i : i + 16])
            if step == "loss":
                loss = loss + ewc_by_loss.penalty()
            loss.backward()
            if step == "grad":
                ewc_by_grad.add_penalty_grad(optimizer=opt)
            opt.step()

    base = mlp()
    train(base, task_a)
    by_loss, by_grad, plain = (copy.deepcopy(base) for _ in range(3))
    ewc_by_loss = ElasticWeightConsolidation(by_loss, lam=10.0)
    ewc_by_grad = ElasticWeightConsolidation(by_grad, lam=10.0)
    loader = [(task_a[0][i : i + 16], task_a[1][i : i + 16]) for i in range(0, 64, 16)]
    fisher = lf.estimate_fisher(base, loader, method="exact")
    ewc_by_loss.consolidate(fisher)
    ewc_by_grad.consolidate(fisher)
    train(by_loss, task_b, "loss")
    train(by_grad, task_b, "grad")
    train(plain, task_b)
    for (n, a), b in zip(by_loss.named_parameters(), by_grad.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    effect = max(
        float((a - c).abs().max()) for a, c in zip(by_grad.parameters(), plain.parameters())
    )
    assert effect > 1e-3  # the penalty changed the training


# No Lightning needed -------------------------------------------------------------------------
def test_imports_with_lightning_unimportable() -> None:
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("lightning", "pytorch_lightning"):
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import lightning_fisher.ewc as core
        from lightning_fisher import ElasticWeightConsolidation, FisherDiagonal

        model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            model.weight.fill_(0.5)  # theta - theta* below is exactly 1
        ewc = ElasticWeightConsolidation(model, lam=2.0)
        ewc.consolidate(FisherDiagonal({n: torch.ones_like(p) for n, p in model.named_parameters()}))
        with torch.no_grad():
            model.weight.add_(1.0)
        assert float(ewc.penalty().detach()) == 6.0  # (2 / 2) * 6 weights * 1^2
        assert core.ElasticWeightConsolidation is ElasticWeightConsolidation
        assert not any(m.split(".")[0] in ("lightning", "pytorch_lightning") for m in sys.modules)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
