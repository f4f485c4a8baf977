"""Fisher diagonals of sharded models: FSDP2 (``fully_shard``), whose parameters are DTensors.

The Fisher diagonal, the EWC gradient and the Squisher are elementwise in the parameters, so they
are kept sharded exactly like the parameters: no rank holds the whole Fisher.

Every estimator adds w (J^T u)^2 over cotangents u. Under FSDP2 an ordinary backward of u on each
rank (rank r with its own inputs and cotangent u_r) ends in a reduce-scatter that sums the ranks'
unsharded gradients g_r = J_r^T u_r and leaves each rank its shard. For the Fisher the sum must be
taken *after* squaring, so during a Fisher pass the reduce-scatter squares its input first:

    shard of sum_r g_r^2      (one backward per cotangent, the same number on every rank)

which is exactly the sum over ranks that a DDP pass all-reduces. Batch-gradient estimators
(``batched``, ``hutchinson*``) need one backward per batch and probe; per-input estimators
(``exact``, ``sample``, ``empirical``, ``upper``, ``lower``) one backward per input and column,
because the per-input engine needs whole weights. Memory per rank: the Fisher shard (float32)
and, for EWC, the anchor shard, about 2 x the parameter shard.

Diagnostics on sharded diagonals (``lightning_fisher.diagnostics``) reduce statistics of the
local shards over the ranks (:func:`reduce_shard_statistics`) and draw histograms from a
bounded sample of entries chosen in the whole parameter's index space (:func:`sample_entries`);
the trace regulariser's double backward runs on whole parameters held for one step
(:func:`unsharded_parameters`).

FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) with ``use_orig_params=True``
is served by :mod:`lightning_fisher.sharded_fsdp1`: each named parameter is a flat 1-D piece of
its rank's shard (uneven, possibly empty; a DTensor cannot describe it), and the Fisher, anchors
and penalty gradient are kept as pieces of the same shape (memory per rank about 2 x the
parameter piece). FSDP1 accepts one communication hook, set before the first forward, so one
hook of ours is registered once (``register_fisher_hook``; ``lf.EWC`` does it when the fit
starts): FSDP1's own reduction in training (bitwise the same gradients), the squaring
reduce-scatter during a Fisher pass. FSDP1 frees the gathered parameters after each backward, so
:func:`run_passes_sharded` runs one forward per backward there (the per-input methods: one per
input and column). ``use_orig_params=False`` and hybrid sharding are refused with what to change.
DeepSpeed ZeRO 1-3 is refused (flattened partitions, no hook to square gradients before their
reduction); deepspeed is not a dependency.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .fisher_diagonal import FisherDiagonal
from .kernel import probabilities
from .outputs import (
    FisherInputError,
    ModelOutputs,
    batch_size_of,
    model_outputs,
    move_batch,
    slice_batch,
)

if TYPE_CHECKING:
    from .estimators.base import Estimator
    from .sharded_fsdp1 import Piece


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters are)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that shares its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined, no-any-return]


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or one of its submodules."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_fsdp1(model: nn.Module) -> bool:
    """Whether ``model`` is (or contains) an FSDP1 ``FullyShardedDataParallel`` wrapper, or lies
    inside one whose Fisher hook is registered (a LightningModule under ``FSDPStrategy``)."""
    if not dist.is_available():
        return False
    from .sharded_fsdp1 import is_fsdp1_model

    return is_fsdp1_model(model)


def refuse_fsdp1(model: nn.Module, who: str) -> None:
    """Raise a ``FisherInputError`` for FSDP1 settings the Fisher and EWC code cannot serve
    (``use_orig_params=False``, hybrid sharding)."""
    if is_fsdp1(model):
        from .sharded_fsdp1 import check_supported

        check_supported(model, who)


def _param_groups(module: nn.Module) -> list[Any]:
    """An FSDP2 module's parameter groups: a list in torch >= 2.12, at most one group before."""
    state = module._get_fsdp_state()  # type: ignore[operator]
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


def _fsdp2_groups(model: nn.Module) -> list[Any]:
    """The parameter groups of every FSDP2 module in ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return [g for m in model.modules() if isinstance(m, FSDPModule) for g in _param_groups(m)]


def _refuse_without_reduce_scatter_hook(groups: list[Any], who: str) -> None:
    if not all(hasattr(g, "_reduce_scatter_comm") for g in groups):
        raise FisherInputError(
            f"{who} on an FSDP2 (fully_shard) model squares the gradients inside FSDP2's "
            f"reduce-scatter, which this torch ({torch.__version__}) does not let a caller "
            "replace. Use a newer torch (2.11 and 2.13 are tested), or DDP or FSDP1."
        )


def check_fsdp2_supported(model: nn.Module, who: str = "The Fisher pass") -> None:
    """Refuse an FSDP2 model whose torch lets no caller replace FSDP2's reduce-scatter (torch
    2.6 has no such hook): the sharded pass squares the gradients there."""
    if is_fsdp2(model):
        _refuse_without_reduce_scatter_hook(_fsdp2_groups(model), who)


def _squaring_reduce_scatter() -> Any:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    class SquaringReduceScatter(DefaultReduceScatter):
        """Reduce-scatter of the squared gradients: rank r's shard of sum_r g_r^2.

        The input is every rank's unsharded gradients, padded with zeros and laid out shard by
        shard; squaring commutes with that layout (0^2 = 0). The sum is never averaged.
        """

        def __call__(
            self,
            output_tensor: Tensor,
            input_tensor: Tensor,
            group: dist.ProcessGroup,
            op: Any,
            async_op: bool = False,
        ) -> Any:
            input_tensor.square_()
            return super().__call__(
                output_tensor, input_tensor, group, dist.ReduceOp.SUM, async_op=async_op
            )

    return SquaringReduceScatter()


@contextmanager
def squared_gradient_reduction(model: nn.Module) -> Iterator[Callable[[], None]]:
    """While active, a backward of an FSDP2 model leaves in each parameter's ``.grad`` the shard of
    sum_r g_r^2 over the ranks r (instead of the mean of g_r), squared and summed in float32; on
    a mesh of size 1 the caller squares the gradient itself (FSDP2 then skips the collective).
    Yields a function that applies the settings again (call it before each backward: FSDP2's
    lazy initialisation at the first forward resets the reduce dtype). Restores FSDP2's
    settings on exit."""
    groups = _fsdp2_groups(model)
    _refuse_without_reduce_scatter_hook(groups, "The Fisher pass")
    for group in groups:
        if getattr(group, "_is_hsdp", False):
            raise FisherInputError(
                "Fisher estimates on sharded models support a 1-D FSDP2 mesh; this model uses a "
                "2-D (HSDP: replicate x shard) mesh. Shard over one mesh dimension."
            )
    saved = [
        (
            g,
            g._reduce_scatter_comm,
            g.gradient_divide_factor,
            g.force_sum_reduction_for_comms,
            g.reduce_grads,
        )
        for g in groups
    ]
    comm = _squaring_reduce_scatter()

    def apply() -> None:
        for g in groups:
            g._reduce_scatter_comm = comm
            g.gradient_divide_factor = None
            g.force_sum_reduction_for_comms = False  # no division after the sum either
            g.reduce_grads = True
            # squares of low-precision gradients are formed and summed in float32
            # (FSDP2 sets this at its lazy init, i.e. the first forward: set again each time)
            if getattr(g, "_reduce_dtype", None) in (None, torch.float16, torch.bfloat16):
                g._reduce_dtype = torch.float32

    saved_dtypes = [getattr(g, "_reduce_dtype", None) for g in groups]
    try:
        apply()
        yield apply
    finally:
        for (g, rs, factor, force_sum, reduce_grads), dtype in zip(saved, saved_dtypes):
            g._reduce_scatter_comm = rs
            g.gradient_divide_factor = factor
            g.force_sum_reduction_for_comms = force_sum
            g.reduce_grads = reduce_grads
            g._reduce_dtype = dtype


@contextmanager
def unsharded_parameters(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """While active, every FSDP2 module of ``model`` holds its parameters whole (all-gathered
    once), forwards and backwards neither reshard them nor reduce gradients, and
    ``model.named_parameters()`` gives the whole parameters; yields them by name. For
    computations FSDP2's per-module resharding cannot serve, such as a double backward
    (the trace regulariser's ``create_graph``): the whole parameters stay alive until the
    graph is gone. Costs one all-gather of the model and its whole size on every rank.
    Restores FSDP2's settings and reshards on exit."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    groups = [g for m in modules for g in _param_groups(m)]
    saved = [(g.post_forward_mesh_info, g.reshard_after_backward, g.reduce_grads) for g in groups]
    try:
        for g in groups:
            g.post_forward_mesh_info = None  # no reshard after forward
            g.reshard_after_backward = False
            g.reduce_grads = False
        for m in modules:
            m.unshard()
        yield dict(model.named_parameters())
    finally:
        for g, (info, after_backward, reduce) in zip(groups, saved):
            g.post_forward_mesh_info = info
            g.reshard_after_backward = after_backward
            g.reduce_grads = reduce
        for m in modules:
            m.reshard()


def local_slice(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of ``whole`` (a tensor shaped like the DTensor ``like``), placed like
    it, as a DTensor; no communication. ``whole`` itself for an ordinary tensor ``like``."""
    if not is_dtensor(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        whole.detach(),
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    )


def _mesh_size(p: Tensor) -> int:
    return int(p.device_mesh.size()) if is_dtensor(p) else 1  # type: ignore[attr-defined]


def _collective_max(values: list[int], device: torch.device) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def _per_input_cotangents(
    cot: Tensor, weight: float, max_bytes: float, per_sequence: bool = False
) -> tuple[Iterator[tuple[Tensor, float]], int]:
    """Per-input estimators: one cotangent per input and column (the column restricted to one
    input's row, and for sequences to one position unless ``per_sequence``), so each backward
    gives J_x^T u_x; with their number."""
    from .estimators.base import _per_position

    K, B, *S, _ = cot.shape

    def items() -> Iterator[tuple[Tensor, float]]:
        for part in (cot,) if per_sequence else _per_position(cot, max_bytes):
            for column in part:
                for b in range(B):
                    one = torch.zeros_like(column)
                    one[b] = column[b]
                    yield one, weight

    return items(), K * B * (math.prod(S) if S and not per_sequence else 1)


def run_passes_sharded(
    model: nn.Module,
    loader: Iterable[Any],
    estimators: list[Estimator],
    observe: Callable[[ModelOutputs], None] | None = None,
) -> list[FisherDiagonal]:
    """``run_passes`` for sharded models: every result's tensors are sharded like the parameters
    (DTensors for FSDP2; for FSDP1, 1-D tensors shaped like each parameter's local piece), equal
    to the Fisher an unsharded (DDP) pass computes on the same data. On FSDP1 every backward has
    a forward of its own (FSDP1 frees the gathered parameters after each backward).

    Every rank runs the same number of forwards and backwards (the collectives inside them must
    match): a rank whose loader is exhausted repeats its last batch with zero cotangents, and each
    estimator's cotangents are padded with zeros to the largest count over the ranks.
    """
    from . import sharded_fsdp1
    from .estimators.base import eval_mode, finish_estimates, limit_loader, trainable_parameters

    refuse_fsdp1(model, "The Fisher pass")
    fsdp1 = is_fsdp1(model)
    opts = estimators[0].options
    if not opts.sync_distributed:
        raise FisherInputError(
            "sync_distributed=False is not possible on an FSDP-sharded model: each rank holds a "
            "shard of every parameter, so the Fisher's sums over the ranks' data are part of the "
            "backward's reduce-scatter. Use sync_distributed=True."
        )
    params = trainable_parameters(model, opts.param_filter)
    names = list(params)
    # parameters whose squares the backward's reduction sums over the ranks (the others are
    # whole on every rank: squared here, all-reduced after the pass)
    if fsdp1:
        reduced = set(sharded_fsdp1.pieces(model))
    else:
        reduced = {n for n, p in params.items() if is_dtensor(p) and _mesh_size(p) > 1}
    first = next(iter(params.values()))
    device = first.device
    world = dist.get_world_size() if dist.is_initialized() else 1
    for n, param in params.items():
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None and (mesh.ndim != 1 or mesh.size() != world):
            raise FisherInputError(
                f"Fisher estimates on sharded models need every parameter sharded over all "
                f"{world} ranks on a 1-D mesh (FSDP2 data parallelism); {n!r} lives on a mesh of "
                f"shape {tuple(mesh.shape)} (tensor parallelism or HSDP are not supported)."
            )
    accs = [
        {
            n: torch.zeros(
                local_tensor(p).shape,
                dtype=torch.promote_types(p.dtype, torch.float32),
                device=device,
            )
            for n, p in params.items()
        }
        for _ in estimators
    ]
    all_params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in all_params]
    loader, limit = limit_loader(loader, opts.max_samples, opts.seed)
    generators = [torch.Generator(device=device).manual_seed(e.options.seed) for e in estimators]
    max_bytes = max(1.0, opts.max_memory_mib) * 2**20
    n_inputs = n_batches = rows = n_sequences = 0

    def forward(batch: Any) -> ModelOutputs:
        def run() -> ModelOutputs:
            return model_outputs(
                model, batch, opts.output_fn, opts.classes, opts.shift_labels, opts.ignore_index
            )

        return sharded_fsdp1.forward_through_root(model, run) if fsdp1 else run()

    unused: list[ModelOutputs] = []  # FSDP1: the batch's forward, before its one backward

    def logits_for_backward(out: ModelOutputs) -> Tensor:
        if not fsdp1:
            return out.logits
        if unused:
            return unused.pop().logits
        return forward(last).logits  # the same inputs, so the same logits

    def backward(out: ModelOutputs, cot: Tensor, weight: float, acc: dict[str, Tensor]) -> None:
        reapply()
        for q in all_params:
            q.grad = None
        logits = logits_for_backward(out)
        # sqrt(w) on the cotangent: weights need not agree across ranks (padding has w = 0)
        logits.backward(cot * math.sqrt(weight), retain_graph=not fsdp1)
        for n in names:
            g = params[n].grad
            if g is None:
                continue
            g_local = local_tensor(g).to(acc[n].dtype)
            if n not in reduced:  # no collective ran, so nothing squared it
                g_local = g_local * g_local
            acc[n].add_(g_local)

    last: Any = None
    iterator = iter(loader)
    try:
        reduction = _fsdp1_reduction(model) if fsdp1 else squared_gradient_reduction(model)
        with reduction as reapply, eval_mode(model):
            while True:
                batch = None
                more = opts.max_batches is None or n_batches < opts.max_batches
                if more and (limit is None or rows < limit):
                    batch = next(iterator, None)
                real = batch is not None
                # every rank learns whether any rank still has data, and whether any has none
                has, empty = _collective_max([real, last is None and not real], device)
                if not has:
                    break
                if empty:
                    raise FisherInputError(
                        "The dataloader of a rank yielded no batches while other ranks have "
                        "data; on a sharded model every rank must run the Fisher pass on data "
                        "(give every rank a shard, e.g. with a DistributedSampler)."
                    )
                if real:
                    if limit is not None:
                        b = batch_size_of(batch)
                        if rows + b > limit:
                            batch = slice_batch(batch, limit - rows)
                    batch = move_batch(batch, device)
                    rows += batch_size_of(batch)
                    last = batch
                out = forward(last)
                unused[:] = [out]
                for e in estimators:
                    e.validate(out.n_classes)
                if real:
                    n_batches += 1
                    n_inputs += out.n_inputs
                    n_sequences += out.n_sequences
                    if observe is not None and out.n_inputs:
                        observe(out)
                p = probabilities(out.logits)
                mask = out.mask.unsqueeze(-1)
                for e, acc, gen in zip(estimators, accs, generators):
                    items: Iterable[tuple[Tensor, float]]
                    if not real:
                        items, count = [], 0
                    elif e.per_input:
                        cols, weight = e.columns(out, p, gen)
                        cols = (cols * mask).to(out.logits.dtype)
                        items, count = _per_input_cotangents(
                            cols, weight, max_bytes, e.per_sequence
                        )
                    else:
                        listed = [
                            ((cot * mask).to(out.logits.dtype), w)
                            for cot, w in e.batch_cotangents(out, p, gen)
                        ]
                        items, count = listed, len(listed)
                    (most,) = _collective_max([count], device)
                    done = 0
                    for cot, w in items:
                        backward(out, cot, w, acc)
                        done += 1
                    zero = torch.zeros_like(out.logits)
                    for _ in range(most - done):
                        backward(out, zero, 0.0, acc)
                del out
                unused.clear()
    finally:
        for q, g in zip(all_params, saved_grads):
            q.grad = g
    counts = torch.tensor(
        [float(n_inputs), float(n_batches), float(n_sequences)], dtype=torch.float64, device=device
    )
    if world > 1:
        # parameters left whole (not sharded) got each rank's own squares
        whole = [acc[n] for acc in accs for n in names if n not in reduced]
        for t in [*whole, counts]:
            dist.all_reduce(t)
    n_inputs, n_batches, n_sequences = (int(c) for c in counts.tolist())
    if n_batches == 0:
        raise FisherInputError(
            "The dataloader yielded no batches, so there is no data to estimate a Fisher from. "
            "Check the dataset is not empty (and that every rank gets a shard)."
        )
    results = finish_estimates(
        estimators,
        accs,
        names,
        n_inputs,
        n_batches,
        [local_tensor(params[k]).detach() for k in names],
        lambda tensors: _nonfinite(names, tensors, device),
        lambda name, t: as_sharded_like(t, params[name]),
        n_sequences=n_sequences,
    )
    if fsdp1 and world > 1:  # local pieces: trace() sums them over the ranks, save() refuses
        where = sharded_fsdp1.pieces(model)
        spread = frozenset(n for n in names if n in where and where[n].spread)
        group = next(iter(where.values())).group if where else None
        for fd in results:
            fd.piece_names, fd.piece_group = spread, group
    return results


@contextmanager
def _fsdp1_reduction(model: nn.Module) -> Iterator[Callable[[], None]]:
    """FSDP1's squared reduction, with the no-op "apply again" of the FSDP2 context manager."""
    from .sharded_fsdp1 import squared_gradient_reduction as squared_fsdp1

    with squared_fsdp1(model):
        yield lambda: None


def _nonfinite(names: list[str], tensors: list[Tensor], device: torch.device) -> list[str]:
    """Names whose local shard holds NaN/Inf on any rank (every rank gets the same answer)."""
    flags = torch.tensor(
        [0 if bool(torch.isfinite(t).all()) else 1 for t in tensors],
        dtype=torch.int64,
        device=device,
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [n for n, f in zip(names, flags.tolist()) if f]


def as_sharded_like(local: Tensor, param: Tensor) -> Tensor:
    """``local`` (a shard shaped like ``param``'s local shard) as a DTensor with ``param``'s mesh
    and placements; ``local`` itself for an ordinary parameter."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def shard_group(tensors: Iterable[Tensor]) -> dist.ProcessGroup | None:
    """The process group over which the first DTensor of ``tensors`` is sharded (1-D mesh), or
    ``None`` when none is a DTensor (nothing to reduce)."""
    for t in tensors:
        if is_dtensor(t):
            return t.device_mesh.get_group()  # type: ignore[attr-defined, no-any-return]
    return None


def _layout(
    tensors: list[Tensor], pieces: Sequence[Piece | None] | None
) -> tuple[list[bool], dist.ProcessGroup | None]:
    """Per tensor, whether it is a part of a whole spread over the ranks (a DTensor shard, or an
    FSDP1 local piece with ``Piece.spread``), and the group to reduce over (``None``: none)."""
    if pieces is not None and len(pieces) != len(tensors):
        raise ValueError(f"{len(pieces)} pieces for {len(tensors)} tensors.")
    found = [p for p in pieces or () if p is not None]
    if found and dist.is_available() and dist.is_initialized():
        return [p is not None and p.spread for p in pieces or ()], found[0].group
    group = shard_group(tensors)
    return [is_dtensor(t) for t in tensors], group


def reduce_shard_statistics(
    rows: Tensor,
    tensors: list[Tensor],
    op: str = "sum",
    pieces: Sequence[Piece | None] | None = None,
) -> Tensor:
    """Per-tensor statistics of local shards, made statistics of the whole tensors.

    ``rows[i]`` holds statistics of ``local_tensor(tensors[i])``. With ``op="sum"`` (sums,
    counts) the rows of DTensors are summed over the ranks of their mesh; with ``op="max"``
    the maxima are taken. ``pieces[i]`` (FSDP1: ``sharded_fsdp1.pieces(model)[name]``, or
    ``None``) marks ``tensors[i]`` as this rank's flat piece of a parameter: its rows are
    reduced over the piece's process group the same way (a ``NO_SHARD`` piece, whole on every
    rank, counts once). Rows of ordinary tensors (whole on every rank) are left as they are.
    A collective when any tensor is a DTensor or a piece: call it on every rank.
    """
    spread, group = _layout(tensors, pieces)
    if group is None:
        return rows
    sharded = torch.tensor(spread, dtype=torch.bool, device=rows.device)
    sharded = sharded.reshape(-1, *([1] * (rows.ndim - 1)))
    if op == "sum":
        # whole tensors: every rank holds the same value, so only one rank contributes it
        keep = sharded | (dist.get_rank(group) == 0)
        out = torch.where(keep, rows, torch.zeros_like(rows))
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    elif op == "max":
        out = rows.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    else:
        raise ValueError(f"op must be 'sum' or 'max'; got {op!r}.")
    return out


def map_local(fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """``fn`` applied to the local shards of ``tensors`` (placed alike), the result sharded like
    the first: an elementwise operation on sharded diagonals without gathering them."""
    out = fn(*(local_tensor(t) for t in tensors))
    return as_sharded_like(out, tensors[0])


def whole_numel(t: Tensor, piece: Piece | None = None) -> int:
    """The number of entries of the whole tensor ``t`` is a part of: its own for an ordinary
    tensor or a DTensor, the parameter's for an FSDP1 piece."""
    return piece.shape.numel() if piece is not None else t.numel()


def sample_entries(
    tensors: dict[str, Tensor],
    max_entries: int | None,
    seed: int = 0,
    pieces: Mapping[str, Piece] | None = None,
) -> dict[str, Tensor]:
    """At most ``max_entries`` entries of each tensor, as flat float32 CPU vectors: all of them
    (in order) when it has no more, else those at ``max_entries`` flat indices drawn uniformly
    from ``seed`` and the tensor's position (repeats dropped, in index order).

    The indices are drawn in the whole tensor's index space, so a sharded tensor (DTensor) gives
    the same sample as the unsharded one: each rank contributes the entries of its shard and the
    bounded sample is summed over the mesh (one collective for all tensors; no rank gathers a
    whole tensor). ``pieces`` (FSDP1: ``sharded_fsdp1.pieces(model)``) marks the tensors that
    are a rank's flat piece [start, start + count) of a parameter's flattened entries; they are
    sampled the same way, over the piece's process group. Histograms of a sharded Fisher are
    drawn from this sample.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    names = list(tensors)
    where = [pieces.get(n) if pieces is not None else None for n in names]
    picks: list[Tensor] = []
    parts: list[Tensor] = []
    for i, name in enumerate(names):
        t = tensors[name]
        piece = where[i]
        n = whole_numel(t, piece)
        if max_entries is None or n <= max_entries:
            index = torch.arange(n)
        else:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            index = torch.randint(n, (max_entries,), generator=gen).unique()  # sorted
        picks.append(index)
        local = local_tensor(t).detach()
        if piece is not None and piece.spread:
            # this rank holds flat entries [start, start + count) of the parameter
            mine = (index >= piece.start) & (index < piece.start + piece.count)
            values = torch.zeros(index.numel(), dtype=torch.float32)
            offsets = (index[mine] - piece.start).to(local.device)
            values[mine] = local.reshape(-1)[offsets].float().cpu()
            parts.append(values)
            continue
        if is_dtensor(t) and t.ndim == 0:  # a scalar: take it whole
            local = t.full_tensor().detach()  # type: ignore[attr-defined]
        if not is_dtensor(t) or t.ndim == 0:
            parts.append(local.reshape(-1)[index.to(local.device)].float().cpu())
            continue
        shape, offset = compute_local_shape_and_global_offset(
            t.shape,
            t.device_mesh,  # type: ignore[attr-defined]
            t.placements,  # type: ignore[attr-defined]
        )
        coords = torch.stack(torch.unravel_index(index, tuple(t.shape)))
        lo = torch.tensor(offset, dtype=torch.int64).reshape(-1, 1)
        hi = lo + torch.tensor(shape, dtype=torch.int64).reshape(-1, 1)
        mine = ((coords >= lo) & (coords < hi)).all(0)
        values = torch.zeros(index.numel(), dtype=torch.float32)
        if bool(mine.any()):
            rel = coords[:, mine] - lo
            flat = torch.zeros_like(rel[0])
            for d in range(t.ndim):  # row-major position in the local shard
                flat = flat * shape[d] + rel[d]
            values[mine] = local.reshape(-1)[flat.to(local.device)].float().cpu()
        parts.append(values)
    spread, group = _layout(list(tensors.values()), where)
    if group is not None and parts:
        sharded = [s and tensors[n].ndim > 0 for n, s in zip(names, spread)]
        device = next(local_tensor(t) for t in tensors.values()).device
        flat = torch.cat([v for v, s in zip(parts, sharded) if s] or [torch.zeros(0)]).to(device)
        # every sampled entry lives on exactly one rank: the sum is that entry, exactly
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat.cpu()
        at = 0
        for j, s in enumerate(sharded):
            if s:
                k = parts[j].numel()
                parts[j] = flat[at : at + k]
                at += k
    return dict(zip(names, parts))


def full_tensors(fd: FisherDiagonal) -> dict[str, Tensor]:
    """Every tensor of ``fd`` gathered whole (a collective: call it on every rank)."""
    return {k: v.full_tensor() if is_dtensor(v) else v for k, v in fd.items()}  # type: ignore[attr-defined]


def full_state(state: Any, model: nn.Module | None = None) -> Any:
    """A copy of a (nested) state dict with every DTensor gathered whole: the full state-dict
    form of a sharded EWC or Fisher state (a collective: call it on every rank). With an FSDP1
    ``model``, the tensors keyed by its parameters' names and shaped like their local pieces
    are gathered whole too (``sharded_fsdp1.full_state``)."""
    if model is not None and is_fsdp1(model):
        from .sharded_fsdp1 import full_state as full_state_fsdp1

        return full_state_fsdp1(state, model)
    if is_dtensor(state):
        return state.full_tensor()
    if isinstance(state, dict):
        return {k: full_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [full_state(v) for v in state]
    return state


def shard_state_like(state: Any, model: nn.Module) -> Any:
    """The inverse of :func:`full_state`: in a (nested) state dict, every whole tensor keyed by a
    name of one of ``model``'s DTensor parameters, of that parameter's shape, becomes a DTensor
    sharded like it (each rank keeps its slice; no communication). For an FSDP1 ``model``, each
    rank keeps its flat piece of the parameters it flattened (``sharded_fsdp1.shard_state``)."""
    from torch.distributed.tensor import distribute_tensor

    if is_fsdp1(model):
        from .sharded_fsdp1 import shard_state

        return shard_state(state, model)

    params = {n: p for n, p in model.named_parameters() if is_dtensor(p)}

    def walk(value: Any, key: str | None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, None) for v in value]
        p = params.get(key) if key is not None else None
        if p is not None and isinstance(value, Tensor) and not is_dtensor(value):
            if value.shape != p.shape:
                raise FisherInputError(
                    f"Cannot shard the saved tensor {key!r}: its shape {tuple(value.shape)} is "
                    f"not the parameter's {tuple(p.shape)}."
                )
            return distribute_tensor(
                value.to(p.device),
                p.device_mesh,  # type: ignore[attr-defined]
                p.placements,  # type: ignore[attr-defined]
                src_data_rank=None,
            )
        return value

    return walk(state, None)


__all__ = [
    "as_sharded_like",
    "full_state",
    "full_tensors",
    "is_dtensor",
    "is_fsdp1",
    "is_fsdp2",
    "local_slice",
    "local_tensor",
    "map_local",
    "reduce_shard_statistics",
    "refuse_fsdp1",
    "run_passes_sharded",
    "sample_entries",
    "shard_group",
    "shard_state_like",
    "squared_gradient_reduction",
    "unsharded_parameters",
    "whole_numel",
]
