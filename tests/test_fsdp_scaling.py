"""``benchmarks/fsdp_scaling.py`` at tiny size on CPU processes (gloo): FSDP2 under
``ModelParallelStrategy`` and FSDP1 under ``FSDPStrategy`` on 1 and 2 ranks, a GPT-2 decoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp_scaling_script_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "fsdp_scaling.json"
    cmd = [sys.executable, "-m", "benchmarks.fsdp_scaling", "--tiny", "--cpu", "--gpus", "1", "2"]
    cmd += ["--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"command", "device", "versions", "rows", "skipped"} <= report.keys()
    assert report["skipped"] == []
    rows = {(r["gpus"], r["strategy"]): r for r in report["rows"]}
    assert set(rows) == {(1, "fsdp2"), (1, "fsdp1"), (2, "fsdp2"), (2, "fsdp1")}
    for (gpus, _), row in rows.items():
        assert row["params"] > 0 and row["model"].startswith("gpt2 2 x 64")
        # float32 on CPU: the gathered sharded Fisher is the DDP pass's up to rounding
        assert row["fisher_max_rel_diff_vs_unsharded"] <= 1e-5, row
        assert row["fisher_max_rel_diff_vs_unsharded_run_dtype"] <= 1e-5, row
        assert row["fisher_sharded"] is True, row
        # Fisher and anchors: each rank holds about its share of the whole
        assert abs(row["fisher_fraction_per_rank"] - 1 / gpus) <= 0.05 / gpus, row
        # the steps timed "with" added the penalty gradient, those "without" did not
        assert row["ewc_penalty_as_scheduled"] is True, row
        assert row["ewc_step_ratio"] > 0 and row["fisher_seqs_per_second"] > 0
        assert row["speedup"] == 1.0 if gpus == 1 else row["speedup"] > 0
    assert out.with_suffix(".md").exists()


def test_each_strategy_trains_the_parameters_in_their_own_dtype() -> None:
    """FSDPStrategy casts the module to its precision flag's dtype ("32-true" made the bf16 GPU
    model float32 in the first GPU run); the script's flag keeps bf16 under both strategies."""
    import torch
    from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.fsdp_scaling import Config, precision

    bf16 = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert FSDPPrecision("32-true").convert_module(bf16).weight.dtype == torch.float32  # the trap
    gpu = Config()
    assert gpu.dtype == "bfloat16"
    flag = precision("fsdp1", gpu)
    kept = FSDPPrecision(flag).convert_module(torch.nn.Linear(2, 2).to(torch.bfloat16))  # type: ignore[arg-type]
    assert kept.weight.dtype == torch.bfloat16
    assert precision("fsdp2", gpu) == "32-true"  # ModelParallelStrategy leaves the module alone
    assert precision("fsdp1", Config(dtype="float32")) == "32-true"
