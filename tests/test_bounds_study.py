"""The bounds study recipe end to end at smoke size: a random-weight tiny BERT, the real data
files, every report field, the claims with their intervals, the figures, incremental writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
from recipes import neuromanifold_bounds as nb

pytestmark = pytest.mark.skipif(
    not (nb.default_data_dir() / "sst2").exists(), reason="../shared/data is not available"
)


def test_smoke_run_without_a_model_dir(tmp_path: Path) -> None:
    out = tmp_path / "bounds"
    torch.set_num_threads(1)
    nb.main(["--smoke", "--out", str(out), "--device", "cpu", "--bootstrap", "50"])
    report = json.loads((out / "bounds_study.json").read_text())
    assert [(r["dataset"], r["stage"]) for r in report["rows"]] == [
        ("ag_news", "pretrained"),
        ("ag_news", "finetuned"),
        ("sst2", "pretrained"),
        ("sst2", "finetuned"),
    ]
    assert report["settings"]["n_fisher"] == nb.SMOKE["n_fisher"]
    assert "random tiny BERT" in report["datasets"]["sst2"]["model"]
    for r in report["rows"]:
        assert set(nb.ROW_FIELDS) <= set(r)
        assert r["bounds"] == "deterministic" and r["n_inputs"] == nb.SMOKE["n_fisher"]
        # Deterministic bounds never break the order, and lower <= F <= upper in trace.
        assert r["order_violations"] == 0
        assert 0 < r["trace_lower"] <= r["trace_f"] * (1 + 1e-6) <= r["trace_upper"] * (1 + 2e-6)
        eig = r["top_eigenvalues"]
        assert len(eig) == nb.SMOKE["eig_k"] and eig == sorted(eig, reverse=True)
        assert 0 < eig[0] <= r["trace_f"] * (1 + 1e-5)  # F is PSD: lambda_1 <= tr F
        assert r["slq_trace"] > 0 and 0 <= r["slq_mass_below"] <= 1
        for dist in ("rademacher", "gaussian"):
            lo, hi = r[f"cv_{dist}_ci"]
            assert 0 < lo <= hi and r[f"cv_{dist}"] > 0
        lo, hi = r["frac_below_1e-5_min_layer_ci"]
        assert lo <= r["frac_below_1e-5_min_layer"] <= hi
        assert set(r["seconds"]) >= {"fisher_pass", "cv_rademacher", "lanczos", "slq"}
    ag, sst = report["rows"][1], report["rows"][3]
    # C = 4: rank 2 keeps more of I(p) than rank 1, the certificate's tail is positive.
    assert ag["trace_lower"] < ag["trace_lower_k2"] <= ag["trace_f"] * (1 + 1e-6)
    assert ag["order_violations_k2"] == 0
    assert ag["certificate_tail_eigen_mass"] > 0 and not ag["certificate_exact"]
    # C = 2: the rank-1 lower bound is F, to float tolerance, and the certificate says so.
    assert sst["lower_f_rel_diff"] < 1e-3 and sst["certificate_exact"]
    assert "trace_lower_k2" not in sst
    by_claim = {(c["claim"], c["dataset"], c["stage"]): c for c in report["claims"]}
    assert by_claim[("lower = F for C = 2", "sst2", "finetuned")]["holds"] is True
    order = by_claim[("upper >= F >= lower (k=1) entrywise", "ag_news", "pretrained")]
    assert order["holds"] is True and order["ci"][0] == 0 and 0 < order["ci"][1] < 1e-3
    cv = by_claim[("CV <= sqrt 2 (Rademacher)", "sst2", "pretrained")]
    assert cv["holds"] == (cv["ci"][1] <= math.sqrt(2))
    md = (out / "bounds_study.md").read_text()
    assert "## The paper's claims, with 95% intervals" in md and "| sst2 | finetuned |" in md
    for name in ("bounds_study.png", "bounds_per_layer.png"):
        assert (out / name).stat().st_size > 0
    for tag in ("ag_news_pretrained", "sst2_finetuned"):
        assert (out / f"density_{tag}.png").stat().st_size > 0
        assert (out / f"spectrum_{tag}.png").stat().st_size > 0


def test_a_killed_run_keeps_the_stages_it_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    analyse = nb.analyse

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second stage
        return analyse(*args, **kwargs)

    monkeypatch.setattr(nb, "analyse", dying)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        nb.main(
            "--smoke --datasets ag_news --device cpu --bootstrap 20 --eig-k 2 --slq-starts 0 "
            f"--cv-runs 2 --out {out}".split()
        )
    report = json.loads((out / "bounds_study.json").read_text())
    assert [(r["dataset"], r["stage"]) for r in report["rows"]] == [("ag_news", "pretrained")]
    assert "slq_trace" not in report["rows"][0]  # --slq-starts 0 turns the density off
    assert (out / "density_ag_news_pretrained.png").exists()
    with pytest.raises(SystemExit):
        nb.parse_args(["--cv-runs", "1"])
