"""Everything the package writes as JSON is strict JSON: NaN and Infinity become null."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_fisher as lf
from lightning_fisher import _json as strict_json


def strict_loads(text: str) -> object:
    def refuse(token: str) -> object:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinite_metrics_are_written_as_null() -> None:
    report = {
        "rows": [{"acc": float("nan"), "ratio": float("inf"), "n": 3, "ok": True}],
        "matrix": [[99.5, math.nan], [-math.inf, 97.0]],
        "pair": (1.5, float("-inf")),
        "numpy": np.array([1.0, np.nan]),
        "numpy_scalar": np.float32("nan"),
        "tensor": torch.tensor([[0.25, float("inf")]]),
        "name": "NaN",  # a string stays a string
        "missing": None,
    }
    text = strict_json.dumps(report, indent=2)
    assert "NaN," not in text and "Infinity" not in text
    assert strict_loads(text) == {
        "rows": [{"acc": None, "ratio": None, "n": 3, "ok": True}],
        "matrix": [[99.5, None], [None, 97.0]],
        "pair": [1.5, None],
        "numpy": [1.0, None],
        "numpy_scalar": None,
        "tensor": [[0.25, None]],
        "name": "NaN",
        "missing": None,
    }


def test_default_hook_results_are_made_strict_and_unknown_values_still_fail() -> None:
    class Odd:
        pass

    assert strict_loads(strict_json.dumps({"x": Odd()}, default=lambda o: math.nan)) == {"x": None}
    with pytest.raises(TypeError, match="not JSON serializable"):
        strict_json.dumps({"x": Odd()})


def test_write_json_and_dump_give_files_strict_readers_accept(tmp_path: Path) -> None:
    strict_json.write_json(tmp_path / "a.json", {"v": math.nan})
    with (tmp_path / "b.json").open("w") as f:
        strict_json.dump([math.inf], f)
    assert strict_loads((tmp_path / "a.json").read_text()) == {"v": None}
    assert strict_loads((tmp_path / "b.json").read_text()) == [None]


def test_fisher_file_metadata_is_strict_json(tmp_path: Path) -> None:
    from safetensors import safe_open

    fd = lf.FisherDiagonal(
        {"w": torch.ones(2)}, n_samples=4, method="exact", options={"tol": math.nan, "k": 2}
    )
    fd.save(tmp_path / "f.safetensors")
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert strict_loads(meta["options"]) == {"tol": None, "k": 2}
    assert lf.FisherDiagonal.load(tmp_path / "f.safetensors").options == {"tol": None, "k": 2}
