"""Fisher diagonals of FSDP1 models (``torch.distributed.fsdp.FullyShardedDataParallel``).

FSDP1 flattens the parameters of each wrapped module into one flat parameter and gives each rank
an equal chunk of it. With ``use_orig_params=True`` every named parameter stays an
``nn.Parameter`` whose data, outside a forward, is a flat 1-D piece of its rank's chunk:
uneven, and empty on a rank whose chunk does not reach it. The Fisher diagonal, the EWC anchors
and the penalty gradient are kept the same way: one 1-D tensor per named parameter, shaped like
that rank's piece, so memory per rank is about 2 x the parameter piece (Fisher in float32 and
anchor in the parameter's dtype).

Every estimator adds w (J^T u)^2 over cotangents u. A backward of u on each rank ends in FSDP1's
reduce-scatter of the ranks' flat gradients g_r; during a Fisher pass our communication hook
squares them first, so each rank keeps its piece of

    sum_r g_r^2      (never divided by the world size),

the sum over ranks that a DDP pass all-reduces. FSDP1 accepts one communication hook, registered
on the root before its first forward, and calls it for every backward; so :func:`register_fisher_hook`
registers a hook of ours once, which does exactly FSDP1's default reduction (divide by the
pre-factor, reduce-scatter or all-reduce, divide by the post-factor: bitwise the same gradients)
unless a Fisher pass has switched it to squaring (:func:`squared_gradient_reduction`).
Lightning's callbacks register it when the fit starts; plain PyTorch users call
``register_fisher_hook(model)`` after wrapping (an unused root is registered on the first Fisher
pass).

FSDP1 frees the unsharded parameters after each backward, so a graph cannot be backpropagated
twice: the Fisher pass runs one forward per backward. ``batched`` and ``hutchinson*`` cost one
forward and backward per batch and probe; the per-input estimators (``exact``, ``sample``,
``empirical``, ``upper``, ``lower``) one forward of the batch and one backward per input and
column (C per input for ``exact`` with C classes): B times the forwards of an unsharded pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .outputs import FisherInputError

#: the prefix FSDP1 puts before the names of the parameters it wraps
WRAPPED_PREFIX = "_fsdp_wrapped_module."


def _fsdp_class() -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


class FisherHookState:
    """State of our FSDP1 communication hook: FSDP1's own reduction settings (process group,
    gradient pre- and post-division factors) and whether a Fisher pass squares the gradients."""

    def __init__(self, group: Any, predivide: float, postdivide: float) -> None:
        self.process_group = group
        self.predivide = predivide
        self.postdivide = postdivide
        self.squaring = False


def _div_if_needed(t: Tensor, factor: float) -> None:
    if factor > 1:  # as FSDP1's default reduction does
        t.div_(factor)


def fisher_comm_hook(state: FisherHookState, grad: Tensor, output: Tensor | None = None) -> None:
    """FSDP1's default gradient reduction; while ``state.squaring``, the sum over the ranks of
    the squared gradients instead (formed and summed in float32 for low-precision gradients).

    ``output`` is ``None`` for ``NO_SHARD`` (an all-reduce of ``grad`` in place), else the
    reduce-scatter's output chunk; ``grad`` is then the padded flat gradient, whose zero padding
    stays zero when squared.
    """
    group = state.process_group
    if not state.squaring:
        _div_if_needed(grad, state.predivide)
        if output is None:
            dist.all_reduce(grad, group=group)
            _div_if_needed(grad, state.postdivide)
        else:
            dist.reduce_scatter_tensor(output, grad, group=group)
            _div_if_needed(output, state.postdivide)
        return
    low = grad.dtype not in (torch.float32, torch.float64)
    squares = grad.float().square() if low else grad.square_()
    if output is None:
        dist.all_reduce(squares, group=group)
        if low:
            grad.copy_(squares)
    elif low:
        out32 = torch.empty(output.shape, dtype=torch.float32, device=output.device)
        dist.reduce_scatter_tensor(out32, squares, group=group)
        output.copy_(out32)
    else:
        dist.reduce_scatter_tensor(output, squares, group=group)


_REGISTERED: weakref.WeakKeyDictionary[nn.Module, FisherHookState] = weakref.WeakKeyDictionary()


def fsdp1_roots(model: nn.Module) -> list[nn.Module]:
    """The outermost FSDP1 modules in ``model`` (``model`` itself if it is one)."""
    fsdp = _fsdp_class()
    roots: list[nn.Module] = []
    inner: set[int] = set()
    for m in model.modules():
        if isinstance(m, fsdp) and id(m) not in inner:
            roots.append(m)
            inner.update(id(s) for s in m.modules() if s is not m)
    return roots


def _states(root: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import _traversal_utils

    return list(_traversal_utils._get_fsdp_states(root))


def check_supported(model: nn.Module, who: str = "The Fisher pass") -> None:
    """Raise a ``FisherInputError`` for FSDP1 settings the Fisher code cannot serve:
    ``use_orig_params=False`` and the hybrid sharding strategies."""
    from torch.distributed.fsdp import ShardingStrategy

    hybrid = (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2)
    for root in fsdp1_roots(model):
        for s in _states(root):
            if not s._use_orig_params:
                raise FisherInputError(
                    f"{who} needs FSDP1 (FullyShardedDataParallel) with use_orig_params=True, "
                    "so that every named parameter, its gradient and its Fisher are a piece of "
                    "the rank's flat shard; this model was wrapped with use_orig_params=False. "
                    "Wrap it with FullyShardedDataParallel(..., use_orig_params=True) (Lightning's "
                    "FSDPStrategy sets it by default)."
                )
            if s.sharding_strategy in hybrid:
                raise FisherInputError(
                    f"{who} supports FSDP1's FULL_SHARD, SHARD_GRAD_OP and NO_SHARD; this model "
                    f"uses {s.sharding_strategy.name}, whose second (inter-node) reduction accepts "
                    "no communication hook. Shard over one process group."
                )


def register_fisher_hook(model: nn.Module) -> None:
    """Register our communication hook on every FSDP1 root in ``model`` (the wrapper itself, or
    a module that contains it): call it once after wrapping and before the first forward
    (FSDP1 accepts one hook per model, set before training). Training with it gives bitwise
    FSDP1's default gradients; Fisher passes switch it to squaring. Calling it again is a no-op;
    a model that already has another communication hook is refused."""
    check_supported(model, "register_fisher_hook")
    for root in fsdp1_roots(model):
        if root in _REGISTERED:
            continue
        states = _states(root)
        first = states[0]
        for s in states:
            hook = getattr(s, "_comm_hook", None)
            if hook is not None and hook is not fisher_comm_hook:
                raise FisherInputError(
                    f"This FSDP1 model already has the communication hook {hook!r}; FSDP1 accepts "
                    "one hook per model, and Fisher estimates need their own (FSDP1's default "
                    "reduction, squaring during a Fisher pass). Remove the other hook."
                )
            if (
                s.process_group is not first.process_group
                or s._gradient_predivide_factor != first._gradient_predivide_factor
                or s._gradient_postdivide_factor != first._gradient_postdivide_factor
            ):
                raise FisherInputError(
                    "Fisher estimates on FSDP1 need every wrapped module to reduce over the same "
                    "process group; this model's FSDP units use different groups."
                )
        state = FisherHookState(
            first.process_group,
            first._gradient_predivide_factor,
            first._gradient_postdivide_factor,
        )
        if getattr(first, "_comm_hook", None) is fisher_comm_hook:
            state = first._comm_hook_state  # registered by another copy of this module
        else:
            root.register_comm_hook(state, fisher_comm_hook)  # type: ignore[operator]
        _REGISTERED[root] = state


def registered_root(model: nn.Module) -> nn.Module | None:
    """The FSDP1 root registered with :func:`register_fisher_hook` that holds ``model`` (it or
    one of its submodules), or ``None``."""
    for root in list(_REGISTERED.keys()):
        if root is model or any(m is model for m in root.modules()):
            return root
    return None


def is_fsdp1_model(model: nn.Module) -> bool:
    """Whether ``model`` contains an FSDP1 module or lies inside a registered FSDP1 root (as a
    LightningModule does under Lightning's FSDPStrategy)."""
    fsdp = _fsdp_class()
    return any(isinstance(m, fsdp) for m in model.modules()) or registered_root(model) is not None


def _prepare(model: nn.Module) -> list[FisherHookState]:
    """The hook states of ``model``'s roots; roots that have not run a forward are registered."""
    check_supported(model)
    roots = fsdp1_roots(model)
    outer = registered_root(model)
    if outer is not None and outer not in roots:
        roots = [outer]
    states = []
    for root in roots:
        if root not in _REGISTERED:
            if getattr(root, "_is_root", None) is not None:  # a forward has run
                raise FisherInputError(
                    "Fisher estimates on FSDP1 need our communication hook, which FSDP1 accepts "
                    "only before the first forward: call "
                    "lightning_fisher.sharded_fsdp1.register_fisher_hook(model) right after "
                    "wrapping the model (Lightning's callbacks do it when the fit starts)."
                )
            register_fisher_hook(root)
        states.append(_REGISTERED[root])
    return states


def ensure_fisher_hook(model: nn.Module) -> None:
    """Register the Fisher communication hook on ``model``'s FSDP1 roots that have none, or
    raise a ``FisherInputError`` saying what to do when a forward already ran without it (call
    it before a forward that is not a Fisher pass, e.g. one that reads the number of classes)."""
    _prepare(model)


@contextmanager
def squared_gradient_reduction(model: nn.Module) -> Iterator[None]:
    """While active, a backward of ``model`` leaves in each FSDP1 parameter's ``.grad`` this rank's
    piece of sum_r g_r^2 over the ranks r (registers the hook if no forward has run yet). Under
    a ``MixedPrecision`` policy with a low-precision ``reduce_dtype`` the gradients are cast to
    float32 before they are squared and summed, as the float32 flat parameters hold them."""
    states = _prepare(model)
    outer = registered_root(model)
    roots = [outer] if outer is not None else fsdp1_roots(model)
    handles = [s._handle for root in roots for s in _states(root) if s._handle is not None]
    saved = [(h, h._reduce_dtype) for h in handles]
    for s in states:
        s.squaring = True
    for h in handles:
        if h._reduce_dtype in (torch.float16, torch.bfloat16):
            h._reduce_dtype = torch.float32
    try:
        yield
    finally:
        for s in states:
            s.squaring = False
        for h, dtype in saved:
            h._reduce_dtype = dtype


def forward_through_root(model: nn.Module, forward: Callable[[], Any]) -> Any:
    """``forward()`` (which calls ``model``) run so that FSDP1 gathers every parameter it uses
    and registers its backward hooks: directly when ``model`` contains its FSDP1 roots; through
    the registered root when ``model`` lies inside it (a LightningModule wrapped by Lightning's
    FSDPStrategy), with the root's inner module's ``forward`` redirected to ``forward`` for one
    call. ``forward()`` returns an object with ``.logits`` (the tensor FSDP1 hooks)."""
    root = registered_root(model)
    if root is None or any(m is root for m in model.modules()):
        return forward()
    inner: nn.Module = root._fsdp_wrapped_module  # type: ignore[assignment]
    had = "forward" in inner.__dict__
    saved = inner.__dict__.get("forward")
    box: list[Any] = []

    def restore() -> None:
        if had:
            inner.__dict__["forward"] = saved
        else:
            inner.__dict__.pop("forward", None)

    def redirected(*args: Any, **kwargs: Any) -> Tensor:
        restore()
        box.append(forward())
        return box[0].logits  # type: ignore[no-any-return]

    inner.__dict__["forward"] = redirected
    # one placeholder argument, ignored: older FSDP1 (torch 2.6) indexes the root's arguments
    placeholder = torch.empty(0, device=next(root.parameters()).device)
    try:
        root(placeholder)
    finally:
        restore()
    return box[0]


@dataclass(frozen=True)
class Piece:
    """Where a named parameter's local piece lies: the whole parameter's shape, the flat range
    [start, start + count) of it this rank holds, the piece's shape (``(count,)`` when sharded;
    the parameter's own shape under ``NO_SHARD``), and the process group it is sharded over."""

    shape: torch.Size
    start: int
    count: int
    local_shape: torch.Size
    group: Any
    #: whether the parameter is spread over the group's ranks (False under ``NO_SHARD``)
    spread: bool = True


def pieces(model: nn.Module) -> dict[str, Piece]:
    """Per named parameter of ``model`` that FSDP1 flattened: its :class:`Piece`."""
    fsdp = _fsdp_class()
    outer = registered_root(model)
    roots = [outer] if outer is not None else fsdp1_roots(model)
    where: dict[int, Piece] = {}
    for root in roots:
        for m in root.modules():
            if not isinstance(m, fsdp) or m._handle is None:
                continue
            flat = m._handle.flat_param
            if flat._params is None:
                check_supported(model)
            for p, shape, info in zip(flat._params, flat._shapes, flat._shard_param_infos):
                start, count = 0, 0
                if info.in_shard:
                    start = int(info.intra_param_start_idx)
                    count = int(info.intra_param_end_idx) - start + 1
                where[id(p)] = Piece(
                    torch.Size(shape),
                    start,
                    count,
                    torch.Size(p.shape),
                    m.process_group,
                    bool(m._handle.uses_sharded_strategy),
                )
    return {n: where[id(p)] for n, p in model.named_parameters() if id(p) in where}


def clean_name(name: str) -> str:
    """A parameter's name without FSDP1's wrapper prefixes (the name in an unwrapped model)."""
    return name.replace(WRAPPED_PREFIX, "")


def _walk(state: Any, fn: Callable[[str, Any], tuple[str, Any] | None]) -> Any:
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            hit = fn(k, v) if isinstance(k, str) and isinstance(v, Tensor) else None
            if hit is None:
                out[k] = _walk(v, fn)
            else:
                out[hit[0]] = hit[1]
        return out
    if isinstance(state, list):
        return [_walk(v, fn) for v in state]
    return state


def collective_device(group: Any) -> torch.device:
    """Where a tensor made for a collective on ``group`` must live: NCCL moves CUDA tensors
    only (the current device), gloo CPU ones."""
    if str(dist.get_backend(group)).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def full_state(state: Any, model: nn.Module) -> Any:
    """A copy of a (nested) state dict in which every tensor keyed by the name of an FSDP1
    parameter of ``model`` and shaped like its local piece is gathered whole, reshaped like the
    parameter and keyed by its unwrapped name (the full state-dict form, loadable without FSDP).
    A collective: call it on every rank."""
    where = pieces(model)
    if not where:
        return state
    names = list(where)
    group = where[names[0]].group
    ranges = torch.tensor(
        [[where[n].start, where[n].count] for n in names],
        dtype=torch.int64,
        device=collective_device(group),
    )
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(ranges) for _ in range(world)]
    dist.all_gather(gathered, ranges, group=group)
    index = {n: i for i, n in enumerate(names)}

    def gather(key: str, value: Tensor) -> tuple[str, Any] | None:
        piece = where.get(key)
        if piece is None or value.shape != piece.local_shape:
            return None
        i = index[key]
        counts = [int(g[i, 1]) for g in gathered]
        width = max(counts)
        buf = torch.zeros(width, dtype=value.dtype, device=value.device)
        buf[: piece.count] = value.reshape(-1)
        parts = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(parts, buf, group=group)
        whole = torch.empty(piece.shape.numel(), dtype=value.dtype, device=value.device)
        for g, part, c in zip(gathered, parts, counts):
            s = int(g[i, 0])
            whole[s : s + c] = part[:c]
        return clean_name(key), whole.reshape(piece.shape)

    return _walk(state, gather)


def shard_state(state: Any, model: nn.Module) -> Any:
    """The inverse of :func:`full_state`: every whole tensor keyed by the (unwrapped or wrapped)
    name of an FSDP1 parameter of ``model``, of the parameter's shape, becomes this rank's
    piece of it (a copy), keyed by the wrapped name; no communication."""
    where = pieces(model)
    by_clean = {clean_name(n): n for n in where}

    def cut(key: str, value: Tensor) -> tuple[str, Any] | None:
        name = key if key in where else by_clean.get(key)
        if name is None:
            return None
        piece = where[name]
        if value.shape != piece.shape:
            if value.shape == piece.local_shape:
                return None  # already a piece
            raise FisherInputError(
                f"Cannot shard the saved tensor {key!r}: its shape {tuple(value.shape)} is not "
                f"the parameter's {tuple(piece.shape)}."
            )
        flat = value.reshape(-1)[piece.start : piece.start + piece.count]
        return name, flat.reshape(piece.local_shape).clone()

    return _walk(state, cut)


@contextmanager
def whole_parameters(
    model: nn.Module, who: str = "This computation"
) -> Iterator[dict[str, Tensor]]:
    """While active, ``model``'s FSDP1 parameters are whole leaf tensors (all-gathered from the
    ranks' pieces, ``requires_grad`` as the parameters), its FSDP1 modules forward straight to
    the modules they wrap (no gathering, resharding or gradient hooks), and
    ``model.named_parameters()`` gives the whole tensors; yields every parameter by name.

    For a double backward (the trace regulariser's ``create_graph``), which FSDP1 cannot run: it
    frees the gathered flat parameters after each backward and reduces gradients in hooks on
    them. Here the forward is the wrapped modules' own arithmetic on ordinary tensors, so
    autograd differentiates it any number of times; gradients land on the yielded tensors, not
    on FSDP1's. Cost: one all-gather of the model and its whole size on every rank while active.
    ``MixedPrecision`` parameter dtypes are refused (the forward would not cast as FSDP1 does).
    Restores the parameters and forwards on exit. A collective: call it on every rank."""
    check_supported(model, who)
    fsdp = _fsdp_class()
    outer = registered_root(model)
    roots = [outer] if outer is not None else fsdp1_roots(model)
    units = [m for root in roots for m in root.modules() if isinstance(m, fsdp)]
    for unit in units:
        handle = unit._handle
        if handle is not None and handle._fwd_bwd_param_dtype != handle.flat_param.dtype:
            raise FisherInputError(
                f"{who} on FSDP1 runs a forward on whole parameters outside FSDP1, which does "
                f"not apply FSDP1's MixedPrecision casts (parameters in "
                f"{handle._fwd_bwd_param_dtype}, held in {handle.flat_param.dtype}); that is not "
                "implemented. Use full precision (no MixedPrecision param_dtype) for this run."
            )
    where = pieces(model)
    params = dict(model.named_parameters())
    gathered = full_state({n: params[n].detach() for n in where}, model)
    whole: dict[str, Tensor] = {}
    for n, p in params.items():
        if n in where:
            w = gathered[clean_name(n)].detach().clone()
            whole[n] = w.requires_grad_(p.requires_grad)
        else:  # not flattened by FSDP1: already whole
            whole[n] = p
    swap = {id(params[n]): whole[n] for n in where}
    owners = [
        (m, attr, p)
        for m in model.modules()
        for attr, p in m._parameters.items()
        if p is not None and id(p) in swap
    ]
    try:
        for unit in units:
            unit.__dict__["forward"] = unit._fsdp_wrapped_module.__call__
        for m, attr, p in owners:
            # a plain tensor, read by the module's forward
            m._parameters[attr] = swap[id(p)]  # type: ignore[assignment]
        yield whole
    finally:
        for m, attr, p in owners:
            m._parameters[attr] = p
        for unit in units:
            unit.__dict__.pop("forward", None)


def local_pieces(tensors: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Per name, this rank's piece of a whole tensor shaped like the FSDP1 parameter of that
    name (as its local piece is shaped; a copy); tensors of other names are kept as they are.
    No communication."""
    where = pieces(model)
    out: dict[str, Tensor] = {}
    for name, value in tensors.items():
        piece = where.get(name)
        if piece is None or value.shape == piece.local_shape:
            out[name] = value
            continue
        flat = value.reshape(-1)[piece.start : piece.start + piece.count]
        out[name] = flat.reshape(piece.local_shape).clone()
    return out


def sum_over_ranks(value: Tensor, model: nn.Module) -> Tensor:
    """``value`` (a sum over this rank's pieces) plus the other ranks' sums, for an FSDP1
    ``model``; the gradient flows through this rank's part only (each rank differentiates its
    own pieces). ``value`` itself for other models. A collective on FSDP1: call it on every
    rank."""
    if not (dist.is_available() and dist.is_initialized()) or not is_fsdp1_model(model):
        return value
    where = pieces(model)
    if not where:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, group=next(iter(where.values())).group)
    return value + (total - value.detach())


def mark_pieces(fd: Any, model: nn.Module) -> Any:
    """``fd`` (a ``FisherDiagonal`` of this rank's pieces of ``model``'s parameters, e.g. one
    restored from a checkpoint) told which tensors are pieces spread over the ranks, so that
    ``fd.trace()`` sums them over the ranks (as a Fisher pass's result does); returns ``fd``."""
    where = pieces(model)
    if (
        where
        and dist.is_initialized()
        and dist.get_world_size(next(iter(where.values())).group) > 1
    ):
        fd.piece_names = frozenset(n for n in fd if n in where and where[n].spread)
        fd.piece_group = next(iter(where.values())).group
    return fd


def traces(fisher: Mapping[str, Tensor], model: nn.Module) -> dict[str, float]:
    """Per-parameter traces of a Fisher kept as FSDP1 local pieces: the sums of the pieces over
    the ranks (summed in float64; one collective). ``FisherDiagonal.trace`` of such a Fisher
    sums this rank's pieces only. Tensors that are not pieces (parameters FSDP1 left whole)
    count once."""
    where = pieces(model)
    names = list(fisher)
    if not names:
        return {}
    device = next(iter(fisher.values())).device
    sums = torch.stack([fisher[n].sum(dtype=torch.float64) for n in names]).to(device)
    if where and dist.is_initialized():
        group = next(iter(where.values())).group
        keep = torch.tensor(
            [(n in where and where[n].spread) or dist.get_rank(group) == 0 for n in names],
            device=device,
        )
        sums = torch.where(keep, sums, torch.zeros_like(sums))
        dist.all_reduce(sums, group=group)
    return dict(zip(names, sums.tolist()))


__all__ = [
    "FisherHookState",
    "Piece",
    "check_supported",
    "clean_name",
    "ensure_fisher_hook",
    "fisher_comm_hook",
    "forward_through_root",
    "fsdp1_roots",
    "full_state",
    "is_fsdp1_model",
    "local_pieces",
    "mark_pieces",
    "pieces",
    "register_fisher_hook",
    "registered_root",
    "shard_state",
    "squared_gradient_reduction",
    "sum_over_ranks",
    "traces",
    "whole_parameters",
]
