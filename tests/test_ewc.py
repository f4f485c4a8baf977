"""EWC callback: the gradient route equals the explicit-loss route, consolidation semantics,
checkpoint round trips, multi-head continual learning and clear errors that keep the state."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lit_helpers import Classifier, loader, max_diff, params, task_classes, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fisher as lf
from lightning_fisher import FisherInputError


def head_of_batch(batch: Any) -> list[int]:
    """The active classes of a batch's task (every batch holds one task's data)."""
    return task_classes(int(batch[1][0]) // 2)


def ewc(**kw: Any) -> lf.EWC:
    kw.setdefault("lam", 100.0)
    kw.setdefault("classes", head_of_batch)
    return lf.EWC(**kw)


def after_task0(**model_kw: Any) -> tuple[Classifier, lf.EWC]:
    model = Classifier(**model_kw)
    model.active = task_classes(0)
    cb = ewc()
    trainer([cb]).fit(model, loader(0, dtype=next(model.parameters()).dtype))
    return model, cb


def state_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bitwise equality of EWC states (tensors compared with torch.equal)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not isinstance(y, dict) or not state_equal(x, y):
                return False
        elif isinstance(x, list):
            if len(x) != len(y) or not all(state_equal(u, v) for u, v in zip(x, y)):
                return False
        elif isinstance(x, torch.Tensor):
            if not (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.cpu(), y.cpu())):
                return False
        elif x != y:
            return False
    return True


def fp16() -> list[MixedPrecision]:
    return [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]


SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "sgd": ({}, {}),
    "adam": ({"optimizer": "adam", "lr": 0.01}, {}),
    "accumulate": ({}, {"accumulate_grad_batches": 3}),
    # 6 batches per epoch: windows of 4 and 2, the loss route's penalty has a share 2/4 in the second
    "accumulate_partial_window": ({}, {"accumulate_grad_batches": 4}),
    "bf16": ({"dtype": torch.float32}, {"precision": "bf16-mixed"}),
    # fp16 AMP with a GradScaler (Lightning maps precision="16-mixed" to bf16 on CPU, so the
    # plugin is passed explicitly); fused Adam unscales inside step(), so the hook sees scaled
    # gradients
    "fp16_adam": ({"optimizer": "adam", "lr": 0.01, "dtype": torch.float32}, {"plugins": fp16}),
    "fp16_fused_adam": (
        {"optimizer": "adam-fused", "lr": 0.01, "dtype": torch.float32},
        {"plugins": fp16},
    ),
    "manual": ({"manual": True}, {}),
    "clip": ({}, {"gradient_clip_val": 0.05}),
    "adam_accumulate_clip": (
        {"optimizer": "adam", "lr": 0.01},
        {"accumulate_grad_batches": 3, "gradient_clip_val": 0.05},
    ),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_gradient_route_equals_explicit_loss(setting: str) -> None:
    model_kw, settings = SETTINGS[setting]

    def trainer_kw() -> dict[str, Any]:  # a fresh GradScaler for every run
        return {k: v() if callable(v) else v for k, v in settings.items()}

    model, cb = after_task0(**model_kw)
    assert cb.task_count == 1
    dtype = next(model.parameters()).dtype
    routed, explicit, plain = (copy.deepcopy(model) for _ in range(3))
    for m in (routed, explicit, plain):
        m.active = task_classes(1)
    by_loss = ewc(apply="loss")
    by_loss.load_state_dict(cb.state_dict())
    explicit.penalty_fn = lambda module, batch: by_loss.penalty(module)
    data = loader(1, dtype=dtype)
    trainer([cb], **trainer_kw()).fit(routed, data)
    trainer([by_loss], **trainer_kw()).fit(explicit, data)
    trainer([], **trainer_kw()).fit(plain, data)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert max_diff(params(routed), params(explicit)) <= tol
    # The penalty changed the update, so the comparison above is not vacuous.
    assert max_diff(params(routed), params(plain)) > 100 * tol
    # Both routes consolidated the same second task.
    assert cb.task_count == by_loss.task_count == 2
    assert max_diff(dict(cb.fishers[0]), dict(by_loss.fishers[0])) <= tol


def test_penalty_gradient_is_exact_and_zero_before_consolidation() -> None:
    model = Classifier()
    cb = ewc()
    assert float(cb.penalty(model)) == 0.0
    x, y = loader(0).dataset.tensors
    cb.consolidate(model, DataLoader(TensorDataset(x, y), batch_size=16), fisher=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    value = cb.penalty(model)
    value.backward()
    (fisher,), (anchor,) = cb.fishers, cb.anchors
    for name, p in model.named_parameters():
        expected = cb.lam * fisher[name].double() * (p.detach() - anchor[name])
        torch.testing.assert_close(p.grad, expected)
    dense = sum(
        (fisher[n].double() * (p.detach() - anchor[n]) ** 2).sum()
        for n, p in model.named_parameters()
    )
    torch.testing.assert_close(value.detach(), 0.5 * cb.lam * dense)


@pytest.mark.parametrize("mode", ["online", "separate"])
def test_consolidation_modes(mode: str) -> None:
    gamma = 0.5
    model = Classifier()
    cb = ewc(mode=mode, gamma=gamma, classes=None)
    estimates, anchors = [], []
    for task in range(2):
        trainer([cb]).fit(model, loader(task))
        # The stored estimate is the Fisher of the finished task on its training data.
        ref = lf.estimate_fisher(model, loader(task), method="exact")
        estimates.append(ref)
        anchors.append(params(model))
    assert cb.task_count == 2
    if mode == "separate":
        assert len(cb.fishers) == 2
        for fd, ref, anchor, stored in zip(cb.fishers, estimates, anchors, cb.anchors):
            assert max_diff(dict(fd), dict(ref)) <= 1e-6
            assert max_diff(stored, anchor) == 0
    else:
        (fd,), (stored,) = cb.fishers, cb.anchors
        combined = estimates[0].scale(gamma) + estimates[1]
        assert max_diff(dict(fd), dict(combined)) <= 1e-6
        assert max_diff(stored, anchors[1]) == 0


def test_no_consolidation_without_training_and_frozen_parameters_ignored() -> None:
    model = Classifier()
    model.net[0].weight.requires_grad_(False)
    cb = ewc(classes=None)
    trainer([cb]).fit(model, loader(0))
    assert "net.0.weight" not in cb.fishers[0] and "net.0.bias" in cb.fishers[0]
    # A second fit that makes no optimizer step (the run already finished) consolidates nothing.
    trainer([cb], max_steps=0).fit(model, loader(0))
    assert cb.task_count == 1


class Growing(Classifier):
    """A classifier that can grow a new output head for a new task."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        if hasattr(self, "new_head"):
            z = torch.cat([z, self.new_head(torch.tanh(self.net[0](x)))], -1)
        return z


def test_new_head_gets_zero_old_fisher() -> None:
    model = Growing()
    model.active = task_classes(0)
    cb = ewc(classes=lambda batch: model.active)
    trainer([cb]).fit(model, loader(0))
    model.new_head = nn.Linear(8, 2).double()  # appears after task 0: units 6 and 7
    model.active = [6, 7]
    x, y = loader(1).dataset.tensors
    data = DataLoader(TensorDataset(x, y + 4), batch_size=8)
    old = copy.deepcopy(cb.fishers[0])
    assert "new_head.weight" not in old
    trainer([cb]).fit(model, data)  # the penalty gradient skips the new head
    fd = cb.fishers[0]
    new = lf.estimate_fisher(model, data, classes=[6, 7])
    assert new["new_head.weight"].abs().sum() > 0
    # online, gamma = 1: F = F_old + F_new, where the new head's old Fisher counts as zero
    torch.testing.assert_close(fd["new_head.weight"], new["new_head.weight"])
    torch.testing.assert_close(fd["net.0.weight"], old["net.0.weight"] + new["net.0.weight"])


def test_multi_head_continual_learning_three_tasks() -> None:
    seeds_acc: dict[str, float] = {}
    for name, lam in (("ewc", 1e3), ("none", 0.0)):
        model = Classifier(hidden=16, optimizer="adam", lr=0.05)
        cb = ewc(lam=lam, mode="separate")
        for task in range(3):
            model.active = task_classes(task)
            trainer([cb], max_epochs=5).fit(model, loader(task, n=96, batch_size=24))
        model.active = task_classes(0)
        seeds_acc[name] = model.accuracy(loader(0, n=96))
        if name == "ewc":
            assert cb.task_count == 3 and len(cb.fishers) == 3
            for task, fd in enumerate(cb.fishers):
                rows = fd["net.2.weight"].abs().sum(1)
                # only the task's own head units have Fisher mass
                assert (rows[task_classes(task)] > 0).all()
                assert rows[[c for c in range(6) if c not in task_classes(task)]].sum() == 0
    assert seeds_acc["ewc"] > seeds_acc["none"]


def test_task_switch_in_datamodule_consolidates_previous_task() -> None:
    class Tasks(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.task_id = 0

        def train_dataloader(self) -> DataLoader:
            return loader(self.task_id)

    class Switch(pl.Callback):  # a task schedule: task 1 starts after epoch 0
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.datamodule.task_id = 1

    model = Classifier()
    cb = ewc(mode="separate")
    dm = Tasks()
    trainer([Switch(), cb], max_epochs=2, reload_dataloaders_every_n_epochs=1).fit(
        model, datamodule=dm
    )
    assert cb.task_count == 2
    # The first consolidation used task 0's data at the parameters of the end of epoch 0.
    probe = copy.deepcopy(model)
    probe.load_state_dict(cb.anchors[0])
    ref = lf.estimate_fisher(probe, loader(0), classes=head_of_batch)
    assert max_diff(dict(cb.fishers[0]), dict(ref)) <= 1e-6
    assert max_diff(cb.anchors[0], cb.anchors[1]) > 0


def test_squisher_uses_global_batch_size() -> None:
    model = Classifier(optimizer="adam", lr=0.01)
    cb = ewc(method="squisher", classes=None)
    t = trainer([cb], accumulate_grad_batches=2)
    t.fit(model, loader(0))
    ref = lf.fisher_from_optimizer(t.optimizers[0], model, batch_size=8 * 2)
    assert cb.fishers[0].method == "squisher"
    assert max_diff(dict(cb.fishers[0]), dict(ref)) == 0


def test_checkpoint_round_trip_and_resume_match_uninterrupted(tmp_path: Any) -> None:
    model, cb = after_task0(optimizer="adam", lr=0.01)
    consolidated = copy.deepcopy(cb.state_dict())

    def run(m: Classifier, callback: lf.EWC, **fit_kw: Any) -> None:
        m.active = task_classes(1)
        ckpt = ModelCheckpoint(dirpath=tmp_path / str(id(m)), save_top_k=-1, every_n_epochs=1)
        trainer([callback, ckpt], max_epochs=2, enable_checkpointing=True).fit(
            m, loader(1), **fit_kw
        )

    full, full_cb = copy.deepcopy(model), copy.deepcopy(cb)
    run(full, full_cb)
    epoch0 = next((tmp_path / str(id(full))).glob("epoch=0*.ckpt"))

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.state = copy.deepcopy(resumed_cb.state_dict())

    resumed, resumed_cb, snap = Classifier(optimizer="adam", lr=0.01), ewc(), Snapshot()
    resumed.active = task_classes(1)
    trainer([resumed_cb, snap], max_epochs=2).fit(resumed, loader(1), ckpt_path=epoch0)
    # Restored: the task-0 Fisher, anchors and counter, bitwise.
    restored = {k: snap.state[k] for k in ("tasks", "task_count")}
    assert state_equal(restored, {k: consolidated[k] for k in ("tasks", "task_count")})
    # Continued: the same parameters and the same consolidated state as the uninterrupted run.
    assert max_diff(params(resumed), params(full)) == 0
    assert state_equal(resumed_cb.state_dict(), full_cb.state_dict())


def test_nan_fisher_and_empty_loader_raise_and_keep_state() -> None:
    model, cb = after_task0()
    before = copy.deepcopy(cb.state_dict())
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.net[0].weight[0, 0] = float("nan")
    with pytest.raises(FisherInputError, match="NaN"):
        cb.consolidate(broken, loader(0))
    empty = DataLoader(
        TensorDataset(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0).long()), batch_size=4
    )
    with pytest.raises(FisherInputError, match="no batches"):
        cb.consolidate(model, empty)
    nan_fisher = lf.FisherDiagonal(
        {n: torch.full_like(p, float("nan")) for n, p in model.named_parameters()}
    )
    with pytest.raises(FisherInputError, match="NaN"):
        cb.consolidate(model, fisher=nan_fisher)
    assert state_equal(cb.state_dict(), before)


def test_mismatched_checkpoint_names_raise_and_keep_state() -> None:
    _model, cb = after_task0()
    other = nn.Sequential(nn.Linear(5, 3))
    target = ewc()
    target.setup(trainer(), other, "fit")  # type: ignore[arg-type]
    own = lf.FisherDiagonal({n: torch.ones_like(p) for n, p in other.named_parameters()})
    target.consolidate(other, fisher=own)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(FisherInputError, match="not parameters of the model"):
        target.load_state_dict(cb.state_dict())
    assert state_equal(target.state_dict(), before)
    # Without the module at load time the check happens when the fit starts.
    late = ewc()
    late.load_state_dict(cb.state_dict())
    with pytest.raises(ValueError, match="does not match the model"):
        trainer([late]).fit(Classifier(hidden=4), loader(0))


def test_bad_arguments_are_rejected() -> None:
    for kw, match in (
        ({"lam": -1.0}, "lam"),
        ({"lam": 1.0, "method": "nope"}, "unknown Fisher method"),
        ({"lam": 1.0, "mode": "both"}, "mode"),
        ({"lam": 1.0, "apply": "x"}, "apply"),
        ({"lam": 1.0, "gamma": float("nan")}, "gamma"),
    ):
        with pytest.raises(ValueError, match=match):
            lf.EWC(**kw)


def test_logged_penalty_is_the_penalty_at_the_step() -> None:
    model, cb = after_task0()
    model.active = task_classes(1)
    seen: list[float] = []

    class Probe(pl.Callback):  # runs after EWC's hook, before the optimizer moves the parameters
        def on_before_optimizer_step(
            self, trainer: pl.Trainer, pl_module: Any, optimizer: Any
        ) -> None:
            seen.append(float(cb.penalty(pl_module)))

    t = trainer([cb, Probe()], log_every_n_steps=1)
    t.fit(model, loader(1))
    assert seen[-1] > 0
    assert float(t.callback_metrics["ewc/penalty"]) == pytest.approx(seen[-1], rel=1e-6)


def test_overhead_benchmark_runs_and_its_routes_agree(tmp_path: Any) -> None:
    from benchmarks import ewc_overhead

    out = tmp_path / "ewc_overhead"
    report = ewc_overhead.main(
        [
            "--tiny",
            "--steps",
            "10",
            "--warmup",
            "2",
            "--rounds",
            "1",
            "--check-steps",
            "3",
            "--check-precisions",
            "16-mixed",
            "--out",
            str(out),
        ]
    )
    (row,) = report["rows"]
    assert row["ratio"] > 0 and row["ms_hook"] > 0 and row["precision"] == "32-true"
    # fp16 AMP with a GradScaler, plain and fused AdamW: the two EWC routes agree
    assert [c["optimizer"] for c in report["checks"]] == ["adamw", "adamw-fused"]
    assert all(c["equal"] for c in report["checks"])
    assert "| cpu | mlp-784-32-10 |" in (tmp_path / "ewc_overhead.md").read_text()
