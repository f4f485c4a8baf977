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
    (tmp_path / "exact_diagonal_gpu.json").write_text(json.dumps(report))
    lm = {
        "device": "a test device",
        "settings": {"batch": 2, "seq_len": 8, "dtype": "float32"},
        "rows": [
            {"model": "g", "method": "train-step", "granularity": None, "ratio_to_step": 1.0},
            {"model": "g", "method": "sample", "granularity": "token", "ratio_to_step": 2.0},
            {"model": "g", "method": "empirical", "granularity": "token", "ratio_to_step": 50.0,
             "note": "floor ...; (causal=False: the uncut route)"},
            {"model": "g", "method": "hutchinson", "granularity": "token", "ratio_to_step": None},
        ],
    }  # fmt: skip
    lm_fig = cost_figure.lm_cost_figure(lm)
    assert [len(ax.patches) for ax in lm_fig.axes] == [2]
    labels = [t.get_text() for t in lm_fig.axes[0].get_yticklabels()]
    assert labels == ["sample (token)", "empirical (token), uncut"]
    (tmp_path / "lm_fisher_scale.json").write_text(json.dumps(lm))
    assert cost_figure.main(["--results", str(tmp_path)]) == 0
    for name in ("exact_diagonal_gpu_cost.png", "lm_fisher_scale_cost.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
