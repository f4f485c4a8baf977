"""The task-incremental ``LightningModule``: one output layer, only the current task's units active."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F


class TaskIncrementalModule(L.LightningModule):
    """Trains ``net`` on one task at a time; the loss sees only the active task's output units.

    Set ``active_classes`` before each ``trainer.fit`` (the runner does). Labels are global class
    indices; they are re-indexed into the active units for the loss, so the network's inactive
    units get no gradient from the data (multi-head, task-incremental protocol). With every class
    of the benchmark active the loss is the plain cross-entropy over the whole output layer (one
    head, class-incremental).

    Args:
        net: a classifier returning logits over every class of the benchmark.
        lr: Adam's learning rate.
        betas: Adam's betas (beta2 = 0.999 is also what the Squisher wants).
        reset_optimizer: a fresh Adam for every task (every ``fit``); ``False`` carries Adam's
            state from task to task, as one optimizer for the whole sequence would.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        reset_optimizer: bool = True,
    ) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.betas = betas
        self.reset_optimizer = reset_optimizer
        self.active_classes: tuple[int, ...] = ()
        self._optimizer_state: dict[str, Any] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def active_logits(self, x: Tensor, classes: Sequence[int]) -> Tensor:
        """Logits of ``classes`` only (the head of one task)."""
        return self(x)[:, list(classes)]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if not self.active_classes:
            raise RuntimeError(
                "Set `module.active_classes` to the current task's classes before fit."
            )
        x, y = batch
        classes = torch.as_tensor(self.active_classes, device=y.device)
        # Global labels -> positions among the active units (labels of a task are its classes).
        target = (y.unsqueeze(1) == classes).float().argmax(dim=1)
        return F.cross_entropy(self.active_logits(x, self.active_classes), target)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, betas=self.betas)
        if not self.reset_optimizer and self._optimizer_state is not None:
            optimizer.load_state_dict(self._optimizer_state)
        return optimizer

    def on_train_end(self) -> None:
        if not self.reset_optimizer:
            self._optimizer_state = copy.deepcopy(self.trainer.optimizers[0].state_dict())

    @torch.no_grad()
    def task_predictions(self, x: Tensor, classes: Sequence[int], batch_size: int = 1000) -> Tensor:
        """Global class predictions within one task's head, in eval mode."""
        was_training = self.training
        self.eval()
        preds = []
        for i in range(0, len(x), batch_size):
            preds.append(self.active_logits(x[i : i + batch_size], classes).argmax(dim=1))
        self.train(was_training)
        return torch.as_tensor(classes, device=x.device)[torch.cat(preds)]
