"""A later Fisher pass over the same model reuses the verified plan (no planning forward), and
plans again whenever what it sees differs: other tracked parameters, another layout, a model
changed between passes, a forgotten proof. Every result equals a pass planned from scratch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher.estimators import per_input


class Branchy(nn.Module):
    """An MLP with an optional extra layer, switched by an attribute between passes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.extra = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.use_extra = False

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.use_extra:
            h = torch.tanh(self.extra(h))
        return self.head(h)


def counted(model: nn.Module) -> list[int]:
    """Rows of every forward of ``model`` (a hook that outlives the passes)."""
    rows: list[int] = []
    model.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    return rows


def fresh(model: nn.Module, batches: list, method: str, **kw: object) -> lf.FisherDiagonal:
    per_input.forget_verified(model)
    return lf.estimate_fisher(model, batches, method, **kw)


def same(a: lf.FisherDiagonal, b: lf.FisherDiagonal) -> None:
    assert set(a) == set(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def batches(n: int = 3, rows: int = 6, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 5, generator=g), torch.randint(0, 3, (rows,), generator=g))] * n


def test_a_later_pass_runs_no_planning_forward_and_gives_the_same_fisher() -> None:
    torch.manual_seed(0)
    model = Branchy()
    data = batches()
    first = fresh(model, data, "exact")
    rows = counted(model)
    again = lf.estimate_fisher(model, data, "exact")
    assert rows == [6, 6, 6], rows  # one recorded forward per batch: no planning, no check
    same(again, first)
    empirical = lf.estimate_fisher(model, data, "empirical")
    same(empirical, fresh(model, data, "empirical"))


def test_a_first_pass_plans_and_checks() -> None:
    torch.manual_seed(0)
    model = Branchy()
    per_input.forget_verified(model)
    rows = counted(model)
    lf.estimate_fisher(model, batches(1), "exact")
    assert 2 in rows and rows.count(6) >= 1 and len(rows) > 1, rows  # the 2-row planning forward


def test_a_model_changed_between_passes_is_planned_again() -> None:
    torch.manual_seed(0)
    model = Branchy()
    data = batches()
    lf.estimate_fisher(model, data, "exact")
    model.use_extra = True  # a module the kept plan never saw runs now
    got = lf.estimate_fisher(model, data, "exact")
    want = fresh(model, data, "exact")
    same(got, want)
    assert float(got["extra.weight"].abs().sum()) > 0
    model.head = nn.Linear(8, 3)  # new parameters: another key
    same(lf.estimate_fisher(model, data, "exact"), fresh(model, data, "exact"))


def test_other_tracked_parameters_or_batch_sizes_are_planned_again() -> None:
    torch.manual_seed(0)
    model = Branchy()
    data = batches()
    lf.estimate_fisher(model, data, "exact")
    only_head = lf.estimate_fisher(model, data, "exact", param_filter=lambda n: "head" in n)
    assert set(only_head) == {"head.weight", "head.bias"}
    same(only_head, fresh(model, data, "exact", param_filter=lambda n: "head" in n))
    other = batches(2, rows=9, seed=1)
    same(lf.estimate_fisher(model, other, "exact"), fresh(model, other, "exact"))


def test_forget_verified_forgets_the_plan() -> None:
    torch.manual_seed(0)
    model = Branchy()
    data = batches(1)
    lf.estimate_fisher(model, data, "exact")
    per_input.forget_verified(model)
    rows = counted(model)
    lf.estimate_fisher(model, data, "exact")
    assert 2 in rows, rows  # planned again


def test_a_plan_kept_without_the_check_is_checked_when_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = Branchy()
    data = batches(1)
    per_input.forget_verified(model)
    lf.estimate_fisher(model, data, "exact", verify=False)
    rows = counted(model)
    checks: list[int] = []
    real = per_input.PerInputEngine._verify
    monkeypatch.setattr(
        per_input.PerInputEngine,
        "_verify",
        lambda self, logits: (checks.append(logits.shape[0]), real(self, logits))[1],
    )
    got = lf.estimate_fisher(model, data, "exact")
    assert rows == [6], rows  # the kept plan: no planning forward
    assert checks == [6]  # but the check it never passed runs
    same(got, fresh(model, data, "exact"))


class DataBranch(Branchy):
    """The extra layer runs only for batches whose first entry is positive."""

    def forward(self, x: Tensor) -> Tensor:
        self.use_extra = bool(x[0, 0] > 0)
        return super().forward(x)


def test_a_batch_reaching_parameters_the_plan_never_saw_is_planned_again() -> None:
    torch.manual_seed(0)
    model = DataBranch()
    (xa, ya), (xb, yb) = batches(1, seed=2)[0], batches(1, seed=3)[0]
    xa[0, 0], xb[0, 0] = -1.0, 1.0  # the first batch plans without `extra`, the second uses it
    both = fresh(model, [(xa, ya), (xb, yb)], "exact")
    fa, fb = fresh(model, [(xa, ya)], "exact"), fresh(model, [(xb, yb)], "exact")
    assert float(fb["extra.weight"].abs().sum()) > 0
    for n in both:
        torch.testing.assert_close(both[n], (fa[n] + fb[n]) / 2, rtol=1e-5, atol=1e-9)


def test_an_sdpa_gpt2_with_shared_position_ids_over_several_passes(engines: list) -> None:
    """Everything at once on a tiny GPT-2: sdpa attention (MATH during the pass), default (1, T)
    position ids (expanded to the batch), the per-position split at the tied head,
    a float64 model so the dense reference decides, and a reused plan from the second pass on."""
    transformers = pytest.importorskip("transformers")
    from dense_reference import max_relative_error
    from test_hf_conv1d_rule import case

    base, data, kw, ref = case()
    model = copy.deepcopy(base)
    model.set_attn_implementation("sdpa")
    assert isinstance(model, transformers.GPT2LMHeadModel)
    per_input.forget_verified(model)
    rows = counted(model.transformer)
    for pass_ in range(2):
        rows.clear()
        for method, want in (("exact", ref.exact()), ("empirical", ref.empirical())):
            got = lf.estimate_fisher(model, data, method=method, **kw)
            err, where = max_relative_error(dict(got.items()), want)
            assert err <= 1e-6, f"pass {pass_} {method}: {err:.2e} on {where}"
        if pass_:  # no planning forward and no expansion proof: one forward per batch and method
            assert rows == [len(b["input_ids"]) for b in data] * 2, rows
    assert all(e.expanded == {"transformer.wpe"} for e in engines)
    assert all(e.split_head is not None for e in engines)


class OutsideUse(Branchy):
    """With ``use_extra``, ``a.weight`` is used once more outside its module: the module calls
    (and so the recorded layout) stay the same, only the graph's uses of the weight change."""

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.use_extra:
            h = h + torch.tanh(nn.functional.linear(x, self.a.weight))
        return self.head(h)


def test_a_parameter_used_once_more_outside_its_module_is_planned_again() -> None:
    torch.manual_seed(0)
    model = OutsideUse()
    data = batches()
    fresh(model, data, "exact")
    model.use_extra = True  # a later pass: the kept plan knows one use of a.weight
    same(lf.estimate_fisher(model, data, "exact"), fresh(model, data, "exact"))
    # within one pass: the second batch adds the use
    model.use_extra = False
    per_input.forget_verified(model)
    xa, ya = batches(1, seed=4)[0]
    xb, yb = batches(1, seed=5)[0]

    class Switch(OutsideUse):
        def forward(self, x: Tensor) -> Tensor:
            self.use_extra = bool(x[0, 0] > 0)
            return super().forward(x)

    switch = Switch()
    switch.load_state_dict(model.state_dict())
    xa[0, 0], xb[0, 0] = -1.0, 1.0
    both = fresh(switch, [(xa, ya), (xb, yb)], "exact")
    fa, fb = fresh(switch, [(xa, ya)], "exact"), fresh(switch, [(xb, yb)], "exact")
    for n in both:
        torch.testing.assert_close(both[n], (fa[n] + fb[n]) / 2, rtol=1e-5, atol=1e-9)
