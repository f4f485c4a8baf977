"""Device-to-host reads of a Fisher pass, counted on CPU: every read stops a GPU pass until the
device has run everything queued before it, so a pass of a deep model must not read once per
layer. Counted per batch (a pass of two batches minus a pass of one) with the benchmark's
``ReadCounter``: ``item``/``bool`` reads, ``nonzero``/``unique``, boolean-mask indexing and
``tolist``/``cpu`` copies."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import random_gpt2
from torch import nn

import lightning_fisher as lf
from benchmarks.host_work import count_reads
from lightning_fisher import hf

pytest.importorskip("transformers")

LM_PASSES = {
    "sample-token": {"method": "sample", "token_route": "sequence"},
    "empirical-sequence": {"method": "empirical", "granularity": "sequence"},
    "sample-sequence": {"method": "sample", "granularity": "sequence"},
}


def _ours(sources: dict[str, int]) -> int:
    return sum(n for where, n in sources.items() if where.startswith("lightning_fisher."))


def reads_per_batch(model: torch.nn.Module, batch: Any, **kw: Any) -> tuple[int, dict[str, int]]:
    """Reads that one more batch adds to a pass (the third pass: the plan is reused), in all and
    by source."""

    def run(n: int) -> None:
        lf.estimate_fisher(model, [batch] * n, progress=False, verify=False, **kw)

    run(1)
    run(2)
    one, two = count_reads(lambda: run(1)), count_reads(lambda: run(2))
    return two.total - one.total, dict(two.sources - one.sources)


def lm_batch(vocab: int, B: int = 3, T: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return hf.with_lm_labels({"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("name", list(LM_PASSES))
def test_lm_pass_reads_do_not_grow_with_depth(name: str) -> None:
    batch = lm_batch(31)
    counts = {}
    for layers in (1, 3):
        model = random_gpt2(31, layers=layers, width=8, dtype=torch.float32)
        kw = {**hf.lm_fisher_kwargs(model), **LM_PASSES[name]}
        counts[layers] = reads_per_batch(model, batch, **kw)
    (shallow, _), (deep, deep_sources) = counts[1], counts[3]
    assert deep == shallow, f"{shallow} reads per batch at 1 layer, {deep} at 3: {deep_sources}"
    # the batch's facts after the forward, every layer's route before the sums of squares
    assert _ours(deep_sources) <= 2, deep_sources


def test_per_position_reads_do_not_grow_with_depth() -> None:
    """Token-level ``empirical`` by the per-position route with many columns per backward (19
    positions, uncut): every layer's direct-route column blocks read their ends with the routes'
    one read per chunk."""
    batch = lm_batch(31, T=20)
    counts = {}
    for layers in (1, 3):
        model = random_gpt2(31, layers=layers, width=8, positions=32, dtype=torch.float32)
        kw = {**hf.lm_fisher_kwargs(model), "method": "empirical", "causal": False}
        counts[layers] = reads_per_batch(model, batch, **kw)
    (shallow, _), (deep, deep_sources) = counts[1], counts[3]
    assert deep == shallow, f"{shallow} reads per batch at 1 layer, {deep} at 3: {deep_sources}"
    assert _ours(deep_sources) <= 4, deep_sources


def deep_mlp(hidden_layers: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 8), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_mlp_pass_reads_do_not_grow_with_depth(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 5, generator=g), torch.randint(0, 4, (6,), generator=g))
    counts = [reads_per_batch(deep_mlp(depth), batch, method=method) for depth in (1, 4)]
    assert counts[0][0] == counts[1][0], counts
    assert _ours(counts[1][1]) <= 1, counts[1][1]


def test_read_counter_sees_the_reads_a_gpu_would_wait_for() -> None:
    t = torch.tensor([1.0, -2.0, 3.0])
    counter = count_reads(
        lambda: (t.sum().item(), bool(t.any()), t[t > 0], torch.unique(t), t.tolist(), t.cpu())
    )
    assert dict(counter.kinds) == {
        "_local_scalar_dense": 2,
        "_bool_index": 1,
        "_unique2": 1,
        "tolist": 1,
        "cpu": 1,
    }
