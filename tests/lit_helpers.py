"""A small multi-head Lightning classifier, task data and a quiet Trainer, for the callback tests."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*number of training batches.*")

D_IN, N_CLASSES = 5, 6


class Classifier(pl.LightningModule):
    """MLP with one 6-unit output layer; ``active`` restricts the loss to a task's head.

    ``penalty_fn(module)`` is added to the loss: the explicit-loss route of EWC and the trace
    regulariser. ``manual=True`` uses manual optimization.
    """

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.1,
        manual: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        hidden: int = 8,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(D_IN, hidden), nn.Tanh(), nn.Linear(hidden, N_CLASSES)
        ).to(dtype)
        self.optimizer_name = optimizer
        self.lr = lr
        self.automatic_optimization = not manual
        self.active: list[int] | None = None
        self.penalty_fn: Callable[[nn.Module, Any], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def head_logits(self, x: Tensor) -> Tensor:
        z = self(x)
        return z if self.active is None else z[:, self.active]

    def local_labels(self, y: Tensor) -> Tensor:
        if self.active is None:
            return y
        return torch.searchsorted(torch.tensor(self.active, device=y.device), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, y = batch
        loss = nn.functional.cross_entropy(self.head_logits(x), self.local_labels(y))
        if self.penalty_fn is not None:
            loss = loss + self.penalty_fn(self, batch)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name in ("adam", "adam-fused"):
            fused = {"fused": True} if self.optimizer_name == "adam-fused" else {}
            return torch.optim.Adam(self.parameters(), lr=self.lr, **fused)
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def accuracy(self, loader: DataLoader) -> float:
        with torch.no_grad():
            hits = sum(
                int((self.head_logits(x).argmax(-1) == self.local_labels(y)).sum())
                for x, y in loader
            )
        return hits / len(loader.dataset)  # type: ignore[arg-type]


def task_data(
    task: int, n: int = 48, seed: int = 0, dtype: torch.dtype = torch.float64
) -> TensorDataset:
    """Task ``task``: classes 2t and 2t+1, split by a task-specific random direction."""
    gen = torch.Generator().manual_seed(1000 * seed + task)
    x = torch.randn(n, D_IN, generator=gen, dtype=dtype)
    w = torch.randn(D_IN, generator=gen, dtype=dtype)
    y = 2 * task + (x @ w > 0).long()
    return TensorDataset(x, y)


def loader(task: int, batch_size: int = 8, **kw: Any) -> DataLoader:
    return DataLoader(task_data(task, **kw), batch_size=batch_size, shuffle=False)


def task_classes(task: int) -> list[int]:
    return [2 * task, 2 * task + 1]


def trainer(callbacks: list[pl.Callback] | None = None, **kw: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
        "num_sanity_val_steps": 0,
    }
    options.update(kw)
    return pl.Trainer(callbacks=callbacks or [], **options)


def params(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
