"""An interrupted Fisher pass (KeyboardInterrupt, an exception from the user's ``output_fn``)
leaves the stored state as it was, every submodule in its own train/eval mode, BatchNorm
statistics untouched and no hooks behind."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from lit_helpers import Classifier, loader, params, task_classes, trainer
from test_kill_resume import kill_resume
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fisher as lf


class UserError(RuntimeError):
    pass


def failing_output_fn(exc: type[BaseException], at_call: int) -> Any:
    """An ``output_fn`` that raises ``exc`` on its ``at_call``-th call (0-based)."""
    calls = {"n": 0}

    def output_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        if calls["n"] == at_call:
            raise exc("stop")
        calls["n"] += 1
        return module(batch[0])

    return output_fn


def mixed_mode_model() -> nn.Module:
    """Training mode overall, but the dropout is in eval mode: a per-submodule mix to restore."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)
    )
    model.train()
    model[3].eval()
    return model


def data() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=6)


def snapshot(model: nn.Module) -> tuple[list[bool], dict[str, torch.Tensor]]:
    return [m.training for m in model.modules()], copy.deepcopy(model.state_dict())


def hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize(
    ("exc", "method", "at_call"),
    [
        (KeyboardInterrupt, "exact", 0),  # in the per-input engine's planning forward
        (UserError, "exact", 2),  # mid-pass, hooks recording
        (KeyboardInterrupt, "hutchinson", 2),
        (UserError, "hutchinson", 0),
    ],
)
def test_interrupted_consolidation_keeps_state_modes_and_statistics(
    exc: type[BaseException], method: str, at_call: int
) -> None:
    model = mixed_mode_model()
    ewc = lf.EWC(lam=1.0, method=method)
    ewc.consolidate(model, data())
    assert ewc.task_count == 1
    before = copy.deepcopy(ewc.state_dict())
    modes, weights = snapshot(model)
    ewc.fisher_options.output_fn = failing_output_fn(exc, at_call)
    with pytest.raises(exc):
        ewc.consolidate(model, data())
    assert kill_resume.bitwise_equal(ewc.state_dict(), before)
    assert [m.training for m in model.modules()] == modes
    assert kill_resume.bitwise_equal(model.state_dict(), weights)  # BatchNorm statistics too
    assert hooks(model) == 0
    # The callback still works after the interruption, and gives what an uninterrupted one gives.
    ewc.fisher_options.output_fn = None
    ewc.consolidate(model, data())
    clean = lf.EWC(lam=1.0, method=method)
    clean.consolidate(model, data())
    clean.consolidate(model, data())
    assert kill_resume.bitwise_equal(ewc.state_dict(), clean.state_dict())


@pytest.mark.parametrize("exc", [KeyboardInterrupt, UserError])
def test_interrupted_estimate_restores_modes(exc: type[BaseException]) -> None:
    model = mixed_mode_model()
    modes, weights = snapshot(model)
    with pytest.raises(exc):
        lf.estimate_fisher(model, data(), output_fn=failing_output_fn(exc, 1))
    assert [m.training for m in model.modules()] == modes
    assert kill_resume.bitwise_equal(model.state_dict(), weights)
    assert hooks(model) == 0


def test_interrupted_consolidation_in_a_fit_keeps_previous_task() -> None:
    """A user error in the Fisher pass at the end of a task's fit propagates, and the EWC state of
    the previous task is kept unchanged (the fit can be re-run or resumed)."""
    model = Classifier()
    model.active = task_classes(0)
    switch = {"raise": False}

    def output_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        if switch["raise"] and torch.is_grad_enabled():  # in the pass, not the no-grad check
            raise UserError("broken output_fn")
        return module(batch[0])

    ewc = lf.EWC(lam=10.0, classes=task_classes(0), output_fn=output_fn)
    trainer([ewc]).fit(model, loader(0))
    before = copy.deepcopy(ewc.state_dict())
    model.active = task_classes(1)
    ewc.fisher_options.classes = task_classes(1)
    switch["raise"] = True
    with pytest.raises(UserError):
        trainer([ewc]).fit(model, loader(1))
    after = ewc.state_dict()
    assert kill_resume.bitwise_equal(after["tasks"], before["tasks"])
    assert after["task_count"] == before["task_count"] == 1
    # Task 1 was trained but not consolidated: it stays pending, not silently dropped.
    assert after["steps_since_consolidation"] > 0
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("exc", [KeyboardInterrupt, UserError])
def test_interrupted_monitor_keeps_previous_estimate(exc: type[BaseException]) -> None:
    model = Classifier()
    monitor = lf.FisherMonitor(method="exact", every_n_epochs=1)
    fit = trainer([monitor])
    fit.fit(model, loader(0))
    previous = dict(monitor.fisher)  # type: ignore[arg-type]
    step = monitor.step
    modes, weights = snapshot(model)
    monitor.fisher_options.output_fn = failing_output_fn(exc, 1)
    with pytest.raises(exc):
        monitor.estimate(fit, model)
    assert kill_resume.bitwise_equal(dict(monitor.fisher), previous)  # type: ignore[arg-type]
    assert monitor.step == step
    assert [m.training for m in model.modules()] == modes
    assert kill_resume.bitwise_equal(params(model), {n: weights[n] for n in params(model)})
