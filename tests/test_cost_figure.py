"""The exact-diagonal cost figure: one panel per model, one bar per implementation that ran."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cost_figure  # noqa: E402


def test_cost_figure_draws_the_report(tmp_path: Path) -> None:
    report = {
        "device": "a test device",
        "rows": [
            {"model": "m1", "implementation": "train-step", "ratio_to_step": 1.0},
            {"model": "m1", "implementation": "ours-exact-later", "ratio_to_step": 2.5},
            {"model": "m1", "implementation": "backpack-diagggn-exact", "ratio_to_step": 3.0},
            {"model": "m1", "implementation": "nngeometry-pmatdiag", "ratio_to_step": None},
            {"model": "m2", "implementation": "ours-hutchinson", "ratio_to_step": 1.5},
        ],
    }
    fig = cost_figure.cost_figure(report)
    bars = [len(ax.patches) for ax in fig.axes]
    assert bars == [2, 1]  # skipped (None) and step rows have no bar
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["m1", "m2"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    out = tmp_path / "cost.png"
    assert cost_figure.main(["--json", str(path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
