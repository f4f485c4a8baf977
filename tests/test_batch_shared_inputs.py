"""Module inputs shared by the batch: a position embedding looked up with ids of shape (1, T)
(GPT-2's default `position_ids`) has an output without a batch dimension. The engine runs such a
module on its inputs expanded to the batch, once it has proven that the model merely broadcasts
the module's output, so the module's own rule applies instead of the whole-model route; a model
that does anything else with that output keeps the whole-model route. Ground truth is the
brute-force dense reference on tiny float64 models."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from dense_reference import dense_reference, max_relative_error
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher.estimators import per_input

RTOL = 1e-6  # the diagonal is stored in float32
V, T, D = 10, 5, 4


def no_hooks(model: nn.Module) -> bool:
    return not any(
        m._forward_pre_hooks or m._forward_hooks or m._backward_hooks for m in model.modules()
    )


# ------------------------------------------------------------------------------- tiny GPT-2


def test_gpt2_default_position_ids_take_the_embedding_rule(
    engines: list[per_input.PerInputEngine],
) -> None:
    """exact, empirical and sample, token and sequence level, equal the dense reference with
    GPT-2's default (1, T) position ids, and `wpe` is not on the whole-model route."""
    from test_hf_conv1d_rule import case, sequence_empirical, sequence_sample

    model, data, kw, ref = case()
    assert all("position_ids" not in b for b in data)
    k, seed = 2, 7

    def check(got: lf.FisherDiagonal, want: dict[str, Tensor], what: str) -> None:
        err, where = max_relative_error(dict(got.items()), want)
        assert err <= RTOL, f"{what}: {err:.2e} on {where}"
        assert want["transformer.wpe.weight"][:T].abs().min() > 0, what  # wpe's entries count

    def run(method: str, **options: Any) -> lf.FisherDiagonal:
        return lf.estimate_fisher(model, data, method=method, **kw, **options)

    check(run("exact"), ref.exact(), "token exact")
    check(run("empirical"), ref.empirical(), "token empirical")
    pos = run("sample", mc_samples=k, seed=seed, token_route="position")
    check(pos, ref.sample(k, seed), "token sample, per position")
    want = sequence_sample(ref, k, seed)
    tok = run("sample", mc_samples=k, seed=seed)
    check(tok, ref.unflatten(want / ref.n_inputs), "token sample, per sequence")
    seq = run("sample", mc_samples=k, seed=seed, granularity="sequence")
    check(seq, ref.unflatten(want / seq.n_samples), "sequence sample")
    total, n_seq = sequence_empirical(ref)
    check(run("empirical", granularity="sequence"), ref.unflatten(total / n_seq), "seq empirical")

    assert len(engines) == 6
    for e in engines:
        assert e.model_route == set()
        assert e.expanded == {"transformer.wpe"}
        assert {h.path: h.rule for h in e.handlers or []}["transformer.wpe"] == "embedding"
        assert "transformer.wpe: inputs shared by the batch, expanded to it" in e.log
        assert not any(line.startswith("transformer.wpe: model") for line in e.log)
    assert no_hooks(model)


def test_the_model_is_unchanged_outside_the_pass() -> None:
    """Hooks removed; a training forward gives the same logits, and `wpe` the same (1, T, D)
    output, as before the pass; default and batched position ids give the same Fisher."""
    from test_hf_conv1d_rule import case

    model, data, kw, _ = case()
    batch = {k: v for k, v in data[0].items() if k != "labels"}
    shapes: list[tuple[int, ...]] = []
    hook = model.transformer.wpe.register_forward_hook(
        lambda _m, _a, out: shapes.append(tuple(out.shape))
    )
    try:
        model.train()
        torch.manual_seed(3)
        before = model(**batch).logits
        got = lf.estimate_fisher(model, data, method="empirical", **kw)
        assert model.training  # the pass restores the mode
        torch.manual_seed(3)
        after = model(**batch).logits
    finally:
        hook.remove()
        model.eval()
    assert torch.equal(before, after)
    assert shapes[0] == shapes[-1] == (1, T + 1, 8)
    assert no_hooks(model)
    explicit = [
        {**b, "position_ids": torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"])}
        for b in data
    ]
    want = lf.estimate_fisher(model, explicit, method="empirical", **kw)
    err, where = max_relative_error(dict(got.items()), dict(want.items()))
    assert err <= 1e-12, f"{err:.2e} on {where}"


# ------------------------------------------------------------------------------- toy models


class SharedPositions(nn.Module):
    """Token embedding plus a position embedding looked up with ids of shape (1, T), shared by the
    batch, then a head on every position. ``mode`` says what the forward does with the shared
    (1, T, D) output: ``broadcast`` adds it (what GPT-2 does); the others depend on its batch
    size of 1 and give other values, or fail, once it has B rows."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.embed = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, ids: Tensor) -> Tensor:
        pe = self.pos(torch.arange(ids.shape[1], device=ids.device)[None])  # (1, T, D)
        if self.mode == "index":
            pe = pe[0]  # (T, D), re-broadcast over the batch
        elif self.mode == "squeeze":
            pe = pe.squeeze(0)[None]  # a no-op on (1, T, D) only
        elif self.mode == "mean":
            pe = pe.mean(0)  # the same values with one row, gradients split over B rows
        h = torch.tanh(self.mix(self.embed(ids) + pe))
        return self.head(h)


def toy_case(mode: str) -> tuple[nn.Module, list[Any]]:
    torch.manual_seed(0)
    model = SharedPositions(mode).double().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (5, T), generator=gen)
    labels = torch.randint(0, V, (5, T), generator=gen)
    return model, [(ids[:3], labels[:3]), (ids[3:], labels[3:])]


@pytest.mark.parametrize("mode", ["broadcast", "index", "squeeze", "mean"])
def test_a_model_that_does_more_than_broadcast_keeps_the_whole_model_route(
    mode: str, engines: list[per_input.PerInputEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """Only a model that merely broadcasts the shared output gets the expansion; the others keep
    the whole-model route with one log line, and every Fisher equals the dense reference. The
    proof stands alone: the fallbacks run with the self-check off."""
    model, data = toy_case(mode)
    ref = dense_reference(model, data)
    good = mode == "broadcast"
    with caplog.at_level(logging.INFO, logger="lightning_fisher"):
        got = {
            m: lf.estimate_fisher(model, data, method=m, verify=good)
            for m in ("exact", "empirical")
        }
    for method, want in (("exact", ref.exact()), ("empirical", ref.empirical())):
        err, where = max_relative_error(dict(got[method].items()), want)
        assert err <= RTOL, f"{mode} {method}: {err:.2e} on {where}"
    assert want["pos.weight"].abs().min() > 0
    assert no_hooks(model)
    lines = [r.getMessage() for r in caplog.records if "'pos'" in r.getMessage()]
    for e in engines:
        if good:
            assert e.expanded == {"pos"} and e.model_route == set()
            assert {h.path: h.rule for h in e.handlers or []}["pos"] == "embedding"
        else:
            assert e.expanded == set() and e.model_route == {"pos.weight"}
            assert "inputs shared by the batch" in e._expand_refused["pos"]
    if good:
        assert lines == []
    else:
        assert len(lines) == len(engines) == 2, lines  # one per pass
        assert all("whole-model route: inputs shared by the batch" in line for line in lines)


def test_a_model_without_shared_inputs_plans_once(
    engines: list[per_input.PerInputEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No module with shared inputs: one plan, nothing expanded, nothing on the model route."""
    plans: list[int] = []
    plan = per_input.PerInputEngine.plan
    monkeypatch.setattr(
        per_input.PerInputEngine,
        "plan",
        lambda self, *a, **k: plans.append(1) or plan(self, *a, **k),
    )
    model, data = toy_case("broadcast")
    ids = [(x, y) for x, y in data]

    class Batched(nn.Module):
        """The same model with the position ids given per sequence, (B, T)."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            m = self.inner
            pos = torch.arange(x.shape[1]).expand_as(x)
            return m.head(torch.tanh(m.mix(m.embed(x) + m.pos(pos))))

    wrapped = Batched(model).eval()
    got = lf.estimate_fisher(wrapped, ids, method="exact")
    ref = dense_reference(wrapped, ids)
    err, where = max_relative_error(dict(got.items()), ref.exact())
    assert err <= RTOL, f"{err:.2e} on {where}"
    assert plans == [1]
    (e,) = engines
    assert e.expanded == set() and e.model_route == set() and not e._expand_refused
