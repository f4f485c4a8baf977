"""Periodic Fisher estimates during training, kept on the callback and sent to the logger."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from .. import sharded
from ..estimators import estimate_fisher
from ..fisher_diagonal import FisherDiagonal
from ..options import FisherOptions, check, warn_ignored_options
from ..outputs import ClassSelector, FisherInputError, OutputFn, check_likelihood
from ..sharded_fsdp1 import clean_name, mark_pieces
from ._utils import (
    adopt_old_state_key,
    build_fisher_options,
    check_dataloader,
    check_first_batch,
    check_method,
    check_name,
    check_options_at_setup,
    evaluation_keeps_state,
    fisher_loader,
    log_metrics,
    prepare_sharded_strategy,
    refuse_sharded_strategy,
    training_loader_problem,
    warn_if_schedule_never_fires,
)


def _layer_traces(fd: FisherDiagonal) -> dict[str, float]:
    """Traces grouped by module, named as in the unwrapped model (FSDP1's wrapper prefixes
    dropped), as ``FisherDiagonal.layer_traces`` groups them."""
    out: dict[str, float] = {}
    for name, value in fd.traces().items():
        name = clean_name(name)
        layer = name.rsplit(".", 1)[0] if "." in name else name
        out[layer] = out.get(layer, 0.0) + value
    return out


class FisherMonitor(Callback):
    r"""Estimate the Fisher diagonal every N epochs (``on_train_epoch_end``) or every N optimizer
    steps, keep the latest estimate in :attr:`fisher` and log its trace.

    Logged: ``fisher/trace`` = tr(F) = sum_i F_i, ``fisher/seconds`` (time of the pass),
    ``fisher/n_samples``, and with ``log_layer_traces`` one ``fisher/trace/<module>`` per module.

    Under ``ModelParallelStrategy`` (FSDP2) the estimate stays sharded like the parameters
    (DTensors; ``on_estimate`` receives it so), its traces are the local shards' sums added over
    the ranks, so every number logged is the unsharded run's; ``save_dir`` and checkpoints hold
    it gathered whole. Under ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``) the same holds
    with each tensor this rank's flat piece of its parameter (the traces sum the ranks' pieces,
    layers are named as in the unwrapped model); the Fisher communication hook is registered
    when the fit starts.

    Args:
        method: any ``lf.estimate_fisher`` method; ``hutchinson`` (the default) costs one
            backward per batch, ``exact`` one per class and input.
        every_n_epochs: estimate at the end of every n-th training epoch.
        every_n_steps: estimate after every n-th optimizer step instead (then leave
            ``every_n_epochs`` at its default or ``None``: another value is refused, as it would
            not be used). Needs a separate ``dataloader`` if the training loader uses persistent
            workers.
        dataloader: data for the pass; default: the trainer's training dataloader (each rank's
            shard under DDP, all-reduced to the Fisher of the union).
        max_samples: estimate on ``n`` random inputs (EXACT(n)). This and the next five are
            shortcuts for the ``FisherOptions`` of the same names (``None``: keep
            ``fisher_options``' value).
        max_batches: stop the pass after this many batches (cheap periodic estimates).
        probes: probes per batch for the ``hutchinson*`` methods.
        mc_samples: label draws per input for ``sample``.
        classes: active classes of a multi-head model (sequence or ``classes(batch)``).
        output_fn: ``output_fn(module, batch) -> logits`` when calling the module is not how the
            logits are obtained.
        log_layer_traces: also log one trace per module.
        save_dir: if set, rank 0 saves every estimate there as ``fisher-step=<step>.safetensors``.
        on_estimate: ``on_estimate(trainer, pl_module, fisher)`` called after every estimate.
        fisher_kwargs: further options by name (``lf.FisherOptions`` fields); they override
            the shortcuts.
        fisher_options: a ``lf.FisherOptions`` the shortcuts and ``fisher_kwargs`` start from.
        name: distinguishes several monitors in one Trainer: the checkpoint key is
            ``"FisherMonitor"``, or ``"FisherMonitor[<name>]"`` with a name. The key does not
            depend on the other settings, so a resumed run with another ``method`` or schedule
            keeps the history; state that older versions keyed by ``method`` and ``every_n_*`` is
            read too.
    """

    def __init__(
        self,
        *,
        method: str = "hutchinson",
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        dataloader: Iterable[Any] | None = None,
        max_samples: int | None = None,
        max_batches: int | None = None,
        probes: int | None = None,
        mc_samples: int | None = None,
        classes: ClassSelector | None = None,
        output_fn: OutputFn | None = None,
        log_layer_traces: bool = True,
        save_dir: str | os.PathLike[str] | None = None,
        on_estimate: Callable[[pl.Trainer, pl.LightningModule, FisherDiagonal], None] | None = None,
        fisher_kwargs: Mapping[str, Any] | None = None,
        fisher_options: FisherOptions | None = None,
        name: str | None = None,
    ) -> None:
        method = check_method("FisherMonitor", method, data_pass=True)
        who = "FisherMonitor"
        check(
            who,
            every_n_epochs=("positive_int_or_none", every_n_epochs),
            every_n_steps=("positive_int_or_none", every_n_steps),
            log_layer_traces=("flag", log_layer_traces),
            on_estimate=("callable_or_none", on_estimate),
        )
        if every_n_epochs is None and every_n_steps is None:
            raise FisherInputError("FisherMonitor: set `every_n_epochs` or `every_n_steps`.")
        if every_n_steps is not None and every_n_epochs not in (None, 1):
            raise FisherInputError(
                f"FisherMonitor: every_n_epochs={every_n_epochs} and every_n_steps={every_n_steps} "
                "are both set, but with every_n_steps the epoch schedule is not used; pass "
                "every_n_epochs=None with every_n_steps, or only every_n_epochs."
            )
        if save_dir is not None and (
            not isinstance(save_dir, (str, os.PathLike)) or os.path.isfile(save_dir)
        ):
            raise FisherInputError(
                f"FisherMonitor: save_dir must be the path of a folder (created when missing) or "
                f"None; got {save_dir!r}"
                + (", an existing file." if isinstance(save_dir, (str, os.PathLike)) else ".")
            )
        check_name("FisherMonitor", name)
        check_dataloader("FisherMonitor", dataloader)
        self.method = method
        self.every_n_epochs = None if every_n_steps is not None else every_n_epochs
        self.every_n_steps = every_n_steps
        self.dataloader = dataloader
        self.log_layer_traces = log_layer_traces
        self.save_dir = save_dir
        self.on_estimate = on_estimate
        self.name = name
        #: the estimator's options (validated; set attributes to change them)
        self.fisher_options = build_fisher_options(
            "FisherMonitor",
            fisher_options,
            {
                "max_samples": max_samples,
                "max_batches": max_batches,
                "probes": probes,
                "mc_samples": mc_samples,
                "classes": classes,
                "output_fn": output_fn,
            },
            fisher_kwargs,
        )
        warn_ignored_options("FisherMonitor", self.fisher_options, [method])
        #: the latest estimate, the optimizer step and epoch it was taken at, and (step, trace) of all
        self.fisher: FisherDiagonal | None = None
        self.step: int | None = None
        self.epoch: int | None = None
        self.history: list[tuple[int, float]] = []
        self._module: pl.LightningModule | None = None
        self._keep_state = False  # the checkpoint being loaded is an evaluation's: keep ours

    @property
    @override
    def state_key(self) -> str:
        return "FisherMonitor" if self.name is None else f"FisherMonitor[{self.name}]"

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Read state that older versions keyed by ``method`` and ``every_n_*``; warn about
        monitor state no monitor of the Trainer claims."""
        settings = {
            "method": self.method,
            "every_n_epochs": self.every_n_epochs,
            "every_n_steps": self.every_n_steps,
        }
        unclaimed = adopt_old_state_key(trainer, self, checkpoint, "FisherMonitor", settings)
        if unclaimed:
            rank_zero_warn(
                f"FisherMonitor: the checkpoint holds FisherMonitor state under {unclaimed}, but "
                f"this callback's key is {self.state_key!r} (name={self.name!r}), so it starts "
                "without the checkpoint's estimate and history; construct it with the `name=` the "
                "checkpoint was written with to restore them."
            )
        # validate/test/predict(ckpt_path=...) restore the weights to evaluate; the estimate and
        # history of the fit stay
        self._keep_state = evaluation_keeps_state(
            trainer, self, checkpoint, self.fisher is not None or bool(self.history)
        )

    def estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> FisherDiagonal:
        """Run the Fisher pass now, keep the result in :attr:`fisher` and log it."""
        start = time.perf_counter()
        loader = fisher_loader(trainer, self.dataloader, "FisherMonitor")
        fd = estimate_fisher(pl_module, loader, self.method, options=self.fisher_options)
        seconds = time.perf_counter() - start
        self.fisher, self.step, self.epoch = fd, trainer.global_step, trainer.current_epoch
        trace = fd.trace()
        self.history.append((trainer.global_step, trace))
        metrics = {
            "fisher/trace": trace,
            "fisher/seconds": seconds,
            "fisher/n_samples": float(fd.n_samples),
        }
        if self.log_layer_traces:
            metrics.update({f"fisher/trace/{k}": v for k, v in _layer_traces(fd).items()})
        log_metrics(trainer, metrics)
        if self.save_dir is not None:
            whole = fd
            if any(sharded.is_dtensor(t) for t in fd.values()):  # gathered on every rank
                whole = FisherDiagonal(
                    sharded.full_tensors(fd), fd.n_samples, fd.method, fd.options, fd.certificate
                )
            elif sharded.is_fsdp1(pl_module):  # pieces gathered whole on every rank
                whole = FisherDiagonal(
                    sharded.full_state(dict(fd), pl_module),
                    fd.n_samples,
                    fd.method,
                    fd.options,
                    fd.certificate,
                )
            if trainer.is_global_zero:
                os.makedirs(self.save_dir, exist_ok=True)
                path = os.path.join(self.save_dir, f"fisher-step={trainer.global_step}.safetensors")
                whole.save(path)
        if self.on_estimate is not None:
            self.on_estimate(trainer, pl_module, fd)
        return fd

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, "lf.FisherMonitor", fsdp2=True, fsdp1=True)
        check_likelihood(pl_module, self.fisher_options.output_fn)
        check_options_at_setup("FisherMonitor", pl_module, self.fisher_options)
        warn_if_schedule_never_fires(
            "FisherMonitor", trainer, self.every_n_epochs, self.every_n_steps
        )
        if any(
            cb is not self and isinstance(cb, FisherMonitor)
            for cb in getattr(trainer, "callbacks", [])
        ):
            rank_zero_warn(
                "FisherMonitor: the Trainer has several FisherMonitor callbacks, and each logs "
                "`fisher/trace`, `fisher/seconds`, `fisher/n_samples`: their values overwrite "
                "each other in the logger (each keeps its own estimate in `.fisher` and "
                "`.history`, and `on_estimate=` receives it)."
            )
        self._module = pl_module

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        prepare_sharded_strategy(trainer)  # FSDP1: the Fisher hook, before the first forward
        check_first_batch("FisherMonitor", trainer, pl_module, self.dataloader, self.fisher_options)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.dataloader is None:  # refuse a training loader the passes cannot read now
            problem = training_loader_problem(trainer.train_dataloader, "FisherMonitor")
            if problem is not None:
                raise FisherInputError(problem)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.every_n_epochs is not None
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        ):
            self.estimate(trainer, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        # Under gradient accumulation several batches end at the same optimizer step.
        if (
            self.every_n_steps is not None
            and step > 0
            and step % self.every_n_steps == 0
            and step != self.step
        ):
            self.estimate(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        # FSDP2 and FSDP1: Lightning writes callback states from rank 0 only, so a sharded
        # estimate is gathered whole here (a collective: every rank builds the checkpoint).
        return {
            "fisher": (
                sharded.full_state(self.fisher.state_dict(), self._module)
                if self.fisher is not None
                else None
            ),
            "step": self.step,
            "epoch": self.epoch,
            "history": [list(h) for h in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._keep_state:
            self._keep_state = False
            return
        fisher = state_dict.get("fisher")
        fsdp1 = self._module is not None and sharded.is_fsdp1(self._module)
        if (
            fisher is not None
            and self._module is not None
            and (sharded.is_fsdp2(self._module) or fsdp1)
        ):
            fisher = sharded.shard_state_like(fisher, self._module)  # each rank's slices
        fd = FisherDiagonal.from_state_dict(fisher) if fisher is not None else None
        if fd is not None and fsdp1:  # its trace sums the ranks' pieces
            mark_pieces(fd, self._module)  # type: ignore[arg-type]
        if fd is not None and self._module is not None:
            try:
                fd.check_matches(self._module)
            except ValueError as err:
                raise FisherInputError(
                    f"FisherMonitor: cannot restore the checkpoint's estimate: {err}"
                ) from None
        self.fisher = fd
        self.step = state_dict.get("step")
        self.epoch = state_dict.get("epoch")
        self.history = [(int(s), float(t)) for s, t in state_dict.get("history", [])]
