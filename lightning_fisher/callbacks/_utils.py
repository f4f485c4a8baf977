"""Small helpers shared by the callbacks: the Fisher data, gradient scale, logging, DDP means."""

from __future__ import annotations

import ast
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from ..estimators import DATA_METHODS, REGISTRY, lookup
from ..options import FisherOptions, check, check_param_filter, closest
from ..outputs import FisherInputError


def fisher_loader(trainer: pl.Trainer, dataloader: Iterable[Any] | None, who: str) -> Iterable[Any]:
    """The data of a Fisher pass: the user's ``dataloader``, else the trainer's training loader.

    Under DDP the training loader carries the ``DistributedSampler`` Lightning injected, so every
    rank estimates on its own shard and the estimator's all-reduce gives the Fisher of the union.
    A shuffled training loader is read in a fixed order (see :func:`fixed_order`).
    """
    if dataloader is not None:
        return dataloader
    loader = trainer.train_dataloader
    problem = training_loader_problem(loader, who, trainer.training)
    if problem is not None:
        raise FisherInputError(problem)
    return fixed_order(loader)


def training_loader_problem(loader: Any, who: str, training: bool = True) -> str | None:
    """Why ``who`` cannot run a Fisher pass on the training dataloader ``loader`` (while
    ``training``), or ``None``. Callbacks check it when training starts, so that a loader they
    cannot use is refused before the task trains rather than at its end."""
    if loader is None:
        return (
            f"{who} has no data for its Fisher pass: the trainer has no training dataloader "
            f"loaded. Pass `dataloader=` to {who}."
        )
    if isinstance(loader, (Mapping, list, tuple)):
        return (
            f"{who} cannot estimate a Fisher on several training dataloaders "
            f"({type(loader).__name__} of {len(loader)}, e.g. a CombinedLoader); pass the one to "
            f"use with `dataloader=` to {who}."
        )
    if training and getattr(loader, "persistent_workers", False) and fixed_order(loader) is loader:
        # A second iter() on a loader with persistent workers resets the training iterator; a
        # plain DataLoader is read through a copy without persistent workers instead.
        return (
            f"{who} would re-iterate the training dataloader while training, which resets a "
            f"loader with `persistent_workers=True` ({type(loader).__name__} with "
            f"{type(getattr(loader, 'sampler', None)).__name__}). Pass a separate `dataloader=` "
            f"for the Fisher to {who}."
        )
    return None


def fixed_order(loader: Any, seed: int = 0) -> Any:
    """``loader`` with its shuffling sampler replaced by one shuffle that is the same every time.

    The Fisher is a sum over the data, but its floating-point rounding and the pairing of seeded
    label/probe draws with inputs depend on the order. A shuffled training loader's order is set
    by the epoch the sampler last saw, which a run resumed from a checkpoint at the end of a fit
    does not replay; a fixed (seeded) permutation makes the pass the same in both (bitwise),
    while ``max_batches`` still sees a random part of a data set sorted by class. Handles a plain
    ``DataLoader`` with ``RandomSampler`` (``shuffle=True``) or a shuffling ``DistributedSampler``
    (each rank keeps a shard: the sampler's own seed at epoch 0); a loader with
    ``persistent_workers=True`` and a sequential sampler is read through a copy without
    persistent workers (iterating the loader itself would reset the training iterator); anything
    else is returned as it is (a custom sampler: pass a ``dataloader=`` to the callback for a
    resume-exact Fisher).
    """
    if type(loader) is not DataLoader or type(loader.batch_sampler) is not BatchSampler:
        return loader
    sampler = loader.sampler
    fixed: Sampler[int]
    if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
        generator = torch.Generator().manual_seed(seed)  # fresh per pass: the same permutation
        fixed = RandomSampler(loader.dataset, generator=generator)  # type: ignore[arg-type]
    elif loader.persistent_workers and (
        type(sampler) is SequentialSampler
        or (type(sampler) is DistributedSampler and not sampler.shuffle)
    ):
        # Its order does not depend on state; a separate loader keeps the training iterator's
        # persistent workers untouched.
        fixed = sampler
    elif type(sampler) is DistributedSampler and sampler.shuffle:
        fixed = DistributedSampler(  # a new sampler stays at epoch 0
            loader.dataset,
            num_replicas=sampler.num_replicas,
            rank=sampler.rank,
            shuffle=True,
            seed=sampler.seed,
            drop_last=sampler.drop_last,
        )
    else:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=fixed,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        prefetch_factor=loader.prefetch_factor,
        in_order=loader.in_order,
        persistent_workers=False,  # never shares the training loader's workers
    )


def build_fisher_options(
    who: str,
    options: FisherOptions | None,
    conveniences: Mapping[str, Any],
    fisher_kwargs: Mapping[str, Any] | None,
) -> FisherOptions:
    """The callback's ``FisherOptions``: ``options``, then the keyword ``conveniences`` that are
    not ``None``, then ``fisher_kwargs``; a name that is not an option or a value it refuses
    raises a ``FisherInputError`` when the callback is built, not after a task trained."""
    check(who, fisher_kwargs=("mapping_or_none", fisher_kwargs))
    overrides = {k: v for k, v in conveniences.items() if v is not None}
    overrides.update(fisher_kwargs or {})
    try:
        return FisherOptions.build(options, **overrides)
    except FisherInputError as err:
        raise FisherInputError(f"{who}: {err}") from None


def check_method(who: str, method: str, *, data_pass: bool) -> str:
    """The registered name of ``method`` (deprecated aliases resolve with a warning); with
    ``data_pass``, a method that reads no data is refused."""
    try:
        info = lookup(method)
    except FisherInputError:
        choices = DATA_METHODS if data_pass else tuple(REGISTRY)
        raise FisherInputError(
            f"{who}: unknown Fisher method {method!r}; choose one of "
            f"{', '.join(choices)}.{closest(method, choices)}"
        ) from None
    if data_pass and not info.data_pass:
        raise FisherInputError(
            f"{who}: method={info.name!r} reads no data; choose one of {', '.join(DATA_METHODS)}."
        )
    return info.name


def check_name(who: str, name: Any) -> None:
    """Raise a ``FisherInputError`` for a callback ``name`` that is not a non-empty string or None."""
    if name is not None and (not isinstance(name, str) or not name):
        raise FisherInputError(f"{who}: name must be a non-empty string or None; got {name!r}.")


def check_dataloader(who: str, loader: Any) -> None:
    """Raise a ``FisherInputError`` for a Fisher dataloader that is not iterable or is empty."""
    if loader is None:
        return
    if isinstance(loader, (str, bytes, Tensor, Mapping)) or not isinstance(loader, Iterable):
        raise FisherInputError(
            f"{who}: the Fisher dataloader must be an iterable of batches (a DataLoader); got "
            f"{type(loader).__name__}."
        )
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return  # an iterable without a length: checked when the pass reads it
    if n == 0:
        raise FisherInputError(
            f"{who}: the Fisher dataloader is empty (0 batches); it needs the data of the task "
            "(for a DataLoader with drop_last=True, at least one full batch)."
        )


def check_options_at_setup(who: str, module: torch.nn.Module, options: FisherOptions) -> None:
    """The checks of a callback's Fisher options that need the model, run in ``setup`` before
    the first step: a ``param_filter`` must keep at least one trainable parameter."""
    check_param_filter(who, module, options.param_filter)


def check_first_batch(
    who: str,
    trainer: pl.Trainer,
    module: torch.nn.Module,
    loader: Iterable[Any] | str | None,
    options: FisherOptions | None,
) -> None:
    """Run the model once (eval mode, no gradients) on the first batch of a Fisher dataloader
    the user passed, when the fit starts (the module on its device): batches the model cannot
    take, labels outside ``classes`` or an ``output_fn`` that fails are refused before the first
    training step instead of at the Fisher pass after training.

    Skipped for the trainer's own loaders, for one-shot iterators (reading would consume a batch)
    and under sharded strategies (their forward is a collective).
    """
    if loader is None or isinstance(loader, str) or not checks_training_batches(trainer):
        return
    params = list(module.parameters())
    if not params or params[0].is_meta:
        return
    batches = iter(loader)
    if batches is loader:
        return
    batch = next(batches, None)
    del batches  # a DataLoader's workers stop here
    if batch is None:
        raise FisherInputError(
            f"{who}: the Fisher dataloader yielded no batches; it needs the data of the task."
        )
    check_fisher_batch(who, module, batch, options, "the first batch of the Fisher dataloader")


def check_fisher_batch(
    who: str,
    module: torch.nn.Module,
    batch: Any,
    options: FisherOptions | None,
    source: str,
) -> None:
    """Run the model once (eval mode, no gradients) on ``batch`` as the Fisher pass will: a batch
    the model cannot take, labels outside ``classes`` or an ``output_fn`` that fails raise a
    ``FisherInputError`` naming ``source``."""
    from ..estimators.base import eval_mode
    from ..outputs import model_outputs, move_batch

    params = list(module.parameters())
    if not params or params[0].is_meta:
        return
    opts = options if options is not None else FisherOptions()
    try:
        with torch.no_grad(), eval_mode(module):
            model_outputs(
                module,
                move_batch(batch, params[0].device),
                opts.output_fn,
                opts.classes,
                opts.shift_labels,
                opts.ignore_index,
            )
    except FisherInputError as err:
        raise FisherInputError(f"{who}: on {source}: {err}") from None
    except Exception as err:
        raise FisherInputError(
            f"{who}: the model cannot take {source} ({type(err).__name__}: {err}); expected "
            "batches like the training ones (or an `output_fn(module, batch)` that returns the "
            "logits)."
        ) from err


def checks_training_batches(trainer: pl.Trainer) -> bool:
    """Whether a callback may run the model on a training batch outside the training step: not
    under sharded strategies, whose forward is a collective."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    return isinstance(getattr(trainer, "strategy", None), (SingleDeviceStrategy, DDPStrategy))


def warn_if_schedule_never_fires(
    who: str, trainer: pl.Trainer, every_n_epochs: int | None, every_n_steps: int | None
) -> None:
    """Warn in ``setup`` when ``every_n_epochs`` / ``every_n_steps`` exceed the fit's
    ``max_epochs`` / ``max_steps``: the periodic work would never run in this fit."""
    max_epochs = getattr(trainer, "max_epochs", None)
    max_steps = getattr(trainer, "max_steps", None)
    epochs_fire = every_n_epochs is not None and (
        max_epochs in (None, -1) or every_n_epochs <= max_epochs
    )
    steps_fire = every_n_steps is not None and (
        max_steps in (None, -1) or every_n_steps <= max_steps
    )
    if not (epochs_fire or steps_fire):
        parts = []
        if every_n_epochs is not None:
            parts.append(f"every_n_epochs={every_n_epochs} > max_epochs={max_epochs}")
        if every_n_steps is not None:
            parts.append(f"every_n_steps={every_n_steps} > max_steps={max_steps}")
        rank_zero_warn(
            f"{who}: {' and '.join(parts)}: its schedule never fires in this fit, so it estimates "
            "nothing; lower every_n_epochs / every_n_steps."
        )


def check_unique_log_keys(
    who: str, trainer: pl.Trainer, callback: pl.Callback, prefix: str
) -> None:
    """Refuse, in ``setup``, another callback of the same type that logs under the same
    ``prefix``: their metrics would overwrite each other in the logger."""
    others = [
        cb
        for cb in getattr(trainer, "callbacks", [])
        if cb is not callback
        and type(cb) is type(callback)
        and getattr(cb, "prefix", None) == prefix
    ]
    if others:
        raise FisherInputError(
            f"{who}: {len(others) + 1} {type(callback).__name__} callbacks log under the same "
            f"prefix {prefix!r}, so their metrics would overwrite each other; give each its own "
            "`prefix=`."
        )


def training_finished(trainer: pl.Trainer) -> bool:
    """Whether the running ``fit`` has made its last optimizer step (valid in the hooks of a step,
    of its validation and of the epoch's end): ``max_steps`` reached, the last batch of the last
    epoch done, or ``trainer.should_stop`` set (early stopping, a timer) where the loop may stop."""
    from lightning.pytorch.trainer.states import TrainerFn

    if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
        return False
    loop = trainer.fit_loop
    if loop.max_steps not in (-1, None) and trainer.global_step >= loop.max_steps:
        return True
    epoch_done = loop.epoch_loop._num_ready_batches_reached()
    max_epochs = loop.max_epochs
    if epoch_done and max_epochs not in (-1, None) and trainer.current_epoch + 1 >= max_epochs:
        return True
    return bool(trainer.should_stop and loop._can_stop_early)


def refuse_sharded_strategy(
    trainer: pl.Trainer, who: str, fsdp2: bool = False, fsdp1: bool = False
) -> None:
    """Raise a clear error at setup under a strategy that shards the parameters in a way ``who``
    does not support.

    ``fsdp2=True``: ``who`` supports ``ModelParallelStrategy`` (FSDP2, ``fully_shard``), whose
    parameters are DTensors sharded per parameter: its Fisher and EWC state are kept sharded like
    them (``lightning_fisher.sharded``). ``fsdp1=True``: ``who`` supports ``FSDPStrategy`` (FSDP1)
    with ``use_orig_params=True`` and a non-hybrid sharding strategy: its state is kept as each
    parameter's flat local piece (``lightning_fisher.sharded_fsdp1``; the callback registers the
    Fisher communication hook when the fit starts, :func:`prepare_sharded_strategy`). DeepSpeed
    holds flattened partitions and is refused, with what is missing. DDP is supported.
    """
    from lightning.pytorch.strategies import (
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    strategy = trainer.strategy
    name = type(strategy).__name__
    if isinstance(strategy, ModelParallelStrategy) and fsdp2:
        return
    if isinstance(strategy, DeepSpeedStrategy):
        missing = (
            "ZeRO (stages 1-3) keeps flattened partitions of the parameters, gradients and Adam "
            "state, with no per-parameter shard views and no hook to square gradients before "
            "their reduction, which sharded Fisher estimates, the EWC penalty gradient and the "
            "Squisher need; a ZeRO route (squared-gradient reduction inside DeepSpeed's "
            "partitioned backward, Fisher state per flat partition) is not implemented"
        )
    elif isinstance(strategy, FSDPStrategy) and fsdp1:
        _check_fsdp1_strategy(strategy, who)
        return
    elif isinstance(strategy, FSDPStrategy):
        missing = (
            "FSDP1 keeps each parameter as a flat 1-D piece of its rank's shard, and this "
            "callback's work on whole parameters or DTensor shards is not implemented for flat "
            "pieces"
        )
    elif isinstance(strategy, ModelParallelStrategy):
        missing = "this callback needs whole parameters on every rank"
    else:
        return
    supported = "strategy='ddp'" + (" or ModelParallelStrategy (FSDP2)" if fsdp2 else "")
    raise FisherInputError(
        f"{who} does not support {name}: it shards the parameters across ranks, and {missing}. "
        f"Use {supported} (under DDP each rank estimates on its shard of the data; the "
        "all-reduced Fisher is identical on every rank)."
    )


def _check_fsdp1_strategy(strategy: Any, who: str) -> None:
    """Refuse ``FSDPStrategy`` settings the FSDP1 route cannot serve, before any training step."""
    if not strategy.kwargs.get("use_orig_params", True):
        raise FisherInputError(
            f"{who} under FSDPStrategy needs use_orig_params=True (each named parameter, its "
            "gradient and its Fisher are then a flat piece of the rank's shard); got "
            "use_orig_params=False. Leave it at Lightning's default True."
        )
    kind = str(getattr(strategy, "sharding_strategy", ""))
    if "HYBRID" in kind:
        raise FisherInputError(
            f"{who} under FSDPStrategy supports FULL_SHARD, SHARD_GRAD_OP and NO_SHARD; got "
            f"{kind}, whose inter-node reduction accepts no communication hook."
        )


def prepare_sharded_strategy(trainer: pl.Trainer) -> None:
    """Under ``FSDPStrategy``, register the Fisher communication hook on the wrapped model (once;
    call it when the fit starts: after wrapping, before the first forward); refuse an FSDP2 model
    this torch cannot serve, before the first step."""
    from lightning.pytorch.strategies import FSDPStrategy

    from ..sharded import check_fsdp2_supported

    if trainer.lightning_module is not None:
        check_fsdp2_supported(trainer.lightning_module, "A Fisher callback")
    if isinstance(trainer.strategy, FSDPStrategy) and trainer.strategy.model is not None:
        from ..sharded_fsdp1 import register_fisher_hook

        register_fisher_hook(trainer.strategy.model)


def grad_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> float:
    """Factor by which gradients seen in ``on_before_optimizer_step`` are still scaled.

    Lightning unscales fp16 (``16-mixed``) gradients before that hook, except for optimizers that
    unscale inside their own ``step`` (fused Adam): those still hold ``scale * grad``, so anything a
    callback adds must be scaled the same way.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return 1.0
    return float(scaler.get_scale())


def accumulation_fraction(trainer: pl.Trainer) -> float:
    """n / k for the optimizer step being taken (valid in ``on_before_optimizer_step``), where k is
    ``accumulate_grad_batches`` and n the micro-batches accumulated for this step.

    Lightning divides every micro-batch's loss by k, and an epoch whose batch count k does not
    divide ends with a step of n < k micro-batches: a term added to every micro-batch's loss then
    contributes n/k of its gradient to that step. A gradient a callback adds once per step is
    scaled by this, so that the update stays the one of the explicit loss. 1 under manual
    optimization (the ``training_step`` scales its own losses).
    """
    k = trainer.accumulate_grad_batches
    if k == 1 or not trainer.lightning_module.automatic_optimization:
        return 1.0
    ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return ((ready - 1) % k + 1) / k


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Send metrics straight to every logger (works in hooks where ``self.log`` is not allowed)."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """In-place mean over DDP ranks, with one collective for all tensors (no-op without DDP)."""
    n = world_size()
    if n == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= n
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def adopt_old_state_key(
    trainer: pl.Trainer,
    callback: pl.Callback,
    checkpoint: dict[str, Any],
    base: str,
    settings: Mapping[str, Any],
    *,
    into_state: bool = False,
) -> list[str]:
    """Move ``callback``'s state in ``checkpoint`` from a key of older versions to its
    ``state_key``; returns the keys of this kind that no callback of the Trainer claims.

    Older versions put settings in the key (``base{'method': 'exact', ...}``), so a changed
    setting dropped the state silently. The state moves when its own key is absent and exactly
    one old key has ``settings`` (or the only unclaimed key of this kind is an old one). With
    ``into_state`` the old key's settings are copied into the moved state.
    """
    states = checkpoint.get("callbacks")
    if not isinstance(states, dict) or callback.state_key in states:
        return []
    kind = type(callback)
    claimed = {cb.state_key for cb in getattr(trainer, "callbacks", []) if isinstance(cb, kind)}
    old_prefix = base + "{"
    unclaimed = [
        k
        for k in states
        if isinstance(k, str)
        and (k == base or k.startswith((base + "[", old_prefix)))
        and k not in claimed
    ]
    old = {
        k: old_key_settings(k, len(base), tuple(settings))
        for k in unclaimed
        if k.startswith(old_prefix)
    }
    same = [k for k, v in old.items() if v == dict(settings)]
    if len(same) == 1 or (len(old) == 1 and len(unclaimed) == 1):
        key = same[0] if same else next(iter(old))
        state = states.pop(key)
        states[callback.state_key] = {**old[key], **state} if into_state else state
        return []
    return unclaimed


def old_key_settings(key: str, start: int, names: tuple[str, ...]) -> dict[str, Any]:
    """The ``names`` settings of an old key such as ``EWC{'method': 'exact', 'mode': 'online'}``."""
    try:
        value = ast.literal_eval(key[start:])
    except (ValueError, SyntaxError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: value[k] for k in names if k in value}


@contextmanager
def plain_warnings_on_rank_zero() -> Iterator[None]:
    """Re-emit the warnings raised in the block (by the plain-torch code a callback calls) with
    ``rank_zero_warn``, so that under DDP they appear once."""
    caught: list[warnings.WarningMessage] | None = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for w in caught or []:
            rank_zero_warn(str(w.message), category=w.category)


def evaluation_keeps_state(
    trainer: pl.Trainer, callback: pl.Callback, checkpoint: Mapping[str, Any], has_state: bool
) -> bool:
    """Whether ``callback`` keeps its own state instead of the one in ``checkpoint``: when
    ``validate``, ``test`` or ``predict`` loads the checkpoint (``ckpt_path="best"`` after a fit,
    say) and the callback already holds state.

    Lightning restores every callback's state along with the weights there. The callbacks' state
    is training state that evaluation does not read, and rolling it back to an earlier checkpoint
    (one written before the fit's end) would drop what the fit consolidated or recorded; a fresh
    callback (nothing held yet) takes the checkpoint's state as Lightning intends.
    """
    from lightning.pytorch.trainer.states import TrainerFn

    states = checkpoint.get("callbacks")
    return (
        has_state
        and trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING, TrainerFn.PREDICTING)
        and isinstance(states, Mapping)
        and callback.state_key in states
    )
