"""Distributed support: ``benchmarks/ddp_scaling.py`` at tiny size on 2 CPU processes (gloo), and
the refusal of parameter-sharding strategies (FSDP1, DeepSpeed; FSDP2 is supported) at setup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lit_helpers import Classifier

import lightning_fisher as lf

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_scaling_script_two_gloo_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "benchmarks.ddp_scaling", "--cpu", "--gpus", "2", "--tiny"]
    cmd += ["--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"command", "device", "versions", "rows"} <= report.keys()
    (row,) = report["rows"]
    assert row["gpus"] == 2 and row["samples_per_second"] > 0
    # Every rank holds the same Fisher, that of the union of the shards (= one process).
    assert row["fisher_equal_across_ranks"] is True
    assert row["fisher_max_rel_diff_vs_one_process"] <= 1e-5
    # EWC under Lightning's DDP: same consolidated Fisher and same weights after EWC updates.
    assert row["ewc_fisher_equal_across_ranks"] is True
    assert row["ewc_params_equal_across_ranks"] is True
    assert row["ewc_task_count"] == 2
    assert out.with_suffix(".md").exists()


def _fake_trainer(strategy: Any) -> Any:
    return SimpleNamespace(strategy=strategy)


@pytest.mark.parametrize("strategy", [FSDPStrategy, ModelParallelStrategy])
@pytest.mark.parametrize(
    "callback",
    [
        lambda: lf.EWC(lam=1.0),
        lambda: lf.FisherMonitor(),
        lambda: lf.FisherTraceRegularizer(alpha=0.1),
    ],
    ids=["EWC", "FisherMonitor", "FisherTraceRegularizer"],
)
def test_sharded_strategies_are_accepted_at_setup(strategy: type, callback: Any) -> None:
    # FSDP needs GPUs in Lightning, so the strategy object is set up without a Trainer here.
    # FSDP2 and FSDP1 (use_orig_params=True) are supported by every callback here; what FSDP1
    # cannot serve is refused in tests/test_fsdp1*.py.
    callback().setup(_fake_trainer(strategy()), Classifier(), "fit")


def test_ddp_strategy_is_accepted_at_setup() -> None:
    for cb in (lf.EWC(lam=1.0), lf.FisherMonitor(), lf.FisherTraceRegularizer(alpha=0.1)):
        cb.setup(_fake_trainer(DDPStrategy()), Classifier(), "fit")
