"""The per-input engine's lean steady state: outputs handed on without clones once a forward
has shown nothing rewrites them (and recorded again when one is rewritten), the one-op logits
check, the labels check of ``empirical`` with one synchronisation."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from models import TinyTransformer, mlp, seeded
from torch import Tensor, nn
from torch.testing import assert_close

import lightning_fisher as lf
from lightning_fisher.estimators import base, per_input
from lightning_fisher.estimators.per_input import forget_verified


class Rewriter(nn.Module):
    """Linear -> (rewritten in place when ``rewrite`` is set or the first entry is large) -> tanh ->
    Linear: the in-place op changes the first Linear's recorded output after it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(5, 6)
        self.lin2 = nn.Linear(6, 3)
        self.rewrite = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin1(x)
        if self.rewrite or bool(x[0, 0] > 50):
            h.mul_(0.5)
        return self.lin2(torch.tanh(h))


def data(n: int = 12, scale: float = 1.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def fresh(model: nn.Module, batches: list[Any], method: str) -> dict[str, Tensor]:
    """The estimate of a copy of ``model`` that has never been planned (its first batch cloned)."""
    twin = copy.deepcopy(model)
    forget_verified(twin)
    return dict(lf.estimate_fisher(twin, batches, method=method, progress=False).items())


def engines(monkeypatch: pytest.MonkeyPatch) -> list[per_input.PerInputEngine]:
    made: list[per_input.PerInputEngine] = []
    cls = per_input.PerInputEngine

    class Recorded(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(base, "PerInputEngine", Recorded)
    return made


@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_a_later_pass_whose_forward_rewrites_an_output_in_place_is_recorded_again(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = engines(monkeypatch)
    model = seeded(Rewriter())
    batch = data()
    lf.estimate_fisher(model, [batch], method=method, progress=False)
    assert {"lin1", "lin2"} <= made[0]._uncloned  # nothing rewrote them: no clones from now on
    model.rewrite = True  # the kept plan hands lin1's output on bare; this forward rewrites it
    got = dict(lf.estimate_fisher(model, [batch], method=method, progress=False).items())
    want = fresh(model, [batch], method)
    assert_close(got, want, rtol=1e-12, atol=0)
    assert "lin1" in made[1]._cloned and "lin1" not in made[1]._uncloned
    # The estimate with the rewrite differs from the one without: the check above can fail.
    model.rewrite = False
    plain = fresh(model, [batch], method)
    assert max(float((got[k] - plain[k]).abs().max()) for k in got) > 1e-3


def test_a_rewrite_on_a_later_batch_of_the_same_pass_is_recorded_again() -> None:
    model = seeded(Rewriter())
    plain, marked = data(seed=1), data(seed=2)
    marked[0][0, 0] = 100.0  # this batch's forward rewrites lin1's output
    got = lf.estimate_fisher(model, [plain, marked], method="exact", progress=False)
    parts = [fresh(model, [b], "exact") for b in (plain, marked)]
    for k, v in got.items():
        assert_close(v, (parts[0][k] + parts[1][k]) / 2, rtol=1e-6, atol=0)


def test_outputs_rewritten_by_an_inplace_relu_stay_cloned(monkeypatch: pytest.MonkeyPatch) -> None:
    made = engines(monkeypatch)
    model = seeded(mlp())  # Linear, Tanh, Linear, ReLU(inplace=True), Linear
    x = torch.randn(10, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    first = dict(lf.estimate_fisher(model, [(x, y)] * 3, method="exact", progress=False).items())
    engine = made[0]
    assert "2" in engine._cloned and "2" not in engine._uncloned
    assert {"0", "4"} <= engine._uncloned
    assert_close(first, fresh(model, [(x, y)], "exact"), rtol=1e-12, atol=0)


def test_an_output_rewritten_after_the_forward_is_refused() -> None:
    model = seeded(Rewriter())
    x, _ = data()
    lf.estimate_fisher(model, [data()], method="exact", progress=False)
    engine = per_input.PerInputEngine(model, dict(model.named_parameters()))
    assert engine.reuse_plan()
    with engine.recording():
        out = model(x)
    assert engine.finish_recording(out.shape[0])
    assert engine.handlers is not None
    recorded = next(h for h in engine.handlers if h.path == "lin1").calls[0].outputs[0]
    with torch.no_grad():
        recorded.mul_(2)  # e.g. by code between the forward and the Fisher pass's backward
    cot = torch.randn(2, *out.shape, dtype=out.dtype)
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(lf.FisherInputError, match="modified in place after the forward"):
        engine.accumulate(out, cot, acc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_nonfinite_logit_is_refused(dtype: torch.dtype, bad: float) -> None:
    from lightning_fisher.outputs import check_logits

    z = torch.randn(4, 3).to(dtype)
    check_logits(z)
    z[2, 1] = bad
    with pytest.raises(lf.FisherInputError, match="1 NaN/Inf logits"):
        check_logits(z)


def test_the_logits_check_still_tells_probabilities_and_empty_batches() -> None:
    from lightning_fisher.outputs import check_logits

    with pytest.raises(lf.FisherInputError, match="looks like probabilities"):
        check_logits(torch.softmax(torch.randn(5, 3), -1))
    with pytest.warns(UserWarning, match=r"lies in \[0, 1\]"):
        check_logits(torch.rand(5, 3) * 0.3)
    check_logits(torch.zeros(0, 3))
    check_logits(torch.randn(1, 3).abs())  # one row: no probability check


def test_empirical_ignores_out_of_range_labels_at_masked_positions() -> None:
    model = seeded(TinyTransformer(token_level=True))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 11, (4, 5), generator=g)
    labels = torch.randint(0, 3, (4, 5), generator=g)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, 3:] = 0
    ignored = labels.masked_fill(mask == 0, -100)
    garbage = labels.masked_fill(mask == 0, 99)  # >= C, but at positions that do not count
    batch = {"input_ids": ids, "attention_mask": mask}
    want = fresh(model, [{**batch, "labels": ignored}], "empirical")
    assert_close(fresh(model, [{**batch, "labels": garbage}], "empirical"), want, rtol=0, atol=0)
    counted = labels.clone()
    counted[2, 1] = 9
    with pytest.raises(lf.FisherInputError, match=r"labels \[9\] >= the number of classes C = 3"):
        fresh(model, [{**batch, "labels": counted}], "empirical")
