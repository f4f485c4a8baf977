"""The per-input engine checks itself and falls back to a correct route; batch dimensions are
found, not assumed; every use of a parameter counts; labels are checked.

Every Fisher here is compared with a deliberately simple loop, written for this file: one input at
a time, one ``autograd.grad`` per logit, float64.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher.estimators import layer_rules, per_input


def loop_fisher(model: nn.Module, x: Tensor, y: Tensor, batch_dim: int = 0) -> tuple[dict, dict]:
    """(exact, empirical) diagonals: input i alone through the model, one gradient per logit."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    exact = {n: torch.zeros_like(p) for n, p in params.items()}
    emp = {n: torch.zeros_like(p) for n, p in params.items()}
    n = x.shape[batch_dim]
    for i in range(n):
        z = model(x.narrow(batch_dim, i, 1))[0]
        p = torch.softmax(z.detach(), -1)
        jac = [
            torch.autograd.grad(z[c], list(params.values()), retain_graph=True, allow_unused=True)
            for c in range(z.shape[0])
        ]
        jac = [
            [torch.zeros_like(q) if g is None else g for g, q in zip(row, params.values())]
            for row in jac
        ]
        for j, name in enumerate(params):
            J = torch.stack([jac[c][j] for c in range(len(jac))])  # (C, *shape)
            g = {c: J[c] - (p.reshape(-1, *[1] * (J.ndim - 1)) * J).sum(0) for c in range(len(jac))}
            exact[name] += sum(p[c] * g[c] ** 2 for c in range(len(jac))) / n
            emp[name] += g[int(y[i])] ** 2 / n
    return exact, emp


def assert_close(fd: lf.FisherDiagonal, want: dict, rtol: float = 1e-6) -> None:
    scale = max(float(w.abs().max()) for w in want.values())
    for name, w in want.items():
        err = float((fd[name].double() - w).abs().max())
        assert err <= rtol * max(float(w.abs().max()), 1e-8 * scale), (name, err)


def seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model.double().eval()


def data(n: int = 6, shape: tuple[int, ...] = (5, 3), classes: int = 3) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=gen
    )


def batches(x: Tensor, y: Tensor, b: int = 4) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + b], y[i : i + b]) for i in range(0, len(y), b)]


# Models that broke the engine's assumptions ---------------------------------------------------


class SeqFirstMHA(nn.Module):
    """nn.MultiheadAttention with the default batch_first=False."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.att = nn.MultiheadAttention(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x).transpose(0, 1)  # (T, B, E)
        o, _ = self.att(h, h, h)
        return self.head(o.mean(0))


class GRUHead(nn.Module):
    """Logits from h_n of a GRU, sequence-first or batch-first, optionally packed."""

    def __init__(self, batch_first: bool, packed: bool = False) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=batch_first)
        self.head = nn.Linear(4, 3)
        self.batch_first, self.packed = batch_first, packed

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.batch_first else x.transpose(0, 1)
        if self.packed:
            lengths = torch.where(x[:, 0, 0] > 0, 2, x.shape[1])
            h = nn.utils.rnn.pack_padded_sequence(
                h, lengths, batch_first=self.batch_first, enforce_sorted=False
            )
        _, hn = self.rnn(h)
        return self.head(hn[-1])


class OutsideUse(nn.Module):
    """enc.weight is used by the parent's forward too (h @ enc.weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.enc(x.mean(1)))
        h = torch.tanh(h @ self.enc.weight)
        return self.head(torch.tanh(self.enc(h)))


class HandTied(nn.Module):
    """Output embedding tied by hand: F.linear(h, emb.weight) in the model's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        ids = (x[..., 0].abs() * 10).long() % 5
        return F.linear(torch.tanh(self.lin(self.emb(ids).mean(1))), self.emb.weight)


class _Legacy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


class LegacyScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        return _Legacy.apply(x, self.w)


class Pooled(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.mean(1))


CASES = {
    "mha_seq_first": SeqFirstMHA,
    "gru_seq_first": lambda: GRUHead(False),
    "gru_batch_first": lambda: GRUHead(True),
    "gru_packed": lambda: GRUHead(False, packed=True),
    "outside_use": OutsideUse,
    "hand_tied": HandTied,
    "prelu": lambda: Pooled(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 3)),
    "legacy_function": lambda: Pooled(nn.Linear(3, 3), LegacyScale(), nn.Tanh(), nn.Linear(3, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_models_that_broke_the_assumptions_match_the_loop(name: str) -> None:
    model = seeded(CASES[name]())
    x, y = data()
    exact, emp = loop_fisher(model, x, y)
    fd = lf.estimate_fisher(model, batches(x, y), method="exact")
    assert fd.n_samples == 6
    assert_close(fd, exact)
    assert_close(lf.estimate_fisher(model, batches(x, y), method="empirical"), emp)


def test_embedding_with_max_norm() -> None:
    model = seeded(nn.Sequential(nn.Embedding(7, 3, max_norm=0.5), nn.Flatten(), nn.Linear(9, 3)))
    gen = torch.Generator().manual_seed(2)
    ids, y = torch.randint(0, 7, (6, 3), generator=gen), torch.randint(0, 3, (6,), generator=gen)
    lf.estimate_fisher(model, [(ids, y)])  # the first forward renormalises the rows in place
    exact, _ = loop_fisher(model, ids, y)
    assert_close(lf.estimate_fisher(model, [(ids[:4], y[:4]), (ids[4:], y[4:])]), exact)


def test_recording_never_changes_what_a_module_returns() -> None:
    """A module whose output has no batch dimension (a position embedding looked up with ids of
    shape (1, T)) and a sequence-first attention: downstream sees the shapes of a plain forward,
    but for the position embedding, which the pass expands to the forward's rows once it has
    proven that the model merely broadcasts it; a forward after the pass sees (1, T) again."""
    seen: list[tuple[int, ...]] = []

    class Positional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Linear(3, 4)
            self.pos = nn.Embedding(5, 4)
            self.mha = SeqFirstMHA().att
            self.head = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            pos = self.pos(torch.arange(x.shape[1]).unsqueeze(0))  # (1, T, 4)
            o, _ = self.mha(*[(self.tok(x) + pos).transpose(0, 1)] * 3)
            seen.append(tuple(pos.shape))
            seen.append(tuple(o.shape))
            return self.head(o.mean(0))

    model = seeded(Positional())
    x, y = data()
    plain = model(x[:4])
    seen.clear()
    fd = lf.estimate_fisher(model, batches(x, y), method="exact")
    assert (1, 5, 4) in seen and (5, 4, 4) in seen and (5, 2, 4) in seen
    # the position embedding is shared (1 row) or expanded to that forward's rows
    assert all(p[0] in (1, o[1]) and p[1:] == (5, 4) for p, o in zip(seen[0::2], seen[1::2]))
    assert (4, 5, 4) in seen[0::2] and (2, 5, 4) in seen[0::2]  # both batches, expanded
    assert fd.n_samples == 6
    assert_close(fd, loop_fisher(model, x, y)[0])
    seen.clear()
    torch.testing.assert_close(model(x[:4]), plain)
    assert seen == [(1, 5, 4), (5, 4, 4)]


def _shift_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the Linear closed form: input x gets input x+1's gradient (the unsigned sum over
    inputs is still right, so only a signed check can see it)."""
    original = layer_rules._LinearRule.unfolded

    def rolled(self, ctx, lo, hi):  # type: ignore[no-untyped-def]
        gl, cols = original(self, ctx, lo, hi)
        return gl.roll(1, dims=1), cols

    monkeypatch.setattr(layer_rules._LinearRule, "unfolded", rolled)


def test_a_broken_rule_is_caught_and_replaced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = seeded(Pooled(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    x, y = data()
    exact, emp = loop_fisher(model, x, y)
    _shift_inputs(monkeypatch)
    with caplog.at_level(logging.INFO, logger="lightning_fisher"):
        fd = lf.estimate_fisher(model, [(x, y)], method="exact")
    assert_close(fd, exact)
    lines = [
        r.getMessage() for r in caplog.records if "failed the per-input check" in r.getMessage()
    ]
    assert len(lines) == 2  # one line per module, not per batch or column
    assert "'body.0'" in lines[0] + lines[1] and "'body.2'" in lines[0] + lines[1]
    assert all("'linear'" in line and "'loop'" in line for line in lines)
    assert_close(lf.estimate_fisher(model, batches(x, y), method="empirical"), emp)


def test_verify_false_skips_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    model = seeded(Pooled(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    x, y = data()
    exact, _ = loop_fisher(model, x, y)
    _shift_inputs(monkeypatch)
    calls = []
    verify = per_input.PerInputEngine.verify
    monkeypatch.setattr(
        per_input.PerInputEngine, "verify", lambda self, z: calls.append(1) or verify(self, z)
    )
    fd = lf.estimate_fisher(model, [(x, y)], method="exact", verify=False)
    assert not calls
    with pytest.raises(AssertionError):  # the broken rule went unchecked
        assert_close(fd, exact)


def test_verification_does_not_change_the_estimate() -> None:
    model = seeded(SeqFirstMHA())
    x, y = data()
    for method in ("exact", "sample", "empirical"):
        on = lf.estimate_fisher(model, batches(x, y), method=method, seed=3)
        off = lf.estimate_fisher(model, batches(x, y), method=method, seed=3, verify=False)
        for name in on:
            torch.testing.assert_close(on[name], off[name], rtol=1e-6, atol=0)


def test_no_correct_route_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every route wrong (the closed form, the loop over inputs and the whole-model route): the
    pass refuses, naming the module and suggesting hutchinson."""
    model = seeded(Pooled(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    x, y = data()
    _shift_inputs(monkeypatch)
    loop = layer_rules._LoopRule.per_input
    whole = per_input.PerInputEngine._model_route_per_input
    monkeypatch.setattr(
        layer_rules._LoopRule, "per_input", lambda *a: {k: 2 * v for k, v in loop(*a).items()}
    )
    monkeypatch.setattr(
        per_input.PerInputEngine,
        "_model_route_per_input",
        lambda *a: {k: 2 * v for k, v in whole(*a).items()},
    )
    with pytest.raises(lf.FisherInputError, match=r"module\(s\) body\.0, body\.2.*hutchinson"):
        lf.estimate_fisher(model, [(x, y)], method="exact")


# Batches of at least 2 x VERIFY_ROWS inputs are checked on a forward of their first rows --------

LARGE = 2 * per_input.VERIFY_ROWS + 8


def _checked_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of inputs of every forward the check runs on."""
    sizes: list[int] = []
    check = per_input.PerInputEngine._verify

    def spy(self, logits):  # type: ignore[no-untyped-def]
        sizes.append(logits.shape[0])
        return check(self, logits)

    monkeypatch.setattr(per_input.PerInputEngine, "_verify", spy)
    return sizes


@pytest.mark.parametrize("name", list(CASES))
def test_large_batches_match_the_loop(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = seeded(CASES[name]())
    x, y = data(LARGE)
    exact, emp = loop_fisher(model, x, y)
    sizes = _checked_sizes(monkeypatch)
    assert_close(lf.estimate_fisher(model, [(x, y)], method="exact"), exact)
    assert sizes == [per_input.VERIFY_ROWS]
    assert_close(lf.estimate_fisher(model, batches(x, y, 36), method="empirical"), emp)


def test_a_broken_rule_is_caught_on_the_first_rows(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = seeded(Pooled(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    x, y = data(LARGE)
    exact, _ = loop_fisher(model, x, y)
    _shift_inputs(monkeypatch)
    sizes = _checked_sizes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="lightning_fisher"):
        fd = lf.estimate_fisher(model, [(x, y)], method="exact")
    assert_close(fd, exact)
    assert set(sizes) == {per_input.VERIFY_ROWS}
    assert sum("failed the per-input check" in r.getMessage() for r in caplog.records) == 2


def test_sequence_first_batches_are_checked_on_their_first_inputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """x of shape (T, B, ...): the labels give the batch size, so the small forward takes the
    batch's first inputs at their batch dimension (not its first time steps) and the check runs
    on them."""

    class SeqFirstGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.rnn(x)[1][-1])

    model = seeded(SeqFirstGRU())
    x, y = data(LARGE)
    exact, _ = loop_fisher(model, x.transpose(0, 1), y, batch_dim=1)
    _shift_inputs(monkeypatch)
    sizes = _checked_sizes(monkeypatch)
    assert_close(lf.estimate_fisher(model, [(x.transpose(0, 1), y)], method="exact"), exact)
    assert set(sizes) == {per_input.VERIFY_ROWS}


def test_a_small_forward_that_fails_falls_back_to_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = seeded(Pooled(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    x, y = data(LARGE)
    exact, _ = loop_fisher(model, x, y)
    _shift_inputs(monkeypatch)
    sizes = _checked_sizes(monkeypatch)

    def whole_batches_only(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        if batch[0].shape[0] != LARGE:
            raise ValueError("this model only takes whole batches")
        return m(batch[0])

    fd = lf.estimate_fisher(model, [(x, y)], method="exact", output_fn=whole_batches_only)
    assert_close(fd, exact)
    assert sizes and set(sizes) == {LARGE}


def test_a_new_structure_is_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose module calls differ from the plan's is planned and checked again."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x.mean(1))
            return self.b(torch.tanh(h)) if x.shape[1] > 4 else h

    model = seeded(Branchy())
    x, y = data()
    checked = []
    verify = per_input.PerInputEngine.verify

    def spy(self, z, first_rows=None):  # type: ignore[no-untyped-def]
        checked.append(self.structure_key() in self._verified)
        return verify(self, z, first_rows)

    monkeypatch.setattr(per_input.PerInputEngine, "verify", spy)
    loader = [(x[:3], y[:3]), (x[3:5], y[3:5]), (x[5:, :4], y[5:])]
    fd = lf.estimate_fisher(model, loader, method="exact")
    assert checked == [False, True, False]
    assert fd.n_samples == 6 and float(fd["b.weight"].abs().sum()) > 0


# Labels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.tensor([0, 1, -1, 2]), r"negative labels \[-1\].*ignore index -100"),
        (torch.tensor([0.0, 1.5, 2.0, 1.0]), r"non-integer.*1\.5"),
        (torch.tensor([0, 1, 3, 7]), r"labels \[3, 7\] >= the number of classes C = 3"),
        (F.one_hot(torch.tensor([0, 1, 2, 1]), 3), r"shape of the logits.*class indices"),
    ],
)
@pytest.mark.parametrize("method", ["empirical", "batched"])
def test_bad_labels(labels: Tensor, match: str, method: str) -> None:
    model = seeded(Pooled(nn.Linear(3, 3)))
    x, _ = data(4)
    with pytest.raises(lf.FisherInputError, match=match):
        lf.estimate_fisher(model, [(x, labels)], method=method)


def test_ignore_index_is_configurable() -> None:
    model = seeded(Pooled(nn.Linear(3, 3)))
    x, y = data()
    marked = y.clone()
    marked[[1, 4]] = -1
    keep = marked != -1
    got = lf.estimate_fisher(model, [(x, marked)], method="empirical", ignore_index=-1)
    want = lf.estimate_fisher(model, [(x[keep], y[keep])], method="empirical")
    assert got.n_samples == 4
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    integral = lf.estimate_fisher(model, [(x, y.double())], method="empirical")  # 0., 1., 2.
    assert integral.n_samples == 6


def test_outputs_in_the_unit_interval_warn() -> None:
    model = seeded(nn.Sequential(Pooled(nn.Linear(3, 3)), nn.Sigmoid()))
    x, y = data()
    with pytest.warns(UserWarning, match=r"lies in \[0, 1\]"):
        lf.estimate_fisher(model, [(x, y)], method="exact")


# A structure proven on a model is relied on by later passes over that model -------------------


def _pooled() -> nn.Module:
    return seeded(Pooled(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))


def test_later_passes_over_the_same_model_rely_on_the_first_proof(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _pooled()
    x, y = data(LARGE)
    exact, _ = loop_fisher(model, x, y)
    sizes = _checked_sizes(monkeypatch)
    for _ in range(2):
        assert_close(lf.estimate_fisher(model, [(x, y)], method="exact"), exact)
    assert sizes == [per_input.VERIFY_ROWS]
    # another batch size is the same structure
    assert_close(lf.estimate_fisher(model, batches(x, y, 20), method="exact"), exact)
    assert len(sizes) == 1
    # another model object of the same architecture has its own proof
    lf.estimate_fisher(_pooled(), [(x, y)], method="exact")
    assert len(sizes) == 2
    # so does another dtype of the same model (the tests run in float64)
    assert x.dtype == torch.float64
    lf.estimate_fisher(model.float(), [(x.float(), y)], method="exact")
    assert len(sizes) == 3
    model.double()
    per_input.forget_verified(model)
    assert_close(lf.estimate_fisher(model, [(x, y)], method="exact"), exact)
    assert len(sizes) == 4


def test_a_model_whose_rule_failed_is_checked_again_by_every_pass(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The proof is of the routes the check ended with; a later pass plans the default rules
    again, so it must check (and fall back) again rather than trust the earlier proof."""
    model = _pooled()
    x, y = data(LARGE)
    exact, _ = loop_fisher(model, x, y)
    _shift_inputs(monkeypatch)
    with caplog.at_level(logging.INFO, logger="lightning_fisher"):
        for _ in range(2):
            assert_close(lf.estimate_fisher(model, [(x, y)], method="exact"), exact)
    assert sum("failed the per-input check" in r.getMessage() for r in caplog.records) == 4


def test_the_check_signs_are_balanced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half of the checked inputs get +1 and half -1: all-equal signs would reduce the check to an
    unsigned sum, which accepts a rule that attributes gradients to the wrong inputs."""
    seen: list[Tensor] = []
    signed_sums = per_input.PerInputEngine._signed_sums

    def spy(self, logits, u, s, rows, diff):  # type: ignore[no-untyped-def]
        seen.append(s[:rows].clone())
        return signed_sums(self, logits, u, s, rows, diff)

    monkeypatch.setattr(per_input.PerInputEngine, "_signed_sums", spy)
    for n in (LARGE, 7, 2):
        x, y = data(n)
        lf.estimate_fisher(_pooled(), [(x, y)], method="empirical")
    assert [len(s) for s in seen] == [per_input.VERIFY_ROWS, 7, 2]
    for s in seen:
        assert set(s.tolist()) == {1.0, -1.0}
        assert abs(float(s.sum())) <= 1
