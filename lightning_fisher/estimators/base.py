"""The data pass shared by every estimator: eval mode, batches, masks, scaling and DDP sums.

Two kinds of estimator plug into it:

* per-input estimators (``exact``, ``sample``, ``empirical``) give K output cotangent columns per
  input; the pass sums the squared per-input gradients J_x^T u over inputs and columns with
  ``PerInputEngine`` and divides by the number of inputs N;
* batch-gradient estimators (``batched``, ``hutchinson*``) give one cotangent u for the whole
  batch; the pass adds (J^T u)^2 = (grad_theta sum_x u_x . z_x)^2 and divides by N x probes
  (``batched``: by the number of batches).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from .. import sharded
from ..fisher_diagonal import FisherDiagonal
from ..kernel import probabilities
from ..options import FisherOptions
from ..outputs import (
    FisherInputError,
    ModelOutputs,
    batch_size_of,
    model_outputs,
    move_batch,
    slice_batch,
)
from .batched_backward import batched_attention, batched_grad
from .causal_cut import causal_blocks, check_prefix, position_lse, prefix_batch
from .forward_checks import (
    dense_embedding_gradients,
    plain_reentrant_checkpoints,
    watch_forward,
)
from .per_input import PerInputEngine

logger = logging.getLogger("lightning_fisher")


class Estimator:
    """Base class: subclasses set ``name`` and implement ``columns`` or ``batch_cotangents``."""

    name: ClassVar[str]
    per_input: ClassVar[bool]
    #: options recorded on the returned ``FisherDiagonal``
    option_names: ClassVar[tuple[str, ...]] = ("max_samples",)

    #: whether the estimate is built on a likelihood per input (everything but ``batched``): the
    #: pass then refuses a model whose inputs are coupled by batch statistics
    per_input_likelihood: ClassVar[bool] = True

    #: the ``granularity`` values the estimator accepts
    granularities: ClassVar[tuple[str, ...]] = ("token",)
    #: the ``token_route`` that ``"auto"`` means, and the routes the estimator accepts
    default_token_route: ClassVar[str] = "position"
    token_routes: ClassVar[tuple[str, ...]] = ("position",)

    def __init__(self, options: FisherOptions) -> None:
        self.options = options
        if options.granularity not in self.granularities:
            raise FisherInputError(
                f"method={self.name!r} does not take granularity={options.granularity!r}; it "
                f"takes {' or '.join(map(repr, self.granularities))}. One gradient per sequence "
                "is defined for 'empirical' and 'sample' (granularity='sequence')."
            )
        route = options.token_route
        if route != "auto" and route not in self.token_routes:
            raise FisherInputError(
                f"method={self.name!r} does not take token_route={route!r}; it takes 'auto' or "
                f"{' or '.join(map(repr, self.token_routes))}. Only 'sample' has an unbiased "
                "one-backward-per-sequence route to the token-level Fisher."
            )

    @property
    def per_sequence(self) -> bool:
        """Whether each input's gradient spans its whole sequence (one per sequence) instead of
        one position of token-level outputs."""
        if self.options.granularity == "sequence":
            return True
        route = self.options.token_route
        return (self.default_token_route if route == "auto" else route) == "sequence"

    @property
    def counts_sequences(self) -> bool:
        """Whether the estimate is normalised by the number of sequences, not of tokens."""
        return self.options.granularity == "sequence"

    def validate(self, n_classes: int) -> None:
        """Raise if the estimator cannot run on outputs with ``n_classes`` classes."""

    def columns(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, float]:
        """Per-input cotangents ``(K, *logits.shape)`` and the weight of each column."""
        raise NotImplementedError

    def batch_cotangents(
        self, out: ModelOutputs, p: Tensor, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, float]]:
        """Cotangents for the whole batch, one per probe, with their weights."""
        raise NotImplementedError

    @property
    def cotangents_per_batch(self) -> int:
        """How many cotangents ``batch_cotangents`` yields for one batch."""
        return 1

    def normaliser(self, n_inputs: int, n_batches: int) -> float:
        return float(n_inputs)

    def finish(self, fd: FisherDiagonal) -> None:
        """Complete the estimate after the pass (``lower`` attaches its certificate)."""


def trainable_parameters(
    model: nn.Module, param_filter: Callable[[str], bool] | None = None
) -> dict[str, nn.Parameter]:
    """Named parameters that require grad (and pass ``param_filter``)."""
    params = {
        n: p
        for n, p in model.named_parameters()
        if p.requires_grad and (param_filter is None or param_filter(n))
    }
    if not params:
        raise FisherInputError(
            "The model has no trainable parameters to estimate a Fisher for (all have "
            "requires_grad=False, or `param_filter` excluded them all)."
        )
    lazy = [n for n, p in params.items() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise FisherInputError(
            f"The parameters {', '.join(lazy[:5])} are not initialised yet (lazy modules such as "
            "nn.LazyLinear get their shapes at their first forward). Run the model once, e.g. "
            "on one batch under torch.no_grad(), or train it, before estimating its Fisher."
        )
    return params


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the pass (no dropout, BatchNorm uses and keeps its running statistics);
    every submodule's own mode is restored afterwards, also on error."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def limit_loader(
    loader: Iterable[Any], max_samples: int | None, seed: int
) -> tuple[Iterable[Any], int | None]:
    """EXACT(n): a loader over ``max_samples`` random inputs of a map-style data set, or the
    first ``max_samples`` inputs when the data set cannot be indexed."""
    if max_samples is None:
        return loader, None
    if max_samples < 1:
        raise ValueError(f"max_samples must be positive; got {max_samples}.")
    if isinstance(loader, DataLoader):
        dataset = loader.dataset
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            n = None
        if n is not None and not isinstance(dataset, torch.utils.data.IterableDataset):
            if max_samples >= n:
                return loader, max_samples
            gen = torch.Generator().manual_seed(seed)
            idx = torch.randperm(n, generator=gen)[:max_samples].tolist()
            return DataLoader(
                Subset(dataset, idx),
                batch_size=loader.batch_size or 1,
                shuffle=False,
                collate_fn=loader.collate_fn,
                num_workers=loader.num_workers,
            ), max_samples
    return loader, max_samples


def _all_reduce(values: list[Tensor]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for v in values:
            dist.all_reduce(v, op=dist.ReduceOp.SUM)


def _progress(loader: Iterable[Any], show: bool | None, desc: str) -> Iterable[Any]:
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if show is False or (total is not None and total <= 1):
        return loader
    from tqdm.auto import tqdm

    # show=None: a bar on interactive terminals only, so logs stay clean.
    return tqdm(
        loader, total=total, desc=desc, leave=False, disable=None if show is None else False
    )


def _per_position(cot: Tensor, max_bytes: float) -> Iterator[Tensor]:
    """Split (K, B, T, C) cotangents so that every column touches one position of each input:
    per-token gradients of a sequence model must not mix positions of the same input. A chunk
    holds at most ``max_bytes`` (refused when one position's columns exceed it)."""
    K, B, *S, C = cot.shape
    if not S:
        yield cot
        return
    flat = cot.reshape(K, B, -1, C)
    T = flat.shape[2]
    one = K * flat[0].numel() * flat.element_size()
    if one > max_bytes:
        raise FisherInputError(
            f"One position's {K} backward column(s) over a ({B}, {T}, {C}) output take "
            f"{one / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB share of "
            f"max_memory_mib the per-position cotangents may use. Pass max_memory_mib >= "
            f"{math.ceil(4 * one / 2**20)}, use smaller batches or shorter sequences, or "
            "method='sample' (one backward per sequence)."
        )
    per_t = max(1, int(max_bytes // max(1, one)))
    for t0 in range(0, T, per_t):
        ts = torch.arange(t0, min(T, t0 + per_t), device=cot.device)
        sel = torch.zeros(len(ts), 1, T, 1, dtype=cot.dtype, device=cot.device)
        sel[torch.arange(len(ts)), 0, ts, 0] = 1
        cols = flat.unsqueeze(1) * sel  # (K, nt, B, T, C)
        yield cols.reshape(K * len(ts), B, *S, C)


def _check_finite(tensors: list[Tensor]) -> list[int]:
    """Indices of the tensors holding NaN/Inf (one fused norm per tensor, not one check each)."""
    if not tensors:
        return []
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
    # one read of the flags (``nonzero`` would read its output size, then the indices)
    return [i for i, bad in enumerate((~torch.isfinite(norms)).tolist()) if bad]


class _SquaredGradients:
    """Adds w (J^T u)^2 = w (grad_theta u . z)^2 to an accumulator for each of many cotangents u.

    Cotangents are taken in chunks and each chunk goes through one batched backward
    (``batched_grad``: the graph is walked once, the weight gradients of a chunk are one matmul
    per layer); a chunk holds its gradients, one parameter-sized tensor per cotangent, so
    its size keeps them and the cotangents under ``max_memory_mib``. The result is that of one
    backward per cotangent, which is also the fallback for a model whose backward cannot be
    batched (an operation without a vmap rule).
    """

    def __init__(self, params: dict[str, nn.Parameter], max_memory_mib: float) -> None:
        self.names = list(params)
        self.params = [params[k] for k in self.names]
        self.param_bytes = sum(p.numel() * max(p.element_size(), 4) for p in self.params)
        self.max_bytes = max(1.0, max_memory_mib) * 2**20
        self.batch = True

    def accumulate(
        self, logits: Tensor, cotangents: Iterable[tuple[Tensor, float, dict[str, Tensor]]]
    ) -> None:
        per_cotangent = self.param_bytes + logits.numel() * max(logits.element_size(), 4)
        size = max(1, int(self.max_bytes // per_cotangent)) if self.batch else 1
        chunk: list[tuple[Tensor, float, dict[str, Tensor]]] = []
        for item in cotangents:
            chunk.append(item)
            if len(chunk) == size:
                self._chunk(logits, chunk)
                chunk = []
        if chunk:
            self._chunk(logits, chunk)

    def _chunk(self, logits: Tensor, chunk: list[tuple[Tensor, float, dict[str, Tensor]]]) -> None:
        if len(chunk) > 1 and self.batch:
            try:
                grads = batched_grad(logits, self.params, torch.stack([c for c, _, _ in chunk]))
            except torch.OutOfMemoryError:
                # Half the chunk at a time; one cotangent that does not fit is a real OOM.
                half = len(chunk) // 2
                self._chunk(logits, chunk[:half])
                self._chunk(logits, chunk[half:])
                return
            except RuntimeError as err:
                if "vmap" not in str(err) and "batch" not in str(err).lower():
                    raise
                # An operation without a batching rule: one backward per cotangent gives the same
                # sums; the model's graph does not change between batches, so keep it so.
                logger.info(
                    "lightning_fisher: batched backward unavailable (%s); one backward per "
                    "cotangent from now on.",
                    str(err).splitlines()[0],
                )
                self.batch = False
            else:
                for i, (_, weight, acc) in enumerate(chunk):
                    self._add(acc, [None if g is None else g[i] for g in grads], weight)
                return
        for cot, weight, acc in chunk:
            grads = torch.autograd.grad(
                logits, self.params, grad_outputs=cot, retain_graph=True, allow_unused=True
            )
            self._add(acc, list(grads), weight)

    def _add(self, acc: dict[str, Tensor], grads: list[Tensor | None], weight: float) -> None:
        keep = [(acc[k], g.to(acc[k].dtype)) for k, g in zip(self.names, grads) if g is not None]
        if keep:
            targets, values = [a for a, _ in keep], [g for _, g in keep]
            torch._foreach_addcmul_(targets, values, values, value=weight)  # acc += w g^2


def _record(engine: PerInputEngine, forward: Callable[[], ModelOutputs], rows: int) -> ModelOutputs:
    """The forward of one batch with the engine recording; planned again (on this batch) when
    the traced structure differs from the plan's."""
    if engine.handlers is None and not engine.reuse_plan():
        engine.plan(forward, rows)
    for attempt in range(2):
        engine.reset()
        with engine.recording():
            out = forward()
        same = engine.finish_recording(out.logits.shape[0])
        if (same and engine.same_uses(out.logits)) or attempt:
            engine.keep_plan()
            return out
        engine.plan(forward, rows)
    return out


def _accumulate_positions(
    engine: PerInputEngine, logits: Tensor, cot: Tensor, acc: dict[str, Tensor], weight: float
) -> None:
    """Per-position columns ``cot`` (K, B, *S, C): split at the vocabulary head where the engine
    can, else dense, a chunk of positions at a time."""
    if not engine.accumulate_positions(logits, cot, acc, weight):
        for part in _per_position(cot, engine.cotangent_bytes):
            engine.accumulate(logits, part, acc, weight)


def _prefix_blocks(
    engine: PerInputEngine,
    forward: Callable[[Any], ModelOutputs],
    batch: Any,
    full_lse: Tensor,
    blocks: list[tuple[int, int]],
    deferred: list[tuple[Tensor, dict[str, Tensor], float]],
    opts: FisherOptions,
) -> None:
    """The causal cut: the per-position columns of each block [a, b) of positions (``deferred``:
    each estimator's columns, sums and weight) through a recorded forward of the batch's first b
    positions (plus the one ``shift_labels`` drops), checked against the whole sequence's logits
    (``full_lse``) first; the columns and logits of the block go in as slices of the positions."""
    B, T = full_lse.shape
    shift = int(opts.shift_labels)
    for a, b in blocks:
        prefix = prefix_batch(batch, b + shift, T + shift)
        out = _record(engine, functools.partial(forward, prefix), B)
        check_prefix(out.logits, full_lse, b)
        if opts.verify:  # a no-op unless the prefix traced a structure the pass has not proven
            engine.verify(out.logits, functools.partial(_first_rows, forward, prefix))
        for cot, acc, weight in deferred:
            _accumulate_positions(engine, out.logits[:, a:b], cot[:, :, a:b], acc, weight)
        engine.reset()


def _first_rows(forward: Callable[[Any], ModelOutputs], batch: Any, rows: int) -> Tensor:
    """Logits of the batch's first ``rows`` rows (the engine's check runs on them)."""
    return forward(slice_batch(batch, rows)).logits


def _attention_for(estimators: list[Estimator]) -> AbstractContextManager[None]:
    """Attention through its MATH backend (``batched_attention``) unless every backward of the
    pass is a plain one of one cotangent: the fused kernels have no batching rule for their
    backward, so a backward of many cotangents at once (the engine's columns, several probes)
    would run them once per cotangent. The per-input engine always records under MATH, whatever
    its column count, so that its per-layer rules see one attention graph. Both backends compute
    the same attention, up to floating-point rounding."""
    if any(e.per_input for e in estimators) or sum(e.cotangents_per_batch for e in estimators) > 1:
        return batched_attention()
    return contextlib.nullcontext()


def eager_compiled_code() -> contextlib.AbstractContextManager[Any]:
    """Code compiled by ``torch.compile`` (a compiled model or submodule) runs eagerly, as its
    Python source, while the block runs: the pass hooks modules, keeps graphs for several
    backwards and vectorises backwards over cotangents, none of which a compiled graph allows
    (AOTAutograd's backward refuses ``vmap``, and donates buffers that a second backward needs).
    The result is the same function of the same parameters; outside the pass the model stays
    compiled."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def run_passes(
    model: nn.Module,
    loader: Iterable[Any],
    estimators: list[Estimator],
    observe: Callable[[ModelOutputs], None] | None = None,
) -> list[FisherDiagonal]:
    """Run several estimators over ``loader`` with one forward per batch.

    Data options (``max_samples``, ``max_batches``, ``output_fn``, ``classes``, ``param_filter``,
    ...) come from the first estimator; each estimator keeps its own seed, so every result equals
    what a pass of that estimator alone gives (up to rounding where that pass alone would keep a
    fused attention kernel, see ``_attention_for``). ``observe(out)``, if given, sees the outputs of
    every batch with at least one input (statistics of p that need no extra forward).
    """
    # autograd on, also when called under no_grad or in inference mode (a validation hook)
    with torch.inference_mode(False), torch.enable_grad():
        return _run_passes(model, loader, estimators, observe)


def _run_passes(
    model: nn.Module,
    loader: Iterable[Any],
    estimators: list[Estimator],
    observe: Callable[[ModelOutputs], None] | None,
) -> list[FisherDiagonal]:
    # Sharded (FSDP) models: the pass keeps the Fisher sharded like the parameters.
    if sharded.is_fsdp2(model) or sharded.is_fsdp1(model):
        return sharded.run_passes_sharded(model, loader, estimators, observe)
    opts = estimators[0].options
    params = trainable_parameters(model, opts.param_filter)
    names = list(params)
    device = next(iter(params.values())).device
    accs = [
        {
            n: torch.zeros(
                p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=device
            )
            for n, p in params.items()
        }
        for _ in estimators
    ]
    loader, limit = limit_loader(loader, opts.max_samples, opts.seed)
    generators = [torch.Generator(device=device).manual_seed(e.options.seed) for e in estimators]
    per_input = any(e.per_input for e in estimators)
    engine = PerInputEngine(model, params, opts.max_memory_mib) if per_input else None
    batched = _SquaredGradients(params, opts.max_memory_mib)
    n_inputs = n_batches = rows = n_sequences = 0
    label = "+".join(e.name for e in estimators)

    def forward(batch: Any) -> ModelOutputs:
        return model_outputs(
            model, batch, opts.output_fn, opts.classes, opts.shift_labels, opts.ignore_index
        )

    coupled_refused = any(e.per_input_likelihood for e in estimators)
    with (
        eval_mode(model),
        _attention_for(estimators),
        eager_compiled_code(),
        plain_reentrant_checkpoints(),
        dense_embedding_gradients(model),
    ):
        for batch in _progress(loader, opts.progress, f"Fisher ({label})"):
            if opts.max_batches is not None and n_batches >= opts.max_batches:
                break
            if limit is not None:
                if rows >= limit:
                    break
                b = batch_size_of(batch)
                if rows + b > limit:
                    batch = slice_batch(batch, limit - rows)
            batch = move_batch(batch, device)
            rows += batch_size_of(batch)
            # the first batch's forwards are watched for what eval mode leaves batch-dependent
            watch = (
                watch_forward(model, coupled_refused)
                if n_batches == 0
                else contextlib.nullcontext()
            )
            with watch:
                if engine is not None:
                    out = _record(engine, functools.partial(forward, batch), batch_size_of(batch))
                else:
                    out = forward(batch)
            for e in estimators:
                e.validate(out.n_classes)
            n = out.n_inputs
            n_batches += 1
            if n == 0:
                continue
            n_inputs += n
            n_sequences += out.n_sequences
            if engine is not None and opts.verify:
                engine.verify(out.logits, functools.partial(_first_rows, forward, batch))
            if observe is not None:
                observe(out)
            p = probabilities(out.logits)
            mask = out.mask.unsqueeze(-1)
            # Per-position columns before the last causal block run on prefixes, after this
            # forward's graph is freed.
            blocks = (
                causal_blocks(out.logits.shape[1]) if opts.causal and out.logits.ndim == 3 else []
            )
            deferred: list[tuple[Tensor, dict[str, Tensor], float]] = []
            for e, acc, gen in zip(estimators, accs, generators):
                if e.per_input:
                    assert engine is not None
                    cot, weight = e.columns(out, p, gen)
                    cot = (cot * mask).to(out.logits.dtype)
                    if e.per_sequence:
                        engine.accumulate(out.logits, cot, acc, weight)
                        continue
                    a = blocks[-1][0] if blocks else 0
                    if a:  # the last block here, on the positions' slices; the rest later
                        deferred.append((cot, acc, weight))
                        _accumulate_positions(engine, out.logits[:, a:], cot[:, :, a:], acc, weight)
                    else:
                        _accumulate_positions(engine, out.logits, cot, acc, weight)
            # Every batch-gradient estimator's cotangents (all probes) go through one batched
            # backward: each estimator still draws from its own generator in its own order.
            cotangents = (
                ((cot * mask).to(out.logits.dtype), weight, acc)
                for e, acc, gen in zip(estimators, accs, generators)
                if not e.per_input
                for cot, weight in e.batch_cotangents(out, p, gen)
            )
            batched.accumulate(out.logits, cotangents)
            if engine is not None:
                engine.reset()
            if deferred:
                assert engine is not None
                full_lse = position_lse(out.logits)
                del out, p, mask, cot, cotangents
                _prefix_blocks(engine, forward, batch, full_lse, blocks[:-1], deferred, opts)
            else:
                del out
    if n_batches == 0:
        raise FisherInputError(
            "The dataloader yielded no batches, so there is no data to estimate a Fisher from. "
            "Check the dataset is not empty (and, under DDP, that every rank gets a shard)."
        )
    counts = torch.tensor(
        [float(n_inputs), float(n_batches), float(n_sequences)], dtype=torch.float64, device=device
    )
    if opts.sync_distributed:
        _all_reduce([t for acc in accs for t in acc.values()] + [counts])
    n_inputs, n_batches, n_sequences = (int(c) for c in counts.tolist())
    results = finish_estimates(
        estimators,
        accs,
        names,
        n_inputs,
        n_batches,
        [params[k].detach() for k in names],
        lambda tensors: [names[i] for i in _check_finite(tensors)],
        n_sequences=n_sequences,
    )
    if limit is not None and rows < limit:
        import warnings

        warnings.warn(
            f"max_samples={limit} is larger than the data ({rows} inputs); the Fisher uses all of it.",
            stacklevel=3,
        )
    return results


def finish_estimates(
    estimators: list[Estimator],
    accs: list[dict[str, Tensor]],
    names: list[str],
    n_inputs: int,
    n_batches: int,
    weights: list[Tensor],
    nonfinite: Callable[[list[Tensor]], list[str]],
    wrap: Callable[[str, Tensor], Tensor] = lambda _name, t: t,
    n_sequences: int | None = None,
) -> list[FisherDiagonal]:
    """The end of every pass, from summed squares to ``FisherDiagonal``s: refuse an undefined
    (no input) or meaningless (NaN/Inf weights or sums) Fisher, divide each estimator's sums by its
    normaliser in place, and let the estimator finish its result. ``nonfinite(tensors)`` names the
    tensors (in ``names`` order) holding NaN/Inf; ``wrap(name, t)`` gives the stored tensor (a
    shard placed like its parameter, under FSDP). Estimators with ``granularity="sequence"``
    count the ``n_sequences`` sequences with a counted position as their inputs."""
    if n_inputs == 0:
        raise FisherInputError(
            "Every input was masked out (attention mask 0 or label -100), so the Fisher is undefined."
        )
    # Infinite weights can give finite logits and a finite, meaningless Fisher (a saturated unit
    # has zero gradients); checked once at the end, so NaN logits keep their own message.
    bad = nonfinite(weights)
    if bad:
        raise FisherInputError(
            f"The parameters {', '.join(bad[:5])} hold NaN/Inf entries, so the Fisher at these "
            "weights is meaningless. Check the model for NaN/Inf weights (or fp16 overflow)."
        )
    results = []
    for e, acc in zip(estimators, accs):
        n = n_inputs
        if e.counts_sequences:
            assert n_sequences is not None, "this pass does not count sequences"
            n = n_sequences
        bad = nonfinite([acc[k] for k in names])
        if bad:
            raise FisherInputError(
                f"The Fisher of {bad[0]!r} has NaN/Inf entries: NaN/Inf in the inputs or weights, "
                "or a gradient overflow (for fp16 models, estimate in float32 or bfloat16)."
            )
        values = [acc[k] for k in names]
        torch._foreach_mul_(values, 1.0 / e.normaliser(n, n_batches))  # ours: in place
        options = e.options.public(e.option_names)
        options["seed"] = e.options.seed
        tensors = {n: wrap(n, v) for n, v in zip(names, values)}
        fd = FisherDiagonal(tensors, n_samples=n, method=e.name, options=options)
        e.finish(fd)
        results.append(fd)
    return results
