"""EWC state in a chosen dtype (``state_dtype``) and in CPU memory (``offload="cpu"``): a bf16
Fisher gives the penalty and gradient of the float32 state within bf16 precision, and exactly
those of the float32 formula applied to the cast Fisher; the arithmetic is float32 whatever the
storage; offloading changes no bit of the update; checkpoints round-trip the dtype and older
float32 state loads; bad values are refused."""

from __future__ import annotations

import copy
import logging
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lit_helpers import Classifier, loader, task_classes, trainer
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher import ewc as ewc_module
from lightning_fisher.ewc import ElasticWeightConsolidation
from lightning_fisher.outputs import FisherInputError

LAM, GAMMA = 37.5, 0.7
BF16_EPS = 2.0**-8  # bfloat16 rounds to 8 significant bits: relative error <= 2^-9


def mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def perturb(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))


def fishers(model: nn.Module, n: int) -> list[lf.FisherDiagonal]:
    gen = torch.Generator().manual_seed(5)
    return [
        lf.FisherDiagonal(
            # entries over several decades, as real Fishers have
            {
                k: torch.rand(p.shape, generator=gen)
                * 10.0 ** torch.randint(-6, 3, p.shape, generator=gen)
                for k, p in model.named_parameters()
            },
            method="exact",
        )
        for _ in range(n)
    ]


def twins(
    mode: str, param_dtype: torch.dtype, base_kw: dict[str, Any] | None = None, **kw: Any
) -> tuple[
    nn.Module, ElasticWeightConsolidation, ElasticWeightConsolidation, list[lf.FisherDiagonal]
]:
    """A model moved away from the anchors of two tasks, consolidated into an EWC with
    ``base_kw`` (default: float32 state) and into one with ``kw``, from the same estimates."""
    model, gen = mlp(param_dtype), torch.Generator().manual_seed(1)
    base = ElasticWeightConsolidation(model, lam=LAM, mode=mode, gamma=GAMMA, **(base_kw or {}))
    other = ElasticWeightConsolidation(model, lam=LAM, mode=mode, gamma=GAMMA, **kw)
    estimates = fishers(model, 2)
    for f in estimates:
        perturb(model, gen)
        base.consolidate(f)
        other.consolidate(f)
    perturb(model, gen)
    return model, base, other, estimates


def start_grads(model: nn.Module) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(9)
    return {n: torch.randn(p.shape, generator=gen).to(p.dtype) for n, p in model.named_parameters()}


def grads_after(model: nn.Module, start: dict[str, Tensor], route: Any) -> dict[str, Tensor]:
    for n, p in model.named_parameters():
        p.grad = start[n].clone()
    route()
    return {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]


# bf16 state against float32 state and against the formula on the cast Fisher ------------------
@pytest.mark.parametrize("mode", ["online", "separate"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_bf16_state_is_the_float32_formula_on_the_cast_fisher(
    mode: str, param_dtype: torch.dtype
) -> None:
    model, f32, b16, (f0, f1) = twins(mode, param_dtype, state_dtype=torch.bfloat16)
    # stored: cast once, after the online sum computed in float32
    # online: the old state is held in bf16 only; gamma F_old + F_new is summed in float32
    online = {k: GAMMA * f0[k].bfloat16().float() + f1[k] for k in f0}
    want = [online] if mode == "online" else [dict(f0), dict(f1)]
    assert len(b16.fishers) == len(want)
    for stored, w in zip(b16.fishers, want):
        for k, t in stored.items():
            assert t.dtype == torch.bfloat16 and torch.equal(t, w[k].bfloat16())
    for a16, a32 in zip(b16.anchors, f32.anchors):  # anchors keep the parameters' dtype
        for k, a in a16.items():
            assert a.dtype == param_dtype and torch.equal(a, a32[k])

    params = {n: p.detach() for n, p in model.named_parameters()}
    # by hand: float32 arithmetic on the cast Fisher, task after task
    total = torch.zeros((), dtype=torch.float32)
    for fisher, anchor in zip(b16.fishers, b16.anchors):
        for k, f in fisher.items():
            d = params[k].float() - anchor[k].float()
            total = total + (f.float() * d.pow(2)).sum()
    by_hand = 0.5 * LAM * total
    penalty = b16.penalty().detach()
    assert penalty.dtype == torch.float32 and torch.equal(penalty, by_hand)
    reference = float(f32.penalty().detach())
    assert float(penalty) == pytest.approx(reference, rel=BF16_EPS)

    start = start_grads(model)
    # by hand: per task, g + lam F (theta - theta*) in float32, rounded into g's dtype
    hand = {}
    for k, g in start.items():
        for fisher, anchor in zip(b16.fishers, b16.anchors):
            d = params[k].float() - anchor[k].float()
            g = g.float().addcmul(fisher[k].float(), d, value=LAM).to(param_dtype)
        hand[k] = g
    got = grads_after(model, start, b16.add_penalty_grad)
    base = grads_after(model, start, f32.add_penalty_grad)
    for k, g in got.items():
        assert g.dtype == param_dtype and torch.equal(g, hand[k])
        assert not torch.equal(g, start[k])  # the penalty acts
        # the cast Fisher is within 2^-9 of the float32 one; bf16 gradients add their rounding
        term = float((base[k].float() - start[k].float()).abs().max())
        slack = 0.0
        if param_dtype == torch.bfloat16:
            slack = 2 * BF16_EPS * float(base[k].float().abs().max())
        assert float((g.float() - base[k].float()).abs().max()) <= BF16_EPS * term + slack
    value = b16.add_penalty_grad(with_penalty=True)
    assert value is not None and float(value) == pytest.approx(float(penalty), rel=1e-5)


def test_float32_arithmetic_for_bf16_parameters() -> None:
    """theta - theta* is formed in float32: with bf16 parameters a step below bf16's resolution of
    theta still moves the gradient (a bf16 difference would round it to zero or a whole ulp)."""
    model = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ewc = ElasticWeightConsolidation(model, lam=1.0, state_dtype="bf16")
    ewc.consolidate(lf.FisherDiagonal({"weight": torch.full((1, 1), 3.0)}))
    with torch.no_grad():
        model.weight.fill_(1.0078125)  # one bf16 ulp above 1
    model.weight.grad = torch.zeros_like(model.weight)
    ewc.add_penalty_grad()
    assert float(model.weight.grad) == 3.0 * 0.0078125
    assert float(ewc.penalty().detach()) == pytest.approx(0.5 * 3.0 * 0.0078125**2, rel=1e-6)


def test_float16_state_refuses_entries_it_cannot_hold() -> None:
    model = mlp(torch.float32)
    ewc = ElasticWeightConsolidation(model, lam=1.0, state_dtype=torch.float16)
    big = lf.FisherDiagonal({n: torch.full_like(p, 1e5) for n, p in model.named_parameters()})
    with pytest.raises(FisherInputError, match=r"overflows state_dtype=torch\.float16"):
        ewc.consolidate(big)
    assert ewc.task_count == 0 and not ewc.fishers
    ewc.consolidate(big.scale(1e-3))
    assert ewc.fishers[0]["0.weight"].dtype == torch.float16


# offload ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("mode", ["online", "separate"])
def test_offload_gives_bitwise_the_same_update(mode: str, state_dtype: torch.dtype | None) -> None:
    """On CPU the offloaded state takes the one-tensor-at-a-time route (the one that streams the
    state to a GPU) where the resident one takes the workspace route: the same update, bit for
    bit, and the same penalty."""
    dtype = {"state_dtype": state_dtype}
    model, plain, off, _ = twins(mode, torch.float32, base_kw=dtype, offload="cpu", **dtype)
    start = start_grads(model)
    want = grads_after(model, start, plain.add_penalty_grad)
    got = grads_after(model, start, off.add_penalty_grad)
    assert all(torch.equal(got[k], want[k]) and not torch.equal(got[k], start[k]) for k in want)
    assert torch.equal(off.penalty().detach(), plain.penalty().detach())
    assert plain.state_bytes().workspace > 0 and off.state_bytes().workspace == 0
    assert all(t.device.type == "cpu" for f in off.fishers for t in f.values())


# state_bytes -----------------------------------------------------------------------------------
def test_state_bytes_counts_fisher_anchor_and_workspace() -> None:
    model, f32, b16, _ = twins("separate", torch.float32, state_dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    for ewc, fisher_bytes in ((f32, 4), (b16, 2)):
        sb = ewc.state_bytes()
        assert sb.fisher == 2 * n * fisher_bytes and sb.anchor == 2 * n * 4 and sb.workspace == 0
        assert sum(sb.per_parameter.values()) == sb.fisher + sb.anchor == sb.total == sb.on_device
        assert sb.per_parameter["0.weight"] == 2 * 35 * (fisher_bytes + 4)
    b16.add_penalty_grad()  # the workspace route: one float32 buffer per parameter
    sb = b16.state_bytes()
    assert sb.workspace == n * 4 and sb.total == sb.fisher + sb.anchor + n * 4
    off = ElasticWeightConsolidation(model, lam=1.0, offload="cpu", state_dtype="bfloat16")
    off.consolidate(fishers(model, 1)[0])
    off.add_penalty_grad()
    sb = off.state_bytes()
    assert sb.total == n * (2 + 4) and sb.on_device == 0


# the update compiled for CUDA ------------------------------------------------------------------
def test_compiled_update_is_the_same_formula() -> None:
    """The function the CUDA route compiles, run eagerly, against the one-tensor-at-a-time
    route (float32: the same up to the fused multiply-add's rounding)."""
    gen = torch.Generator().manual_seed(0)
    for dtype, state in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
        shapes = [(4, 3), (3,)]
        g, p, a = ([torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(3))
        f = [torch.rand(s, generator=gen).to(state) for s in shapes]
        fused, each = [t.clone() for t in g], [t.clone() for t in g]
        ewc_module._update_lists(fused, f, p, a, torch.tensor(LAM, dtype=torch.float64))
        values = [ewc_module._add_term(*args, LAM, True) for args in zip(each, f, p, a)]
        # the penalty's value the compiled route reports on logging steps
        total = ewc_module._penalty_sum(f, p, a)
        assert total.dtype == torch.float32
        torch.testing.assert_close(total, sum(values), rtol=1e-6, atol=0)  # type: ignore[arg-type]
        for x, y in zip(fused, each):
            torch.testing.assert_close(
                x, y, rtol=1e-6 if dtype == torch.float32 else BF16_EPS, atol=1e-6
            )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_update_and_its_logged_fallback(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, f32, b16, _ = twins("separate", torch.bfloat16, state_dtype=torch.bfloat16)
    model.cuda()
    start = {k: g.cuda() for k, g in start_grads(model).items()}
    b16.compile_update = False
    eager = grads_after(model, start, b16.add_penalty_grad)
    b16.compile_update = True
    b16.invalidate_caches()
    compiled = grads_after(model, start, b16.add_penalty_grad)
    for k, g in eager.items():
        torch.testing.assert_close(compiled[k], g, rtol=BF16_EPS, atol=0)
    value = b16.add_penalty_grad(with_penalty=True)
    assert value is not None
    assert float(value) == pytest.approx(float(b16.penalty().detach()), rel=1e-5)
    assert b16.state_bytes().workspace == 0  # the compiled route needs no buffer

    def broken() -> Any:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(ewc_module, "_compiled_update", broken)
    again = ElasticWeightConsolidation(model, lam=LAM)
    again.load_state_dict(f32.state_dict())
    with caplog.at_level(logging.WARNING, logger="lightning_fisher"):
        got = grads_after(model, start, again.add_penalty_grad)
    assert "torch.compile of the one-pass penalty-gradient update failed" in caplog.text
    assert all(not torch.equal(got[k], start[k]) for k in got)


# checkpoints -----------------------------------------------------------------------------------
def test_core_state_round_trips_the_dtype_and_old_float32_state_loads() -> None:
    model, f32, b16, _ = twins("separate", torch.float32, state_dtype=torch.bfloat16)
    again = ElasticWeightConsolidation(model, lam=LAM, mode="separate", state_dtype=torch.bfloat16)
    again.load_state_dict(copy.deepcopy(b16.state_dict()))
    for x, y in zip(again.fishers, b16.fishers):
        assert all(x[k].dtype == torch.bfloat16 and torch.equal(x[k], y[k]) for k in y)
    old = ElasticWeightConsolidation(model, lam=LAM, mode="separate", state_dtype=torch.bfloat16)
    old.load_state_dict(f32.state_dict())  # float32 state: cast as a consolidation would
    for x, y in zip(old.fishers, b16.fishers):
        assert all(torch.equal(x[k], y[k]) for k in y)
    up = ElasticWeightConsolidation(model, lam=LAM, mode="separate")
    up.load_state_dict(b16.state_dict())
    for x, y in zip(up.fishers, b16.fishers):
        assert all(x[k].dtype == torch.float32 and torch.equal(x[k], y[k].float()) for k in y)


def test_callback_checkpoint_round_trip_in_a_new_trainer(tmp_path: Any) -> None:
    def fit(callback: lf.EWC, task: int, **kw: Any) -> Classifier:
        model = Classifier(dtype=torch.float32)
        model.active = task_classes(task)
        trainer([callback], max_epochs=1, **kw).fit(model, loader(task, dtype=torch.float32))
        return model

    cb = lf.EWC(lam=10.0, state_dtype=torch.bfloat16, offload="cpu")
    model = fit(cb, 0)
    path = tmp_path / "task0.ckpt"
    tr = trainer([cb], max_epochs=1)
    tr.strategy.connect(model)
    tr.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]["EWC"]
    assert all(t.dtype == torch.bfloat16 for t in saved["tasks"][0]["fisher"]["tensors"].values())

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.fishers = [{k: t.clone() for k, t in f.items()} for f in restored.fishers]

    for state_dtype in (torch.bfloat16, None):
        restored, snap = lf.EWC(lam=10.0, state_dtype=state_dtype), Snapshot()
        resumed = Classifier(dtype=torch.float32)
        resumed.active = task_classes(0)
        trainer([restored, snap], max_epochs=1).fit(
            resumed, loader(0, dtype=torch.float32), ckpt_path=path
        )
        assert len(snap.fishers) == 1
        for k, t in cb.fishers[0].items():
            got = snap.fishers[0][k]
            assert got.dtype == restored.state_dtype and torch.equal(got, t.to(got.dtype))

    # a float32 checkpoint of an older run loads into bf16 state, cast
    plain = lf.EWC(lam=10.0)
    fit(plain, 0)
    state = copy.deepcopy(plain.state_dict())
    into = lf.EWC(lam=10.0, state_dtype=torch.bfloat16)
    into.load_state_dict(state)
    for k, t in plain.fishers[0].items():
        assert torch.equal(into.fishers[0][k], t.bfloat16())


def test_last_fisher_is_kept_like_the_state() -> None:
    """The estimate kept for inspection is the consolidated estimate, rounded to a 16-bit state
    dtype (not a float32 copy beside it); float32 state keeps it as estimated."""
    torch.manual_seed(0)
    net = Classifier(dtype=torch.float32)
    est = lf.FisherDiagonal(
        {n: torch.rand_like(p) for n, p in net.named_parameters()}, method="exact"
    )
    for state_dtype, want in ((torch.bfloat16, torch.bfloat16), (None, torch.float32)):
        cb = lf.EWC(lam=1.0, state_dtype=state_dtype)
        returned = cb.consolidate(net, fisher=est)
        assert returned is not None and cb.last_fisher is not None
        for k, t in est.items():
            assert cb.last_fisher[k].dtype == want
            assert torch.equal(cb.last_fisher[k], t.to(want))


# bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"state_dtype": torch.int8}, r"state_dtype must be .*torch.int8 \(not a floating-point"),
        ({"state_dtype": "int32"}, "state_dtype must be"),
        ({"state_dtype": 16}, "state_dtype must be"),
        ({"state_dtype": torch.complex64}, "state_dtype must be"),
        ({"offload": "gpu"}, "offload must be False .* or 'cpu'.*got 'gpu'"),
        ({"offload": True}, "offload must be False"),
        ({"offload": "cuda"}, "offload must be False"),
    ],
)
def test_bad_values_are_refused(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(FisherInputError, match=match):
        ElasticWeightConsolidation(lam=1.0, **kw)
    with pytest.raises(FisherInputError, match=match):
        lf.EWC(lam=1.0, **kw)


# the benchmark ---------------------------------------------------------------------------------
def test_benchmark_writes_its_rows(tmp_path: Any) -> None:
    pytest.importorskip("transformers")
    import json

    from benchmarks import ewc_state_dtype

    args = ["--device", "cpu", "--layers", "1", "--width", "32", "--vocab", "64", "--batch", "2"]
    args += ["--seq-len", "8", "--repeats", "1", "--configs", "float32", "bf16+cpu"]
    assert ewc_state_dtype.main([*args, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "ewc_state_dtype_cpu.json").read_text())
    assert report["device_type"] == "cpu" and "--layers 1" in report["command"]
    rows = report["rows"]
    assert [(r["state_dtype"], r["offload"]) for r in rows] == [
        ("float32", None),
        ("bfloat16", "cpu"),
    ]
    for r in rows:
        assert r["dtype"] == "bfloat16" and r["params"] > 0
        assert r["ewc_step_ratio"] == pytest.approx(r["ewc_step_seconds"] / r["step_seconds"])
        assert r["max_rel_diff_vs_eager"] == 0.0  # on CPU every route is the eager one
    # bf16 Fisher and bf16 anchors: 4 bytes a parameter, all of it in CPU memory
    assert rows[1]["state_mib"] == pytest.approx(rows[1]["params"] * 4 / 2**20)
    assert rows[1]["state_on_device_mib"] == 0
    assert rows[0]["state_mib"] == pytest.approx(rows[0]["params"] * 6 / 2**20)
    assert "| gpt2 1 x 32 |" in (tmp_path / "ewc_state_dtype_cpu.md").read_text()
