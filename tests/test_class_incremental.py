"""Class-incremental recipes (one head, every class active), the LOWER and UPPER rows, and the
reports' paired comparisons of Fisher methods."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

import lightning_fisher as lf
from lightning_fisher.estimators import ESTIMATORS
from recipes import reproduce
from recipes.data import task_loader
from recipes.runner import build_tasks, load_config, run_continual

pytestmark = pytest.mark.filterwarnings("ignore")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_bounds = pytest.mark.skipif(
    "lower" not in ESTIMATORS or "upper" not in ESTIMATORS,
    reason="lf.estimate_fisher(method='lower'/'upper') is not in this version of lightning_fisher",
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(**kw: object) -> dict[str, object]:
    return {"iters": 15, "n_tasks": 2, "max_train_per_task": 60, "accelerator": "cpu", **kw}


# Scenario ---------------------------------------------------------------------------------------
def test_class_incremental_configs_are_the_task_incremental_protocol_with_one_head() -> None:
    for name in ("split_mnist", "split_cifar10"):
        task = dataclasses.asdict(load_config(name))
        single = dataclasses.asdict(load_config(f"class_incremental_{name}"))
        assert task["scenario"] == "task" and single["scenario"] == "class"
        assert single == {**task, "scenario": "class"}  # nothing else of the protocol differs
        assert single["class_order"] == "permuted" and single["iters"] == 2000


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_evaluation_uses_each_tasks_head_or_every_class(scenario: str) -> None:
    cfg = load_config("split_digits", scenario=scenario, method="NONE", **_tiny())
    tasks = build_tasks(cfg)
    result = run_continual(cfg, tasks)
    module = result["module"].eval()
    n_classes = max(max(t.classes) for t in tasks) + 1  # the head has a unit per class seen
    expected_head = tuple(range(n_classes)) if scenario == "class" else tasks[1].classes
    assert module.active_classes == expected_head
    for j, task in enumerate(tasks):
        with torch.no_grad():
            logits = module(task.x_test)
        if scenario == "class":
            preds = logits.argmax(dim=1)  # any class of the benchmark
        else:
            head = torch.tensor(task.classes)
            preds = head[logits[:, head].argmax(dim=1)]
        expected = 100.0 * (preds == task.y_test).double().mean().item()
        assert result["matrix"][-1][j] == pytest.approx(expected)


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_the_fisher_counts_every_class_only_in_the_class_incremental_scenario(
    scenario: str,
) -> None:
    cfg = load_config("split_digits", scenario=scenario, method="EXACT", mode="separate", **_tiny())
    tasks = build_tasks(cfg)
    ewc = run_continual(cfg, tasks)["callback"]
    rows = ewc.fishers[0]["net.classifier.weight"].sum(dim=1)  # one output unit per row
    first = list(tasks[0].classes)
    others = [c for c in range(len(rows)) if c not in first]
    assert others
    assert (rows[first] > 0).all()
    if scenario == "class":  # softmax over every unit: each carries Fisher information
        assert (rows[others] > 0).all()
    else:
        assert (rows[others] == 0).all()


def test_an_unknown_scenario_is_refused_before_training() -> None:
    with pytest.raises(lf.FisherInputError, match=r"scenario 'domain'.*'task'.*'class'"):
        run_continual(load_config("split_digits", scenario="domain", **_tiny()))


# LOWER and UPPER --------------------------------------------------------------------------------
@needs_bounds
def test_lower_rank_one_is_exact_with_a_two_class_head() -> None:
    # Same seed, one task: identical training, so the consolidated Fishers must agree.
    fishers = {}
    for method in ("EXACT", "LOWER"):
        cfg = load_config("split_digits", method=method, lam=1.0, **_tiny(n_tasks=1, iters=30))
        fishers[method] = run_continual(cfg)["callback"].fishers[0]
    for name, exact in fishers["EXACT"].items():
        torch.testing.assert_close(fishers["LOWER"][name], exact, rtol=1e-4, atol=1e-9)
    assert fishers["EXACT"].trace() > 0


@needs_bounds
def test_with_ten_classes_lower_is_below_exact_and_upper_above() -> None:
    cfg = load_config("split_digits", scenario="class", method="NONE", **_tiny(n_tasks=None))
    tasks = build_tasks(cfg)
    module = run_continual(cfg, tasks)["module"]
    assert module.net.classifier.out_features == 10
    loader = task_loader(tasks[-1].x_train, tasks[-1].y_train, 32)
    exact, lower, upper = lf.estimate_fishers(
        module, loader, ["exact", {"method": "lower", "rank": 1}, "upper"]
    )
    for name, f in exact.items():
        assert (lower[name] <= f * (1 + 1e-4) + 1e-9).all()
        assert (f <= upper[name] * (1 + 1e-4) + 1e-9).all()
    assert lower.trace() < 0.999 * exact.trace()  # rank 1 of a rank-9 kernel misses some


@needs_bounds
def test_lower_and_upper_rows_run_in_the_task_incremental_reproduction(tmp_path: Path) -> None:
    out = reproduce.main(
        [
            "--benchmark",
            "split_digits",
            "--methods",
            "LOWER",
            "UPPER",
            "--lambdas",
            "10",
            "--seeds",
            "1",
            "--iters",
            "2",
            "--max-train-per-task",
            "20",
            "--accelerator",
            "cpu",
            "--threads",
            "1",
            "--results-dir",
            str(tmp_path),
        ]
    )
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"LOWER", "UPPER"}
    assert all(r["n_seeds"] == 1 and r["fisher_seconds"] > 0 for r in rows.values())


def test_a_row_whose_estimator_is_missing_is_refused_before_any_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_fisher.estimators as est

    monkeypatch.setattr(est, "METHODS", tuple(m for m in est.METHODS if m != "upper"))
    with pytest.raises(SystemExit, match=r"UPPER needs lf.estimate_fisher\(method='upper'\)"):
        reproduce.main(
            [
                "--benchmark",
                "split_digits",
                "--methods",
                "EXACT",
                "UPPER",
                "--results-dir",
                str(tmp_path),
            ]
        )
    assert not list(tmp_path.iterdir())


# Comparisons ------------------------------------------------------------------------------------
def _plan_with(accs: dict[str, list[float]]) -> reproduce.Plan:
    """A plan whose cells are given: lambda 1 searched on seed 0, then the final seeds 1, 2, ..."""
    plan = reproduce.Plan(list(accs), 3, {}, 0, 0, [1.0])
    seconds = {"EXACT": 2.0, "LOWER": 0.4, "EMPIRICAL": 0.3}
    for method, values in accs.items():
        for seed, acc in enumerate([50.0, *values]):
            plan.done[(method, 1.0, seed)] = {
                "method": method,
                "seed": seed,
                "avg_acc": acc,
                "fisher_seconds": seconds[method],
            }
    return plan


def test_comparison_is_paired_over_shared_seeds_and_says_whether_it_exceeds_two_se() -> None:
    exact, empirical = [80.0, 82.0, 84.0], [79.0, 80.5, 83.2]
    c = reproduce.compare(
        _plan_with({"EXACT": exact, "EMPIRICAL": empirical}), "EXACT", "EMPIRICAL"
    )
    d = [a - b for a, b in zip(exact, empirical)]
    se = statistics.stdev(d) / math.sqrt(3)
    assert c is not None and c["paired"] and c["n_shared_seeds"] == 3 and c["a_higher_on"] == 3
    assert c["diff"] == pytest.approx(statistics.mean(d)) and c["se"] == pytest.approx(se)
    assert c["diff"] > 2 * c["se"] and c["exceeds_2se"]
    assert (
        "EXACT vs EMPIRICAL" in c["sentence"]
        and "exceeds 2 s.e.: EXACT is above EMPIRICAL" in c["sentence"]
    )
    assert f"{statistics.mean(d):+.2f} ± {se:.2f}" in c["sentence"]
    # Differences that change sign: within 2 s.e.
    c = reproduce.compare(
        _plan_with({"EXACT": exact, "EMPIRICAL": [81.0, 80.0, 85.0]}), "EXACT", "EMPIRICAL"
    )
    assert c is not None and not c["exceeds_2se"] and "within 2 s.e." in c["sentence"]


def test_comparison_without_shared_seeds_uses_both_standard_errors_and_lower_states_costs() -> None:
    plan = _plan_with(
        {"LOWER": [70.0, 71.0, 72.0], "EXACT": [69.0, 70.0, 75.0], "EMPIRICAL": [60.0]}
    )
    # EXACT's seeds moved away from LOWER's: no pairs left.
    for seed in plan.final_seeds:
        r = plan.done.pop(("EXACT", 1.0, seed))
        plan.done[("EXACT", 1.0, seed + 10)] = {**r, "seed": seed + 10}
    plan.final_seeds = [1, 2, 3, 11, 12, 13]
    c = reproduce.compare(plan, "LOWER", "EXACT")
    assert c is not None and not c["paired"] and c["n_shared_seeds"] == 0
    sem = statistics.stdev([70.0, 71.0, 72.0]) / math.sqrt(3)
    sem_exact = statistics.stdev([69.0, 70.0, 75.0]) / math.sqrt(3)
    assert c["se"] == pytest.approx(math.hypot(sem, sem_exact))
    assert "LOWER 0.4 s, EXACT 2 s, EMPIRICAL 0.3 s" in c["sentence"]
    assert reproduce.compare(plan, "LOWER", "UPPER") is None  # no such row


def test_class_incremental_reproduction_writes_its_own_report(tmp_path: Path) -> None:
    argv = ["--benchmark", "class_incremental_split_mnist", "--data-dir", str(DATA)]
    argv += ["--methods", "EXACT", "EMPIRICAL", "--lambdas", "100", "--seeds", "2"]
    argv += ["--iters", "2", "--max-train-per-task", "20", "--accelerator", "cpu", "--threads", "1"]
    reproduce.main([*argv, "--results-dir", str(tmp_path)])
    report = json.loads((tmp_path / "class_incremental_split_mnist.json").read_text())
    assert report["settings"]["scenario"] == "class"
    assert report["settings"]["class_order"] == "permuted"
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"EXACT", "EMPIRICAL"}
    for r in rows.values():
        assert {"method", "best_lambda", "mean_acc", "sem", "n_seeds", "fisher_seconds"} <= set(r)
        assert r["n_seeds"] == 2
    (c,) = [c for c in report["comparisons"] if (c["a"], c["b"]) == ("EXACT", "EMPIRICAL")]
    final = {(g["method"], g["seed"]): g["avg_acc"] for g in report["grid"] if g["seed"] > 0}
    d = [final[("EXACT", s)] - final[("EMPIRICAL", s)] for s in (1, 2)]
    assert c["paired"] and c["diff"] == pytest.approx(sum(d) / 2)
    md = (tmp_path / "class_incremental_split_mnist.md").read_text()
    assert "class-incremental" in md and "EXACT vs EMPIRICAL" in md
    # A task-incremental report of the same data keeps its own name and settings.
    assert not (tmp_path / "reproduce_class_incremental_split_mnist_permuted.json").exists()


def test_the_default_rows_leave_out_those_whose_estimator_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lightning_fisher.estimators as est

    monkeypatch.setattr(
        est, "METHODS", tuple(m for m in est.METHODS if m not in ("lower", "upper"))
    )
    rows = reproduce.default_methods()
    assert rows == [m for m in reproduce.PRIORITY if m not in ("LOWER", "UPPER")]
    assert "skipping LOWER" in capsys.readouterr().out
    monkeypatch.setattr(est, "METHODS", (*est.METHODS, "lower", "upper"))
    assert reproduce.default_methods() == list(reproduce.PRIORITY)


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_a_single_task_run_reports_a_one_by_one_matrix(scenario: str) -> None:
    cfg = load_config("split_digits", scenario=scenario, method="NONE", **_tiny(n_tasks=1))
    result = run_continual(cfg)
    assert len(result["matrix"]) == 1 and len(result["matrix"][0]) == 1
    assert result["avg_acc"] == pytest.approx(result["matrix"][0][0])
    assert result["forgetting"] == 0 and result["bwt"] == 0
