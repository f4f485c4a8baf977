"""``FisherDiagnostics``: spectral and bound diagnostics of the Fisher, logged during training.

The callback decides when to look and where to write; ``lightning_fisher.diagnostics`` computes
the numbers and draws the figures.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from typing_extensions import override

from ..diagnostics import (
    DEFAULT_METHODS,
    DiagnosticsResult,
    compute_diagnostics,
    figure_to_rgb,
    log10_layer_values,
    plot_bounds_history,
    plot_layer_density,
    plot_spectral_density,
    plot_spectrum,
    save_png,
)
from ..diagnostics.statistics import (
    DETERMINISTIC_BOUNDS_MAX_CLASSES,
    HISTOGRAM_ENTRIES,
    SHARDED_SPECTRUM_REFUSAL,
    SLQ_ITERS,
    SLQ_STARTS,
    check_methods,
    warn_unused_spectrum_options,
)
from ..options import FisherOptions, check, closest
from ..outputs import ClassSelector, FisherInputError, OutputFn, check_likelihood
from ._utils import (
    check_dataloader,
    check_first_batch,
    check_name,
    check_options_at_setup,
    check_unique_log_keys,
    evaluation_keeps_state,
    fisher_loader,
    log_metrics,
    prepare_sharded_strategy,
    refuse_sharded_strategy,
    training_loader_problem,
    warn_if_schedule_never_fires,
)

#: Sub-folder of a ``CSVLogger``'s log directory that receives the PNG figures.
CSV_FIGURE_DIR = "fisher_diagnostics"


class FisherDiagnostics(Callback):
    r"""Log spectral and bound diagnostics of the Fisher while training.

    Every ``every_n_epochs`` epochs (at ``on_train_epoch_end``) and/or every ``every_n_steps``
    optimizer steps, estimates the Fisher diagonal with each of ``methods`` on ``max_batches``
    batches of ``dataloader`` (``lightning_fisher.diagnostics.compute_diagnostics``) and logs:

    * ``<prefix>/<method>/trace`` and ``<prefix>/<method>/trace/<layer>``: tr(F) per method;
    * ``<prefix>/bounds/lower_over_f`` = tr(lower) / tr(F) and ``<prefix>/bounds/f_over_upper`` =
      tr(F) / tr(upper). With at most ``deterministic_bounds_max_classes`` classes the bounds
      and F are deterministic (``upper``, ``lower`` of rank ``rank``, ``exact`` replace
      ``hutchinson_upper``, ``hutchinson_lower``, ``hutchinson`` in ``methods``), with
      ``<prefix>/certificate/...`` (the lower bound's certificate),
      ``<prefix>/bounds/order_violations`` (0) and ``<prefix>/bounds/lower_f_rel_diff`` (0 for two
      classes); above it the Hutchinson estimates, with standard errors over the probes
      (``<prefix>/<method>/trace_se``, ``<prefix>/bounds/<ratio>_se``) drawn as bands;
    * with ``eigenvalues=k``: ``<prefix>/eig_1`` .. ``eig_k``, the top eigenvalues of F by Lanczos,
      and with ``spectral_density=True`` ``<prefix>/spectral_*`` from stochastic Lanczos
      quadrature, both on the same batches, and a ``spectrum`` figure;
    * ``<prefix>/kernel/...``: means over inputs of the largest eigenvalue of I(p), of 1 - ||p||^2,
      of 1 - max p, and how close the largest eigenvalue sits to its bounds;
    * ``<prefix>/frac_below/<layer>``: fraction of diagonal entries below ``threshold``;
    * ``<prefix>/<method>/cv``: coefficient of variation over probes; ``<prefix>/empirical/rel_gap``
      = sum |E - F| / sum F;
    * histograms of log10 of the diagonal per layer, a figure of the per-layer density of log10 F
      and a figure of the bounds over training;
    * ``<prefix>/fit_index`` (0 for the callback's first ``fit``, 1 for its second, ...) and
      ``<prefix>/cumulative_step`` (optimizer steps over all its fits), so that evaluations of
      several fits (one Trainer per task, whose global step restarts) stay apart.

    Where they go depends on the logger: ``WandbLogger`` gets scalars, histograms, images and a
    per-layer table; ``TensorBoardLogger`` scalars, ``add_histogram`` and ``add_figure``;
    ``CSVLogger`` scalars in ``metrics.csv`` and PNG files in ``<log_dir>/fisher_diagnostics/``; any
    other logger the scalars. Without a logger, results stay on the callback (``history``,
    ``last``) and one warning says so. Drawing figures costs several evaluations' worth of time, so
    by default they are drawn at the end of every ``fit`` that evaluated; ``figure_every_n=k``
    also draws them at the first evaluation and every k-th after it. ``figures()`` draws them on
    demand. The fit index and cumulative step are part of the checkpointed state, so a resumed run
    continues counting; a ``fit`` that makes no training step warns that it evaluated nothing.

    Cost (Hutchinson bounds): per batch of ``max_batches``, one forward shared by every method and
    the kernel statistics, one batched backward (``torch.func.vmap``) for the ``3 * probes``
    Hutchinson cotangents (with the default methods) and one for the empirical Fisher's per-input
    gradients; the weight gradients (one per probe) are most of it. Space evaluations a few
    hundred steps apart to keep them a small fraction of training (``python -m
    benchmarks.diagnostics_overhead`` measures it; the diagnostics docs give figures). Deterministic bounds
    cost 2C + ``rank`` per-input backward columns (``exact``, ``upper``, ``lower``) instead of the
    ``3 * probes`` batch backwards; the spectrum costs one Fisher-vector product (a forward and
    three backward passes over the batches) per Lanczos step, up to ``lanczos_iters`` (default
    40) for the eigenvalues and ``slq_starts * slq_iters`` for the density: off by default.

    Under ``ModelParallelStrategy`` (FSDP2) the diagonals stay sharded like the parameters and
    every scalar logged equals the unsharded (DDP) run's: traces, fractions and gaps are the
    local shards' sums and counts added over the ranks, maxima taken over them; histograms and
    the layer-density figure read the bounded sample of ``histogram_entries`` (drawn in the
    whole parameter's index space, so the same entries as unsharded). The deterministic bounds
    run there (one backward per input and column); ``eigenvalues`` and ``spectral_density`` are
    refused at setup (they need Fisher-vector products on whole parameters). Under
    ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``) the same holds with each diagonal this
    rank's flat piece of its parameter: sums and counts over the ranks' pieces, the sample drawn
    in the whole parameter's flat index space, layers named as in the unwrapped model; the
    Fisher communication hook is registered when the fit starts.

    Probes are drawn with the same seeds at every evaluation, so changes over training come from the
    model, not from new probe noise; the ``hutchinson`` trace logged equals the mean over
    ``i < probes`` of ``lf.estimate_fisher(model, loader, "hutchinson", probes=1, seed=seed + i,
    max_batches=max_batches).trace()``.

    Args:
        every_n_epochs: evaluate at the end of every n-th training epoch (``None``: never).
        every_n_steps: evaluate every n optimizer steps (``None``: never).
        dataloader: ``"val"`` (the first validation loader; the training loader if there is none,
            with a warning), ``"train"`` (the training loader, read in the fixed order every Fisher
            pass of the callbacks uses), or any
            iterable of batches. Each evaluation reads its first ``max_batches`` batches once and
            gives the same batches to every method.
        max_batches: batches of that loader per evaluation and method (``None``: all).
        probes: one-probe estimates per ``hutchinson*`` method; their mean is logged and, with 2
            or more, their coefficient of variation.
        methods: estimators to run (any data-pass method of ``lf.METHODS``); F is ``exact`` when listed, else
            ``hutchinson``.
        threshold: entries below it count as negligible in ``frac_below``.
        seed: seed of the probes (and of ``sample``'s label draws).
        output_fn: ``output_fn(module, batch) -> logits`` when calling the module on a batch is not
            how the logits are obtained.
        classes: restrict the classes that count (the active head of a task-incremental model).
        shift_labels: causal language models: logits at position t predict the token at t + 1
            (``lightning_fisher.hf.lm_fisher_kwargs(model)`` tells).
        histograms: log per-layer histograms of log10 of the diagonal (W&B, TensorBoard).
        figure_every_n: also draw figures at the first and every n-th evaluation (``None``: only at
            the end of training).
        prefix: first component of every logged name.
        name: distinguishes several instances in one Trainer: the checkpoint key is
            ``"FisherDiagnostics"``, or ``"FisherDiagnostics[<name>]"`` with a name.
        deterministic_bounds_max_classes: up to this many classes the bounds and F are computed
            exactly (``None`` or 0: always Hutchinson).
        rank: rank k of the lower bound (top-k eigenpairs of I(p)).
        eigenvalues: log the k largest eigenvalues of F (0: off).
        lanczos_iters: Lanczos steps for them at most (default max(2k + 20, 40)).
        spectral_density: log the SLQ spectral density of F.
        slq_starts: random starts of the density.
        slq_iters: Lanczos steps per start of the density.
        histogram_entries: histograms and the layer-density figure read at most this many
            entries of each parameter's diagonal (a fixed random sample above it; ``None``: all).
        fisher_options: a ``lf.FisherOptions`` for the estimators' other options
            (``param_filter``, ``max_memory_mib``, ``ignore_index``, ...); ``output_fn``,
            ``classes`` and ``shift_labels`` above override its own when set.
    """

    def __init__(
        self,
        *,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        dataloader: str | Iterable[Any] = "val",
        max_batches: int | None = 1,
        probes: int = 2,
        methods: Sequence[str] = DEFAULT_METHODS,
        threshold: float = 1e-5,
        seed: int = 0,
        output_fn: OutputFn | None = None,
        classes: ClassSelector | None = None,
        shift_labels: bool = False,
        histograms: bool = True,
        figure_every_n: int | None = None,
        prefix: str = "fisher",
        name: str | None = None,
        deterministic_bounds_max_classes: int | None = DETERMINISTIC_BOUNDS_MAX_CLASSES,
        rank: int = 1,
        eigenvalues: int = 0,
        lanczos_iters: int | None = None,
        spectral_density: bool = False,
        slq_starts: int = SLQ_STARTS,
        slq_iters: int = SLQ_ITERS,
        fisher_options: FisherOptions | None = None,
        histogram_entries: int | None = HISTOGRAM_ENTRIES,
    ) -> None:
        who = "FisherDiagnostics"
        check(
            who,
            every_n_epochs=("positive_int_or_none", every_n_epochs),
            every_n_steps=("positive_int_or_none", every_n_steps),
            max_batches=("positive_int_or_none", max_batches),
            figure_every_n=("positive_int_or_none", figure_every_n),
            rank=("positive_int", rank),
            lanczos_iters=("positive_int_or_none", lanczos_iters),
            slq_starts=("positive_int", slq_starts),
            slq_iters=("positive_int", slq_iters),
            histogram_entries=("positive_int_or_none", histogram_entries),
            probes=("positive_int", probes),
            threshold=("positive_number", threshold),
            seed=("integer", seed),
            output_fn=("callable_or_none", output_fn),
            classes=("classes", classes),
            shift_labels=("flag", shift_labels),
            histograms=("flag", histograms),
            spectral_density=("flag", spectral_density),
            eigenvalues=("non_negative_int", eigenvalues),
            deterministic_bounds_max_classes=(
                "non_negative_int",
                deterministic_bounds_max_classes or 0,
            ),
        )
        if every_n_epochs is None and every_n_steps is None:
            raise FisherInputError(
                "FisherDiagnostics: set every_n_epochs or every_n_steps; with neither nothing is "
                "ever logged."
            )
        if isinstance(dataloader, str) and dataloader not in ("val", "train"):
            raise FisherInputError(
                f"FisherDiagnostics: dataloader must be 'val', 'train' or an iterable of batches; "
                f"got {dataloader!r}.{closest(dataloader, ('val', 'train'))}"
            )
        if not isinstance(prefix, str) or not prefix.strip("/") or prefix != prefix.strip("/"):
            raise FisherInputError(
                "FisherDiagnostics: prefix must be a non-empty string without a leading or "
                f"trailing '/' (the first component of every logged name); got {prefix!r}."
            )
        warn_unused_spectrum_options(
            who,
            eigenvalues,
            lanczos_iters,
            spectral_density,
            slq_starts,
            slq_iters,
            density_name="spectral_density",
        )
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.dataloader = dataloader
        self.max_batches = max_batches
        self.probes = probes
        self.methods = check_methods(methods)
        self.threshold = threshold
        self.seed = seed
        self.output_fn = output_fn
        self.classes = classes
        self.shift_labels = shift_labels
        self.histograms = histograms
        self.figure_every_n = figure_every_n
        self.prefix = prefix
        self.deterministic_bounds_max_classes = deterministic_bounds_max_classes
        self.rank = rank
        self.eigenvalues = eigenvalues
        self.lanczos_iters = lanczos_iters
        self.spectral_density = spectral_density
        self.slq_starts = slq_starts
        self.slq_iters = slq_iters
        self.histogram_entries = histogram_entries
        if fisher_options is not None and not isinstance(fisher_options, FisherOptions):
            raise FisherInputError(
                "FisherDiagnostics: fisher_options must be a FisherOptions or None; got "
                f"{type(fisher_options).__name__}."
            )
        #: the estimators' other options (``param_filter``, ``max_memory_mib``, ...)
        self.fisher_options = fisher_options
        self._n_classes: int | None = None  # read at the first evaluation
        #: one entry per evaluation: ``step``, ``epoch`` and the global statistics (no prefix).
        self.history: list[dict[str, float]] = []
        #: index of the current (or last) fit, and optimizer steps over all fits
        self.fit_index = -1
        self.cumulative_step = 0
        #: the latest result; its ``fishers`` keeps only the diagonal the figures show (F, or the
        #: first method's). Not saved in checkpoints.
        self.last: DiagnosticsResult | None = None
        self._last_eval: tuple[int, int] | None = None  # (fit index, cumulative step)
        self._figures_eval: tuple[int, int] | None = None
        self._step_base = (0, 0)  # (cumulative step, trainer.global_step) at this fit's start
        self._restored = False  # the state came from a checkpoint of the coming fit
        self._keep_state = False  # the checkpoint being loaded is an evaluation's: keep ours
        self._fit_steps = 0
        self._warned: set[str] = set()
        check_dataloader("FisherDiagnostics", None if isinstance(dataloader, str) else dataloader)
        check_name("FisherDiagnostics", name)
        self.name = name

    @property
    @override
    def state_key(self) -> str:
        return "FisherDiagnostics" if self.name is None else f"FisherDiagnostics[{self.name}]"

    # Hooks --------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, "FisherDiagnostics", fsdp2=True, fsdp1=True)
        check_likelihood(pl_module, self.output_fn)
        if self.fisher_options is not None:
            check_options_at_setup("FisherDiagnostics", pl_module, self.fisher_options)
        check_unique_log_keys("FisherDiagnostics", trainer, self, self.prefix)
        warn_if_schedule_never_fires(
            "FisherDiagnostics", trainer, self.every_n_epochs, self.every_n_steps
        )
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy)) and (
            self.eigenvalues or self.spectral_density
        ):
            raise FisherInputError(
                f"FisherDiagnostics(eigenvalues={self.eigenvalues}, spectral_density="
                f"{self.spectral_density}) under {type(trainer.strategy).__name__}: "
                f"{SHARDED_SPECTRUM_REFUSAL}."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._restored and trainer.ckpt_path is not None):
            self.fit_index += 1  # a fit resumed from a checkpoint keeps the index it had
        self._restored = False
        self._fit_steps = 0
        prepare_sharded_strategy(trainer)  # FSDP1: the Fisher hook, before the first forward
        check_first_batch(
            "FisherDiagnostics", trainer, pl_module, self.dataloader, _pass_options(self)
        )
        if self.dataloader == "val" and not trainer.enable_validation:
            self._warn_once(
                "no_val",
                "FisherDiagnostics(dataloader='val'): the Trainer has no validation dataloader, so "
                "the diagnostics use the training dataloader.",
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After a checkpoint's loops are restored: the cumulative count continues from here.
        self._step_base = (self.cumulative_step, trainer.global_step)
        if self.dataloader == "train" or (
            self.dataloader == "val" and not trainer.enable_validation
        ):  # refuse a training loader the passes cannot read now, before the task trains
            problem = training_loader_problem(trainer.train_dataloader, "FisherDiagnostics")
            if problem is not None:
                raise FisherInputError(problem)

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # validate/test/predict(ckpt_path=...) restore the weights to evaluate; the history of
        # the fits stays
        self._keep_state = evaluation_keeps_state(
            trainer, self, checkpoint, bool(self.history) or self.fit_index > 0
        )

    def _sync_step(self, trainer: Trainer) -> int:
        base, start = self._step_base
        self.cumulative_step = base + trainer.global_step - start
        return self.cumulative_step

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        self._fit_steps += 1

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._sync_step(trainer)
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync_step(trainer)
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._evaluate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        evaluated = self._last_eval is not None and self._last_eval[0] == self.fit_index
        if self.last is not None and evaluated and self._figures_eval != self._last_eval:
            self._log_figures(trainer, self.last)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._fit_steps and trainer.ckpt_path is None:
            rank_zero_warn(
                "FisherDiagnostics: this fit made no training step (the Trainer is at epoch "
                f"{trainer.current_epoch}, global step {trainer.global_step}; max_epochs="
                f"{trainer.max_epochs}, max_steps={trainer.max_steps}), so nothing was trained "
                "or evaluated (and an EWC callback consolidated nothing). A Trainer that reached "
                "its limits does not train again: build a new Trainer for each task (the "
                "callbacks can be reused), or raise max_epochs/max_steps before calling fit again."
            )

    # State --------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(h) for h in self.history],
            "fit_index": self.fit_index,
            "cumulative_step": self.cumulative_step,
            "last_eval": list(self._last_eval) if self._last_eval is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._keep_state:
            self._keep_state = False
            return
        self.history = [dict(h) for h in state_dict.get("history", [])]
        if "fit_index" in state_dict:
            self.fit_index = int(state_dict["fit_index"])
            self.cumulative_step = int(state_dict["cumulative_step"])
            last = state_dict.get("last_eval")
            self._last_eval = (int(last[0]), int(last[1])) if last is not None else None
        else:  # a checkpoint of an older version: one fit, counted by the global step
            self.fit_index = 0
            step = int(state_dict.get("last_step", -1))
            self.cumulative_step = max(step, 0)
            self._last_eval = (0, step) if step >= 0 else None
        self._restored = True

    # Work ---------------------------------------------------------------------------------------
    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        key = (self.fit_index, self.cumulative_step)
        if key == self._last_eval:  # epoch end and a step trigger at the same step
            return
        loader = self._resolve_loader(trainer)
        # Lightning may call hooks after validation ran under inference mode; the estimators need
        # autograd.
        with torch.inference_mode(False), torch.enable_grad():
            result = compute_diagnostics(
                pl_module,
                loader,
                self.methods,
                self.probes,
                self.max_batches,
                self.threshold,
                self.seed,
                self.output_fn,
                self.classes,
                shift_labels=self.shift_labels,
                deterministic_bounds_max_classes=self.deterministic_bounds_max_classes,
                rank=self.rank,
                n_classes=self._n_classes,
                eigenvalues=self.eigenvalues,
                lanczos_iters=self.lanczos_iters,
                density=self.spectral_density,
                slq_starts=self.slq_starts,
                slq_iters=self.slq_iters,
                options=self.fisher_options,
                histogram_entries=self.histogram_entries,
            )
        if "n_classes" in result.values and self.classes is None:  # a selector may change C
            self._n_classes = int(result.values["n_classes"])
        # Keep one diagonal (the one the figures show), not one per method: each is model-sized.
        result.fishers = {result.reference or self.methods[0]: result.density_fisher}
        self.last, self._last_eval = result, key
        self.history.append(
            {
                "step": float(trainer.global_step),
                "epoch": float(trainer.current_epoch),
                "fit_index": float(self.fit_index),
                "cumulative_step": float(self.cumulative_step),
                **result.values,
            }
        )
        self._log(trainer, result)

    def _resolve_loader(self, trainer: Trainer) -> Iterable[Any]:
        if not isinstance(self.dataloader, str):
            return self.dataloader
        if self.dataloader == "val":
            loader = _first(trainer.val_dataloaders)
            if loader is None:
                try:  # validation has not run yet (num_sanity_val_steps=0, first epoch)
                    trainer.fit_loop.epoch_loop.val_loop.setup_data()
                    loader = _first(trainer.val_dataloaders)
                except Exception:
                    loader = None
            if loader is not None:
                return loader
            self._warn_once(
                "no_val",
                "FisherDiagnostics(dataloader='val'): the Trainer has no validation dataloader, so "
                "the diagnostics use the training dataloader.",
            )
        # The training loader in a fixed order, with the checks every callback's Fisher pass makes.
        return fisher_loader(trainer, None, "FisherDiagnostics")

    def _log(self, trainer: Trainer, result: DiagnosticsResult) -> None:
        if not trainer.loggers:
            self._warn_once(
                "no_logger",
                "FisherDiagnostics: the Trainer has no logger; the results are kept on the callback "
                "(`.history`, `.last`).",
            )
            return
        counters = {
            "fit_index": float(self.fit_index),
            "cumulative_step": float(self.cumulative_step),
        }
        log_metrics(
            trainer,
            {
                **result.scalars(self.prefix),
                **{f"{self.prefix}/{k}": v for k, v in counters.items()},
            },
        )
        if self.histograms and trainer.is_global_zero:
            self._log_histograms(trainer.loggers, result, trainer.global_step)
        n = len(self.history)
        if self.figure_every_n is not None and (n - 1) % self.figure_every_n == 0:
            self._log_figures(trainer, result)

    def _log_histograms(
        self, loggers: Sequence[Logger], result: DiagnosticsResult, step: int
    ) -> None:
        targets = [lg for lg in loggers if isinstance(lg, (TensorBoardLogger, WandbLogger))]
        if not targets:
            return
        logs = log10_layer_values(result.shown_entries)
        for logger in targets:
            if isinstance(logger, TensorBoardLogger):
                for layer, values in logs.items():
                    if values.numel():
                        logger.experiment.add_histogram(
                            f"{self.prefix}/log10_diag/{layer}", values, step
                        )
            else:
                import wandb

                hists = {
                    f"{self.prefix}/log10_diag/{layer}": wandb.Histogram(
                        np_histogram=np.histogram(values.numpy(), bins=64)
                    )
                    for layer, values in logs.items()
                    if values.numel()
                }
                logger.experiment.log({**hists, "trainer/global_step": step})

    def figures(self, result: DiagnosticsResult | None = None) -> dict[str, Figure]:
        """The figures of ``result`` (default: the latest): ``layer_density``, ``bounds`` and,
        when the spectrum was computed, ``spectrum``."""
        result = result or self.last
        if result is None:
            raise RuntimeError("FisherDiagnostics has not evaluated yet; there is nothing to draw.")
        figures = {
            "layer_density": plot_layer_density(result.shown_entries, self.threshold),
            "bounds": plot_bounds_history(self.history, x="cumulative_step"),
        }
        if result.spectrum is not None:
            figures["spectrum"] = plot_spectrum(result.spectrum, result.density)
        elif result.density is not None:
            figures["spectrum"] = plot_spectral_density(result.density)
        return figures

    def _log_figures(self, trainer: Trainer, result: DiagnosticsResult) -> None:
        self._figures_eval = self._last_eval
        if not trainer.is_global_zero:
            return
        targets = [
            lg
            for lg in trainer.loggers
            if isinstance(lg, (TensorBoardLogger, WandbLogger, CSVLogger))
        ]
        if not targets:
            return
        step = trainer.global_step
        cumulative = self._last_eval[1] if self._last_eval is not None else step
        figures = self.figures(result)
        for logger in targets:
            if isinstance(logger, TensorBoardLogger):
                for name, fig in figures.items():
                    logger.experiment.add_figure(f"{self.prefix}/{name}", fig, step, close=False)
            elif isinstance(logger, WandbLogger):
                for name, fig in figures.items():
                    logger.log_image(f"{self.prefix}/{name}", [figure_to_rgb(fig)], step=step)
                columns = list(result.layers[0])
                logger.log_table(
                    f"{self.prefix}/layers",
                    columns,
                    [[row[c] for c in columns] for row in result.layers],
                    step=step,
                )
            else:
                folder = os.path.join(logger.log_dir, CSV_FIGURE_DIR)
                save_png(
                    figures["layer_density"],
                    os.path.join(folder, f"layer_density_step{cumulative:06d}.png"),
                )
                save_png(figures["bounds"], os.path.join(folder, "bounds.png"))
                if "spectrum" in figures:
                    save_png(
                        figures["spectrum"],
                        os.path.join(folder, f"spectrum_step{cumulative:06d}.png"),
                    )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _pass_options(cb: FisherDiagnostics) -> FisherOptions:
    """The options of the callback's passes: its ``fisher_options`` with ``output_fn``,
    ``classes`` and ``shift_labels`` set on the callback overriding them (as
    ``compute_diagnostics`` does)."""
    overrides: dict[str, Any] = {"output_fn": cb.output_fn, "classes": cb.classes}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if cb.shift_labels:
        overrides["shift_labels"] = True
    return FisherOptions.build(cb.fisher_options, **overrides)


def _first(loaders: Any) -> Any:
    """The first loader of what Lightning holds (one loader, a list or a dict of them), or None."""
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders
