"""The closed-form per-input rule for `transformers`' GPT-2 `Conv1D` (y = x @ W + b, W stored
(in, out)): chosen for every Conv1D of a GPT-2 model, never handed to the vmap route, and its
Fisher equal to the brute-force dense reference for `exact`, `empirical` and `sample` at token
and sequence granularity (a tiny float64 GPT-2 with random weights and padded sequences)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from dense_reference import DenseReference, dense_reference, draw_labels, max_relative_error
from models import random_gpt2
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher import hf
from lightning_fisher.estimators import layer_rules
from lightning_fisher.estimators.base import trainable_parameters
from lightning_fisher.estimators.per_input import PerInputEngine

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D

VOCAB, T = 12, 6
RTOL = 1e-6  # the diagonal is stored in float32


def tiny_gpt2() -> nn.Module:
    model = random_gpt2(VOCAB)
    for m in model.modules():  # larger than GPT-2's init, so no Conv1D gradient is near zero
        if isinstance(m, Conv1D):
            nn.init.normal_(m.weight, std=0.4)
            nn.init.normal_(m.bias, std=0.2)
    return model


def batches() -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (5, T), generator=gen)
    mask = (torch.arange(T) < torch.tensor([T, 4, T, 2, 5])[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    return [
        hf.with_lm_labels({"input_ids": ids[i:j], "attention_mask": mask[i:j]})
        for i, j in ((0, 3), (3, 5))
    ]


_BUILT: dict[str, Any] = {}


def case() -> tuple[nn.Module, list[dict[str, Tensor]], dict[str, Any], DenseReference]:
    if not _BUILT:
        model, data = tiny_gpt2(), batches()
        _BUILT["case"] = (
            model,
            data,
            hf.lm_fisher_kwargs(model),
            dense_reference(model, data, shift_labels=True),
        )
    return _BUILT["case"]


def conv1d_names(model: nn.Module) -> set[str]:
    return {
        f"{path}.{p}"
        for path, m in model.named_modules()
        if isinstance(m, Conv1D)
        for p in ("weight", "bias")
    }


@pytest.fixture
def rule_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, str]]:
    """(rule name, module class name) of every call of a rule's per-input code in the test."""
    calls: Counter[tuple[str, str]] = Counter()
    for rule in layer_rules._RULES.values():
        for method in ("per_input", "signed_sum", "sum_squares"):
            original = getattr(rule, method)

            def spy(ctx: Any, *a: Any, _o: Any = original, _r: Any = rule, **k: Any) -> Any:
                calls[(_r.name, type(ctx.module).__name__)] += 1
                return _o(ctx, *a, **k)

            monkeypatch.setattr(rule, method, spy)
    return calls


def test_every_conv1d_of_gpt2_gets_the_closed_form() -> None:
    model, data, _, _ = case()
    engine = PerInputEngine(model, trainable_parameters(model))
    batch = {k: v for k, v in data[0].items() if k != "labels"}
    engine.plan(lambda: model(**batch).logits)
    assert engine.handlers is not None
    rules = {h.path: h.rule for h in engine.handlers}
    convs = [path for path, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(convs) == 4  # c_attn, c_proj of the attention; c_fc, c_proj of the MLP
    assert {rules[path] for path in convs} == {"hf_conv1d"}
    # a plain nn.Linear keeps its own rule, and the Conv1D rule takes nothing else
    assert layer_rules._closed_form_rule(nn.Linear(3, 2), {"weight", "bias"}) == "linear"
    assert [p for p, r in rules.items() if r == "hf_conv1d"] == convs


def test_a_conv1d_subclass_with_its_own_forward_goes_to_the_vjp_rule() -> None:
    class Scaled(Conv1D):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    assert layer_rules._closed_form_rule(Conv1D(3, 2), {"weight", "bias"}) == "hf_conv1d"
    assert layer_rules._closed_form_rule(Scaled(3, 2), {"weight", "bias"}) == "vjp"


def sequence_sample(ref: DenseReference, k: int, seed: int) -> Tensor:
    """sum over sequences s of (1/k) sum_j (sum_t g_{y_tj})^2, with the library's draws (every
    position of a batch, row-major, the counted ones used)."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(ref.jacobians[0].shape[1], dtype=torch.float64)
    j = 0
    for p, mask in zip(ref.batch_probs, ref.batch_masks):
        draws = draw_labels(p, k, gen).reshape(*mask.shape, k)
        for b in range(mask.shape[0]):
            ts = torch.nonzero(mask[b]).flatten().tolist()
            for d in range(k):
                g = torch.zeros_like(total)
                for i, t in enumerate(ts):
                    e = torch.zeros_like(ref.probs[j + i])
                    e[int(draws[b, t, d])] = 1
                    g += ref.jacobians[j + i].T @ (e - ref.probs[j + i])
                total += g.pow(2) / k
            j += len(ts)
    return total


def sequence_empirical(ref: DenseReference) -> tuple[Tensor, int]:
    """sum over sequences of (sum_t g_{y_t})^2 with the true labels, and the number of sequences."""
    total = torch.zeros(ref.jacobians[0].shape[1], dtype=torch.float64)
    j, n_seq = 0, 0
    for mask in ref.batch_masks:
        for row in mask:
            n = int(row.sum())
            if not n:
                continue
            g = torch.zeros_like(total)
            for i in range(j, j + n):
                e = torch.zeros_like(ref.probs[i])
                e[ref.labels[i]] = 1
                g += ref.jacobians[i].T @ (e - ref.probs[i])
            total += g.pow(2)
            j, n_seq = j + n, n_seq + 1
    return total, n_seq


def check(got: lf.FisherDiagonal, want: dict[str, Tensor], model: nn.Module, what: str) -> None:
    err, where = max_relative_error(dict(got.items()), want)
    assert err <= RTOL, f"{what}: {err:.2e} on {where}"
    # the Conv1D entries are not vanishing, so the comparison above tests the rule
    for name in conv1d_names(model):
        assert want[name].abs().max() > 1e-6, name


def test_the_rule_matches_the_dense_reference(rule_calls: Counter[tuple[str, str]]) -> None:
    model, data, kw, ref = case()
    k, seed = 2, 7

    def run(method: str, **options: Any) -> lf.FisherDiagonal:
        return lf.estimate_fisher(model, data, method=method, **kw, **options)

    check(run("exact"), ref.exact(), model, "token exact")
    check(run("empirical"), ref.empirical(), model, "token empirical")
    pos = run("sample", mc_samples=k, seed=seed, token_route="position")
    check(pos, ref.sample(k, seed), model, "token sample, per position")
    want = sequence_sample(ref, k, seed)
    tok = run("sample", mc_samples=k, seed=seed)  # one backward per sequence
    check(tok, ref.unflatten(want / ref.n_inputs), model, "token sample, per sequence")
    seq = run("sample", mc_samples=k, seed=seed, granularity="sequence")
    check(seq, ref.unflatten(want / seq.n_samples), model, "sequence sample")
    total, n_seq = sequence_empirical(ref)
    emp = run("empirical", granularity="sequence")
    assert emp.n_samples == n_seq
    check(emp, ref.unflatten(total / n_seq), model, "sequence empirical")

    # every Conv1D went through the closed form, none through vmap or the loop
    assert rule_calls[("hf_conv1d", "Conv1D")] > 0
    assert not [key for key in rule_calls if key[1] == "Conv1D" and key[0] != "hf_conv1d"]


class Conv1DNet(nn.Module):
    """Conv1D on rows (L = 1) and on a sequence (L = 4 positions), mean pooling, a Conv1D head."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.inp = Conv1D(5, 3)  # (nf=out, nx=in)
        self.seq = Conv1D(4, 5)
        self.head = Conv1D(n_classes, 4)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, 4, 3)
        h = torch.tanh(self.inp(x[:, 0]))  # rows: L = 1
        h = torch.tanh(self.seq(torch.tanh(self.inp(x)) + h[:, None]))  # inp used twice
        return self.head(h.mean(1))


@pytest.mark.parametrize("n_classes", [3, 9])
def test_rows_sequences_and_both_sum_routes_match_the_dense_fisher(
    n_classes: int, rule_calls: Counter[tuple[str, str]]
) -> None:
    """3 classes: 2 columns < 4 positions (direct route); 9 classes: 8 columns > 4 positions (Gram
    route); the head sees rows, so it folds its columns (L = 1)."""
    from reference import dense_fisher, per_input_jacobians, per_label_grads, unflatten

    torch.manual_seed(0)
    model = Conv1DNet(n_classes).double().eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.7)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, n_classes, (7,), generator=gen)
    js, zs, ys = per_input_jacobians(model, lambda f, r: f(r["x"]), [{"x": x, "y": y}])
    loader = [(x[i : i + 3], y[i : i + 3]) for i in range(0, 7, 3)]
    want = {
        "exact": unflatten(model, dense_fisher(js, zs).diagonal()),
        "empirical": unflatten(model, per_label_grads(js, zs, ys).pow(2).mean(0)),  # type: ignore[arg-type]
    }
    for method, reference in want.items():
        got = lf.estimate_fisher(model, loader, method=method)
        err, where = max_relative_error(dict(got.items()), reference)
        assert err <= RTOL, f"{method}: {err:.2e} on {where}"
    assert rule_calls[("hf_conv1d", "Conv1D")] > 0
    assert set(rule_calls) == {("hf_conv1d", "Conv1D")}
