"""Elastic Weight Consolidation as a Lightning callback.

Penalty, over the consolidated tasks t with Fisher diagonals F_t and anchors theta*_t:

    P(theta) = (lambda / 2) sum_t sum_i F_t,i (theta_i - theta*_t,i)^2,
    grad P   = lambda sum_t F_t (theta - theta*_t).

``mode="separate"`` keeps one (F_t, theta*_t) per task; ``mode="online"`` keeps one pair, updated
as F <- gamma F + F_new and theta* <- theta_new.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from ..estimators import METHODS, estimate_fisher, fisher_from_optimizer
from ..fisher_diagonal import FisherDiagonal
from ..outputs import ClassSelector, FisherInputError, OutputFn, batch_size_of
from . import _cpu_kernel
from ._utils import (
    fisher_loader,
    grad_scale,
    log_metrics,
    refuse_sharded_strategy,
    world_size,
)

MODES = ("online", "separate")
#: per task: parameters, their Fisher, anchors and workspace buffers
_Terms = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]
APPLY = ("grad", "loss")


@dataclass
class _Task:
    """One consolidated (Fisher, anchor) pair; tensors live on the parameters' device."""

    fisher: FisherDiagonal
    anchor: dict[str, Tensor]


class EWC(Callback):
    r"""Elastic Weight Consolidation with no change to the ``LightningModule``.

    At the end of every ``fit`` (and when the datamodule's ``task_id`` changes, or when
    :meth:`consolidate` is called) it estimates the Fisher diagonal of the finished task on that
    task's training data and stores it with the current parameters as anchors. During training it
    adds the exact penalty gradient ``lam * sum_t F_t * (theta - theta*_t)`` to the parameters'
    gradients once per optimizer step, in ``on_before_optimizer_step``: after gradient
    accumulation, the DDP all-reduce and AMP unscaling, and before gradient clipping, so the
    update equals the one from ``loss + ewc.penalty(module)``. With fp16 AMP and an optimizer that
    unscales inside ``step`` (fused Adam), the added gradient is multiplied by the loss scale.

    Memory: per consolidated parameter a float32 Fisher, an anchor and a workspace buffer (both in
    the parameter's dtype); separate mode keeps a Fisher and an anchor per task. Cost per optimizer
    step and task: two in-place passes over the parameters (``work = theta - theta*``, then
    ``grad += lam F work``; on CUDA three ``foreach`` launches), or one with ``cpu_kernel=True``
    (the penalty's value, two more, only on logging steps).

    Under DDP the default Fisher data is each rank's ``DistributedSampler`` shard and the estimate is
    all-reduced, so every rank holds the Fisher of the union (the sampler's padding may repeat a
    few inputs). A user ``dataloader`` is not sharded: every rank then estimates on all of it (same
    result, more work). ``max_samples`` draws the same subset on every rank.

    Args:
        lam: penalty strength lambda (van de Ven's scale: about 1e4-1e6 for ``exact``, about 1e3
            times more for ``batched``). For ``squisher`` search its own range: Adam's second
            moment also holds EWC's own gradient, so under online EWC a large lambda feeds back
            and overflows (Split MNIST: 1e4 best, 1e6 diverged).
        method: any ``lf.estimate_fisher`` method, or ``"squisher"`` (Adam's ``exp_avg_sq`` via
            ``lf.fisher_from_optimizer``, no data pass).
        mode: ``"online"`` (one Fisher, F <- gamma F + F_new, anchor <- theta_new) or
            ``"separate"`` (one Fisher and anchor per task).
        gamma: decay of the old Fisher in online mode.
        max_samples: EXACT(n): estimate on ``n`` random inputs.
        mc_samples: label draws per input for ``method="sample"``.
        probes: probes per batch for the ``hutchinson*`` methods.
        apply: ``"grad"`` adds the penalty gradient to ``.grad`` (the default); ``"loss"`` adds
            nothing, for users who add :meth:`penalty` to their loss themselves.
        dataloader: data for the Fisher pass; default: the trainer's training dataloader (the
            finished task's data; under DDP each rank's shard).
        classes: active classes of a task-incremental (multi-head) model: a sequence of class
            indices or a callable ``classes(batch)`` returning them.
        output_fn: ``output_fn(module, batch) -> logits`` if calling the module is not how the
            logits are obtained.
        consolidate_on_fit_end: consolidate at the end of every ``fit`` that made optimizer steps.
        task_attr: name of the datamodule attribute whose change marks a task boundary (checked in
            ``on_train_epoch_end``); ``None`` disables the check.
        batch_size: training batch size B for the Squisher (F = B * v_hat); default: the
            micro-batch size times ``accumulate_grad_batches`` times the number of DDP ranks.
        bias_correction: bias-correct the Squisher's ``exp_avg_sq``.
        log_penalty: log ``ewc/penalty`` at every optimizer step.
        fisher_kwargs: further keyword arguments of ``lf.estimate_fisher`` (``seed``,
            ``max_batches``, ``param_filter``, ``max_memory_mib``, ...).
        cpu_kernel: on CPU, add ``lam F (theta - theta*)`` with a one-pass C kernel (reads each of
            grad, F, theta, theta* once, writes grad once; same roundings as the explicit loss's
            gradient), compiled once per process at ``fit`` start with the system C compiler. Used
            for float32 tensors while PyTorch runs one CPU thread (the kernel is single-threaded);
            otherwise, or without a working compiler (a warning), PyTorch's ops.
    """

    def __init__(
        self,
        lam: float,
        method: str = "exact",
        mode: str = "online",
        gamma: float = 1.0,
        max_samples: int | None = None,
        mc_samples: int = 1,
        probes: int = 1,
        *,
        apply: str = "grad",
        dataloader: Iterable[Any] | None = None,
        classes: ClassSelector | None = None,
        output_fn: OutputFn | None = None,
        consolidate_on_fit_end: bool = True,
        task_attr: str | None = "task_id",
        batch_size: int | None = None,
        bias_correction: bool = True,
        log_penalty: bool = True,
        fisher_kwargs: Mapping[str, Any] | None = None,
        cpu_kernel: bool = False,
    ) -> None:
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"EWC: lam must be a finite number >= 0; got {lam!r}.")
        if method != "squisher" and method not in METHODS:
            raise ValueError(
                f"EWC: unknown Fisher method {method!r}; choose one of {', '.join(METHODS)} or 'squisher'."
            )
        if mode not in MODES:
            raise ValueError(f"EWC: mode must be 'online' or 'separate'; got {mode!r}.")
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"EWC: gamma must be a finite number >= 0; got {gamma!r}.")
        if apply not in APPLY:
            raise ValueError(
                f"EWC: apply must be 'grad' (the callback adds the penalty gradient) or 'loss' (you "
                f"add `ewc.penalty(module)` to your loss); got {apply!r}."
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"EWC: batch_size must be positive; got {batch_size}.")
        self.lam = float(lam)
        self.method = method
        self.mode = mode
        self.gamma = float(gamma)
        self.apply = apply
        self.dataloader = dataloader
        self.consolidate_on_fit_end = consolidate_on_fit_end
        self.task_attr = task_attr
        self.batch_size = batch_size
        self.bias_correction = bias_correction
        self.log_penalty = log_penalty
        self.cpu_kernel = cpu_kernel
        self.fisher_kwargs: dict[str, Any] = {
            "max_samples": max_samples,
            "mc_samples": mc_samples,
            "probes": probes,
            "classes": classes,
            "output_fn": output_fn,
            **dict(fisher_kwargs or {}),
        }
        self._tasks: list[_Task] = []
        self.task_count = 0
        self._steps_since = 0  # optimizer steps since the last consolidation
        self._trained = False  # on_train_start ran in the current fit
        self._epoch_task: Any = None  # datamodule task id seen at the start of the epoch
        self._micro_batch: int | None = None
        self._module: nn.Module | None = None
        self._terms_cache: dict[int, list[_Terms]] = {}
        #: per cached parameter list: whether F, theta, theta* suit the C kernel
        self._kernel_fits: dict[int, bool] = {}
        #: the latest estimate (before online accumulation) and how long it took
        self.last_fisher: FisherDiagonal | None = None
        self.fisher_seconds = 0.0

    # Read access -----------------------------------------------------------------------------
    @property
    def fishers(self) -> list[FisherDiagonal]:
        """The stored Fisher diagonals: one in online mode, one per task in separate mode."""
        return [t.fisher for t in self._tasks]

    @property
    def anchors(self) -> list[dict[str, Tensor]]:
        """The stored anchor parameters theta*, matching :attr:`fishers`."""
        return [t.anchor for t in self._tasks]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, mode=self.mode)

    # The penalty -----------------------------------------------------------------------------
    def penalty(self, module: nn.Module) -> Tensor:
        """(lam / 2) sum_t sum_i F_t,i (theta_i - theta*_t,i)^2, differentiable in ``module``'s
        parameters (zero before the first consolidation)."""
        params = dict(module.named_parameters())
        device = next(iter(params.values())).device if params else torch.device("cpu")
        self._to_device(device)
        total = torch.zeros((), dtype=torch.float32, device=device)
        for task in self._tasks:
            for name, f in task.fisher.items():
                if name not in params:
                    raise FisherInputError(
                        f"EWC: consolidated parameter {name!r} is not a parameter of this module; "
                        "the penalty needs the module the Fisher was estimated on."
                    )
                total = total + (f * (params[name] - task.anchor[name]).pow(2)).sum()
        return 0.5 * self.lam * total

    # Consolidation ---------------------------------------------------------------------------
    def consolidate(
        self,
        module: nn.Module,
        dataloader: Iterable[Any] | None = None,
        *,
        fisher: FisherDiagonal | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> FisherDiagonal:
        """Estimate the Fisher of the finished task and store it with the anchors theta* = theta.

        Args:
            module: the model (a ``LightningModule`` attached to a trainer, or any module).
            dataloader: the finished task's data; default: the callback's ``dataloader``, else the
                trainer's training dataloader.
            fisher: use this precomputed estimate instead of running the estimator.
            optimizer: the Adam optimizer for ``method="squisher"`` (default: the trainer's).

        Returns:
            The new estimate (before online accumulation). On any error the stored state is
            left unchanged.
        """
        start = time.perf_counter()
        trainer = getattr(module, "_trainer", None)
        if fisher is None:
            fisher = self._estimate(module, trainer, dataloader, optimizer)
        params = {n: p for n, p in module.named_parameters()}
        fisher.check_matches(module)
        for name, t in fisher.items():
            if not torch.isfinite(t).all():
                raise FisherInputError(
                    f"EWC: the Fisher of {name!r} has NaN/Inf entries; nothing was consolidated. "
                    "Check the model and data for NaN/Inf (or fp16 overflow)."
                )
        device = next(iter(params.values())).device
        fisher = fisher.to(device)
        self.fisher_seconds = time.perf_counter() - start
        self.last_fisher = fisher
        if self.mode == "online" and self._tasks:
            # Parameters new since the last task (a new head) count as zero on the old side.
            combined = self._tasks[0].fisher.scale(self.gamma) + fisher
            self._tasks = [_Task(combined, self._anchor(params, combined))]
        else:
            self._tasks.append(_Task(fisher, self._anchor(params, fisher)))
        self.task_count += 1
        self._steps_since = 0
        self._invalidate_caches()
        if trainer is not None:
            log_metrics(
                trainer,
                {
                    "ewc/fisher_trace": fisher.trace(),
                    "ewc/tasks": float(self.task_count),
                    "ewc/fisher_seconds": self.fisher_seconds,
                },
            )
        return fisher

    def _estimate(
        self,
        module: nn.Module,
        trainer: pl.Trainer | None,
        dataloader: Iterable[Any] | None,
        optimizer: torch.optim.Optimizer | None,
    ) -> FisherDiagonal:
        if self.method == "squisher":
            optimizers = (
                [optimizer]
                if optimizer is not None
                else list(trainer.optimizers if trainer else [])
            )
            if not optimizers:
                raise FisherInputError(
                    "EWC(method='squisher') needs the Adam optimizer: call it from a fit, or pass "
                    "`optimizer=` to `consolidate`."
                )
            batch = self._squisher_batch_size(trainer)
            parts = [
                fisher_from_optimizer(o, module, batch, self.bias_correction) for o in optimizers
            ]
            total = parts[0]
            for part in parts[1:]:
                total = total + part
            return total
        loader = dataloader if dataloader is not None else self.dataloader
        if loader is None:
            if trainer is None:
                raise FisherInputError(
                    "EWC.consolidate needs a `dataloader` when the module is not attached to a trainer."
                )
            loader = fisher_loader(trainer, None, "EWC")
        return estimate_fisher(module, loader, method=self.method, **self.fisher_kwargs)

    def _squisher_batch_size(self, trainer: pl.Trainer | None) -> int:
        if self.batch_size is not None:
            return self.batch_size
        if self._micro_batch is None or trainer is None:
            raise FisherInputError(
                "EWC(method='squisher') does not know the training batch size; pass `batch_size=`."
            )
        accumulate = (
            trainer.accumulate_grad_batches
            if trainer.lightning_module.automatic_optimization
            else 1
        )
        # Adam's exp_avg_sq tracks the squared mean gradient of the global batch.
        return self._micro_batch * accumulate * world_size()

    @staticmethod
    def _anchor(params: Mapping[str, Tensor], fisher: FisherDiagonal) -> dict[str, Tensor]:
        return {n: params[n].detach().clone() for n in fisher}

    def _to_device(self, device: torch.device) -> None:
        for task in self._tasks:
            if any(t.device != device for t in task.anchor.values()):
                task.fisher = task.fisher.to(device)
                task.anchor = {k: v.to(device) for k, v in task.anchor.items()}
                self._invalidate_caches()

    # Lightning hooks -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, "lf.EWC")
        self._module = pl_module  # lets load_state_dict check names before touching state

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = False
        self._invalidate_caches()
        if self.cpu_kernel and pl_module.device.type == "cpu" and _cpu_kernel.load() is None:
            # compiled here, not inside the first training step
            warnings.warn(
                "EWC(cpu_kernel=True): no C compiler could build the kernel; using PyTorch's ops "
                "(same result, one more pass over the parameters).",
                stacklevel=2,
            )
        if self._tasks:
            for task in self._tasks:
                task.fisher.check_matches(pl_module)
            self._to_device(pl_module.device)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.method == "squisher" and self.batch_size is None:
            try:
                self._micro_batch = batch_size_of(batch)
            except FisherInputError:
                self._micro_batch = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = self._task_id(trainer)
        if (
            task is not None
            and self._epoch_task is not None
            and task != self._epoch_task
            and self._steps_since
        ):
            warnings.warn(
                f"EWC: the task changed ({self._epoch_task!r} -> {task!r}) after the previous task's "
                "data was replaced, so it was not consolidated. Change `task_id` before "
                "`on_train_epoch_end` of the task's last epoch, or call `ewc.consolidate(...)`.",
                stacklevel=2,
            )
        self._epoch_task = task

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = self._task_id(trainer)
        if task is None or self._epoch_task is None or task == self._epoch_task:
            return
        if self._steps_since:
            self.consolidate(pl_module)
        self._epoch_task = task

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.consolidate_on_fit_end and self._steps_since:
            self.consolidate(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed from a checkpoint written after its last optimizer step but before the
        # consolidation (killed during the Fisher pass) is already done: Lightning skips the
        # training loop and `on_train_end`, so the pending consolidation runs here. The strategy
        # has moved the module to the CPU by now; the pass runs on the training device.
        if self._trained or not (self.consolidate_on_fit_end and self._steps_since):
            return
        device = pl_module.device
        pl_module.to(trainer.strategy.root_device)
        try:
            self.consolidate(pl_module)
        finally:
            pl_module.to(device)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._steps_since += 1
        if not self._tasks or self.lam == 0:
            return
        # Computing the penalty's value costs extra passes: do it only when Lightning logs.
        every = max(1, getattr(trainer, "log_every_n_steps", 50))
        log = self.log_penalty and (trainer.global_step + 1) % every == 0
        if self.apply == "loss":
            if log:
                with torch.no_grad():
                    explicit = self.penalty(pl_module)
                pl_module.log("ewc/penalty", explicit, on_step=True, on_epoch=False, batch_size=1)
            return
        scale = grad_scale(trainer, optimizer) * self.lam
        value: Tensor | None = None
        with torch.no_grad():
            for params, fishers, anchors, work in self._terms(pl_module, optimizer):
                grads = []
                for p in params:
                    if p.grad is None:  # the explicit-loss route would give it a gradient too
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
                if not log and self._cpu_kernel_add(grads, fishers, params, anchors, scale):
                    continue
                # work = theta - theta* in place on a persistent workspace (no allocation per step).
                if params[0].device.type == "cpu":
                    # Memory-bound on CPU: one pass (read theta, theta*, write work) instead of a
                    # copy and a subtraction.
                    for w, p, a in zip(work, params, anchors):
                        torch.sub(p, a, out=w)
                else:  # the multi-tensor CUDA kernels: two launches instead of one per tensor
                    torch._foreach_copy_(work, params)
                    torch._foreach_sub_(work, anchors)
                # grad += (scale F) (theta - theta*): scale times F first, as in the loss's gradient
                torch._foreach_addcmul_(grads, fishers, work, value=scale)
                if log:
                    squares = torch._foreach_mul(work, work)
                    torch._foreach_mul_(squares, fishers)  # F (theta - theta*)^2 >= 0
                    part = torch.stack(torch._foreach_norm(squares, 1)).float().sum()
                    value = part if value is None else value + part
        if log:
            total = value if value is not None else torch.zeros((), device=pl_module.device)
            pl_module.log(
                "ewc/penalty", 0.5 * self.lam * total, on_step=True, on_epoch=False, batch_size=1
            )

    def _cpu_kernel_add(
        self,
        grads: list[Tensor],
        fishers: list[Tensor],
        params: list[Tensor],
        anchors: list[Tensor],
        scale: float,
    ) -> bool:
        """grads += (scale F) (theta - theta*) in one pass with the C kernel; ``False`` (nothing
        added) where it does not apply."""
        if not self.cpu_kernel or torch.get_num_threads() != 1:
            return False  # ATen's ops use the other threads; the kernel would not
        kernel = _cpu_kernel.load()
        if kernel is None:
            return False
        key = id(params)
        if key not in self._kernel_fits:  # F, theta, theta* are fixed while the cache lives
            self._kernel_fits[key] = all(
                _cpu_kernel.fits(t) and t.shape == p.shape
                for p, f, a in zip(params, fishers, anchors)
                for t in (p, f, a)
            )
        # grads are new tensors at every step (zero_grad sets them to None)
        if not self._kernel_fits[key] or not all(
            _cpu_kernel.fits(g) and g.shape == p.shape for g, p in zip(grads, params)
        ):
            return False
        for g, f, p, a in zip(grads, fishers, params, anchors):
            kernel(g.data_ptr(), f.data_ptr(), p.data_ptr(), a.data_ptr(), scale, g.numel())
        return True

    def _invalidate_caches(self) -> None:
        """Forget the per-optimizer terms and kernel checks (F, theta* or the device changed)."""
        self._terms_cache.clear()
        self._kernel_fits.clear()

    def _terms(
        self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> list[_Terms]:
        """Per task: the optimizer's trainable parameters that have a Fisher, with F, theta* and
        a workspace buffer per parameter (shared by the tasks)."""
        key = id(optimizer)
        if key not in self._terms_cache:
            self._to_device(pl_module.device)
            names = {id(p): n for n, p in pl_module.named_parameters()}
            owned: list[Tensor] = [
                p
                for g in optimizer.param_groups
                for p in g["params"]
                if p.requires_grad and id(p) in names
            ]
            work = {id(p): torch.empty_like(p) for p in owned}
            terms: list[_Terms] = []
            for task in self._tasks:
                ps = [p for p in owned if names[id(p)] in task.fisher]
                terms.append(
                    (
                        ps,
                        [task.fisher[names[id(p)]] for p in ps],
                        [task.anchor[names[id(p)]] for p in ps],
                        [work[id(p)] for p in ps],
                    )
                )
            self._terms_cache[key] = terms
        return self._terms_cache[key]

    def _task_id(self, trainer: pl.Trainer) -> Any:
        if self.task_attr is None:
            return None
        datamodule = getattr(trainer, "datamodule", None)
        return getattr(datamodule, self.task_attr, None) if datamodule is not None else None

    # Checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "task_count": self.task_count,
            "steps_since_consolidation": self._steps_since,
            "epoch_task": self._epoch_task if isinstance(self._epoch_task, (int, str)) else None,
            "tasks": [
                {
                    "fisher": t.fisher.state_dict(),
                    "anchor": {k: v.clone() for k, v in t.anchor.items()},
                }
                for t in self._tasks
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"EWC: the checkpoint holds mode={state_dict['mode']!r} state but this callback has "
                f"mode={self.mode!r}; construct EWC with the checkpoint's mode."
            )
        tasks = []
        for entry in state_dict["tasks"]:
            fisher = FisherDiagonal.from_state_dict(entry["fisher"])
            anchor = dict(entry["anchor"])
            if set(anchor) != set(fisher):
                raise ValueError("EWC: corrupt checkpoint state: anchor and Fisher names differ.")
            if self._module is not None:
                try:
                    fisher.check_matches(self._module)
                except ValueError as err:
                    raise FisherInputError(
                        f"EWC: cannot restore the checkpoint's EWC state: {err} Resume with the "
                        "model the checkpoint was written from."
                    ) from None
            tasks.append(_Task(fisher, anchor))
        # Replace the state only once everything is validated.
        self._tasks = tasks
        self.task_count = int(state_dict["task_count"])
        self._steps_since = int(state_dict["steps_since_consolidation"])
        self._epoch_task = state_dict.get("epoch_task")
        self._invalidate_caches()
