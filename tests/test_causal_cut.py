"""The causal cut of the per-position route (``causal=True``): each block of positions runs
through a forward of its prefix only. Same Fisher as the uncut route and as the brute-force dense
reference; refused for a model that reads ahead."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from models import random_decoder, random_gpt2
from reference import dense_fisher, per_input_jacobians, per_label_grads, unflatten
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher import hf
from lightning_fisher.estimators.causal_cut import (
    causal_blocks,
    check_prefix,
    position_lse,
    prefix_batch,
)
from lightning_fisher.outputs import FisherInputError

pytest.importorskip("transformers")
VOCAB, T = 24, 20  # 19 predicted positions per sequence: 3 causal blocks


def lm_batches(n: int = 4, seed: int = 1) -> list[dict[str, Tensor]]:
    """Two batches of token ids with right padding of varied lengths, labels = ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=gen)
    lengths = torch.tensor([T, 9, T, 14, 3, T][:n])
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    half = n // 2
    return [
        hf.with_lm_labels({"input_ids": ids[i : i + half], "attention_mask": mask[i : i + half]})
        for i in (0, half)
    ]


def lengths_seen(model: nn.Module) -> tuple[list[int], Any]:
    """The sequence lengths of the model's forwards, from a forward pre-hook."""
    seen: list[int] = []

    def hook(_m: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(int(kwargs["input_ids"].shape[1]))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def uncut_and_cut(
    model: nn.Module, batches: list[Any], **kw: Any
) -> tuple[lf.FisherDiagonal, lf.FisherDiagonal, list[int]]:
    """The Fisher with ``causal=False`` and with ``causal=True``, and the sequence lengths of
    the second pass's forwards."""
    full = lf.estimate_fisher(model, batches, causal=False, **kw)
    seen, handle = lengths_seen(model)
    try:
        cut = lf.estimate_fisher(model, batches, causal=True, **kw)
    finally:
        handle.remove()
    return full, cut, seen


def test_blocks_cover_the_positions_once() -> None:
    for n in (1, 5, 7, 8, 19, 100, 511, 512):
        blocks = causal_blocks(n)
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(b0[1] == b1[0] and b0[0] < b0[1] for b0, b1 in itertools.pairwise(blocks))
    assert len(causal_blocks(7)) == 1 and len(causal_blocks(19)) == 3
    assert len(causal_blocks(511)) == 16


@pytest.mark.parametrize(
    ("method", "extra"),
    [("empirical", {}), ("exact", {}), ("sample", {"token_route": "position", "mc_samples": 2})],
)
def test_the_cut_gives_the_uncut_fisher(method: str, extra: dict[str, Any]) -> None:
    model = random_gpt2(VOCAB, width=16, layers=2, positions=32)
    batches = lm_batches()
    full, cut, seen = uncut_and_cut(
        model, batches, shift_labels=True, method=method, seed=3, **extra
    )
    # Blocks [0, 6), [6, 13), [13, 19) of the 19 predicted positions: prefixes of 7 and 14 inputs
    assert sorted(set(seen)) == [7, 14, T], seen
    assert cut.n_samples == full.n_samples
    for name in full:
        err = (cut[name] - full[name]).abs().max() / full[name].abs().max()
        assert err < 1e-10, f"{name}: {err:.1e}"


def test_the_cut_gives_the_uncut_fisher_through_dense_columns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the head split the blocks' columns are dense over (B, T, C) slices of the
    positions: still the uncut Fisher."""
    from lightning_fisher.estimators import per_input

    monkeypatch.setattr(per_input.PerInputEngine, "head_split", False)
    model = random_gpt2(VOCAB, width=16, layers=2, positions=32)
    batches = lm_batches()
    full, cut, seen = uncut_and_cut(model, batches, shift_labels=True, method="empirical")
    assert sorted(set(seen)) == [7, 14, T], seen
    for name in full:
        err = (cut[name] - full[name]).abs().max() / full[name].abs().max()
        assert err < 1e-10, f"{name}: {err:.1e}"


def test_the_cut_matches_the_dense_reference() -> None:
    """Token-level exact and empirical through the cut (``hf.lm_fisher_kwargs``) against one
    autograd gradient per (sequence, position, logit)."""
    model = random_gpt2(VOCAB, width=16, layers=1, positions=32)
    batches = lm_batches()
    ids = torch.cat([b["input_ids"] for b in batches])
    am = torch.cat([b["attention_mask"] for b in batches])
    labels = ids.masked_fill(am == 0, -100)
    ref = {"x": ids, "am": am, "mask": am[:, 1:].bool(), "y": labels[:, 1:]}
    js, zs, ys = per_input_jacobians(
        model,
        lambda f, r: f(input_ids=r["x"], attention_mask=r["am"]).logits[:, :-1],
        [ref],
        token_level=True,
    )
    kw = hf.lm_fisher_kwargs(model)
    assert kw["causal"] is True
    seen, handle = lengths_seen(model)
    try:
        exact = lf.estimate_fisher(model, batches, method="exact", **kw)
        emp = lf.estimate_fisher(model, batches, method="empirical", **kw)
    finally:
        handle.remove()
    assert min(seen) < T
    for fd, flat in (
        (exact, dense_fisher(js, zs).diagonal()),
        (emp, per_label_grads(js, zs, ys).pow(2).mean(0)),  # type: ignore[arg-type]
    ):
        assert fd.n_samples == len(js)
        for name, want in unflatten(model, flat).items():
            err = (fd[name].double() - want).abs().max() / want.abs().max().clamp_min(1e-12)
            assert err < 1e-6, f"{fd.method} {name}: relative error {err:.2e}"


def test_the_cut_holds_in_bfloat16() -> None:
    """The prefix check's tolerance passes a causal model's rounding in bfloat16."""
    model = random_gpt2(VOCAB, width=16, layers=2, positions=32, dtype=torch.bfloat16)
    batches = lm_batches()
    cut = lf.estimate_fisher(model, batches, method="empirical", shift_labels=True, causal=True)
    full = lf.estimate_fisher(model, batches, method="empirical", shift_labels=True)
    for name in full:
        err = (cut[name].float() - full[name].float()).abs().max() / full[name].float().abs().max()
        assert err < 0.1, f"{name}: {err:.1e}"


class ReadsAhead(nn.Module):
    """Token logits that see the mean of the whole sequence: not causal."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.emb(input_ids)
        return self.head(h + h.mean(1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_model_that_reads_ahead_is_refused(dtype: torch.dtype) -> None:
    model = ReadsAhead().to(dtype)
    batches = lm_batches()
    lf.estimate_fisher(model, batches, method="empirical", shift_labels=True)  # uncut: fine
    with pytest.raises(FisherInputError, match="reads ahead"):
        lf.estimate_fisher(model, batches, method="empirical", shift_labels=True, causal=True)


class SequenceFirst(nn.Module):
    """A causal LM on sequence-first token ids (T, B) (a running mean of embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids).cumsum(0) / torch.arange(1, ids.shape[0] + 1).view(-1, 1, 1)
        return self.head(h)  # (T, B, C)


def test_float64_prefix_check_allows_float32_rounding_not_reading_ahead() -> None:
    """A float64 model that computes parts in float32 (Llama's RMSNorm) gives a prefix whose
    logits differ from the whole sequence's by float32 rounding: accepted. A change at the scale
    of reading ahead is still refused."""
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(2, 12, 9, generator=gen, dtype=torch.float64)
    lse = position_lse(full)
    rounding = full[:, :6] * (1 + 1e-7 * torch.randn(2, 6, 9, generator=gen, dtype=torch.float64))
    check_prefix(rounding, lse, 6)
    with pytest.raises(FisherInputError, match="reads ahead"):
        check_prefix(full[:, :6] + 1e-3 * torch.randn(2, 6, 9, generator=gen), lse, 6)


@pytest.mark.parametrize("hidden", [16, 128])
def test_the_cut_runs_on_a_float64_llama(hidden: int) -> None:
    """Llama-family models (rotary positions, RMSNorm in float32 even in a float64 model): the
    prefix check passes and the cut gives the uncut Fisher to float32 rounding."""
    model = random_decoder("llama", 300, width=hidden, layers=2, seed=4)
    ids = torch.randint(0, 300, (2, 40))
    batch = hf.with_lm_labels({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    kw = hf.lm_fisher_kwargs(model)
    assert kw.pop("causal") is True
    full, cut, seen = uncut_and_cut(model, [batch], method="empirical", **kw)
    assert min(seen) < 40  # prefixes ran
    for name, f in full.items():
        assert torch.allclose(cut[name], f, rtol=1e-5, atol=1e-5 * float(f.abs().max())), name


def test_sequence_first_inputs_are_refused_not_cut_wrongly() -> None:
    """Positions on dim 0 of the inputs: when dim 1 (the batch) happens to have the sequence's
    length the cut would take rows, not positions; the prefix check refuses it."""
    model = SequenceFirst().double()
    ids = torch.randint(0, VOCAB, (T, T), generator=torch.Generator().manual_seed(0))
    batch = (ids, ids.t())  # inputs (T, B) with B = T; labels (B, T)

    def output_fn(m: nn.Module, b: Any) -> Tensor:
        return m(b[0]).transpose(0, 1)

    kw = {"method": "empirical", "shift_labels": True, "output_fn": output_fn}
    lf.estimate_fisher(model, [batch], **kw)  # uncut: fine
    with pytest.raises(FisherInputError, match="sequence-first inputs"):
        lf.estimate_fisher(model, [batch], causal=True, **kw)


def test_a_cut_that_misses_the_inputs_warns_and_stays_right() -> None:
    """Sequence-first inputs whose batch size is not the length: only the (B, T) labels are cut,
    the model reads every position, and the Fisher is still the uncut one."""
    model = SequenceFirst().double()
    ids = torch.randint(0, VOCAB, (T, 3), generator=torch.Generator().manual_seed(0))

    def output_fn(m: nn.Module, b: Any) -> Tensor:
        return m(b[0]).transpose(0, 1)

    kw = {"method": "empirical", "shift_labels": True, "output_fn": output_fn}
    full = lf.estimate_fisher(model, [(ids, ids.t())], **kw)
    with pytest.warns(UserWarning, match="inputs were not cut"):
        cut = lf.estimate_fisher(model, [(ids, ids.t())], causal=True, **kw)
    for name in full:
        assert torch.allclose(cut[name], full[name], rtol=1e-10, atol=0)


def test_prefix_batch_cuts_the_sequence_tensors_only() -> None:
    x = torch.zeros(2, 10, 3)
    batch = {"input_ids": torch.zeros(2, 10), "pixel": torch.zeros(2, 4), "x": x}
    out = prefix_batch(batch, 6, 10)
    assert out["input_ids"].shape == (2, 6) and out["x"].shape == (2, 6, 3)
    assert out["pixel"].shape == (2, 4)
    assert [t.shape for t in prefix_batch((x, [x]), 4, 10)[1]] == [(2, 4, 3)]
    with pytest.raises(FisherInputError, match=r"no \(B, T, \.\.\.\) tensor with T = 12"):
        prefix_batch(batch, 6, 12)


def test_causal_must_be_a_flag() -> None:
    with pytest.raises(FisherInputError, match="causal must be True or False"):
        lf.FisherOptions(causal=1)  # type: ignore[arg-type]


def test_position_lse_in_chunks_equals_one_logsumexp(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_fisher.estimators import causal_cut

    z = torch.randn(3, 11, 7, dtype=torch.bfloat16)
    want = torch.logsumexp(z.float(), -1)
    monkeypatch.setattr(causal_cut, "LSE_CHUNK_BYTES", 3 * 7 * 4 * 2)  # two positions a chunk
    assert torch.equal(causal_cut.position_lse(z), want)
