"""What every callback shares: keyword-only constructors, ``@override`` on every Lightning hook,
and a checkpoint key that does not change with the settings (``name=`` tells instances apart);
FisherMonitor reads state that older versions keyed by its settings."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import Classifier, loader, trainer

import lightning_fisher as lf

CALLBACKS: dict[type[pl.Callback], dict[str, Any]] = {
    lf.EWC: {"lam": 1.0},
    lf.FisherMonitor: {},
    lf.FisherTraceRegularizer: {"alpha": 0.1},
    lf.FisherDiagnostics: {},
}
HOOKS = {n for n in dir(pl.Callback) if not n.startswith("_")}


@pytest.mark.parametrize("cls", list(CALLBACKS), ids=lambda c: c.__name__)
def test_constructor_arguments_are_keyword_only(cls: type[pl.Callback]) -> None:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert params and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    first = next(iter(CALLBACKS[cls].values()), None)
    if first is not None:
        with pytest.raises(TypeError):
            cls(first)


@pytest.mark.parametrize("cls", list(CALLBACKS), ids=lambda c: c.__name__)
def test_every_hook_is_marked_override(cls: type[pl.Callback]) -> None:
    own = {n: v for n, v in vars(cls).items() if n in HOOKS}
    assert own, "the callback overrides no hook"
    for name, value in own.items():
        func = value.fget if isinstance(value, property) else value
        assert getattr(func, "__override__", False), f"{cls.__name__}.{name} lacks @override"


@pytest.mark.parametrize(
    ("cls", "changed"),
    [
        (lf.EWC, {"method": "empirical", "mode": "separate", "gamma": 0.5}),
        (lf.FisherMonitor, {"method": "exact", "every_n_epochs": None, "every_n_steps": 3}),
        (lf.FisherTraceRegularizer, {"probes": 2, "every_n_steps": 4}),
        (lf.FisherDiagnostics, {"every_n_epochs": 2, "probes": 3}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_state_key_is_stable_and_named(cls: type[pl.Callback], changed: dict[str, Any]) -> None:
    base = CALLBACKS[cls]
    key = cls(**base).state_key
    assert key == cls.__name__
    assert cls(**base, **changed).state_key == key
    assert cls(**base, name="b").state_key == f"{cls.__name__}[b]"
    with pytest.raises(lf.FisherInputError, match="name"):
        cls(**base, name="")


def test_monitor_resumes_state_written_under_an_old_key(tmp_path: Path) -> None:
    monitor = lf.FisherMonitor(method="empirical", max_batches=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer([monitor, ckpt], max_epochs=2, enable_checkpointing=True).fit(Classifier(), loader(0))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = checkpoint["callbacks"].pop("FisherMonitor")
    old_key = "FisherMonitor{'method': 'empirical', 'every_n_epochs': 1, 'every_n_steps': None}"
    checkpoint["callbacks"][old_key] = state
    torch.save(checkpoint, tmp_path / "old.ckpt")

    resumed = lf.FisherMonitor(method="empirical", max_batches=1)
    trainer([resumed], max_epochs=3).fit(Classifier(), loader(0), ckpt_path=tmp_path / "old.ckpt")
    assert resumed.history[:2] == monitor.history and len(resumed.history) == 3

    # Another name does not claim it, and says so instead of dropping it silently.
    named = lf.FisherMonitor(method="empirical", max_batches=1, name="other")
    with pytest.warns(UserWarning, match="name="):
        trainer([named], max_epochs=3).fit(
            Classifier(), loader(0), ckpt_path=tmp_path / "last.ckpt"
        )
    assert len(named.history) == 1
