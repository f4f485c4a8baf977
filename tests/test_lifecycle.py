"""The lifecycle around the estimates, used as a continual-learning user uses it: one ``fit`` per
task with a new Trainer (and, on a resume, new callback instances), the usual ``ModelCheckpoint``.

Run as a script (``python tests/test_lifecycle.py <dir> <phase>``) it is the worker of the
new-process resume test.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lit_helpers import Classifier, loader, params, task_classes, trainer
from torch.utils.data import DataLoader, TensorDataset

import lightning_fisher as lf
from lightning_fisher import FisherInputError

STEPS_PER_EPOCH = 6  # 48 inputs per task, batches of 8


def ewc(**kw: Any) -> lf.EWC:
    options: dict[str, Any] = {"lam": 10.0, "method": "sample", "mode": "separate"}
    options.update(kw)
    return lf.EWC(**options)


def same(a: Any, b: Any) -> bool:
    """Nested dicts/lists of tensors and plain values, tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


class ValLoss(Classifier):
    """The helpers' classifier with a validation loss that stops improving (early stopping)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", 1.0)  # constant: EarlyStopping(patience=0) stops at the 2nd check


def fit_task(
    model: Classifier,
    cb: lf.EWC,
    task: int,
    extra: list[pl.Callback] | None = None,
    ckpt_path: Any = None,
    **kw: Any,
) -> pl.Trainer:
    model.active = task_classes(task)
    cb.fisher_options.classes = task_classes(task)
    options: dict[str, Any] = {"max_epochs": 2, "deterministic": True}
    options.update(kw)
    if any(isinstance(c, ModelCheckpoint) for c in extra or []):
        options["enable_checkpointing"] = True
    t = trainer([cb, *(extra or [])], **options)
    val = loader(task) if isinstance(model, ValLoss) else None
    t.fit(model, loader(task), val, ckpt_path=ckpt_path)
    return t


# 1. The consolidated state is in every checkpoint written after the task's last step ------------
CONFIGS: dict[str, dict[str, Any]] = {
    # ModelCheckpoint's default: a save at the end of every epoch, plus last.ckpt
    "epoch_end": {"ckpt": {"save_last": True}},
    "validation_end": {"ckpt": {"save_last": True, "save_on_train_epoch_end": False}, "val": True},
    "train_epoch_end_with_val": {
        "ckpt": {"save_last": True, "save_on_train_epoch_end": True},
        "val": True,
    },
    "every_n_train_steps": {"ckpt": {"save_last": True, "every_n_train_steps": 4}},
    "max_steps": {
        "ckpt": {"save_last": True, "every_n_train_steps": 3},
        "trainer": {"max_steps": 9, "max_epochs": -1},
    },
    "early_stopping": {
        "ckpt": {"save_last": True, "save_top_k": -1},
        "val": True,
        "stop": {"monitor": "val_loss", "patience": 0},
        "trainer": {"max_epochs": 5},
    },
    # A step checkpoint at the epoch's last step, then the validation after it stops the run.
    "early_stopping_after_step_checkpoint": {
        "ckpt": {"save_last": True, "every_n_train_steps": STEPS_PER_EPOCH, "save_top_k": -1},
        "val": True,
        "stop": {"monitor": "val_loss", "patience": 0},
        "trainer": {"max_epochs": 5},
    },
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_checkpoints_after_the_last_step_hold_the_consolidated_state(
    tmp_path: Path, config: str
) -> None:
    setting = CONFIGS[config]
    model = ValLoss() if setting.get("val") else Classifier()
    cb = ewc()
    ckpt = ModelCheckpoint(dirpath=tmp_path, **setting["ckpt"])
    extra: list[pl.Callback] = [ckpt]
    if "stop" in setting:
        extra.insert(0, EarlyStopping(**setting["stop"]))
    t = fit_task(model, cb, 0, extra, **setting.get("trainer", {}))
    assert cb.task_count == 1  # consolidated once, not again at the end of the fit
    final = cb.state_dict()
    written = 0
    for path in sorted(tmp_path.glob("*.ckpt")):
        checkpoint = torch.load(path, weights_only=False)
        state = checkpoint["callbacks"][cb.state_key]
        if checkpoint["global_step"] == t.global_step:
            assert same(state, final), path.name
            written += 1
        else:  # a mid-task checkpoint: nothing consolidated yet
            assert state["task_count"] == 0 and state["steps_since_consolidation"] > 0, path.name
    assert written >= 1 and (tmp_path / "last.ckpt").exists()


def test_resumed_mid_task_consolidates_once_as_uninterrupted(tmp_path: Path) -> None:
    """A checkpoint written mid-task (step 6 of 12, at an epoch's end: a plain DataLoader resumes
    exactly there) resumed by a new Trainer and a new EWC: nothing consolidated early, one
    consolidation at the end, bitwise as without the interruption."""
    full, full_cb = Classifier(optimizer="adam", lr=0.01), ewc()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)
    fit_task(full, full_cb, 0, [ckpt])
    mid = next(tmp_path.glob("*step=6.ckpt"))
    assert torch.load(mid, weights_only=False)["callbacks"]["EWC"]["task_count"] == 0

    resumed, resumed_cb = Classifier(optimizer="adam", lr=0.01), ewc()
    fit_task(resumed, resumed_cb, 0, ckpt_path=mid)
    assert resumed_cb.task_count == 1
    assert same(resumed_cb.state_dict(), full_cb.state_dict())
    assert same(params(resumed), params(full))


def worker(work: Path, phase: str) -> None:
    """Task 0 with ``ModelCheckpoint(save_last=True)`` (phase ``a``); or task 1 from task 0's
    last.ckpt, the way one restarts a killed run: a new model, a new EWC and a new Trainer, the
    weights and EWC state taken from the checkpoint (phase ``b``); or both in one run (``full``).
    Saves the final EWC state and weights to ``<work>/<phase>.pt``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, cb = Classifier(optimizer="adam", lr=0.01), ewc()
        if phase in ("a", "full"):
            ckpt = ModelCheckpoint(dirpath=work / "ckpt", save_last=True)
            fit_task(model, cb, 0, [ckpt])
        if phase == "b":
            checkpoint = torch.load(work / "ckpt" / "last.ckpt", weights_only=False)
            model.load_state_dict(checkpoint["state_dict"])
            cb.load_state_dict(checkpoint["callbacks"][cb.state_key])
        if phase in ("b", "full"):
            fit_task(model, cb, 1)
        torch.save({"ewc": cb.state_dict(), "model": params(model)}, work / f"{phase}.pt")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(300)
def test_next_task_resumed_in_a_new_process_trains_with_the_penalty(tmp_path: Path) -> None:
    script = Path(__file__).resolve()
    # The children import the package this process imported.
    path = [str(Path(lf.__file__).resolve().parents[1]), str(script.parent)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    for phase in ("a", "b"):  # two processes: the first ends after task 0
        subprocess.run(
            [sys.executable, str(script), str(tmp_path), phase],
            check=True,
            capture_output=True,
            env=env,
            timeout=240,
        )
    worker(tmp_path, "full")
    resumed = torch.load(tmp_path / "b.pt", weights_only=False)
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    assert full["ewc"]["task_count"] == 2
    assert same(resumed["ewc"], full["ewc"])
    assert same(resumed["model"], full["model"])


# 2. A checkpoint whose EWC state does not match the callback's settings --------------------------
def two_tasks(tmp_path: Path, **kw: Any) -> tuple[Path, lf.EWC]:
    model, cb = Classifier(), ewc(**kw)
    fit_task(model, cb, 0, max_epochs=1)
    fit_task(model, cb, 1, [ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=1)
    assert cb.task_count == 2
    return tmp_path / "last.ckpt", cb


def test_resuming_with_another_method_or_mode_is_an_error_or_a_conversion(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path, cb = two_tasks(tmp_path)
    with pytest.raises(FisherInputError, match=r"method='sample'.*method='empirical'"):
        fit_task(Classifier(), ewc(method="empirical"), 1, ckpt_path=path, max_epochs=3)

    # separate -> online: F = gamma F_0 + F_1, anchored at the latest task
    online = ewc(mode="online", gamma=0.5)
    with pytest.warns(UserWarning, match="converted"):
        online.load_state_dict(torch.load(path, weights_only=False)["callbacks"]["EWC"])
    f0, f1 = cb.fishers
    assert online.task_count == 2 and len(online.fishers) == 1
    for name in f0:
        assert torch.equal(online.fishers[0][name], 0.5 * f0[name] + f1[name])
        assert torch.equal(online.anchors[0][name], cb.anchors[1][name])

    # online (2 tasks) -> separate cannot be split
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        online_path, _ = two_tasks(tmp_path / "online", mode="online")
    with pytest.raises(FisherInputError, match="cannot be split"):
        fit_task(Classifier(), ewc(mode="separate"), 1, ckpt_path=online_path, max_epochs=3)


def test_checkpoint_of_an_older_version_is_read_and_names_are_checked(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path, cb = two_tasks(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["callbacks"].pop("EWC")
    del state["method"], state["gamma"]  # what older versions wrote, under a key with both
    checkpoint["callbacks"]["EWC{'method': 'sample', 'mode': 'separate'}"] = state
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)

    restored = ewc()
    fit_task(Classifier(), restored, 1, ckpt_path=old, max_epochs=3)
    assert restored.task_count == 3  # the two tasks of the checkpoint, then this fit's
    assert same(restored.state_dict()["tasks"][:2], cb.state_dict()["tasks"])
    with pytest.raises(FisherInputError, match="method='sample'"):
        fit_task(Classifier(), ewc(method="exact"), 1, ckpt_path=old, max_epochs=3)
    # Under another name the state is not silently dropped.
    with pytest.raises(FisherInputError, match="name="):
        fit_task(Classifier(), ewc(name="b"), 1, ckpt_path=path, max_epochs=3)
    # Two instances in one Trainer: one key each (Lightning refuses two with the same key).
    assert {c.state_key for c in trainer([ewc(name="a"), ewc(name="b")]).callbacks} >= {
        "EWC[a]",
        "EWC[b]",
    }


# 3. A fit that makes no training step ---------------------------------------------------------
def test_a_reused_trainer_that_makes_no_step_warns() -> None:
    model, cb = Classifier(), ewc()
    diag = lf.FisherDiagnostics(dataloader="train", max_batches=1, methods=["hutchinson"])
    t = trainer([cb, diag])
    model.active = task_classes(0)
    t.fit(model, loader(0))
    assert cb.task_count == 1
    model.active = task_classes(1)
    with pytest.warns(UserWarning) as caught:
        t.fit(model, loader(1))  # max_epochs already reached: nothing happens
    messages = [str(w.message) for w in caught]
    for who in ("EWC", "FisherDiagnostics"):
        assert any(m.startswith(who) and "no training step" in m for m in messages), who
    assert any("new Trainer for each task" in m for m in messages)
    assert cb.task_count == 1


# 4. FisherDiagnostics across fits ----------------------------------------------------------------
class Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_diagnostics_count_fits_and_draw_figures_for_each(tmp_path: Path) -> None:
    diag = lf.FisherDiagnostics(dataloader="train", max_batches=1, methods=["hutchinson"])
    model = Classifier()
    for task in range(2):  # one epoch each: both fits evaluate at global step 6
        model.active = task_classes(task)
        logger = CSVLogger(tmp_path, name=f"task{task}")
        trainer([diag], logger=logger).fit(model, loader(task))
        figures = sorted(p.name for p in Path(logger.log_dir, "fisher_diagnostics").iterdir())
        assert figures == ["bounds.png", f"layer_density_step{6 * (task + 1):06d}.png"], task
    assert [(h["fit_index"], h["cumulative_step"], h["step"]) for h in diag.history] == [
        (0.0, 6.0, 6.0),
        (1.0, 12.0, 6.0),
    ]
    assert diag.state_dict()["fit_index"] == 1 and diag.state_dict()["cumulative_step"] == 12

    recorder, restored = (
        Recorder(),
        lf.FisherDiagnostics(dataloader="train", max_batches=1, methods=["hutchinson"]),
    )
    restored.load_state_dict(copy.deepcopy(diag.state_dict()))
    trainer([restored], logger=recorder).fit(model, loader(1))  # a third fit continues counting
    logged = [r for r in recorder.rows if "fisher/fit_index" in r]
    assert [(r["fisher/fit_index"], r["fisher/cumulative_step"]) for r in logged] == [(2.0, 18.0)]


# 5. Every configuration check runs before the first training step ------------------------------
class CountSteps(pl.Callback):
    steps = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps += 1


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ewc(fisher_kwargs={"probs": 2}), "unknown Fisher estimator option"),
        (lambda: ewc(mc_samples=0), "mc_samples"),
        (lambda: ewc(method="hutchinson", fisher_kwargs={"probe_distribution": "normal"}), "probe"),
        (lambda: ewc(method="hutchinson_lower", fisher_kwargs={"rank": 0}), "rank"),
        (lambda: ewc(max_samples=-3), "max_samples"),
        (lambda: ewc(dataloader=DataLoader(TensorDataset(torch.zeros(0, 5)))), "empty"),
        (lambda: lf.FisherMonitor(fisher_kwargs={"max_batch": 1}), "unknown Fisher estimator"),
        (lambda: lf.FisherMonitor(probes=0), "probes"),
        (lambda: lf.FisherDiagnostics(dataloader=[]), "empty"),
    ],
)
def test_option_typos_are_refused_when_the_callback_is_built(build: Any, match: str) -> None:
    with pytest.raises(FisherInputError, match=match):
        build()


def test_squisher_with_sgd_is_refused_before_the_first_step() -> None:
    model, counter = Classifier(optimizer="sgd"), CountSteps()
    before = params(model)
    with pytest.raises(FisherInputError, match=r"exp_avg_sq.*SGD"):
        trainer([ewc(method="squisher"), counter]).fit(model, loader(0))
    assert counter.steps == 0 and same(params(model), before)


# 6. The penalty and its ratio to the loss are logged ----------------------------------------------
def test_penalty_and_its_ratio_to_the_loss_are_logged() -> None:
    model, cb = Classifier(), ewc(lam=100.0)
    fit_task(model, cb, 0, max_epochs=1)

    class Losses(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *_: Any) -> None:
            self.losses.append(float(outputs["loss"]))

    recorder, losses = Recorder(), Losses()
    fit_task(model, cb, 1, [losses], max_epochs=1, logger=recorder, log_every_n_steps=2)
    rows = [r for r in recorder.rows if "ewc/penalty" in r]
    assert len(rows) == STEPS_PER_EPOCH // 2  # logging steps only
    for i, row in enumerate(rows):
        loss = losses.losses[2 * i + 1]
        assert row["ewc/penalty"] > 0
        assert row["ewc/penalty_ratio"] == pytest.approx(row["ewc/penalty"] / loss, rel=1e-6)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    worker(Path(sys.argv[1]), sys.argv[2])
