"""Elastic Weight Consolidation as a Lightning callback.

Penalty, over the consolidated tasks t with Fisher diagonals F_t and anchors theta*_t:

    P(theta) = (lambda / 2) sum_t sum_i F_t,i (theta_i - theta*_t,i)^2,
    grad P   = lambda sum_t F_t (theta - theta*_t).

The state and the math live in :class:`lightning_fisher.ewc.ElasticWeightConsolidation`; this
callback decides when to consolidate (and on which data), when to add the gradient, and logs.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from .. import sharded
from ..estimators import estimate_fisher, lookup
from ..ewc import ElasticWeightConsolidation, StateBytes
from ..fisher_diagonal import FisherDiagonal
from ..options import FisherOptions, check, warn_ignored_options
from ..outputs import ClassSelector, FisherInputError, OutputFn, batch_size_of, check_likelihood
from ._utils import (
    accumulation_fraction,
    adopt_old_state_key,
    build_fisher_options,
    check_dataloader,
    check_first_batch,
    check_fisher_batch,
    check_method,
    check_name,
    check_options_at_setup,
    checks_training_batches,
    evaluation_keeps_state,
    fisher_loader,
    grad_scale,
    log_metrics,
    old_key_settings,
    plain_warnings_on_rank_zero,
    prepare_sharded_strategy,
    refuse_sharded_strategy,
    training_finished,
    training_loader_problem,
    world_size,
)

APPLY = ("grad", "loss")
#: optimizers whose state holds Adam's ``exp_avg_sq`` (what the Squisher reads)
SQUISHER_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)


class EWC(Callback):
    r"""Elastic Weight Consolidation with no change to the ``LightningModule``.

    Once a ``fit`` has made its last optimizer step (and when the datamodule's ``task_id`` changes,
    or when :meth:`consolidate` is called) it estimates the Fisher diagonal of the finished task on
    that task's training data and stores it with the current parameters as anchors. The
    consolidation runs before any checkpoint of that last step is written (``max_steps`` or
    ``max_epochs`` reached, or ``trainer.should_stop`` set by early stopping or a timer, is known
    when ``ModelCheckpoint`` saves), else in ``on_train_end``; a checkpoint file that
    ``ModelCheckpoint`` wrote at the last step before the stop was decided is written again. So
    every checkpoint written after a task's last step holds its consolidated state, and a run
    resumed from it (in a new process) trains the next task with the penalty. During training it
    adds the exact penalty gradient ``lam * sum_t F_t * (theta - theta*_t)`` to the parameters'
    gradients once per optimizer step, in ``on_before_optimizer_step``: after gradient
    accumulation, the DDP all-reduce and AMP unscaling, and before gradient clipping, so the
    update equals the one from ``loss + ewc.penalty(module)`` (also in an epoch's last, shorter
    accumulation window of n < k micro-batches, where Lightning's division of each micro-batch's
    loss by k = ``accumulate_grad_batches`` gives the penalty in the loss a share n/k, and the
    added gradient gets the same share). With fp16 AMP and an optimizer that unscales inside
    ``step`` (fused Adam), the added gradient is multiplied by the loss scale.
    Under manual optimization the gradient is added inside each ``opt.step()`` of the optimizers
    ``self.optimizers()`` returns (restricted to that optimizer's parameters), so after any
    clipping the ``training_step`` does itself (``apply="loss"`` clips the sum); training batches
    without a step Lightning sees (a raw optimizer) raise an error at the epoch's end once a
    penalty is due.

    The state, the penalty and its gradient are those of
    :class:`lightning_fisher.ElasticWeightConsolidation` (the attribute :attr:`core`), which a
    training loop without Lightning can use directly; this callback decides when to consolidate
    and on which data, when to add the gradient, and what to log.

    Memory (:meth:`state_bytes`): per consolidated parameter a Fisher in ``state_dtype`` (float32
    by default, bfloat16 or float16 for half) and an anchor in the parameter's dtype, in GPU
    memory or, with ``offload="cpu"``, in CPU memory; separate mode keeps a Fisher and an anchor
    per task. Cost per optimizer step and task: on CUDA one pass over g, F, theta and theta* by an
    update compiled with ``torch.compile`` on the first step (``compile_update=False``, or where
    it does not compile, logged: three ``foreach`` launches and a workspace buffer); on CPU two
    in-place passes (``work = theta - theta*``, then ``grad += lam F work``), or one with
    ``cpu_kernel=True`` (the penalty's value, two more, only on logging steps). The arithmetic is
    float32 whatever the storage dtypes. With ``offload="cpu"`` every step also copies the
    state's bytes from CPU to GPU memory.

    Logged on Lightning's logging steps (``log_every_n_steps``): ``ewc/penalty`` (the penalty's
    value) and ``ewc/penalty_ratio`` (its ratio to the loss ``training_step`` returned; with
    ``apply="loss"`` that loss includes the penalty you added), so λ's effect shows while
    training; at each consolidation ``ewc/fisher_trace``, ``ewc/tasks`` and ``ewc/fisher_seconds``.

    Checkpoints keep the state under the key ``"EWC"`` (``"EWC[<name>]"`` with ``name=``, for
    several instances in one Trainer) with the settings it was built with. Resuming it with
    another ``method`` raises an error (the Fisher's scale depends on it); ``mode="separate"``
    state resumed with ``mode="online"`` is converted (F = sum_t gamma^(T-t) F_t, anchor = the
    last task's), the reverse raises. State written by older versions under
    ``EWC{'method': ..., 'mode': ...}`` is read the same way. ``validate``, ``test`` and
    ``predict`` with a ``ckpt_path`` (``"best"`` after a fit) load the checkpoint's weights but
    leave a callback that holds state as it is, so no consolidated task is rolled back. A model
    loaded with ``load_from_checkpoint`` gets its EWC state from :meth:`load_checkpoint`; a
    weights-only checkpoint holds none.

    Under DDP the default Fisher data is each rank's ``DistributedSampler`` shard and the estimate is
    all-reduced, so every rank holds the Fisher of the union (the sampler's padding may repeat a
    few inputs). A user ``dataloader`` is not sharded: every rank then estimates on all of it (same
    result, more work). ``max_samples`` draws the same subset on every rank.

    Args:
        lam: penalty strength lambda. Its best value depends on the model, the data and the
            method's scale, so search a grid (powers of 10) on held-out tasks, watching
            ``ewc/penalty_ratio``. The methods' scales relate as follows: ``exact``, ``sample``
            and ``hutchinson`` estimate the same F; ``empirical`` squares the gradient of the
            true label, which is near zero for inputs the model already classifies confidently,
            so its scale falls below F's the more confident the model is (and lambda rises
            accordingly); ``batched`` squares the mean gradient of a Fisher batch of b inputs,
            about 1/b of F when the gradients of different inputs are uncorrelated, so lambda
            about b times larger. For ``squisher`` search its own range: Adam's second moment
            also holds EWC's own gradient, so under online EWC a large lambda feeds back and
            overflows.
        method: any registered method (``lf.METHODS``); ``"squisher"`` reads Adam's
            ``exp_avg_sq`` from the trainer's optimizer (no data pass).
        mode: ``"online"`` (one Fisher, F <- gamma F + F_new, anchor <- theta_new) or
            ``"separate"`` (one Fisher and anchor per task).
        gamma: decay of the old Fisher in online mode, >= 0, usually in (0, 1] (0 and values
            above 1 warn; ignored by ``"separate"``).
        max_samples: EXACT(n): estimate on ``n`` random inputs. This and the next four are
            shortcuts for the ``FisherOptions`` of the same names (``None``: keep
            ``fisher_options``' value).
        mc_samples: label draws per input for ``method="sample"``.
        probes: probes per batch for the ``hutchinson*`` methods.
        classes: active classes of a task-incremental (multi-head) model: a sequence of class
            indices or a callable ``classes(batch)`` returning them.
        output_fn: ``output_fn(module, batch) -> logits`` if calling the module is not how the
            logits are obtained.
        apply: ``"grad"`` adds the penalty gradient to ``.grad`` (the default); ``"loss"`` adds
            nothing, for users who add :meth:`penalty` to their loss themselves.
        dataloader: data for the Fisher pass; default: the trainer's training dataloader (the
            finished task's data; under DDP each rank's shard). When a fit starts, the model is
            run once (eval mode, no gradients; so ``output_fn`` is called once more) on the
            first batch of ``dataloader``, or on the first training batch when there is none:
            a batch the Fisher pass cannot take, or labels outside ``classes``, is refused before
            the task trains rather than after it.
        consolidate_on_fit_end: consolidate after the last optimizer step of every ``fit`` that
            made optimizer steps (before the checkpoints of that step).
        task_attr: name of the datamodule attribute whose change marks a task boundary (checked in
            ``on_train_epoch_end``); ``None`` disables the check.
        batch_size: training batch size B for the Squisher (F = B * v_hat); default: the
            micro-batch size times ``accumulate_grad_batches`` times the number of DDP ranks.
        bias_correction: bias-correct the Squisher's ``exp_avg_sq``.
        log_penalty: log ``ewc/penalty`` and ``ewc/penalty_ratio`` on logging steps.
        fisher_kwargs: further options by name (``lf.FisherOptions`` fields: ``seed``,
            ``max_batches``, ``param_filter``, ``max_memory_mib``, ...); they override the
            shortcuts.
        fisher_options: a ``lf.FisherOptions`` the shortcuts and ``fisher_kwargs`` start from.
        cpu_kernel: on CPU, add ``lam F (theta - theta*)`` with a one-pass C kernel (reads each of
            grad, F, theta, theta* once, writes grad once; same roundings as the explicit loss's
            gradient), compiled once per process at ``fit`` start with the system C compiler. Used
            for float32 tensors while PyTorch runs one CPU thread (the kernel is single-threaded);
            otherwise, or without a working compiler (a warning), PyTorch's ops.
        state_dtype: storage dtype of the Fisher diagonals (``None``: float32; ``torch.bfloat16``
            or ``torch.float16`` halve it); estimated and summed in float32, cast when
            consolidated. A checkpoint's state is cast to it when loaded.
        offload: ``False`` or ``"cpu"``: keep Fishers and anchors in (pinned) CPU memory and copy
            them to the GPU at each optimizer step (PCIe traffic of the state's size per step,
            for GPU memory).
        compile_update: on CUDA, fuse the penalty-gradient update with ``torch.compile``
            (default; 1.031-1.035x a step on a 1.3B bf16 GPT-2 on an H200, against 1.23x by the
            ``foreach`` ops that ``False`` keeps).
        name: distinguishes several ``EWC`` instances in one Trainer (their checkpoint keys).
    """

    def __init__(
        self,
        *,
        lam: float,
        method: str = "exact",
        mode: str = "online",
        gamma: float = 1.0,
        max_samples: int | None = None,
        mc_samples: int | None = None,
        probes: int | None = None,
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
        fisher_options: FisherOptions | None = None,
        cpu_kernel: bool = False,
        state_dtype: torch.dtype | str | None = None,
        offload: bool | str = False,
        compile_update: bool = True,
        name: str | None = None,
    ) -> None:
        method = check_method("EWC", method, data_pass=False)
        #: the plain-torch state and penalty this callback drives
        self.core = ElasticWeightConsolidation(
            lam=lam,
            mode=mode,
            gamma=gamma,
            method=method,
            cpu_kernel=cpu_kernel,
            state_dtype=state_dtype,
            offload=offload,
            compile_update=compile_update,
        )
        if apply not in APPLY:
            raise FisherInputError(
                f"EWC: apply must be 'grad' (the callback adds the penalty gradient) or 'loss' (you "
                f"add `ewc.penalty(module)` to your loss); got {apply!r}."
            )
        check(
            "EWC",
            batch_size=("positive_int_or_none", batch_size),
            bias_correction=("flag", bias_correction),
            consolidate_on_fit_end=("flag", consolidate_on_fit_end),
            task_attr=("name_or_none", task_attr),
            log_penalty=("flag", log_penalty),
            cpu_kernel=("flag", cpu_kernel),
            compile_update=("flag", compile_update),
        )
        check_name("EWC", name)
        check_dataloader("EWC", dataloader)
        squisher = not lookup(method).data_pass
        # (option, value, default, who reads it) for options that this method or mode ignores
        unread: list[tuple[str, Any, Any, str]] = []
        if mode == "separate":
            unread.append(("gamma", gamma, 1.0, "mode='online'"))
        if squisher:
            unread.append(("dataloader", dataloader, None, "the data-pass methods"))
        else:
            unread.append(("batch_size", batch_size, None, "method='squisher'"))
            unread.append(("bias_correction", bias_correction, True, "method='squisher'"))
        ignored = [
            f"{option}={type(value).__name__ if option == 'dataloader' else repr(value)} "
            f"(read only by {reader})"
            for option, value, default, reader in unread
            if value is not default and value != default
        ]
        if ignored:
            warnings.warn(
                f"EWC(method={method!r}, mode={mode!r}) ignores {', '.join(ignored)}.",
                UserWarning,
                stacklevel=2,
            )
        if not consolidate_on_fit_end and task_attr is None:
            warnings.warn(
                "EWC(consolidate_on_fit_end=False, task_attr=None) never consolidates by itself: "
                "call `ewc.consolidate(module)` at each task boundary, or set one of them.",
                UserWarning,
                stacklevel=2,
            )
        self.apply = apply
        self.dataloader = dataloader
        self.consolidate_on_fit_end = consolidate_on_fit_end
        self.task_attr = task_attr
        self.batch_size = batch_size
        self.bias_correction = bias_correction
        self.log_penalty = log_penalty
        self.name = name
        #: the estimator's options (validated; set attributes to change them)
        self.fisher_options = build_fisher_options(
            "EWC",
            fisher_options,
            {
                "max_samples": max_samples,
                "mc_samples": mc_samples,
                "probes": probes,
                "classes": classes,
                "output_fn": output_fn,
            },
            fisher_kwargs,
        )
        if not squisher:
            warn_ignored_options("EWC", self.fisher_options, [method])
        self._steps_since = 0  # optimizer steps since the last consolidation
        self._trained = False  # on_train_start ran in the current fit
        self._fit_steps = 0  # optimizer steps in the current fit
        #: global step of a checkpoint written in this fit while a consolidation was pending
        self._pending_save_step: int | None = None
        self._logged_penalty: float | None = None  # the penalty of this step, for its ratio
        self._epoch_task: Any = None  # datamodule task id seen at the start of the epoch
        self._micro_batch: int | None = None
        self._module: nn.Module | None = None
        self._fit_batches = 0  # training batches in the current fit
        self._warned_outside = False  # warned about optimizer steps Lightning did not see
        self._keep_state = False  # the checkpoint being loaded is an evaluation's: keep ours
        #: the latest estimate (before online accumulation), in a 16-bit ``state_dtype`` when the
        #: state has one and in CPU memory under ``offload="cpu"``, and how long it took
        self.last_fisher: FisherDiagonal | None = None
        self.fisher_seconds = 0.0

    # Read access (the core's state and settings) ----------------------------------------------
    @property
    def lam(self) -> float:
        """Penalty strength lambda."""
        return self.core.lam

    @lam.setter
    def lam(self, value: float) -> None:
        if isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
            raise FisherInputError(f"EWC: lam must be a finite number >= 0; got {value!r}.")
        self.core.lam = float(value)

    @property
    def method(self) -> str:
        method = self.core.method
        assert method is not None  # set at construction, never cleared
        return method

    @property
    def mode(self) -> str:
        return self.core.mode

    @property
    def gamma(self) -> float:
        return self.core.gamma

    @property
    def cpu_kernel(self) -> bool:
        return self.core.cpu_kernel

    @property
    def state_dtype(self) -> torch.dtype:
        """Storage dtype of the Fisher diagonals."""
        return self.core.state_dtype

    @property
    def offload(self) -> str | None:
        """``"cpu"`` when the state lives in CPU memory, else ``None``."""
        return self.core.offload

    def state_bytes(self) -> StateBytes:
        """Bytes of the EWC state, per parameter and in total
        (:meth:`lightning_fisher.ElasticWeightConsolidation.state_bytes`)."""
        return self.core.state_bytes()

    @property
    def task_count(self) -> int:
        """Number of consolidated tasks."""
        return self.core.task_count

    @property
    def fishers(self) -> list[FisherDiagonal]:
        """The stored Fisher diagonals: one in online mode, one per task in separate mode."""
        return self.core.fishers

    @property
    def anchors(self) -> list[dict[str, Tensor]]:
        """The stored anchor parameters theta*, matching :attr:`fishers`."""
        return self.core.anchors

    @property
    @override
    def state_key(self) -> str:
        return "EWC" if self.name is None else f"EWC[{self.name}]"

    # The penalty -----------------------------------------------------------------------------
    def penalty(self, module: nn.Module) -> Tensor:
        """(lam / 2) sum_t sum_i F_t,i (theta_i - theta*_t,i)^2, differentiable in ``module``'s
        parameters (zero before the first consolidation)."""
        return self.core.penalty(module)

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
        fisher = self.core.consolidate(fisher, module)
        self.fisher_seconds = time.perf_counter() - start
        self.last_fisher = self._kept(fisher)
        self._steps_since = 0
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

    def _kept(self, fisher: FisherDiagonal) -> FisherDiagonal:
        """``fisher`` as ``last_fisher`` keeps it: in the state's 16-bit dtype and its memory, so
        that the copy kept for inspection costs no more than the state (a float32 copy of a 1.3B
        model's estimate would hold 4.9 GiB of GPU memory beside a bfloat16 state)."""
        device = torch.device("cpu") if self.core.offload is not None else None
        dtype = self.core.state_dtype if self.core.state_dtype.itemsize < 4 else None
        if dtype is None and device is None:
            return fisher
        return fisher.to(device=device, dtype=dtype)

    def _estimate(
        self,
        module: nn.Module,
        trainer: pl.Trainer | None,
        dataloader: Iterable[Any] | None,
        optimizer: torch.optim.Optimizer | None,
    ) -> FisherDiagonal:
        if not lookup(self.method).data_pass:  # the Squisher: its data is the optimizer's state
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
                estimate_fisher(
                    module,
                    None,
                    self.method,
                    optimizer=o,
                    batch_size=batch,
                    bias_correction=self.bias_correction,
                )
                for o in optimizers
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
        return estimate_fisher(module, loader, self.method, options=self.fisher_options)

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

    # Lightning hooks -------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, "lf.EWC", fsdp2=True, fsdp1=True)
        if lookup(self.method).data_pass:  # a categorical Fisher of the model's outputs
            check_likelihood(pl_module, self.fisher_options.output_fn)  # before training
            check_options_at_setup("EWC", pl_module, self.fisher_options)
        _warn_unseen_task_attr(trainer, self.task_attr, self.consolidate_on_fit_end)
        self._module = pl_module  # lets load_state_dict check names before touching state

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = False
        self._fit_steps = 0
        self._fit_batches = 0
        self._warned_outside = False
        prepare_sharded_strategy(trainer)  # FSDP1: the Fisher hook, before the first forward
        check_first_batch("EWC", trainer, pl_module, self.dataloader, self.fisher_options)
        self._pending_save_step = None
        self._logged_penalty = None
        self.core.invalidate_caches()
        if not lookup(self.method).data_pass:
            wrong = [
                type(o).__name__
                for o in trainer.optimizers
                if not isinstance(o, SQUISHER_OPTIMIZERS)
            ]
            if wrong:
                raise FisherInputError(
                    f"EWC(method='squisher') reads Adam's `exp_avg_sq`, but the optimizer is "
                    f"{', '.join(wrong)}; use Adam or AdamW (or NAdam, RAdam), or another `method`."
                )
        if (
            self.cpu_kernel
            and pl_module.device.type == "cpu"
            and not self.core.prepare_cpu_kernel()  # compiled here, not in the first step
        ):
            rank_zero_warn(
                "EWC(cpu_kernel=True): no C compiler could build the kernel; using PyTorch's ops "
                "(same result, one more pass over the parameters)."
            )
        if self.core.fishers:
            self.core.check_matches(pl_module)
            self.core.to(pl_module.device)
        self._warn_weights_only_checkpoints(trainer)

    def _warn_weights_only_checkpoints(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        if any(
            isinstance(cb, ModelCheckpoint) and cb.save_weights_only
            for cb in trainer.checkpoint_callbacks
        ):
            rank_zero_warn(
                "EWC: ModelCheckpoint(save_weights_only=True) writes no callback state, so its "
                "files hold no EWC Fisher, anchors or task count; a run continued from one "
                "starts EWC with no consolidated task. Keep a full checkpoint (a second "
                "ModelCheckpoint with save_weights_only=False) to continue from."
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (
            not self._fit_batches
            and self.dataloader is None
            and lookup(self.method).data_pass
            and checks_training_batches(trainer)
        ):
            # The consolidation reads batches like this one after the task's last step: refuse
            # labels outside `classes` or a failing `output_fn` now, for one no-grad forward.
            check_fisher_batch(
                "EWC", pl_module, batch, self.fisher_options, "the first training batch"
            )
        if self.batch_size is None and not lookup(self.method).data_pass:
            try:
                self._micro_batch = batch_size_of(batch)
            except FisherInputError:
                self._micro_batch = None

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._fit_batches += 1
        penalty, self._logged_penalty = self._logged_penalty, None
        if penalty is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            value = abs(float(loss.detach()))
            if value > 0 and math.isfinite(value):
                pl_module.log(
                    "ewc/penalty_ratio", penalty / value, on_step=True, on_epoch=False, batch_size=1
                )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = self._task_id(trainer)
        if (
            task is not None
            and self._epoch_task is not None
            and task != self._epoch_task
            and self._steps_since
        ):
            rank_zero_warn(
                f"EWC: the task changed ({self._epoch_task!r} -> {task!r}) after the previous task's "
                "data was replaced, so it was not consolidated. Change `task_id` before "
                "`on_train_epoch_end` of the task's last epoch, or call `ewc.consolidate(...)`."
            )
        self._epoch_task = task

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_batches and not self._fit_steps:
            self._refuse_steps_outside_lightning(pl_module)
        task = self._task_id(trainer)
        if task is None or self._epoch_task is None or task == self._epoch_task:
            return
        if self._steps_since:
            self._consolidate_in_hook(pl_module)
        self._epoch_task = task

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = True
        # The consolidation reads the training data after the task's last step: a loader it
        # cannot read is refused now, before the task trains.
        if (
            self.consolidate_on_fit_end
            and self.dataloader is None
            and lookup(self.method).data_pass
        ):
            problem = training_loader_problem(trainer.train_dataloader, "EWC")
            if problem is not None:
                raise FisherInputError(problem)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning collected `state_dict()` just before this hook. A checkpoint written after the
        # task's last step gets the consolidated state: the pass runs now, once (the later hooks
        # find nothing pending), on the parameters the checkpoint holds.
        if not (self.consolidate_on_fit_end and self._steps_since and self._trained):
            return
        if training_finished(trainer):
            self._consolidate_in_hook(pl_module)
            if self.state_key in checkpoint.get("callbacks", {}):
                checkpoint["callbacks"][self.state_key] = self.state_dict()
        else:
            self._pending_save_step = trainer.global_step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.consolidate_on_fit_end and self._steps_since:
            self._consolidate_in_hook(pl_module)
            if self._pending_save_step == trainer.global_step:
                # A checkpoint of this last step was written before the stop was decided (a step
                # checkpoint, then early stopping in the validation that followed it).
                self._rewrite_checkpoints_of_this_step(trainer)
        self._pending_save_step = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._fit_steps and self._fit_batches:
            self._refuse_steps_outside_lightning(pl_module)
        elif not self._fit_steps and trainer.ckpt_path is None:
            self._warn_no_step(trainer)
        # A fit resumed from a checkpoint written after its last optimizer step but before the
        # consolidation (one written by an older version, or by hand) is already done: Lightning
        # skips the training loop and `on_train_end`, so the pending consolidation runs here. The
        # strategy has moved the module to the CPU by now; the pass runs on the training device.
        if self._trained or not (self.consolidate_on_fit_end and self._steps_since):
            return
        device = pl_module.device
        pl_module.to(trainer.strategy.root_device)
        try:
            self._consolidate_in_hook(pl_module)
        finally:
            pl_module.to(device)

    def _warn_no_step(self, trainer: pl.Trainer) -> None:
        rank_zero_warn(
            "EWC: this fit made no training step (the Trainer is at epoch "
            f"{trainer.current_epoch}, global step {trainer.global_step}; max_epochs="
            f"{trainer.max_epochs}, max_steps={trainer.max_steps}), so its task was neither "
            "trained nor consolidated. A Trainer that reached its limits does not train again: "
            "build a new Trainer for each task (the callbacks can be reused), or raise "
            "max_epochs/max_steps before calling fit again."
        )

    def _refuse_steps_outside_lightning(self, pl_module: pl.LightningModule) -> None:
        """Training batches ran but no optimizer step went through Lightning (whose optimizer
        wrapper calls ``on_before_optimizer_step``): the penalty gradient was never added and
        the task cannot be consolidated. An error where a penalty was due, else a warning."""
        message = (
            f"EWC: {self._fit_batches} training batches ran but no optimizer step went through "
            "Lightning"
            + (
                " (manual optimization: step the optimizers that `self.optimizers()` returns, "
                "not `self.optimizers(use_pl_optimizer=False)` or optimizers kept elsewhere)"
                if not pl_module.automatic_optimization
                else ""
            )
            + ", so EWC never saw a step: "
        )
        if self.core.fishers and self.lam > 0 and self.apply == "grad":
            raise FisherInputError(
                message + "the penalty gradient lam * F * (theta - theta*) of the consolidated "
                f"{self.task_count} task(s) was not added to any update."
            )
        if not self._warned_outside:
            self._warned_outside = True
            rank_zero_warn(message + "this task will not be consolidated at the end of the fit.")

    def _consolidate_in_hook(self, pl_module: pl.LightningModule) -> None:
        # Hooks of the validation loop run under inference mode; the estimators need autograd.
        with torch.inference_mode(False), torch.enable_grad():
            self.consolidate(pl_module)

    def _rewrite_checkpoints_of_this_step(self, trainer: pl.Trainer) -> None:
        """Write again, now with the consolidated state, the files that ``ModelCheckpoint``
        callbacks saved at this global step."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        step = trainer.global_step
        for cb in trainer.checkpoint_callbacks:
            if (
                not isinstance(cb, ModelCheckpoint)
                or cb.save_weights_only
                or cb._last_global_step_saved != step
            ):
                continue
            paths = {cb._last_checkpoint_saved, cb.last_model_path, cb.best_model_path}
            paths.update(cb.best_k_models)
            chosen: list[str] = []
            if trainer.is_global_zero:
                chosen = [p for p in sorted(str(p) for p in paths if p) if _written_at(p, step)]
            for path in trainer.strategy.broadcast(chosen):
                trainer.save_checkpoint(path)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._steps_since += 1
        self._fit_steps += 1
        if not self.core.fishers or self.lam == 0:
            return
        # Computing the penalty's value costs extra passes: do it only when Lightning logs.
        every = max(1, getattr(trainer, "log_every_n_steps", 50))
        log = self.log_penalty and (trainer.global_step + 1) % every == 0
        penalty: Tensor | None
        if self.apply == "loss":
            if not log:
                return
            with torch.no_grad():
                penalty = self.core.penalty(pl_module)
        else:
            penalty = self.core.add_penalty_grad(
                pl_module,
                optimizer=optimizer,
                # the explicit loss's share in a short accumulation window at an epoch's end
                scale=grad_scale(trainer, optimizer) * accumulation_fraction(trainer),
                with_penalty=log,
            )
        if log and penalty is not None:
            self._logged_penalty = float(penalty)
            pl_module.log("ewc/penalty", penalty, on_step=True, on_epoch=False, batch_size=1)

    def _task_id(self, trainer: pl.Trainer) -> Any:
        if self.task_attr is None:
            return None
        datamodule = getattr(trainer, "datamodule", None)
        return getattr(datamodule, self.task_attr, None) if datamodule is not None else None

    # Checkpoints -----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # FSDP2: Lightning writes callback states from rank 0 only, so sharded Fishers and
        # anchors are gathered whole here (a collective: every rank builds the checkpoint).
        return {
            **sharded.full_state(self.core.state_dict(), self._module),
            "steps_since_consolidation": self._steps_since,
            "epoch_task": self._epoch_task if isinstance(self._epoch_task, (int, str)) else None,
        }

    def load_checkpoint(self, checkpoint: str | os.PathLike[str] | Mapping[str, Any]) -> None:
        """Load this callback's state from a Lightning checkpoint file (or its loaded dict).

        The way to continue from a checkpoint without resuming its fit: a model loaded with
        ``LightningModule.load_from_checkpoint(path)`` (which restores the weights only) and a
        new ``EWC`` that calls ``load_checkpoint(path)`` before ``trainer.fit(model, ...)``. A
        checkpoint that holds no callback state (``ModelCheckpoint(save_weights_only=True)``)
        or no state under this callback's key raises a ``FisherInputError`` and leaves the
        state unchanged.
        """
        where = "the checkpoint"
        if not isinstance(checkpoint, Mapping):
            where = f"the checkpoint {os.fspath(checkpoint)!r}"
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
            raise FisherInputError(
                f"EWC.load_checkpoint: {where} is not a Lightning checkpoint (a dict with "
                f"'state_dict'); got {type(checkpoint).__name__}."
            )
        states = checkpoint.get("callbacks")
        if not isinstance(states, Mapping):
            raise FisherInputError(
                f"EWC.load_checkpoint: {where} holds no callback state (it was written with "
                "`save_weights_only=True`), so it has no EWC Fishers and anchors; the weights "
                "alone cannot restore the consolidated tasks. Use a full checkpoint "
                "(ModelCheckpoint's default save_weights_only=False)."
            )
        if self.state_key not in states:
            found = [k for k in states if isinstance(k, str) and k.startswith("EWC")]
            old = [k for k in found if k.startswith("EWC{")]
            if len(found) == 1 and old:  # written by an older version under a settings key
                state = {**old_key_settings(old[0], 3, ("method", "mode")), **states[old[0]]}
            else:
                raise FisherInputError(
                    f"EWC.load_checkpoint: {where} holds no state under this callback's key "
                    f"{self.state_key!r} (name={self.name!r}); EWC state found under "
                    f"{found or 'no key'}."
                    + (" Construct EWC with the `name=` it was written with." if found else "")
                )
        else:
            state = states[self.state_key]
        self._keep_state = False  # a direct load always loads
        self.load_state_dict(copy.deepcopy(dict(state)))

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Move this callback's state from a key of older versions (which held ``method`` and
        ``mode``) to the current key, or refuse EWC state no EWC callback of the Trainer claims."""
        unclaimed = adopt_old_state_key(
            trainer,
            self,
            checkpoint,
            "EWC",
            {"method": self.method, "mode": self.mode},
            into_state=True,  # the old key held the method; the old state held the mode
        )
        if unclaimed:
            raise FisherInputError(
                f"EWC: the checkpoint holds EWC state under {unclaimed}, but this callback's key "
                f"is {self.state_key!r} (name={self.name!r}); construct EWC with the `name=` the "
                "checkpoint was written with."
            )
        # validate/test/predict(ckpt_path=...) restore the weights to evaluate; the consolidated
        # tasks stay (a "best" checkpoint written before the fit's end holds fewer).
        self._keep_state = evaluation_keeps_state(
            trainer, self, checkpoint, bool(self.core.fishers) or self._steps_since > 0
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._keep_state:
            self._keep_state = False
            return
        steps_since = int(state_dict["steps_since_consolidation"])
        if self._module is not None and (
            sharded.is_fsdp2(self._module) or sharded.is_fsdp1(self._module)
        ):
            state_dict = sharded.shard_state_like(state_dict, self._module)  # each rank's slices
        with plain_warnings_on_rank_zero():
            self.core.load_state_dict(state_dict, self._module)
        self._steps_since = steps_since
        self._epoch_task = state_dict.get("epoch_task")


def _written_at(path: str, step: int) -> bool:
    """Whether ``path`` is a regular checkpoint file written at global step ``step``."""
    if not os.path.isfile(path) or os.path.islink(path):
        return False
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not a file torch reads with mmap (an older format): leave it as it is
        return False
    return isinstance(checkpoint, dict) and checkpoint.get("global_step") == step


def _warn_unseen_task_attr(trainer: pl.Trainer, task_attr: str | None, on_fit_end: bool) -> None:
    """Warn in ``setup`` when ``task_attr`` names an attribute the fit's datamodule lacks (or
    there is no datamodule) while it matters: it was set away from its default, or it is the
    only consolidation trigger (``consolidate_on_fit_end=False``)."""
    if task_attr is None or (task_attr == "task_id" and on_fit_end):
        return
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, task_attr):
        return
    where = (
        f"the datamodule ({type(datamodule).__name__}) has no attribute {task_attr!r}"
        if datamodule is not None
        else "the fit has no datamodule"
    )
    then = (
        "it consolidates only at the end of each fit"
        if on_fit_end
        else "it never consolidates by itself (consolidate_on_fit_end=False)"
    )
    rank_zero_warn(f"EWC(task_attr={task_attr!r}): {where}, so no task switch is seen; {then}.")
