"""The per-position token route's closed forms against the brute-force dense reference: tied
input/output embeddings without a per-input (vocabulary x width) gradient, and vocabulary heads
whose output gradient has one nonzero position per column.

Float64 models (GPT-2 from a `transformers` config, and a hand-written tie with padding and
repeated tokens); the engine's self-check runs on every estimate (``verify=True``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dense_reference import dense_reference, max_relative_error
from models import random_gpt2
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher import hf
from lightning_fisher.estimators import layer_rules, per_input

VOCAB, T = 11, 16  # T >= 16: the direct route's column blocks are used
RTOL = 1e-6  # the diagonal is stored in float32


@pytest.fixture(autouse=True)
def dense_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """These closed forms serve the dense per-position columns: the head split (its own tests in
    test_position_head_split.py) is off here."""
    monkeypatch.setattr(per_input.PerInputEngine, "head_split", False)


class TiedLM(nn.Module):
    """Embedding (with a padding row), tanh of a Linear, a causal running mean, and a vocabulary
    head that shares the embedding table (``tied=True``) or has its own."""

    def __init__(self, tied: bool, dim: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.embed(ids)))
        steps = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype, device=h.device)
        return self.head(h.cumsum(1) / steps[:, None])


def _batches() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    # a few ids drawn from a small range: tokens repeat within a sequence; 0 is the padding row
    ids = torch.randint(0, 4, (5, T), generator=gen)
    ids[:, 0] = 3
    labels = torch.randint(0, VOCAB, (5, T), generator=gen)
    labels[1, 4:] = -100
    return [(ids[:3], labels[:3]), (ids[3:], labels[3:])]


def _gpt2(position_ids: bool = False) -> tuple[nn.Module, list[Any], dict[str, Any]]:
    pytest.importorskip("transformers")
    model = random_gpt2(VOCAB, positions=T)
    assert model.lm_head.weight is model.transformer.wte.weight
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 5, (4, T), generator=gen)
    mask = (torch.arange(T) < torch.tensor([T, 4, T, 5])[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    batches = [
        hf.with_lm_labels({"input_ids": ids[i:j], "attention_mask": mask[i:j]})
        for i, j in ((0, 3), (3, 4))
    ]
    if position_ids:  # one row per sequence: `wpe`'s output gets a batch dimension
        for b in batches:
            b["position_ids"] = torch.arange(T).expand(b["input_ids"].shape[0], -1)
    return model, batches, hf.lm_fisher_kwargs(model)


class _Spy:
    """Counts the calls of a module-level function of the engine (``per_input``) or of its layer
    rules (``layer_rules``), where its callers look it up, and how often it answered truthily."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, module: Any = per_input) -> None:
        self.calls = self.hits = 0
        fn = getattr(module, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self.calls += 1
            self.hits += bool(out)
            return out

        monkeypatch.setattr(module, name, spy)


def _check(model: nn.Module, batches: list[Any], kw: dict[str, Any], method: str) -> None:
    ref = dense_reference(model, batches, shift_labels=kw.get("shift_labels", False))
    want = ref.empirical() if method == "empirical" else ref.exact()
    got = lf.estimate_fisher(
        model, batches, method=method, token_route="position", verify=True, **kw
    )
    err, where = max_relative_error(dict(got.items()), want)
    assert err <= RTOL, f"{method}: {err:.2e} on {where}"


@pytest.mark.parametrize("method", ["empirical", "exact"])
def test_hand_written_tie_matches_the_dense_reference(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = TiedLM(tied=True).double().eval()
    tied = _Spy(monkeypatch, "_tied_sum_squares")
    _check(model, _batches(), {}, method)
    assert tied.hits > 0 and tied.hits == tied.calls


@pytest.mark.parametrize("position_ids", [False, True])
def test_gpt2_tied_embeddings_match_the_dense_reference(
    position_ids: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, batches, kw = _gpt2(position_ids)
    tied = _Spy(monkeypatch, "_tied_sum_squares")
    one = _Spy(monkeypatch, "_route_one_position", layer_rules)
    _check(model, batches, kw, "empirical")
    assert tied.hits > 0 and tied.hits == tied.calls
    assert one.hits > 0  # the vocabulary head's columns touch one position each


def test_untied_head_takes_the_one_position_product(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = TiedLM(tied=False).double().eval()
    tied = _Spy(monkeypatch, "_tied_sum_squares")
    one = _Spy(monkeypatch, "_route_one_position", layer_rules)
    _check(model, _batches(), {}, "empirical")
    assert tied.calls == 0 and one.hits > 0
    # `mix` sees every earlier position: its columns are not one-position
    assert one.hits < one.calls


def test_one_position_product_equals_the_direct_one() -> None:
    """The one-position sum of squares of a Linear against per-input gradients built directly."""
    gen = torch.Generator().manual_seed(0)
    K, B, L, n_out, n_in = 4, 3, 5, 6, 2
    g = torch.randn(K, B, L, n_out, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, L, (K, B), generator=gen)
    g *= torch.nn.functional.one_hot(pos, L).to(g.dtype)[..., None]
    g[0, 1] = 0  # a column with no position at all
    x = torch.randn(B, L, n_in, generator=gen, dtype=torch.float64)
    lin = nn.Linear(n_in, n_out).double()
    out = lin(x)
    engine = per_input.PerInputEngine(lin, dict(lin.named_parameters()))
    handler = layer_rules._Handler(lin, "", {"weight": "weight", "bias": "bias"}, "linear")
    call = layer_rules._Call([x], None, [0], [out], [0], [], [0], [0])
    engine._batch_size = B
    ctx = layer_rules._Ctx(engine, handler, call, [g], handler.names, torch.float64)
    acc = {n: torch.zeros_like(p) for n, p in lin.named_parameters()}
    layer_rules._RULES["linear"].sum_squares(ctx, acc, 0.5)
    want_w = 0.5 * torch.einsum("kblo,bli->kboi", g, x).pow(2).sum((0, 1))
    want_b = 0.5 * g.sum(2).pow(2).sum((0, 1))
    assert layer_rules._one_position(g.movedim(2, 3))
    torch.testing.assert_close(acc["weight"], want_w, rtol=1e-12, atol=0)
    torch.testing.assert_close(acc["bias"], want_b, rtol=1e-12, atol=0)


def test_direct_route_cut_at_each_columns_last_position() -> None:
    """Columns sorted into blocks and cut at their last nonzero position give the full product."""
    gen = torch.Generator().manual_seed(0)
    K, B, n_out, L, n_in = 37, 2, 5, 40, 3
    g = torch.randn(K, B, n_out, L, generator=gen, dtype=torch.float64)
    ends = torch.randint(0, L + 1, (K,), generator=gen)
    ends[0], ends[1] = 0, L  # a column with no gradient, one reaching the end
    g *= (torch.arange(L) < ends[:, None]).to(g.dtype)[:, None, None, :]
    g[3, :, :, : ends[3] - 1] = 0  # zeros before the end do not matter
    u = torch.randn(B, n_in, L, generator=gen, dtype=torch.float64)
    want = torch.einsum("kbol,bil->bkoi", g, u).pow(2).sum((0, 1))
    torch.testing.assert_close(layer_rules._direct_squares(g, u), want, rtol=1e-12, atol=0)
