"""Kill and resume: EWC runs killed by SIGKILL (in training and inside a Fisher pass) and resumed
from their last checkpoint end bitwise equal to an uninterrupted run.

The subprocess harness is ``benchmarks/kill_resume.py`` (which runs 10 random kill points and
writes the report); CI runs two kill points of it here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import Classifier, loader, params, task_classes, trainer
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_fisher as lf
from benchmarks import kill_resume
from lightning_fisher.callbacks._utils import fixed_order


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_in_training_and_in_fisher_pass_resumes_bitwise(tmp_path: Path) -> None:
    # Task 1 killed mid-epoch (resumes from the step-4 epoch-boundary checkpoint), and killed in
    # batch 2 of task 1's consolidation, which runs before the checkpoint of the task's last step
    # is written (resumes from the step-4 checkpoint too, retrains the last epoch and consolidates).
    points = ["train:1:6", "fisher:1:2"]
    # One worker at a time.
    assert kill_resume.run(tmp_path / "reference", timeout=240) == 0
    outcomes = [kill_resume.kill_and_resume(tmp_path / p.replace(":", "_"), p) for p in points]
    reference = kill_resume.load_final(tmp_path / "reference")
    assert reference["task_count"] == kill_resume.TASKS
    steps = kill_resume.STEPS_PER_TASK
    expected_resume = [{"task": 1, "step": steps // 2}, {"task": 1, "step": steps // 2}]
    for point, outcome, resumed_from in zip(points, outcomes, expected_resume):
        assert outcome["killed"], f"{point}: the worker was not killed"
        assert outcome["resumed_from"] == resumed_from, point
        final = outcome["final"]
        assert kill_resume.bitwise_equal(final["model"], reference["model"]), point
        assert kill_resume.bitwise_equal(final["ewc"], reference["ewc"]), point


def test_bitwise_equal_sees_one_bit() -> None:
    a = {"w": torch.ones(3), "tasks": [{"n": 1, "f": torch.zeros(2)}]}
    b = copy.deepcopy(a)
    assert kill_resume.bitwise_equal(a, b)
    b["tasks"][0]["f"][1] = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))
    assert not kill_resume.bitwise_equal(a, b)
    assert not kill_resume.bitwise_equal(a, {**a, "w": torch.ones(3, dtype=torch.float64)})


class Interrupt(Exception):
    """Stands in for a kill inside the Fisher pass (raised from the user's output_fn)."""


def _output_fn(state: dict[str, bool]) -> Any:
    def output_fn(module: torch.nn.Module, batch: Any) -> torch.Tensor:
        # The Fisher pass differentiates; EWC's no-grad check of the first training batch passes.
        if state["raise"] and torch.is_grad_enabled():
            raise Interrupt
        return module(batch[0])

    return output_fn


def _shuffled(task: int) -> DataLoader:
    data = loader(task).dataset
    return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))


def test_fit_resumed_after_its_last_step_reruns_the_consolidation(tmp_path: Path) -> None:
    """A fit limited by ``max_steps`` whose consolidation was interrupted: the checkpoint of the
    last step is not written (the consolidation runs before it). A checkpoint written after the last step without
    the consolidation (by an older version) resumes into a fit with no step left (Lightning skips
    ``on_train_end``), yet EWC consolidates, bitwise as uninterrupted. The training loader is
    shuffled, and the Fisher pass must not depend on its epoch."""
    kw: dict[str, Any] = {"max_steps": 12, "max_epochs": -1, "deterministic": True}

    def run(state: dict[str, bool], folder: str, **fit_kw: Any) -> tuple[Classifier, lf.EWC]:
        model = Classifier(optimizer="adam", lr=0.01)
        model.active = task_classes(0)
        cb = lf.EWC(lam=10.0, method="sample", classes=task_classes(0), output_fn=_output_fn(state))
        ckpt = ModelCheckpoint(dirpath=tmp_path / folder, every_n_train_steps=6, save_last=True)
        trainer([cb, ckpt], enable_checkpointing=True, **kw).fit(model, _shuffled(0), **fit_kw)
        return model, cb

    uninterrupted_model, uninterrupted = run({"raise": False}, "full")
    state = {"raise": True}
    with pytest.raises(Interrupt):
        run(state, "killed")
    state["raise"] = False
    # The step-12 checkpoint was never written without the consolidation. (Resuming from step 6
    # replays epoch 1 of a RandomSampler in another order: benchmarks/kill_resume.py covers that
    # resume with a seeded sampler.)
    last = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6 and last["callbacks"]["EWC"]["task_count"] == 0

    old = torch.load(tmp_path / "full" / "last.ckpt", weights_only=False)
    assert old["global_step"] == 12 and old["callbacks"]["EWC"]["task_count"] == 1
    old["callbacks"]["EWC"].update(task_count=0, tasks=[], steps_since_consolidation=12)
    torch.save(old, tmp_path / "old.ckpt")
    resumed_model, resumed = run(state, "old", ckpt_path=tmp_path / "old.ckpt")
    assert resumed.task_count == 1
    assert kill_resume.bitwise_equal(resumed.state_dict(), uninterrupted.state_dict())
    assert kill_resume.bitwise_equal(params(resumed_model), params(uninterrupted_model))


def test_fisher_pass_over_a_shuffled_loader_does_not_depend_on_the_epoch() -> None:
    """Consolidations at the ends of epochs 0, 1, 2 of a shuffled loader (weights frozen, lr 0)
    are bitwise equal: the pass reads the training data in one fixed order, whatever epoch the
    sampler was set to (what makes a resumed consolidation identical)."""
    model = Classifier(lr=0.0)
    model.active = task_classes(0)
    ewc = lf.EWC(lam=1.0, method="sample", mode="separate", classes=task_classes(0))

    class EveryEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            ewc.consolidate(pl_module)

    trainer([EveryEpoch()], max_epochs=3, deterministic=True).fit(model, _shuffled(0))
    assert len(ewc.fishers) == 3
    for other in ewc.fishers[1:]:
        assert kill_resume.bitwise_equal(dict(other), dict(ewc.fishers[0]))


@pytest.mark.parametrize("world", [1, 3])
def test_fixed_order_reads_every_input_once_in_the_same_order(world: int) -> None:
    data = TensorDataset(torch.arange(23.0))
    if world == 1:
        loaders = [DataLoader(data, batch_size=4, shuffle=True)]
    else:
        loaders = [
            DataLoader(data, batch_size=4, sampler=DistributedSampler(data, world, r, seed=5))
            for r in range(world)
        ]
    seen = []
    for epoch, original in enumerate(loaders):
        if isinstance(original.sampler, DistributedSampler):
            original.sampler.set_epoch(epoch + 7)
        first = [b[0].tolist() for b in fixed_order(original)]
        assert first == [b[0].tolist() for b in fixed_order(original)]
        seen += [v for b in first for v in b]
    # DistributedSampler pads 23 inputs to a multiple of the ranks, as in training.
    assert sorted(set(seen)) == list(range(23)) and len(seen) == -(-23 // world) * world
