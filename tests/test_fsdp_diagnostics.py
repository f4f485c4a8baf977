"""Diagnostics, FisherMonitor and FisherTraceRegularizer on sharded (FSDP2) models: every number
equal to the unsharded (DDP) run's, on 2 CPU processes (gloo), through
``benchmarks/fsdp_check.py``'s diagnostics rows; the bounded histogram sample; the refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lit_helpers import Classifier

import lightning_fisher as lf
from lightning_fisher.sharded import sample_entries

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp2_diagnostics_and_callbacks_equal_unsharded_runs() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.fsdp_check import run_diagnostics

    rows, details = run_diagnostics(WORLD)
    assert [row["method"] for row in rows[:2]] == ["deterministic bounds", "hutchinson bounds"]
    for row in rows:
        assert row["world_size"] == WORLD
        assert row["fisher_placed_like_params"] is True, row
        assert row["fisher_max_rel_diff_vs_unsharded"] <= 1e-6, row
    # the regulariser's gradient, added to the local shards, gives DDP's update ...
    assert rows[2]["ewc_update_max_rel_diff_vs_ddp"] <= 1e-6, rows[2]
    # ... and it matters: without the regulariser the update is another one
    assert details["regularizer_effect"] > 1e-3, details
    # what was compared: bounds with their certificate, CVs and standard errors, fractions
    deterministic, hutchinson = details["deterministic_scalars"], details["hutchinson_scalars"]
    for name in ("bounds/order_violations", "certificate/tail_eigenvalue_max", "exact/trace"):
        assert any(k.endswith(name) for k in deterministic), name
    for name in ("hutchinson/cv", "hutchinson/trace_se", "bounds/f_over_upper_se"):
        assert any(k.endswith(name) for k in hutchinson), name
    logged = details["lightning_metrics"]
    for name in ("fisher/trace@", "fisher/exact/trace@", "fisher/frac_below/net.0@"):
        assert any(k.startswith(name) for k in logged), name  # monitor and diagnostics
    assert any(k.startswith("fisher_trace/penalty@") for k in logged)
    # the histogram sample is bounded (16 entries per parameter) and holds entries
    for name, size in details["sample_sizes"].items():
        assert 0 < size <= min(16, details["numel"][name.removeprefix("net.")]), (name, size)
    assert details["spectrum_refused"] is True
    assert rows[2]["checkpoint_sharded_bitwise"] is True  # FisherMonitor's sharded estimate
    assert rows[2]["checkpoint_full_bitwise"] is True


def test_sample_entries_is_bounded_fixed_and_reads_the_entries() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.rand(7, 9, generator=gen), "a.bias": torch.rand(4, generator=gen)}
    sample = sample_entries(tensors, 10, seed=3)
    assert torch.equal(sample["a.bias"], tensors["a.bias"])  # small: every entry, in order
    got = sample["a.weight"]
    assert 0 < got.numel() <= 10
    # each sampled value is an entry of the tensor, drawn without repeats
    flat = tensors["a.weight"].reshape(-1)
    assert all(bool((flat == v).any()) for v in got)
    assert got.unique().numel() == got.numel()
    assert torch.equal(sample_entries(tensors, 10, seed=3)["a.weight"], got)  # the same again
    assert not torch.equal(sample_entries(tensors, 10, seed=4)["a.weight"], got)
    assert torch.equal(sample_entries(tensors, None)["a.weight"], flat)


def test_spectrum_is_refused_under_model_parallel_at_setup() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    fake = SimpleNamespace(strategy=ModelParallelStrategy())
    lf.FisherDiagnostics().setup(fake, Classifier(), "fit")  # type: ignore[arg-type]
    for kwargs in ({"eigenvalues": 2}, {"spectral_density": True}):
        with pytest.raises(lf.FisherInputError, match="Fisher-vector products F v on whole"):
            lf.FisherDiagnostics(**kwargs).setup(fake, Classifier(), "fit")  # type: ignore[arg-type]
    with pytest.raises(lf.FisherInputError, match="histogram_entries"):
        lf.FisherDiagnostics(histogram_entries=0)
