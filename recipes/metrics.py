"""Continual-learning metrics as torchmetrics ``Metric`` objects.

The accuracy matrix R has R[i, j] = accuracy on task j's test set after training on tasks 0..i.
From its last row and its diagonal:

* average accuracy  A = (1/T) sum_j R[T-1, j];
* forgetting (Chaudhry et al. 2018)  F = (1/(T-1)) sum_{j<T-1} max_{l<T-1} R[l, j] - R[T-1, j];
* backward transfer (Lopez-Paz & Ranzato 2017)  BWT = (1/(T-1)) sum_{j<T-1} R[T-1, j] - R[j, j].

Forgetting and backward transfer are 0 for a single task.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class AccuracyMatrix(Metric):
    """Accumulates correct/total counts per (trained-up-to task, evaluated task) cell.

    ``update(after_task, eval_task, preds, target)`` adds one batch; ``compute()`` returns the
    T x T matrix of accuracies (NaN for cells never evaluated). Counts are summed across processes,
    so it is correct under DDP.
    """

    full_state_update = False
    higher_is_better = True
    correct: Tensor
    total: Tensor

    def __init__(self, n_tasks: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be positive; got {n_tasks}.")
        self.n_tasks = n_tasks
        self.add_state(
            "correct", torch.zeros(n_tasks, n_tasks, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "total", torch.zeros(n_tasks, n_tasks, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, after_task: int, eval_task: int, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        for k, name in ((after_task, "after_task"), (eval_task, "eval_task")):
            if not 0 <= k < self.n_tasks:
                raise ValueError(f"{name}={k} is outside 0..{self.n_tasks - 1}.")
        if preds.shape != target.shape:
            raise ValueError(
                f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape."
            )
        self.correct[after_task, eval_task] += (preds == target).sum().double()
        self.total[after_task, eval_task] += target.numel()

    def compute(self) -> Tensor:
        return self.correct / self.total  # 0/0 = NaN marks a cell never evaluated


def average_accuracy(matrix: Tensor) -> Tensor:
    """Mean accuracy over all tasks after the last one."""
    return matrix[-1].mean()


def forgetting(matrix: Tensor) -> Tensor:
    """Mean drop from each earlier task's best accuracy (before the last task) to its final one."""
    t = matrix.shape[0]
    if t < 2:
        return matrix.new_zeros(())
    best = matrix[:-1, :-1].nan_to_num(float("-inf")).max(dim=0).values
    return (best - matrix[-1, :-1]).mean()


def backward_transfer(matrix: Tensor) -> Tensor:
    """Mean change of each earlier task's accuracy from just after learning it to the end."""
    t = matrix.shape[0]
    if t < 2:
        return matrix.new_zeros(())
    return (matrix[-1, :-1] - matrix.diagonal()[:-1]).mean()


class AverageAccuracy(AccuracyMatrix):
    """``AccuracyMatrix`` that computes the average final accuracy."""

    def compute(self) -> Tensor:
        return average_accuracy(super().compute())


class Forgetting(AccuracyMatrix):
    """``AccuracyMatrix`` that computes forgetting (lower is better)."""

    higher_is_better = False

    def compute(self) -> Tensor:
        return forgetting(super().compute())


class BackwardTransfer(AccuracyMatrix):
    """``AccuracyMatrix`` that computes backward transfer (negative: forgetting)."""

    def compute(self) -> Tensor:
        return backward_transfer(super().compute())
