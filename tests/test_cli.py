"""The ``lightning-fisher render`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_case
from lightning.pytorch.loggers import CSVLogger
from test_diagnostics import assert_png

import lightning_fisher as lf
from lightning_fisher.cli import main
from lightning_fisher.diagnostics import compute_diagnostics


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = make_case("mlp", dtype=torch.float32)
    path = tmp_path_factory.mktemp("fisher") / "task1.safetensors"
    lf.estimate_fisher(case.model, case.loader, "exact").save(path)
    return path


def test_render_draws_every_file_and_prints_layers(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fd = lf.FisherDiagonal.load(saved)
    other = tmp_path / "scaled.safetensors"
    fd.scale(1e-6).save(other)
    out = tmp_path / "figs"
    assert main(["render", str(saved), str(other), "--out", str(out), "--threshold", "1e-4"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "scaled_layer_density.png",
        "task1_layer_density.png",
    ]
    for p in out.iterdir():
        assert_png(p.read_bytes())
    text = capsys.readouterr().out
    assert f"trace={fd.trace():.6g}" in text and "method=exact" in text
    for layer in fd.layer_traces():
        assert any(line.split()[:1] == [layer] for line in text.splitlines())


def test_render_history_from_a_csv_logger(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = make_case("mlp", dtype=torch.float32)
    logger = CSVLogger(tmp_path)
    for step in (10, 20, 30):
        logger.log_metrics(
            compute_diagnostics(case.model, case.loader, seed=step).scalars("fisher"), step=step
        )
    logger.log_metrics({"train_loss": 0.5}, step=31)  # rows without diagnostics are skipped
    logger.save()
    metrics = Path(logger.log_dir) / "metrics.csv"
    assert (
        main(["render", str(saved), "--out", str(tmp_path / "o"), "--history", str(metrics)]) == 0
    )
    assert_png((tmp_path / "o" / "bounds.png").read_bytes())
    assert "3 evaluations" in capsys.readouterr().out


def test_bad_input_exits_2_and_writes_nothing(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    assert main(["render", str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert main(["render", str(saved), str(junk), "--out", str(out)]) == 2
    assert "not a saved FisherDiagonal" in capsys.readouterr().err
    csv_file = tmp_path / "metrics.csv"
    csv_file.write_text("step,train_loss\n1,0.5\n")
    assert main(["render", str(saved), "--out", str(out), "--history", str(csv_file)]) == 2
    assert "no 'fisher/...' diagnostics columns" in capsys.readouterr().err
    assert main(["render", str(saved), "--out", str(out), "--threshold", "0"]) == 2
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["render", str(saved)])  # --out is required
    assert "--out" in capsys.readouterr().err


def test_python_dash_m_runs_the_command(saved: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lightning_fisher", "render", str(saved), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert_png((tmp_path / "task1_layer_density.png").read_bytes())
