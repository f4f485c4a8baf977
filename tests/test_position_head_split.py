"""Per-position columns split at the vocabulary head against the brute-force dense reference.

Token-level ``empirical``, ``exact`` and ``sample`` by the per-position route on float64 models:
tiny GPT-2 (tied and untied ``lm_head``, eager attention, next-token labels), a causal LM with an
``nn.Linear`` or ``transformers`` ``Conv1D`` head (a tied one, one whose logits are a slice of the
head's positions), and a model whose logits mix the head's positions, where the split must not be
taken. The engine's self-check runs on every estimate (``verify=True``).
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
from lightning_fisher.estimators import per_input
from lightning_fisher.outputs import FisherInputError

VOCAB, T = 11, 12
RTOL = 1e-6  # the diagonal is stored in float32


class CausalLM(nn.Module):
    """Embedding, tanh of a Linear, a causal running mean, a vocabulary head: ``head`` is
    ``"linear"``, ``"tied"`` (sharing the embedding table), ``"conv1d"`` (``transformers``'
    ``Conv1D``) or ``"mixed"`` (logits head(h) + head(h) rolled by one position). ``crop`` drops
    the first positions of the logits (a slice after the head)."""

    def __init__(self, head: str = "linear", crop: int = 0, dim: int = 5) -> None:
        super().__init__()
        self.kind, self.crop = head, crop
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        if head == "conv1d":
            conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
            self.head: nn.Module = conv1d(VOCAB, dim)
        else:
            self.head = nn.Linear(dim, VOCAB, bias=head != "tied")
        if head == "tied":
            self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        steps = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype, device=h.device)
        h = torch.tanh(self.mix(h.cumsum(1) / steps[:, None]))
        z = self.head(h)
        if self.kind == "mixed":
            z = z + self.head(h).roll(1, dims=1)
        return z[:, self.crop :]


def _batches(crop: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5, (5, T), generator=gen)  # repeated tokens, 0 the padding row
    labels = torch.randint(0, VOCAB, (5, T - crop), generator=gen)
    labels[1, 3:] = -100
    return [(ids[:3], labels[:3]), (ids[3:], labels[3:])]


def _gpt2(tied: bool) -> tuple[nn.Module, list[Any], dict[str, Any]]:
    pytest.importorskip("transformers")
    model = random_gpt2(VOCAB, positions=T, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 5, (3, T), generator=gen)
    mask = (torch.arange(T) < torch.tensor([T, 4, T])[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    batches = [
        hf.with_lm_labels({"input_ids": ids[i:j], "attention_mask": mask[i:j]})
        for i, j in ((0, 2), (2, 3))
    ]
    return model, batches, hf.lm_fisher_kwargs(model)


def _check(
    model: nn.Module, batches: list[Any], kw: dict[str, Any], method: str, engines: list[Any]
) -> per_input.PerInputEngine:
    """The estimate against the dense reference; returns the pass's engine."""
    ref = dense_reference(model, batches, shift_labels=kw.get("shift_labels", False))
    if method == "sample":
        want, extra = ref.sample(2, seed=5), {"mc_samples": 2, "seed": 5}
    else:
        want, extra = (ref.empirical() if method == "empirical" else ref.exact()), {}
    got = lf.estimate_fisher(
        model, batches, method=method, token_route="position", verify=True, **kw, **extra
    )
    err, where = max_relative_error(dict(got.items()), want)
    assert err <= RTOL, f"{method}: {err:.2e} on {where}"
    return engines[-1]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("method", ["empirical", "exact", "sample"])
def test_gpt2_head_split_matches_the_dense_reference(
    tied: bool, method: str, engines: list[Any]
) -> None:
    model, batches, kw = _gpt2(tied)
    engine = _check(model, batches, kw, method, engines)
    assert engine.split_head == "lm_head"
    assert "lm_head: head split refused" not in engine.log


@pytest.mark.parametrize(
    ("head", "crop"), [("linear", 0), ("tied", 0), ("conv1d", 0), ("linear", 2)]
)
@pytest.mark.parametrize("method", ["empirical", "exact", "sample"])
def test_causal_lm_head_split_matches_the_dense_reference(
    head: str, crop: int, method: str, engines: list[Any]
) -> None:
    torch.manual_seed(0)
    model = CausalLM(head, crop).double().eval()
    engine = _check(model, _batches(crop), {}, method, engines)
    assert engine.split_head == "head"


def test_split_equals_the_dense_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same pass with the split and with the dense per-position columns: equal to round-off."""
    model, batches, kw = _gpt2(True)

    def run() -> Tensor:
        return lf.estimate_fisher(
            model, batches, method="exact", token_route="position", **kw
        ).flatten()

    split = run()
    monkeypatch.setattr(per_input.PerInputEngine, "head_split", False)
    torch.testing.assert_close(split, run(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["empirical", "exact"])
def test_head_output_mixed_across_positions_is_not_split(method: str, engines: list[Any]) -> None:
    torch.manual_seed(0)
    model = CausalLM("mixed").double().eval()
    engine = _check(model, _batches(), {}, method, engines)
    assert engine.split_head is None


def test_a_wrong_split_fails_the_check_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, engines: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A head split whose position offset is wrong is caught by the self-check (its gradients
    come from the split): the pass takes the dense columns and is right."""
    real = per_input._head_offset

    def off_by_one(logits: Tensor, out: Tensor) -> int | None:
        offset = real(logits, out)
        return None if offset is None else offset - 1

    monkeypatch.setattr(per_input, "_head_offset", off_by_one)
    torch.manual_seed(0)
    model = CausalLM("linear", crop=2).double().eval()
    with caplog.at_level("INFO", logger="lightning_fisher"):
        engine = _check(model, _batches(2), {}, "empirical", engines)
    assert engine.split_head is None and "head: head split refused" in engine.log
    assert "failed the per-input check" in caplog.text


def test_a_cap_fits_more_positions_per_backward(
    monkeypatch: pytest.MonkeyPatch, engines: list[Any]
) -> None:
    """Under one cap the split's chunks hold more columns than the dense columns', and both give
    the same Fisher; a cap below one split column is refused with a message."""
    torch.manual_seed(0)
    model = CausalLM("linear", dim=16).double().eval()
    model.head = nn.Linear(16, 4000).double()  # one dense column: 3 x 12 x 4000 x 8 = 1.1 MiB
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, T), generator=gen)
    batches = [(ids, torch.randint(0, 4000, (3, T), generator=gen))]

    def run() -> tuple[Tensor, int]:
        fd = lf.estimate_fisher(
            model, batches, method="empirical", token_route="position", max_memory_mib=6
        )
        return fd.flatten(), engines[-1].max_backward_columns

    split, split_cols = run()
    assert engines[-1].split_head == "head"
    monkeypatch.setattr(per_input.PerInputEngine, "head_split", False)
    dense, dense_cols = run()
    assert engines[-1].split_head is None
    torch.testing.assert_close(split, dense, rtol=1e-12, atol=0)
    assert split_cols == T and dense_cols == 1, (split_cols, dense_cols)
    monkeypatch.setattr(per_input.PerInputEngine, "head_split", True)
    # one split column's (B, C) slice: 3 x 12000 x 8 bytes, over a quarter of 1 MiB
    model.head = nn.Linear(16, 12000).double()
    with pytest.raises(FisherInputError, match=r"cotangents of one column.*max_memory_mib >= \d+"):
        lf.estimate_fisher(
            model,
            [(ids, batches[0][1])],
            method="empirical",
            token_route="position",
            max_memory_mib=1,
            verify=False,
        )
