"""Fisher-trace regulariser as a Lightning callback.

Adds the gradient of ``alpha * R`` to the parameters' gradients, where R is the differentiable
Hutchinson trace estimate of ``lightning_fisher.regularizers.fisher_trace_penalty``:

    R = (1/P) sum_k ||v_k||^2 / |B|,  v_k = J^T L(p) xi_k,  E[R] = tr(F_B).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from .. import sharded, sharded_fsdp1
from ..options import PROBE_DISTRIBUTIONS, check, check_choice, check_param_filter
from ..outputs import ClassSelector, FisherInputError, OutputFn, check_likelihood
from ..regularizers import fisher_trace_penalty_grads
from ._utils import (
    accumulation_fraction,
    all_reduce_mean_,
    check_name,
    evaluation_keeps_state,
    grad_scale,
    prepare_sharded_strategy,
    refuse_sharded_strategy,
)


class FisherTraceRegularizer(Callback):
    r"""Penalise the Fisher's trace: the objective becomes ``loss + alpha * tr(F_B)`` (Hutchinson).

    How: the training batch's graph is gone after its backward, so on a regularised step the
    callback keeps the step's (micro-)batches and, in ``on_before_optimizer_step``, recomputes a
    forward on each, builds v = J^T L(p) xi with ``create_graph=True`` and adds
    ``alpha * dR/dtheta`` (averaged over the micro-batches and, under DDP, over ranks, like the
    loss) to ``.grad``. That is before gradient clipping and after AMP unscaling, so the update
    equals the one from ``loss + alpha * fisher_trace_penalty(module, batch)``.

    Under ``ModelParallelStrategy`` (FSDP2) the recomputation runs on the whole parameters
    (``lightning_fisher.sharded.unsharded_parameters``: one all-gather, the whole model on
    every rank for the step's regulariser; a double backward cannot run through FSDP2's
    per-module resharding), and the gradient, averaged over the ranks like DDP's, is added to
    each rank's local gradient shards: the update equals the DDP run's. Under ``FSDPStrategy``
    (FSDP1, ``use_orig_params=True``), which cannot double-backward through its flat
    parameters (it frees the gathered flat parameter after each backward and reduces gradients
    in hooks on it), the recomputation gathers the whole parameters from the ranks' pieces and
    runs the wrapped modules' own forward on them outside FSDP1
    (``lightning_fisher.sharded_fsdp1.whole_parameters``; the same cost as under FSDP2); each
    rank adds its flat piece of the rank-averaged gradient. FSDP1 ``MixedPrecision`` parameter
    dtypes are refused there.

    Under manual optimization the gradient is added in the ``opt.step()`` of the optimizer that
    ``self.optimizers()`` returns (after clipping the ``training_step`` does itself); several
    optimizers are refused when the fit starts.

    Cost of a regularised step: one more forward, one backward with ``create_graph`` per probe and
    one double-backward, about 3-4x a plain training step (plus one gradient-sized all-reduce under
    DDP); use ``every_n_steps`` to amortise it. The recomputation runs in the module's current
    (train) mode, under the trainer's precision, and leaves BatchNorm statistics unchanged.

    Args:
        alpha: strength of the penalty.
        probes: probe vectors per batch (the variance of R falls as 1/probes).
        every_n_steps: regularise every n-th optimizer step.
        output_fn: ``output_fn(module, batch) -> logits`` if calling the module is not how the
            logits are obtained.
        classes: active classes of a multi-head model (sequence or ``classes(batch)``).
        probe_distribution: ``rademacher`` or ``gaussian``.
        seed: probes are drawn from ``seed``, the global step and the DDP rank, so a resumed run
            draws the same probes.
        param_filter: regularise the trace over these parameters only (by name).
        log: log ``fisher_trace/estimate`` (R) and ``fisher_trace/penalty`` (alpha R).
        name: distinguishes several instances in one Trainer: the checkpoint key is
            ``"FisherTraceRegularizer"``, or ``"FisherTraceRegularizer[<name>]"`` with a name.
    """

    def __init__(
        self,
        *,
        alpha: float,
        probes: int = 1,
        every_n_steps: int = 1,
        output_fn: OutputFn | None = None,
        classes: ClassSelector | None = None,
        probe_distribution: str = "rademacher",
        seed: int = 0,
        param_filter: Callable[[str], bool] | None = None,
        log: bool = True,
        name: str | None = None,
    ) -> None:
        who = "FisherTraceRegularizer"
        check(
            who,
            alpha=("non_negative_number", alpha),
            probes=("positive_int", probes),
            every_n_steps=("positive_int", every_n_steps),
            output_fn=("callable_or_none", output_fn),
            classes=("classes", classes),
            seed=("integer", seed),
            param_filter=("callable_or_none", param_filter),
            log=("flag", log),
        )
        check_choice(who, "probe_distribution", probe_distribution, PROBE_DISTRIBUTIONS)
        check_name("FisherTraceRegularizer", name)
        self.alpha = float(alpha)
        self.probes = probes
        self.every_n_steps = every_n_steps
        self.output_fn = output_fn
        self.classes = classes
        self.probe_distribution = probe_distribution
        self.seed = seed
        self.param_filter = param_filter
        self.log = log
        self.name = name
        self._pending: list[Any] = []
        #: regularised optimizer steps so far, and the latest trace estimate R
        self.applied_steps = 0
        self.last_trace: float | None = None
        self._keep_state = False  # the checkpoint being loaded is an evaluation's: keep ours

    @property
    @override
    def state_key(self) -> str:
        base = "FisherTraceRegularizer"
        return base if self.name is None else f"{base}[{self.name}]"

    def probe_generator(self, step: int, rank: int, device: torch.device) -> torch.Generator:
        """The generator whose draws give the probes of optimizer step ``step`` on ``rank``."""
        generator = torch.Generator(device=device)
        generator.manual_seed(((self.seed * 1_000_003 + step) * 65_537 + rank) % 2**63)
        return generator

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, "lf.FisherTraceRegularizer", fsdp2=True, fsdp1=True)
        check_likelihood(pl_module, self.output_fn)
        check_param_filter("FisherTraceRegularizer", pl_module, self.param_filter)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        prepare_sharded_strategy(trainer)  # FSDP1: no Fisher pass here, but one hook per model
        if not pl_module.automatic_optimization and len(trainer.optimizers) > 1:
            # The first step of a batch would take the regulariser's gradient for its own
            # parameters only, and the other optimizers' parameters would get none.
            raise FisherInputError(
                "lf.FisherTraceRegularizer supports one optimizer under manual optimization; got "
                f"{len(trainer.optimizers)}. With several optimizers (a GAN, say) only you know "
                "which loss carries the penalty: add `alpha * fisher_trace_penalty(self, batch)` "
                "(from lightning_fisher.regularizers) to it in `training_step` instead."
            )

    def _due(self, trainer: pl.Trainer) -> bool:
        return self.alpha > 0 and trainer.global_step % self.every_n_steps == 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._due(trainer):
            self._pending.append(batch)  # already on the device; a reference, not a copy

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        batches, self._pending = self._pending, []
        if not batches or not self._due(trainer):
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        generator = self.probe_generator(trainer.global_step, trainer.global_rank, pl_module.device)
        fsdp2 = sharded.is_fsdp2(pl_module)
        fsdp1 = not fsdp2 and sharded.is_fsdp1(pl_module)
        names = {id(p): n for n, p in pl_module.named_parameters()}
        if (fsdp2 or fsdp1) and any(id(p) not in names for p in params):
            raise FisherInputError(
                f"lf.FisherTraceRegularizer under {'FSDP2' if fsdp2 else 'FSDP1'} needs every "
                "optimized parameter to be a parameter of the LightningModule (the regulariser "
                "differentiates the whole parameters by name); the optimizer holds others."
            )
        hold: AbstractContextManager[dict[str, torch.Tensor]] = nullcontext({})
        if fsdp2:
            hold = sharded.unsharded_parameters(pl_module)
        elif fsdp1:
            hold = sharded_fsdp1.whole_parameters(pl_module, "lf.FisherTraceRegularizer")
        with hold as whole:
            # under FSDP the double backward runs on the whole parameters, named alike
            targets = [whole[names[id(p)]] for p in params] if fsdp2 or fsdp1 else params
            extra, trace = fisher_trace_penalty_grads(
                pl_module,
                batches,
                targets,
                self.alpha,
                self.probes,
                output_fn=self.output_fn,
                classes=self.classes,
                probe_distribution=self.probe_distribution,
                generator=generator,
                param_filter=self.param_filter,
                forward_context=trainer.precision_plugin.forward_context,
            )
        all_reduce_mean_([*extra, trace])  # DDP averages the loss gradient over ranks
        if fsdp2:  # every rank keeps its shard of the mean gradient
            extra = [sharded.local_slice(e, p) for e, p in zip(extra, params)]
        elif fsdp1:  # every rank keeps its piece of the mean gradient
            cut = sharded_fsdp1.local_pieces(
                {names[id(p)]: e for p, e in zip(params, extra)}, pl_module
            )
            extra = [cut[names[id(p)]] for p in params]
        # The mean over the n micro-batches, as the loss route's sum of alpha R_b / k is n/k of
        # it (n < k in an epoch's last, shorter accumulation window).
        scale = grad_scale(trainer, optimizer) * accumulation_fraction(trainer)
        with torch.no_grad():
            for p, e in zip(params, extra):
                if not e.numel():  # an FSDP1 piece this rank does not hold
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(e.to(p.grad.dtype), alpha=scale)
        self.applied_steps += 1
        self.last_trace = float(trace)
        if self.log:
            pl_module.log(
                "fisher_trace/estimate", trace.float(), on_step=True, on_epoch=False, batch_size=1
            )
            pl_module.log(
                "fisher_trace/penalty",
                self.alpha * trace.float(),
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"applied_steps": self.applied_steps, "last_trace": self.last_trace}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # validate/test/predict(ckpt_path=...) restore the weights to evaluate; the counts stay
        self._keep_state = evaluation_keeps_state(trainer, self, checkpoint, self.applied_steps > 0)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._keep_state:
            self._keep_state = False
            return
        self.applied_steps = int(state_dict["applied_steps"])
        self.last_trace = state_dict.get("last_trace")
