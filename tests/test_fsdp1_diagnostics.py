"""FisherDiagnostics, FisherMonitor and FisherTraceRegularizer on FSDP1 models
(``FullyShardedDataParallel`` with ``use_orig_params=True``; Lightning's ``FSDPStrategy``): every
number equal to the unsharded (DDP) run's, on 2 CPU processes (gloo), through
``benchmarks/fsdp_check.py``'s FSDP1 diagnostics rows; on one process, the flat-piece sample and
the refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lit_helpers import Classifier

import lightning_fisher as lf
from lightning_fisher.sharded import sample_entries
from lightning_fisher.sharded_fsdp1 import Piece

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp1_diagnostics_and_callbacks_equal_unsharded_runs() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.fsdp_check import run_fsdp1_diagnostics

    rows, details = run_fsdp1_diagnostics(WORLD)
    layouts = [row["strategy"] for row in rows]
    for layout in ("each Linear a unit", "NO_SHARD", "one-unit wrapper", "FSDPStrategy"):
        assert any(layout in s for s in layouts), layout
    for row in rows:
        assert row["world_size"] == WORLD
        assert row["fisher_placed_like_params"] is True, row
        assert row["fisher_max_rel_diff_vs_unsharded"] <= 1e-6, row
    lightning = rows[-1]
    # the regulariser's gradient on whole parameters, cut to the pieces, gives DDP's update
    assert lightning["ewc_update_max_rel_diff_vs_ddp"] <= 1e-6, lightning
    assert details["penalty_grad_diff"] <= 1e-6, details
    assert details["training_after_bitwise"] is True  # FSDP1's own parameters back in place
    assert lightning["checkpoint_sharded_bitwise"] is True, lightning  # the monitor's pieces
    assert lightning["checkpoint_full_bitwise"] is True, lightning
    # what was compared: bounds with their certificate, CVs and standard errors, fractions
    deterministic = details["each Linear a unit, deterministic_scalars"]
    hutchinson = details["each Linear a unit, hutchinson_scalars"]
    for name in ("bounds/order_violations", "certificate/tail_eigenvalue_max", "exact/trace"):
        assert any(k.endswith(name) for k in deterministic), name
    for name in ("hutchinson/cv", "hutchinson/trace_se", "bounds/f_over_upper_se"):
        assert any(k.endswith(name) for k in hutchinson), name
    logged = details["lightning_metrics"]
    for name in (
        "fisher/trace@",
        "fisher/trace/net.0@",  # layers named as in the unwrapped model
        "fisher/exact/trace@",
        "fisher/frac_below/net.0@",
        "fisher_trace/penalty@",
    ):
        assert any(k.startswith(name) for k in logged), name
    # the histogram sample is bounded (16 entries per parameter) and holds entries
    for name, size in details["sample_sizes"].items():
        assert 0 < size <= min(16, details["numel"][name.removeprefix("net.")]), (name, size)
    assert details["spectrum_refused"] is True


def test_sample_entries_of_flat_pieces_is_the_whole_tensors_sample() -> None:
    """On one process, pieces covering a parameter's flat entries give the whole tensor's sample
    piece by piece: each entry where its piece holds it, zero elsewhere (the ranks' sum)."""
    gen = torch.Generator().manual_seed(0)
    whole = torch.rand(7, 9, generator=gen)
    want = sample_entries({"w": whole}, 10, seed=3)["w"]
    total = torch.zeros_like(want)
    for start, count in ((0, 40), (40, 23), (63, 0)):
        piece = Piece(whole.shape, start, count, torch.Size([count]), None)
        local = whole.reshape(-1)[start : start + count]
        got = sample_entries({"w": local}, 10, seed=3, pieces={"w": piece})["w"]
        assert got.shape == want.shape
        total += got
    assert torch.equal(total, want)


def test_fsdp_strategy_supports_the_callbacks_and_refuses_what_fsdp1_cannot_serve() -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch import nn

    makers = (
        lambda: lf.FisherMonitor(),
        lambda: lf.FisherDiagnostics(),
        lambda: lf.FisherTraceRegularizer(alpha=0.1),
    )
    for make in makers:
        make().setup(SimpleNamespace(strategy=FSDPStrategy()), Classifier(), "fit")  # type: ignore[arg-type]
        for strategy, match in (
            (FSDPStrategy(use_orig_params=False), "use_orig_params=True"),
            (
                FSDPStrategy(sharding_strategy="HYBRID_SHARD", auto_wrap_policy={nn.Linear}),
                "HYBRID",
            ),
        ):
            with pytest.raises(lf.FisherInputError, match=match):
                make().setup(SimpleNamespace(strategy=strategy), Classifier(), "fit")  # type: ignore[arg-type]
    for kwargs in ({"eigenvalues": 2}, {"spectral_density": True}):
        with pytest.raises(lf.FisherInputError, match=r"FSDPStrategy.*Fisher-vector products"):
            lf.FisherDiagnostics(**kwargs).setup(  # type: ignore[arg-type]
                SimpleNamespace(strategy=FSDPStrategy()), Classifier(), "fit"
            )
