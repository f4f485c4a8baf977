"""Mixed precision: steps the fp16 grad scaler skips add nothing to what the callbacks accumulate
during training, and bf16 models get Fisher diagonals accumulated in float32.

The only Fisher statistic accumulated *during* training is Adam's ``exp_avg_sq`` (read by the
Squisher); EWC's penalty gradient is added to gradients the scaler then discards; FisherMonitor
and the trace regulariser compute fresh estimates. Lightning maps ``precision="16-mixed"`` on the
CPU to bf16, so the fp16 run here uses Lightning's ``MixedPrecision("16-mixed", "cpu")`` plugin
with a real ``torch.amp.GradScaler("cpu")``, and forces skipped steps with an Inf gradient.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from lit_helpers import Classifier, loader, params, task_classes, trainer
from test_kill_resume import kill_resume
from torch.utils.data import DataLoader, Subset

import lightning_fisher as lf

BATCH = 8
SKIPPED = (2, 5)  # batches whose step the scaler skips


class InfGradient(pl.Callback):
    """Puts an Inf into one gradient on the given batches: the scaler must skip those steps."""

    def __init__(self, batches: tuple[int, ...]) -> None:
        self.batches = batches
        self.seen = 0
        self.scales: list[float] = []

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.seen in self.batches:
            pl_module.net[0].weight.grad[0, 0] = float("inf")
        self.seen += 1

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.scales.append(float(trainer.precision_plugin.scaler.get_scale()))


def fp16_trainer(callbacks: list[pl.Callback]) -> pl.Trainer:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    return trainer(callbacks, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])


class FusedAdam(Classifier):
    """Fused Adam unscales inside its own step (the scaler passes it the scale and found-Inf)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)


def squisher_run(
    skip: bool, fused: bool
) -> tuple[Classifier, lf.EWC, torch.optim.Optimizer, InfGradient]:
    """Task 0, then task 1 under 16-mixed: with Inf gradients on the SKIPPED batches, or
    without those batches at all."""
    model = (FusedAdam if fused else Classifier)(optimizer="adam", lr=0.01, dtype=torch.float32)
    ewc = lf.EWC(lam=1e3, method="squisher", mode="online")
    model.active = task_classes(0)
    fp16_trainer([ewc]).fit(model, loader(0, dtype=torch.float32))
    model.active = task_classes(1)
    data = loader(1, dtype=torch.float32).dataset
    n_batches = len(data) // BATCH  # type: ignore[arg-type]
    if skip:
        task1 = DataLoader(data, batch_size=BATCH)
    else:
        keep = [i for b in range(n_batches) if b not in SKIPPED for i in range(b * 8, b * 8 + 8)]
        task1 = DataLoader(Subset(data, keep), batch_size=BATCH)
    spy = InfGradient(SKIPPED if skip else ())
    fit = fp16_trainer([ewc, spy])
    fit.fit(model, task1)
    return model, ewc, fit.optimizers[0], spy


@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused-adam"])
def test_skipped_fp16_steps_add_nothing_to_the_squisher_nor_the_ewc_updates(fused: bool) -> None:
    model_a, ewc_a, opt_a, spy_a = squisher_run(skip=True, fused=fused)
    model_b, ewc_b, opt_b, spy_b = squisher_run(skip=False, fused=fused)
    # The scaler really skipped: it halved its scale once per Inf step.
    assert spy_a.scales[-1] == spy_b.scales[-1] / 2 ** len(SKIPPED)
    steps_a = {int(s["step"]) for s in opt_a.state.values()}
    steps_b = {int(s["step"]) for s in opt_b.state.values()}
    assert steps_a == steps_b == {len(spy_b.scales)}
    # Same exp_avg_sq, same Squisher (and its sample count), same weights after EWC updates:
    # the loss scale is a power of two, so unscaling is exact and the runs agree bit for bit.
    assert ewc_a.task_count == ewc_b.task_count == 2
    assert kill_resume.bitwise_equal(ewc_a.state_dict(), ewc_b.state_dict())
    assert ewc_a.last_fisher is not None and ewc_b.last_fisher is not None
    assert ewc_a.last_fisher.n_samples == ewc_b.last_fisher.n_samples
    assert kill_resume.bitwise_equal(params(model_a), params(model_b))


def test_fisher_monitor_and_ewc_work_under_fp16_with_skipped_steps() -> None:
    model = Classifier(optimizer="adam", lr=0.01, dtype=torch.float32)
    monitor = lf.FisherMonitor(method="exact", every_n_steps=2)
    ewc = lf.EWC(lam=10.0)
    fp16_trainer([ewc, monitor, InfGradient(SKIPPED)]).fit(model, loader(0, dtype=torch.float32))
    # The estimates are fresh passes at the current weights: a skipped step changes nothing.
    ref = lf.estimate_fisher(model, loader(0, dtype=torch.float32), method="exact")
    assert monitor.fisher is not None and monitor.step == 6
    torch.testing.assert_close(dict(monitor.fisher), dict(ref), rtol=0, atol=0)
    torch.testing.assert_close(dict(ewc.fishers[0]), dict(ref), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["exact", "batched"])
def test_bf16_model_fisher_is_accumulated_in_float32(method: str) -> None:
    """The same batch 128 times gives the one-batch Fisher: a float32 accumulator keeps the
    relative error near 1e-6, a bf16 one (8-bit mantissa) would be off by about 1e-2."""
    model = Classifier(dtype=torch.bfloat16)
    batch = next(iter(loader(0, dtype=torch.bfloat16)))
    once = lf.estimate_fisher(model, [batch], method=method)
    many = lf.estimate_fisher(model, [batch] * 128, method=method)
    for name, value in many.items():
        assert value.dtype == torch.float32
        scale = once[name].abs().max()
        assert scale > 0
        assert float((value - once[name]).abs().max() / scale) < 1e-5, name


def test_bf16_model_fisher_matches_float32_model_to_bf16_precision() -> None:
    model32 = Classifier(dtype=torch.float32)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    data = loader(0, dtype=torch.float32)
    exact32 = lf.estimate_fisher(model32, data)
    exact16 = lf.estimate_fisher(model16, [(x.bfloat16(), y) for x, y in data])
    for name, value in exact16.items():
        assert value.dtype == torch.float32
        rel = float((value - exact32[name]).abs().max() / exact32[name].abs().max())
        assert rel < 0.05, (name, rel)  # bf16 weights, forward and backward; float32 sums
