"""FisherMonitor: when it estimates, what it keeps and logs, checkpoint state, bad input."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lit_helpers import Classifier, loader, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fisher as lf
from lightning_fisher import FisherInputError


def test_every_n_epochs_estimates_the_current_model(tmp_path: Any) -> None:
    seen: list[tuple[int, float]] = []
    mon = lf.FisherMonitor(
        method="exact",
        every_n_epochs=2,
        save_dir=tmp_path / "fishers",
        on_estimate=lambda t, m, fd: seen.append((t.current_epoch, fd.trace())),
    )
    model = Classifier()
    t = trainer([mon], max_epochs=4, logger=CSVLogger(tmp_path))
    t.fit(model, loader(0))
    assert [epoch for epoch, _ in seen] == [1, 3]
    assert mon.step == t.global_step and mon.epoch == 3
    # The kept estimate is the Fisher of the final model on the training data.
    ref = lf.estimate_fisher(model, loader(0), method="exact")
    for name in ref:
        torch.testing.assert_close(mon.fisher[name], ref[name])
    assert [trace for _, trace in mon.history] == [trace for _, trace in seen]
    saved = lf.FisherDiagonal.load(
        tmp_path / "fishers" / f"fisher-step={t.global_step}.safetensors"
    )
    assert all(torch.equal(saved[k], mon.fisher[k]) for k in ref)
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = logged.splitlines()[0].split(",")
    assert "fisher/trace" in header and "fisher/trace/net.0" in header


def test_every_n_steps_with_accumulation() -> None:
    steps: list[int] = []
    mon = lf.FisherMonitor(
        every_n_steps=2, max_batches=1, on_estimate=lambda t, m, fd: steps.append(t.global_step)
    )
    # 6 batches, 2 per optimizer step: steps 1, 2, 3; estimates after step 2 only, once.
    trainer([mon], accumulate_grad_batches=2).fit(Classifier(), loader(0))
    assert steps == [2]
    assert mon.fisher is not None and mon.fisher.method == "hutchinson"


def test_state_round_trip_and_mismatch_keeps_state() -> None:
    mon = lf.FisherMonitor(method="empirical")
    model = Classifier()
    trainer([mon]).fit(model, loader(0))
    restored = lf.FisherMonitor(method="empirical")
    restored.load_state_dict(copy.deepcopy(mon.state_dict()))
    assert restored.history == mon.history and restored.step == mon.step
    assert all(torch.equal(restored.fisher[k], mon.fisher[k]) for k in mon.fisher)
    other = lf.FisherMonitor(method="empirical")
    other.setup(trainer(), nn.Sequential(nn.Linear(5, 2)), "fit")  # type: ignore[arg-type]
    with pytest.raises(FisherInputError, match="not parameters of the model"):
        other.load_state_dict(mon.state_dict())
    assert other.fisher is None and other.history == []


def test_empty_loader_and_bad_arguments() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0).long()))
    with pytest.raises(FisherInputError, match="empty"):  # refused before any training
        lf.FisherMonitor(dataloader=empty)

    class NoLength:  # an iterable without len(): found empty when the pass reads it
        def __iter__(self) -> Any:
            return iter(empty)

    mon = lf.FisherMonitor(dataloader=NoLength())
    with pytest.raises(FisherInputError, match="no batches"):
        trainer([mon]).fit(Classifier(), loader(0))
    assert mon.fisher is None
    for kw, match in (
        ({"method": "squish"}, "unknown Fisher method"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_epochs": None}, "every_n_steps"),
    ):
        with pytest.raises(ValueError, match=match):
            lf.FisherMonitor(**kw)
