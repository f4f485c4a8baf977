"""The continual-learning recipes: metrics, data readers, each recipe for a few steps, the
reproduction runner's planning, resuming and reports, and the demo."""

from __future__ import annotations

import gzip
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_fisher as lf
from recipes import data as rdata
from recipes import demo, reproduce, run
from recipes.metrics import (
    AccuracyMatrix,
    AverageAccuracy,
    BackwardTransfer,
    Forgetting,
    average_accuracy,
    backward_transfer,
    forgetting,
)
from recipes.runner import load_config, run_continual

pytestmark = pytest.mark.filterwarnings("ignore")


def strict_loads(text: str) -> object:
    """``json.loads`` that refuses NaN and Infinity, as strict JSON readers do."""

    def refuse(token: str) -> object:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: intra-op threads only add spinning overhead on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Metrics ----------------------------------------------------------------------------------------
def _random_matrix(t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(t, t, generator=g, dtype=torch.float64)
    return m.tril() + torch.triu(torch.full((t, t), float("nan"), dtype=torch.float64), 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_their_definitions_on_a_hand_built_matrix(seed: int) -> None:
    m = _random_matrix(5, seed)
    t = m.shape[0]
    final = [m[t - 1, j].item() for j in range(t)]
    expect_avg = sum(final) / t
    expect_fgt = sum(
        max(m[i, j].item() for i in range(j, t - 1)) - final[j] for j in range(t - 1)
    ) / (t - 1)
    expect_bwt = sum(final[j] - m[j, j].item() for j in range(t - 1)) / (t - 1)
    assert average_accuracy(m).item() == pytest.approx(expect_avg)
    assert forgetting(m).item() == pytest.approx(expect_fgt)
    assert backward_transfer(m).item() == pytest.approx(expect_bwt)
    assert forgetting(m[:1, :1]).item() == 0 and backward_transfer(m[:1, :1]).item() == 0


def test_accuracy_matrix_metric_counts_predictions_per_cell() -> None:
    g = torch.Generator().manual_seed(0)
    t = 3
    metrics = [AccuracyMatrix(t), AverageAccuracy(t), Forgetting(t), BackwardTransfer(t)]
    correct = torch.zeros(t, t)
    total = torch.zeros(t, t)
    for i in range(t):
        for j in range(i + 1):
            for _ in range(2):  # two batches per cell: counts must add up, not average
                target = torch.randint(
                    0, 2, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g
                )
                preds = torch.where(torch.rand(target.shape, generator=g) < 0.7, target, 1 - target)
                for metric in metrics:
                    metric.update(i, j, preds, target)
                correct[i, j] += (preds == target).sum()
                total[i, j] += target.numel()
    expected = (correct / total).double()
    got = metrics[0].compute()
    assert torch.allclose(got.tril(), expected.tril())
    assert torch.isnan(got.triu(1)[torch.triu(torch.ones(t, t, dtype=torch.bool), 1)]).all()
    assert metrics[1].compute().item() == pytest.approx(average_accuracy(got).item())
    assert metrics[2].compute().item() == pytest.approx(forgetting(got).item())
    assert metrics[3].compute().item() == pytest.approx(backward_transfer(got).item())
    with pytest.raises(ValueError, match="outside"):
        metrics[0].update(t, 0, torch.zeros(1), torch.zeros(1))


# Data -------------------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, n_train: int = 60, n_test: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    (root / "mnist").mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        xs, ys = rdata.MNIST_FILES[split]
        _write_idx(root / "mnist" / xs, x)
        _write_idx(root / "mnist" / ys, y)
        arrays[split] = x
        arrays[split + "_y"] = y
    return arrays


def _fake_cifar_tarball(path: Path, per_class: int = 3) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in rdata.CIFAR10_CLASSES:
                for k in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                        buf, "JPEG"
                    )
                    info = tarfile.TarInfo(f"cifar10-jpg/{split}/{cls}/{k:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)


def test_mnist_reader_round_trips_idx_files(tmp_path: Path) -> None:
    written = _fake_mnist(tmp_path)
    arrays = rdata.load_arrays("mnist", tmp_path)
    for split in ("train", "test"):
        assert np.array_equal(arrays[split].x, written[split])
        assert np.array_equal(arrays[split].y, written[split + "_y"])


def test_cifar_reader_decodes_the_jpeg_tarball_and_caches_it(tmp_path: Path) -> None:
    (tmp_path / "cifar10").mkdir()
    _fake_cifar_tarball(tmp_path / "cifar10" / "cifar10-jpg.tar.gz")
    arrays = rdata.load_arrays("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    assert arrays["train"].x.shape == (30, 32, 32, 3) and arrays["train"].x.dtype == np.uint8
    assert sorted(np.bincount(arrays["test"].y).tolist()) == [3] * 10
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = rdata.load_arrays("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    assert np.array_equal(again["train"].x, arrays["train"].x)


def test_missing_data_gives_an_error_that_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(rdata.DataNotFoundError, match="--data-dir"):
        rdata.load_arrays("mnist", tmp_path / "nowhere")
    with pytest.raises(rdata.DataNotFoundError, match="--data-dir"):
        rdata.load_arrays("cifar10", tmp_path)
    with pytest.raises(SystemExit, match="--data-dir"):
        run.main(["--config", "split_mnist", "--data-dir", str(tmp_path), "--iters", "1"])


def test_tasks_hold_their_own_classes_and_batches_cover_each_epoch() -> None:
    tasks = rdata.split_tasks(rdata.load_digits_arrays())
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for t in tasks:
        assert set(t.y_train.tolist()) == set(t.classes) == set(t.y_test.tolist())
    x = torch.arange(10.0).unsqueeze(1)
    batches = list(rdata.RandomBatches(x, torch.arange(10), batch_size=4, n_batches=5, seed=3))
    assert all(len(b[0]) == 4 for b in batches)
    epoch = torch.cat([b[1] for b in batches[:2]])
    assert len(set(epoch.tolist())) == 8  # no repeats within an epoch
    again = list(rdata.RandomBatches(x, torch.arange(10), batch_size=4, n_batches=5, seed=3))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))


@pytest.mark.parametrize("seed", [1, 2, 7])
def test_permuted_class_order_gives_each_task_the_classes_van_de_vens_relabelling_does(
    seed: int,
) -> None:
    # His code relabels class c as p[c] (p a NumPy permutation drawn right after seeding) and gives
    # task t the new labels 2t and 2t + 1.
    np.random.seed(seed)
    p = np.random.permutation(list(range(10)))
    expected = [{c for c in range(10) if p[c] in (2 * t, 2 * t + 1)} for t in range(5)]
    order = rdata.permuted_class_order(10, seed)
    tasks = rdata.split_tasks(rdata.load_digits_arrays(), class_order=order)
    assert [set(t.classes) for t in tasks] == expected
    for t in tasks:  # labels keep their original names; each task holds only its own classes
        assert set(t.y_train.tolist()) == set(t.classes) == set(t.y_test.tolist())
    with pytest.raises(ValueError, match="each of the 10 classes once"):
        rdata.split_tasks(rdata.load_digits_arrays(), class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8])


def test_class_order_config_sorted_permuted_or_explicit() -> None:
    from recipes.runner import build_tasks

    def classes(**kw: object) -> list[tuple[int, ...]]:
        return [t.classes for t in build_tasks(load_config("split_digits", **kw))]

    assert classes() == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]  # Split Digits: natural order
    # The published protocol's configs pair the classes as van de Ven's code does.
    assert load_config("split_mnist").class_order == "permuted"
    assert load_config("split_cifar10").class_order == "permuted"
    assert classes(class_order="9,8,7,6,5,4,3,2,1,0", n_tasks=2) == [(9, 8), (7, 6)]
    one, two = classes(class_order="permuted", seed=1), classes(class_order="permuted", seed=2)
    assert one != two and sorted(c for t in one for c in t) == list(range(10))
    with pytest.raises(ValueError, match="Unknown class_order"):
        classes(class_order="shuffled")
    # The run itself trains and evaluates each task within its own (non-adjacent) units.
    cfg = load_config("split_digits", class_order="permuted", seed=1, iters=3, accelerator="cpu")
    _check_result(run_continual(cfg), 5)


# Recipes ----------------------------------------------------------------------------------------
def _check_result(result: dict, n_tasks: int) -> None:
    m = torch.tensor(result["matrix"])
    assert m.shape == (n_tasks, n_tasks)
    lower = m[torch.tril(torch.ones(n_tasks, n_tasks, dtype=torch.bool))]
    assert ((lower >= 0) & (lower <= 100)).all()
    assert result["avg_acc"] == pytest.approx(m[-1].mean().item())


@pytest.mark.parametrize("method", ["NONE", "EXACT", "SQUISHER"])
def test_split_digits_recipe_runs_and_consolidates_every_task(method: str) -> None:
    cfg = load_config("split_digits", method=method, lam=1e3, iters=3, accelerator="cpu")
    result = run_continual(cfg)
    _check_result(result, 5)
    ewc = result["callback"]
    if method == "NONE":
        assert ewc is None and result["fisher_seconds"] == []
    else:
        assert ewc.task_count == 5 and len(result["fisher_seconds"]) == 5
        # Multi-head: only the finished tasks' output units carry Fisher information.
        f = ewc.fishers[0]["net.classifier.weight"]
        assert (f.sum(dim=1) > 0).all()


def test_a_single_task_run_reports_a_one_by_one_matrix() -> None:
    result = run_continual(load_config("split_digits", iters=3, n_tasks=1, accelerator="cpu"))
    _check_result(result, 1)
    assert result["forgetting"] == 0.0 and result["bwt"] == 0.0


def test_ewc_keeps_the_weights_the_first_task_relies_on() -> None:
    # Same seed, so both runs leave task 0 with the same weights; only EWC pulls them back later.
    kw = {"lam": 1e4, "iters": 60, "n_tasks": 3, "mode": "separate", "accelerator": "cpu"}
    with_ewc = run_continual(load_config("split_digits", method="EXACT", **kw))
    without = run_continual(load_config("split_digits", method="NONE", **kw))
    ewc = with_ewc["callback"]
    f0, anchor0 = ewc.fishers[0], ewc.anchors[0]

    def drift(module: torch.nn.Module) -> float:
        params = dict(module.named_parameters())
        return sum(float((f0[n] * (params[n].detach() - anchor0[n]) ** 2).sum()) for n in f0)

    assert drift(with_ewc["module"]) < 0.5 * drift(without["module"])


@pytest.mark.parametrize("reset", [True, False])
def test_adam_state_is_fresh_per_task_or_carried_across_tasks(reset: bool) -> None:
    cfg = load_config("split_digits", iters=3, n_tasks=2, reset_optimizer=reset, accelerator="cpu")
    module = run_continual(cfg)["module"]
    state = module._optimizer_state
    if reset:
        assert state is None
    else:  # one optimizer for the whole sequence: its step count runs over both tasks
        assert {float(s["step"]) for s in state["state"].values()} == {6.0}


def test_split_mnist_recipe_runs_from_local_idx_files(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    cfg = load_config(
        "split_mnist", data_dir=str(tmp_path), method="EXACT(n=500)", iters=2, accelerator="cpu"
    )
    _check_result(run_continual(cfg), 5)


def test_split_cifar10_recipe_runs_the_resnet(tmp_path: Path) -> None:
    (tmp_path / "cifar10").mkdir()
    _fake_cifar_tarball(tmp_path / "cifar10" / "cifar10-jpg.tar.gz", per_class=1)
    cfg = load_config(
        "split_cifar10",
        data_dir=str(tmp_path),
        cache_dir=str(tmp_path / "c"),
        method="BATCHED",
        iters=1,
        batch_size=4,
        n_tasks=2,
        accelerator="cpu",
    )
    _check_result(run_continual(cfg), 2)


def test_cli_overrides_the_config_and_writes_results(tmp_path: Path) -> None:
    result = run.main(
        [
            "--config",
            "split_digits",
            "--method",
            "HUTCHINSON",
            "--lam",
            "10",
            "--iters",
            "2",
            "--n-tasks",
            "2",
            "--hidden",
            "16",
            "--output-dir",
            str(tmp_path),
        ]
    )
    saved = strict_loads((tmp_path / "results.json").read_text())
    assert saved["config"]["hidden"] == [16] and saved["config"]["method"] == "HUTCHINSON"
    assert saved["avg_acc"] == pytest.approx(result["avg_acc"])
    # The matrix's cell (0, 1) was never evaluated (NaN in memory): strict JSON writes null.
    assert math.isnan(result["matrix"][0][1]) and saved["matrix"][0][1] is None


# Reproduction runner ----------------------------------------------------------------------------
def test_plan_extends_the_grid_until_the_best_lambda_is_bracketed() -> None:
    plan = reproduce.Plan(
        ["EXACT"], seeds=2, centres={"EXACT": 3}, span=1, max_extend=6, lambdas=None
    )
    peak = 6.0  # accuracy peaks at lambda = 1e6, outside the first window 1e2..1e4

    def acc(lam: float) -> float:
        return 90 - (math.log10(lam) - peak) ** 2

    while todo := plan.todo():
        for method, lam, seed in todo:
            plan.done[(method, lam, seed)] = {"avg_acc": acc(lam) + seed, "fisher_seconds": 0.1}
    (row,) = plan.rows()
    assert row["best_lambda"] == pytest.approx(10**peak)
    assert row["lambda_bracketed"] and row["n_seeds"] == 2
    assert row["mean_acc"] == pytest.approx(90 + 1.5)  # seeds 1 and 2 at the best lambda
    assert row["sem"] == pytest.approx(0.5)


def test_reproduce_writes_reports_and_resumes_without_rerunning(tmp_path: Path) -> None:
    argv = [
        "--benchmark",
        "split_digits",
        "--methods",
        "EXACT",
        "NONE",
        "--lambdas",
        "1",
        "100",
        "--seeds",
        "2",
        "--iters",
        "2",
        "--max-train-per-task",
        "20",
        "--accelerator",
        "cpu",
        "--threads",
        "1",  # tiny models: more threads only spin on a shared CPU
        "--results-dir",
        str(tmp_path),
    ]
    out = reproduce.main(argv)
    assert not out["partial"]
    report = json.loads((tmp_path / "reproduce_split_digits.json").read_text())
    assert {"command", "device", "versions", "rows"} <= set(report)
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"EXACT", "NONE"}
    for r in rows.values():
        assert {"method", "best_lambda", "mean_acc", "sem", "n_seeds", "fisher_seconds"} <= set(r)
        assert r["n_seeds"] == 2
    assert rows["EXACT"]["best_lambda"] in (1.0, 100.0) and rows["EXACT"]["fisher_seconds"] > 0
    assert (tmp_path / "reproduce_split_digits.md").read_text().count("\n| ") == 3
    assert (tmp_path / "reproduce_split_digits_lambda.png").stat().st_size > 0
    cells = (tmp_path / "reproduce_split_digits.cells.jsonl").read_text().splitlines()
    assert len(cells) == 2 + 2 + 2  # two lambdas on seed 0, two fresh seeds each for EXACT and NONE
    reproduce.main(argv)
    assert (tmp_path / "reproduce_split_digits.cells.jsonl").read_text().splitlines() == cells


def test_reproduce_builds_each_seeds_tasks_under_a_permuted_class_order(tmp_path: Path) -> None:
    argv = ["--benchmark", "split_digits", "--methods", "NONE", "--seeds", "2", "--iters", "2"]
    argv += ["--max-train-per-task", "20", "--accelerator", "cpu", "--threads", "1"]
    argv += ["--results-dir", str(tmp_path)]
    reproduce._TASKS.clear()
    reproduce.main([*argv, "--class-order", "permuted"])
    orders = sorted(
        tuple(t.classes for t in tasks) for tasks in reproduce._TASKS.values()
    )  # one task list per seed, not one shared by both
    assert orders == sorted(
        tuple(tuple(rdata.permuted_class_order(10, s)[2 * t : 2 * t + 2]) for t in range(5))
        for s in (1, 2)
    )
    # Its own report name, so it never mixes with a sorted-order table.
    report = json.loads((tmp_path / "reproduce_split_digits_permuted.json").read_text())
    assert report["settings"]["class_order"] == "permuted"
    assert "class order permuted" in (tmp_path / "reproduce_split_digits_permuted.md").read_text()
    # The default order leaves the settings as they were, so older cells files still match.
    reproduce.main([*argv, "--name", "sorted"])
    assert "class_order" not in json.loads((tmp_path / "sorted.json").read_text())["settings"]
    reproduce._TASKS.clear()


def test_reproduce_writes_a_partial_report_when_out_of_budget(tmp_path: Path) -> None:
    out = reproduce.main(
        [
            "--benchmark",
            "split_digits",
            "--methods",
            "NONE",
            "--seeds",
            "1",
            "--budget-minutes",
            "0",
            "--results-dir",
            str(tmp_path),
        ]
    )
    assert out["partial"]
    assert json.loads((tmp_path / "reproduce_split_digits.json").read_text())["partial"] is True


def test_lambda_scale_relates_the_estimators_traces() -> None:
    from recipes import lambda_scale

    (row,) = lambda_scale.main(["--steps", "3", "--batch-sizes", "1", "8"])
    # b = 1: BATCHED is the empirical Fisher itself.
    assert row["b_batched_over_empirical"][1] == pytest.approx(1.0, rel=1e-4)
    assert row["b_batched_over_empirical"][8] > 0 and 0 < row["mean_eps"] < 1
    assert row["empirical_over_exact"] > 0


# Demo -------------------------------------------------------------------------------------------
def test_demo_prints_a_table_and_saves_both_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = demo.main(["--output-dir", str(tmp_path), "--iters", "2"])
    printed = capsys.readouterr().out
    assert [r["name"] for r in results] == [name for name, _, _ in demo.DEMO_RUNS]
    for name, *_ in demo.DEMO_RUNS:
        assert name in printed
    for fig in ("accuracy_matrix.png", "fisher_density.png"):
        assert (tmp_path / fig).stat().st_size > 0
    # Each EWC run prints the time of every Fisher computation (one per task boundary).
    for r in results:
        if r["method"] != "NONE":
            assert len(r["fisher_seconds"]) == 5
            assert demo.format_fisher_times(r["fisher_seconds"]) in printed
    saved = strict_loads((tmp_path / "results.json").read_text())
    assert [r["avg_acc"] for r in saved] == pytest.approx([r["avg_acc"] for r in results])
    assert saved[0]["matrix"][0][1] is None  # a cell never evaluated: null, not NaN


# BATCHED's lambda law ---------------------------------------------------------------------------
def _scaling_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "batched_lambda_scaling.py"
    spec = importlib.util.spec_from_file_location("batched_lambda_scaling", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trace_ratio_is_recorded_from_the_network_at_each_boundary() -> None:
    # With b = 1, BATCHED is EMPIRICAL: at the last boundary (no training after it) the recorded
    # ratio must be tr(EMPIRICAL) / tr(EXACT) of the final network on the last task's data.
    from recipes.data import task_loader
    from recipes.runner import build_tasks

    cfg = load_config(
        "split_digits",
        method="BATCHED",
        fisher_batch_size=1,
        trace_ratio_to="exact",
        lam=10.0,
        iters=10,
        n_tasks=2,
        max_train_per_task=50,
        accelerator="cpu",
    )
    tasks = build_tasks(cfg)
    result = run_continual(cfg, tasks)
    assert len(result["trace_ratios"]) == 2
    module, last = result["module"], tasks[-1]
    loader = task_loader(last.x_train, last.y_train, 7)
    kw = {"classes": list(last.classes), "progress": False}
    empirical = lf.estimate_fisher(module, loader, "empirical", **kw).trace()
    exact = lf.estimate_fisher(module, loader, "exact", **kw).trace()
    assert result["trace_ratios"][-1] == pytest.approx(empirical / exact, rel=1e-4)
    assert result["trace_ratios"][0] != pytest.approx(result["trace_ratios"][1])


def test_least_squares_slope_and_its_standard_error_match_numpy() -> None:
    scaling = _scaling_module()
    x = [0.0, 0.9, 1.5, 2.1, 2.7]
    y = [9.8, 10.9, 11.4, 12.2, 12.6]
    fit = scaling.least_squares(x, y)
    (slope, intercept), cov = np.polyfit(x, y, 1, cov="unscaled")
    rss = float(np.sum((np.polyval([slope, intercept], x) - np.array(y)) ** 2))
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    assert fit["slope_se"] == pytest.approx(math.sqrt(cov[0, 0] * rss / (len(x) - 2)))
    assert scaling.least_squares([0.0, 1.0], [1.0, 3.0])["slope_se"] is None


def test_plan_searches_on_a_finer_grid_and_brackets_the_best_lambda() -> None:
    plan = reproduce.Plan(
        ["BATCHED[b=8]"],
        seeds=1,
        centres={"BATCHED[b=8]": 3.0},
        span=1,
        max_extend=8,
        lambdas=None,
        step=0.5,
    )
    assert plan.window("BATCHED[b=8]") == [float(f"{10**x:.6g}") for x in (2.5, 3.0, 3.5)]
    while todo := plan.todo():
        for method, lam, seed in todo:
            plan.done[(method, lam, seed)] = {
                "avg_acc": 90 - (math.log10(lam) - 4.5) ** 2,
                "fisher_seconds": 0.1,
                "seed": seed,
            }
    (row,) = plan.rows()
    assert row["best_lambda"] == pytest.approx(10**4.5, rel=1e-5) and row["lambda_bracketed"]
    assert reproduce.split_method("BATCHED[b=8]") == ("BATCHED", {"fisher_batch_size": 8})
    assert reproduce.split_method("EXACT(n=500)") == ("EXACT(n=500)", {})


def test_batched_lambda_scaling_writes_rows_fit_and_figure_and_resumes(tmp_path: Path) -> None:
    scaling = _scaling_module()
    argv = ["--config", "split_digits", "--batch-sizes", "1", "4", "16", "--lambdas", "1", "1e4"]
    argv += ["--seeds", "1", "--iters", "2", "--max-train-per-task", "30", "--n-tasks", "2"]
    argv += ["--accelerator", "cpu", "--threads", "1", "--results-dir", str(tmp_path)]
    out = scaling.main(argv)
    assert not out["partial"]
    report = json.loads((tmp_path / "batched_lambda_scaling.json").read_text())
    assert {"command", "device", "versions", "rows", "fit"} <= set(report)
    rows = report["rows"]
    assert [r["batch_size"] for r in rows] == [1, 4, 16]
    for r in rows:
        assert {"batch_size", "best_lambda", "mean_acc", "trace_ratio_to_exact", "n_seeds"} <= set(
            r
        )
        assert r["n_seeds"] == 1 and r["best_lambda"] in (1.0, 1e4)
        # The ratio is the mean over the boundaries of the final seed's run at the best lambda.
        (cell,) = [
            g
            for g in report["grid"]
            if g["method"] == f"BATCHED[b={r['batch_size']}]" and g["seed"] == 1
        ]
        assert cell["lam"] == r["best_lambda"] and len(cell["trace_ratios"]) == 2
        assert r["trace_ratio_to_exact"] == pytest.approx(sum(cell["trace_ratios"]) / 2)
    # A larger Fisher batch averages gradients first: less of EXACT's trace is left.
    ratios = [r["trace_ratio_to_exact"] for r in rows]
    assert ratios[0] > ratios[1] > ratios[2]
    # The fit is the least-squares line through the rows, in log10.
    logb = [math.log10(r["batch_size"]) for r in rows]
    alpha = np.polyfit(logb, [math.log10(r["best_lambda"]) for r in rows], 1)[0]
    beta = np.polyfit(logb, [-math.log10(r["trace_ratio_to_exact"]) for r in rows], 1)[0]
    assert report["fit"]["alpha"] == pytest.approx(alpha, abs=1e-9)
    assert report["fit"]["beta"] == pytest.approx(beta)
    assert report["fit"]["n_points"] == 3 and report["fit"]["alpha_se"] is not None
    md = (tmp_path / "batched_lambda_scaling.md").read_text()
    assert md.count("\n| ") == 1 + 3 and "alpha =" in md  # header and one row per b
    assert (tmp_path / "batched_lambda_scaling.png").stat().st_size > 0
    cells = (tmp_path / "batched_lambda_scaling.cells.jsonl").read_text().splitlines()
    assert len(cells) == 3 * (2 + 1)
    scaling.main(argv)
    assert (tmp_path / "batched_lambda_scaling.cells.jsonl").read_text().splitlines() == cells


def test_a_flat_edge_stops_the_search_with_a_tolerance() -> None:
    """A curve flat within the tolerance at its edge is not widened (and the report says so);
    without a tolerance, or where the edge really climbs, it is."""

    def run(flat: float | None, slope: float) -> tuple[dict[str, object], int]:
        plan = reproduce.Plan(
            ["EXACT"],
            seeds=1,
            centres={"EXACT": 3},
            span=1,
            max_extend=3,
            lambdas=None,
            flat_tolerance=flat,
        )
        while todo := plan.todo():
            for method, lam, seed in todo:
                acc = 19.0 + slope * (3 - math.log10(lam))  # best at the low edge
                plan.done[(method, lam, seed)] = {"avg_acc": acc, "fisher_seconds": 0.1}
        (row,) = plan.rows()
        return row, len(plan.search("EXACT"))

    row, tried = run(0.5, slope=0.1)  # the edge beats its neighbour by 0.1 < 0.5
    assert tried == 3 and row["lambda_flat_at_edge"] and not row["lambda_bracketed"]
    row, tried = run(None, slope=0.1)
    assert tried == 6 and not row["lambda_flat_at_edge"]  # widened up to max_extend
    row, tried = run(0.5, slope=1.0)
    assert tried == 6 and not row["lambda_flat_at_edge"]  # a real climb is followed
    with pytest.raises(SystemExit, match="flat-tolerance"):
        reproduce.Plan(["EXACT"], 1, {"EXACT": 3}, 1, 1, None, flat_tolerance=-1.0)
