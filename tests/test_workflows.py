"""The callbacks in Lightning workflows a user adds them to without changing anything else:
evaluation from a checkpoint after a fit, checkpoints of weights only, the tuner, gradient
accumulation, several or persistent training loaders, manual optimization, data modules, dict
batches and 64-bit precision. The numbers are checked against ``lf.estimate_fisher`` on the same
weights and data, or against an equivalent run."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities import CombinedLoader
from lit_helpers import Classifier, loader, max_diff, params, task_classes, task_data, trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_fisher as lf
from lightning_fisher import FisherInputError


def ewc(**kw: Any) -> lf.EWC:
    options: dict[str, Any] = {"lam": 10.0, "method": "exact"}
    options.update(kw)
    return lf.EWC(**options)


def same(a: Any, b: Any) -> bool:
    """Nested dicts/lists of tensors and plain values, tensors compared bit for bit."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def fisher_diff(fisher: lf.FisherDiagonal, reference: lf.FisherDiagonal) -> float:
    assert fisher.keys() == reference.keys()
    return max_diff(dict(fisher), dict(reference))


class Evaluated(Classifier):
    """A validation loss that rises every epoch: the best checkpoint is the first epoch's, written
    before the fit's last step (and so before the consolidation)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", float(self.current_epoch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", 0.0)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0])


# Evaluation from a checkpoint after a fit ---------------------------------------------------------
def test_evaluating_a_best_checkpoint_keeps_the_fits_state(tmp_path: Path) -> None:
    model = Evaluated()
    model.active = task_classes(0)
    cb = ewc()
    monitor = lf.FisherMonitor(method="exact", every_n_epochs=1)
    reg = lf.FisherTraceRegularizer(alpha=1e-3, log=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="min", save_top_k=1)
    t = trainer([cb, monitor, reg, ckpt], max_epochs=3, enable_checkpointing=True)
    t.fit(model, loader(0), loader(0))
    assert cb.task_count == 1 and ckpt.best_model_path.endswith("step=6.ckpt")
    best = torch.load(ckpt.best_model_path, weights_only=False)["callbacks"]
    assert best["EWC"]["task_count"] == 0  # written mid-task: a real rollback is possible
    states = [copy.deepcopy(c.state_dict()) for c in (cb, monitor, reg)]

    t.validate(model, loader(0), ckpt_path="best", verbose=False)
    t.test(model, loader(0), ckpt_path="best", verbose=False)
    t.predict(model, loader(0), ckpt_path="best")
    for c, state in zip((cb, monitor, reg), states):
        assert same(c.state_dict(), state), type(c).__name__
    # The evaluated weights are the best checkpoint's, as Lightning intends.
    restored = torch.load(ckpt.best_model_path, weights_only=False)["state_dict"]
    assert same(params(model), restored)

    # The next task trains against the first one and consolidates a second.
    model.active = task_classes(1)
    trainer([cb], max_epochs=1).fit(model, loader(1))
    assert cb.task_count == 2

    # A fresh callback (nothing held yet) takes the checkpoint's state, as Lightning restores it.
    fresh = ewc()
    trainer([fresh]).validate(Evaluated(), loader(0), ckpt_path=ckpt.best_model_path, verbose=False)
    assert fresh.task_count == 0 and same(fresh.state_dict(), best["EWC"])


# Checkpoints of weights only, and models loaded with load_from_checkpoint --------------------------
def test_weights_only_checkpoints_are_refused_and_full_ones_load(tmp_path: Path) -> None:
    model = Classifier()
    model.active = task_classes(0)
    cb = ewc()
    weights_only = ModelCheckpoint(dirpath=tmp_path / "w", save_weights_only=True)
    t = trainer([cb, weights_only], enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"save_weights_only=True\) writes no callback state"):
        t.fit(model, loader(0))
    t.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    t.save_checkpoint(tmp_path / "full.ckpt")

    # Resuming a fit from weights only fails in Lightning itself (no optimizer state), loudly.
    with pytest.raises(KeyError, match="save_weights_only"):
        trainer([ewc()], max_epochs=2).fit(
            Classifier(), loader(1), ckpt_path=tmp_path / "weights.ckpt"
        )
    # Loading EWC state from it says why there is none; the state is left as it was.
    other = ewc()
    with pytest.raises(FisherInputError, match="save_weights_only=True"):
        other.load_checkpoint(tmp_path / "weights.ckpt")
    assert other.task_count == 0
    with pytest.raises(FisherInputError, match=r"'EWC\[b\]'.*\['EWC'\].*name="):
        ewc(name="b").load_checkpoint(tmp_path / "full.ckpt")

    # A model loaded with load_from_checkpoint and a new EWC loading the same file continue as
    # the original objects do.
    loaded = Classifier.load_from_checkpoint(tmp_path / "full.ckpt")
    resumed = ewc()
    resumed.load_checkpoint(tmp_path / "full.ckpt")
    assert same(resumed.state_dict(), cb.state_dict())
    for m, c in ((model, cb), (loaded, resumed)):
        m.active = task_classes(1)
        trainer([c]).fit(m, loader(1))
    assert resumed.task_count == 2
    assert same(resumed.state_dict(), cb.state_dict())
    assert same(params(loaded), params(model))


# The tuner ----------------------------------------------------------------------------------------
class Tunable(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 8

    def train_dataloader(self) -> DataLoader:
        return loader(0, batch_size=self.batch_size)


def test_tuner_trial_runs_leave_weights_and_state_unchanged(tmp_path: Path) -> None:
    model = Tunable()
    model.active = task_classes(0)
    cb, monitor = ewc(), lf.FisherMonitor(method="exact", every_n_steps=1)
    trainer([cb]).fit(model)
    state, before = copy.deepcopy(cb.state_dict()), params(model)
    t = trainer([cb, monitor], default_root_dir=tmp_path)
    Tuner(t).lr_find(model, min_lr=1e-3, max_lr=1.0, num_training=5, update_attr=False)
    Tuner(t).scale_batch_size(model, mode="power", steps_per_trial=1, max_trials=2)
    assert same(cb.state_dict(), state) and same(params(model), before)
    assert monitor.fisher is None  # the trial runs do not reach the callbacks


# Gradient accumulation ----------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [None, 0.05])
def test_accumulation_equals_a_k_times_larger_batch(clip: float | None) -> None:
    """k micro-batches of b accumulate the mean gradient of a batch of k*b; the penalty gradient
    is added once per optimizer step, before clipping, so both runs make the same updates."""
    model = Classifier()
    model.active = task_classes(0)
    cb = ewc()
    trainer([cb]).fit(model, loader(0))
    runs = []
    for accumulate, batch in ((3, 8), (1, 24)):
        m, c = copy.deepcopy(model), ewc()
        c.load_state_dict(copy.deepcopy(cb.state_dict()))
        m.active = task_classes(1)
        trainer([c], accumulate_grad_batches=accumulate, gradient_clip_val=clip, max_epochs=2).fit(
            m, loader(1, batch_size=batch)
        )
        runs.append((m, c))
    (acc, acc_cb), (big, big_cb) = runs
    assert max_diff(params(acc), params(big)) <= 1e-12
    assert fisher_diff(acc_cb.fishers[0], big_cb.fishers[0]) <= 1e-12
    plain = copy.deepcopy(model)
    plain.active = task_classes(1)
    trainer([], gradient_clip_val=clip, max_epochs=2).fit(plain, loader(1, batch_size=24))
    assert max_diff(params(big), params(plain)) > 1e-6  # the penalty acted


# Training data the Fisher pass reads ---------------------------------------------------------------
class Multi(Classifier):
    """Trains on the first loader of a list or dict of loaders."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if isinstance(batch, dict):
            batch = batch["a"]
        elif isinstance(batch[0], (list, tuple)):
            batch = batch[0]
        return super().training_step(batch, batch_idx)


LOADERS = {
    "list": lambda: [loader(0), loader(0)],
    "combined_dict": lambda: CombinedLoader({"a": loader(0), "b": loader(0)}, "max_size_cycle"),
    "combined_one": lambda: CombinedLoader([loader(0)], "max_size_cycle"),
}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_several_training_loaders_are_refused_before_training(kind: str) -> None:
    callbacks: list[pl.Callback] = [
        ewc(),
        lf.FisherMonitor(method="exact"),
        lf.FisherDiagnostics(dataloader="train", methods=["hutchinson"], max_batches=1),
    ]
    for cb in callbacks:
        model = Multi()
        t = trainer([cb])
        with pytest.raises(FisherInputError, match=r"several training dataloaders.*dataloader="):
            t.fit(model, LOADERS[kind]())
        assert t.global_step == 0, type(cb).__name__  # refused before the task trained
    # With its own Fisher data the callback works on the combined training data.
    model, cb = Multi(), ewc(dataloader=loader(0))
    trainer([cb]).fit(model, LOADERS[kind]())
    assert fisher_diff(cb.fishers[0], lf.estimate_fisher(model, loader(0), "exact")) == 0


class Batches(pl.Callback):
    """Records the inputs of every training batch, by epoch."""

    def __init__(self) -> None:
        self.inputs: dict[int, list[Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.inputs.setdefault(trainer.current_epoch, []).append(args[1][0].clone())


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_training_loader_with_persistent_workers(shuffle: bool) -> None:
    """The Fisher passes read such a loader through a copy: training sees every input once per
    epoch, and the Fisher is the estimate on the weights of the pass."""
    data = DataLoader(
        task_data(0), batch_size=8, shuffle=shuffle, num_workers=1, persistent_workers=True
    )
    model, cb, batches = Classifier(), ewc(), Batches()
    monitor = lf.FisherMonitor(method="exact", every_n_steps=2)  # passes mid-epoch
    trainer([cb, monitor, batches], max_epochs=2).fit(model, data)
    everything = task_data(0).tensors[0]
    assert sorted(batches.inputs) == [0, 1]
    for inputs in batches.inputs.values():
        seen = torch.cat(inputs)
        assert seen.shape == everything.shape
        assert torch.equal(seen[seen[:, 0].argsort()], everything[everything[:, 0].argsort()])
    assert [step for step, _ in monitor.history] == [2, 4, 6, 8, 10, 12]
    reference = lf.estimate_fisher(model, loader(0), "exact")
    assert fisher_diff(cb.fishers[0], reference) <= 1e-15
    assert fisher_diff(monitor.fisher, reference) <= 1e-15
    if not shuffle:  # the same updates as without worker processes
        plain = Classifier()
        trainer([ewc(), lf.FisherMonitor(method="exact", every_n_steps=2)], max_epochs=2).fit(
            plain, loader(0)
        )
        assert max_diff(params(model), params(plain)) == 0


# Manual optimization ------------------------------------------------------------------------------
class RawSteps(Classifier):
    """Manual optimization that steps the raw optimizer, which Lightning does not see."""

    def __init__(self) -> None:
        super().__init__(manual=True)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers(use_pl_optimizer=False)
        opt.zero_grad()
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        opt.step()


def test_optimizer_steps_lightning_does_not_see_are_refused() -> None:
    model = RawSteps()
    cb = ewc()
    with pytest.warns(UserWarning, match=r"no optimizer step went through Lightning.*use_pl_opt"):
        trainer([cb]).fit(model, loader(0))
    assert cb.task_count == 0
    cb.consolidate(model, loader(0))
    # A penalty was due: an error at the first epoch's end rather than a run without it.
    t = trainer([cb], max_epochs=3)
    with pytest.raises(FisherInputError, match=r"penalty gradient.*1 task"):
        t.fit(model, loader(1))
    assert t.current_epoch == 0


class TwoOptimizers(Classifier):
    """GAN-style manual optimization: one optimizer per layer, both stepped every batch; with
    ``penalty`` set, the EWC penalty is in the loss instead."""

    def __init__(self) -> None:
        super().__init__(manual=True)
        self.penalty: lf.EWC | None = None

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD(self.net[2].parameters(), lr=0.1),
        ]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        first, second = self.optimizers()  # type: ignore[misc]
        x, y = batch
        loss = nn.functional.cross_entropy(self.head_logits(x), self.local_labels(y))
        if self.penalty is not None:
            loss = loss + self.penalty.penalty(self)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()


def test_two_optimizers_in_manual_optimization_get_the_penalty_once() -> None:
    model, cb = TwoOptimizers(), ewc(lam=100.0)
    model.active = task_classes(0)
    trainer([cb]).fit(model, loader(0))
    routed, explicit, plain = (copy.deepcopy(model) for _ in range(3))
    by_loss = ewc(lam=100.0, apply="loss")
    by_loss.load_state_dict(copy.deepcopy(cb.state_dict()))
    explicit.penalty = by_loss
    for m, c in ((routed, [cb]), (explicit, [by_loss]), (plain, [])):
        m.active = task_classes(1)
        trainer(c).fit(m, loader(1))
    assert max_diff(params(routed), params(explicit)) <= 1e-12
    assert max_diff(params(routed), params(plain)) > 1e-6
    assert cb.task_count == by_loss.task_count == 2


class ClippedByHand(Classifier):
    """Manual optimization that clips the gradients before ``opt.step()``; with ``after_clip``
    set, the EWC gradient is added by hand after the clipping, with ``in_loss`` the penalty is in
    the loss (so clipped with it)."""

    def __init__(self) -> None:
        super().__init__(manual=True)
        self.after_clip: lf.EWC | None = None
        self.in_loss: lf.EWC | None = None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()  # type: ignore[union-attr]
        loss = nn.functional.cross_entropy(self.head_logits(x), self.local_labels(y))
        if self.in_loss is not None:
            loss = loss + self.in_loss.penalty(self)
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
        if self.after_clip is not None:
            self.after_clip.core.add_penalty_grad(self)
        opt.step()  # type: ignore[union-attr]


def test_manual_clipping_does_not_see_the_penalty_gradient() -> None:
    """In manual optimization the penalty gradient is added inside ``opt.step()``, after the
    clipping a ``training_step`` does (automatic optimization clips the sum)."""
    model, cb = ClippedByHand(), ewc(lam=100.0)
    model.active = task_classes(0)
    trainer([cb]).fit(model, loader(0))
    routed, by_hand, clipped = (copy.deepcopy(model) for _ in range(3))
    added, in_loss = ewc(lam=100.0, apply="loss"), ewc(lam=100.0, apply="loss")
    for c in (added, in_loss):
        c.load_state_dict(copy.deepcopy(cb.state_dict()))
    by_hand.after_clip, clipped.in_loss = added, in_loss
    for m, c in ((routed, cb), (by_hand, added), (clipped, in_loss)):
        m.active = task_classes(1)
        trainer([c]).fit(m, loader(1))
    assert max_diff(params(routed), params(by_hand)) <= 1e-12
    assert max_diff(params(routed), params(clipped)) > 1e-6  # clipping the sum differs


# Data modules, dict batches, 64-bit precision -------------------------------------------------------
class Tasks(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.task_id = 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            [{"x": x, "y": y} for x, y in zip(*task_data(self.task_id).tensors)], batch_size=8
        )


class DictBatches(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return super().training_step((batch["x"], batch["y"]), batch_idx)


def test_datamodule_dict_batches_and_64_bit_precision_consolidate_the_estimate() -> None:
    model, cb = DictBatches(), ewc()
    dm = Tasks()
    trainer([cb]).fit(model, datamodule=dm)
    reference = lf.estimate_fisher(model, dm.train_dataloader(), "exact")
    assert fisher_diff(cb.fishers[0], reference) == 0
    # precision="64-true" turns a float32 model into a float64 one
    model, cb = Classifier(dtype=torch.float32), ewc()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([cb], precision="64-true").fit(model, loader(0))
    assert next(model.parameters()).dtype == torch.float64
    assert fisher_diff(cb.fishers[0], lf.estimate_fisher(model, loader(0), "exact")) == 0


def test_trace_regularizer_refuses_several_optimizers_in_manual_optimization() -> None:
    """With two optimizers the first step of a batch would take the whole regulariser and the
    second optimizer's parameters none; which loss carries it is the user's choice."""
    model = TwoOptimizers()
    t = trainer([lf.FisherTraceRegularizer(alpha=0.5)])
    with pytest.raises(FisherInputError, match=r"one optimizer under manual.*got 2"):
        t.fit(model, loader(0))
    assert t.global_step == 0
