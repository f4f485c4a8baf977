"""Sums of squared per-input gradients, for any model, from one forward and batched backwards.

Given output cotangents u_{k,x} (K columns per input x), this engine computes

    S_i = sum_x sum_k w (J_x^T u_{k,x})_i^2

for every tracked parameter i, where J_x = dz(x)/dtheta. ``exact`` uses the columns of a square
root of I(p), ``sample`` k columns e_y - p with y ~ p, ``empirical`` one column e_y - p with the
true label.

How: a planning forward of two rows (one if the batch has two) records, for every module call,
the shapes of its inputs and outputs, and, under a ``TorchFunctionMode``, which module is running
whenever a tracked parameter is used. Comparing those shapes with the full batch's finds each
tensor's batch dimension (or that it has none). Each parameter goes to the innermost module whose
forward contains all its uses (usually the module that owns it). During the real forward, hooks
record those modules' inputs and outputs; one backward per chunk of columns
(``batched_grad``) gives the gradient at every output; a per-layer rule turns (input, output
gradient) into per-input parameter gradients (the rules live in ``layer_rules``):

* closed forms (``_RULES``) for ``nn.Linear``, ``transformers``' ``Conv1D`` (a Linear with the
  weight stored (in, out)), ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding``, the affine parameters
  of the norms and ``nn.PReLU``. Linear and Conv are products over L
  positions; with L < K the columns are contracted first (Gram route), and with L = 1 they fold;
* any other module by ``torch.func.vjp`` of that module alone, vectorised over inputs and columns;
* ``loop``: the module re-run on one input at a time with ordinary autograd;
* the whole-model route, for parameters whose use cannot be localised (an output without a batch
  dimension, a packed sequence, a module whose batch cannot be sliced): per-input gradients by a
  backward of the whole batch's graph with each column restricted to one input, which equals that
  input's own gradient because the model treats inputs independently (true in eval mode).

Inputs shared by the batch: a module whose tensor inputs have no batch dimension but a leading
dimension of 1 (GPT-2's ``wpe`` looked up with position ids of shape (1, T)) has an output without
one. Found when the first batch is recorded; the engine then asks to plan again
(``finish_recording`` returns False), proves on two rows that the model merely broadcasts the
module's output (``_prove_expansion``), and from then on runs the module, while planning and
recording only, on those inputs expanded to the batch (``x.expand(B, *x.shape[1:])``), so that its
output has a batch dimension and its rule applies. A failed proof keeps the whole-model route.

Recorded outputs are handed on to the rest of the forward as clones until a forward has shown
that nothing rewrites them in place, then as they are (their versions checked on every batch; a
rewritten one is recorded again, cloned): one op and one activation copy fewer per output.

Plans are reused: a later batch of a pass, and a later pass over the same model (``_PLANS``,
the model's last plan, not one a failed check changed), record with the plan they have, without
a planning forward; the check itself is kept per structure (``_VERIFIED``). Every
recorded forward is compared with the plan, by the layout of its recorded calls
(``same_layout``) and by the tracked parameters its autograd graph reaches and how often it uses
each (``same_uses``, a walk of the graph): a module that ran only now, a branch the plan never
saw or a parameter used once more outside its module is planned again on that batch.

Per-position columns (token-level logits (B, T, C), column (k, t) nonzero at position t only)
are split at the vocabulary head where the logits are the output of a closed-form matrix head
z_t = W h_t + b (``nn.Linear``, ``Conv1D``, or a Linear tied to an ``nn.Embedding``), called once,
up to autograd nodes that move no entry to another position (a clone, a dtype cast, a view of
the same shape, a slice of the positions: ``_head_offset`` walks the chain at each batch).
``accumulate_positions`` then takes each column as its (B, C) slice u at position t: the head's
own squares for all columns at once (its rule on the B T (input, position) pairs as inputs of
one position), u W at the head's input, one batched backward from there for the chunk, and for a
tied weight the cross term with the embedding's rows. No (B, T, C) tensor is formed per column
and the chunks are sized for the smaller cost. The check below covers the split (its gradients
at the recorded outputs come from the same split on the checked batch); a failed check refuses
it for the engine.

Self-verification: on the first batch of every traced structure (once per model: a later pass
over the same model with the same recorded structure relies on the earlier proof) the engine
draws balanced random signs s_x (half +1, half -1) and compares, per parameter,
sum_x s_x J_x^T u_x built from its per-input gradients with one ordinary backward of the
cotangent s_x u_x, on the batch's first ``VERIFY_ROWS`` inputs (from a forward of their own on
large batches, so the check's cost does not grow with the batch). The difference is formed in
place in the reference gradients, with no other parameter-sized buffer. A rule
that disagrees or raises is replaced by the next route (closed form or vjp -> loop -> whole
model), with one log line; when even the whole-model route disagrees (inputs are not
independent) a ``FisherInputError`` is raised.

Precision: ``product_dtype`` is the dtype of the per-input products, bfloat16 for a bfloat16
model (its output gradients and activations are bfloat16; the GEMMs accumulate in float32 and
round each per-input gradient once, a relative error of about 2^-9 per entry, 2^-8 per square),
else the accumulation dtype (float32, or float64 for float64 models: unchanged). Every square is
taken after a cast to the accumulation dtype and every sum over inputs or columns is in it, so the
nonnegative squares add up without further loss. Rules whose per-input gradients are sums of
elementwise products that may cancel (norms, PReLU: ``model_dtype_products = False``) work in the
accumulation dtype. float16 models keep float32 products: their range could overflow a per-input
gradient. Chunk sizes count the bytes really allocated (a 16-bit product and its float32 square).

A parameter used in several places (tied weights, a module called twice) has its per-input
gradients summed over the uses before squaring; one ``nn.Embedding`` and one ``nn.Linear`` use
(tied input and output embeddings) are summed in closed form, without a per-input gradient of the
whole table (``_tied_sum_squares``). Per-input gradients are materialised in chunks
whose size keeps memory under ``max_memory_mib``, shared out so that the parts live at the same
time add up to at most the cap: a quarter for the cotangent columns handed in (the caller cuts
them), half for the output gradients of a chunk of columns (cotangents included), a quarter for
a rule's per-input buffers. When one column or one input alone exceeds its share, the pass
refuses with a ``FisherInputError`` before allocating it.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..options import MAX_MEMORY_MIB
from ..outputs import FisherInputError
from .batched_backward import batched_grad
from .layer_rules import (
    _NEXT,
    _RULES,
    UNKNOWN,
    _Call,
    _closed_form_rule,
    _Ctx,
    _EmbeddingRule,
    _folded_bytes,
    _folded_sum_squares,
    _Handler,
    _read_one_position,
    _segments,
    _tied_pair,
    _tied_sum_squares,
)

logger = logging.getLogger("lightning_fisher")

#: Use site of a parameter used outside the model's forward (in ``output_fn``, say).
OUTSIDE = "\0outside"
#: Relative tolerance of the self-verification, by dtype (of the norm of the per-input gradients).
#: float64 allows float32 rounding: a float64 model may compute parts in float32 (Gemma's RMSNorm
#: scales by ``1 + weight.float()``, so its weight's gradient is summed in float32: 1.5e-8 off);
#: a wrong rule is off at O(1).
VERIFY_RTOL = {torch.float64: 1e-5, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
_VERIFY_SEED = 0x5EED
#: The check looks at the first inputs of the batch only (the cotangent is zero beyond them),
#: half of them with sign +1 and half with -1 (a random order), so a rule that mixes inputs
#: cannot pass with all signs equal; few enough that the check's products stay small beside the
#: parameter-sized work every check does once.
VERIFY_ROWS = 8
#: Of those, the whole-model route checks this many one by one and the rest as one signed column.
VERIFY_MODEL_ROUTE_ROWS = 2


def _norms(tensors: Sequence[Tensor]) -> list[float]:
    """The 2-norms of ``tensors``, with one synchronisation."""
    if not tensors:
        return []
    dev = tensors[0].device
    return torch.stack([n.to(dev) for n in torch._foreach_norm(list(tensors))]).tolist()


def _floats(values: list[Tensor]) -> list[float]:
    """0-d tensors (possibly on several devices) as floats, with one synchronisation per device."""
    if not values:
        return []
    dev = values[0].device
    return torch.stack([v.to(dev) for v in values]).tolist()


def _owned(
    grads: Sequence[Tensor | None], params: Sequence[Tensor], dtype: torch.dtype, held: Tensor
) -> list[Tensor]:
    """``grads`` in ``dtype`` as tensors no one else holds, so that they may be overwritten:
    autograd may hand the same tensor to several inputs, a view, or the cotangent ``held``
    itself; those are copied, the rest kept. Zeros for ``None``."""
    seen = {held.untyped_storage().data_ptr()}
    out = []
    for g, p in zip(grads, params):
        if g is None:
            out.append(torch.zeros(p.shape, dtype=dtype, device=p.device))
            continue
        storage = g.untyped_storage().data_ptr()
        fresh = g.dtype == dtype and storage not in seen
        out.append(g if fresh else g.to(dtype, memory_format=torch.contiguous_format, copy=True))
        seen.add(out[-1].untyped_storage().data_ptr())
    return out


#: Structures that passed the check, per model: a later pass over the same model whose recorded
#: structure (modules, rules, parameter names, batch dimensions, dtype) is one of them skips it.
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, set[Any]] = weakref.WeakKeyDictionary()


def forget_verified(model: nn.Module) -> None:
    """Forget the structures of ``model`` that passed the check (and the plan kept with them), so
    the next pass plans and checks again."""
    _VERIFIED.pop(model, None)
    _PLANS.pop(model, None)


@dataclass
class _Plan:
    """A plan kept for later passes over the same model: what planning and the first batch's
    recording found (see ``PerInputEngine.reuse_plan``)."""

    key: Any
    trace: _Trace
    handlers: list[tuple[nn.Module, str, dict[str, str], str]]
    model_route: set[str]
    shared: set[str]
    dims: dict[tuple[str, int], Any]
    expanded: set[str]
    expand_refused: dict[str, str]
    log: list[str]
    messages: list[tuple[Any, ...]]
    used: frozenset[tuple[str, int]] | None
    uncloned: set[str]
    cloned: set[str]


#: The last plan per model. A later pass reuses it, skipping the planning forward, as a later
#: batch of a pass does; its first batch is compared with the plan (``same_layout``) and
#: planned again when it differs.
_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def _parameter_uses(root: Tensor, ids: dict[int, str]) -> frozenset[tuple[str, int]]:
    """(name, uses) of every tracked parameter (``ids``: id -> name) that ``root``'s autograd
    graph reaches, ``uses`` counting the graph's edges into that parameter: a parameter used
    once more (a second use outside its module, say) changes its count."""
    uses: dict[str, int] = {}
    seen: set[Any] = set()
    stack = [root.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            variable = getattr(nxt, "variable", None)  # an AccumulateGrad node: a leaf tensor
            if variable is not None and id(variable) in ids:
                name = ids[id(variable)]
                uses[name] = uses.get(name, 0) + 1
            else:
                stack.append(nxt)
    return frozenset(uses.items())


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)


# Tracing --------------------------------------------------------------------------------------


@dataclass
class _Trace:
    """What the planning forward saw: call shapes per module and the modules using each parameter."""

    rows: int
    finished: bool = False
    #: module path -> per call: (shapes of the flattened (args, kwargs) leaves, of the output leaves)
    calls: dict[str, list[tuple[list[Any], list[Any]]]] = field(default_factory=dict)
    #: parameter name -> paths of the innermost modules running when it was used
    uses: dict[str, set[str]] = field(default_factory=dict)


@functools.cache
def _args_spec(n: int) -> Any:
    """The tree spec of ``(args, {})`` for ``n`` positional arguments that are tensors."""
    return tree_flatten((tuple(range(n)), {}))[1]


def _flatten_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], Any]:
    """``tree_flatten((args, kwargs))``; a module called on tensors alone (the usual call)
    without walking the tree."""
    if not kwargs and all(isinstance(a, Tensor) for a in args):
        return list(args), _args_spec(len(args))
    return tree_flatten((args, kwargs))


def _shapes(leaves: list[Any]) -> list[Any]:
    return [tuple(t.shape) if isinstance(t, Tensor) else None for t in leaves]


class _UseRecorder(TorchFunctionMode):
    """Records, for every torch function that takes a tracked parameter and returns a tensor that
    requires grad, the innermost module running (attribute reads such as ``p.dtype`` are not uses)."""

    def __init__(self, ids: dict[int, str], stack: list[str], uses: dict[str, set[str]]) -> None:
        super().__init__()
        self.ids, self.stack, self.uses = ids, stack, uses

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        found = [self.ids[id(t)] for t in tree_flatten((args, kwargs))[0] if id(t) in self.ids]
        if found and any(isinstance(t, Tensor) and t.requires_grad for t in tree_flatten(out)[0]):
            where = self.stack[-1] if self.stack else OUTSIDE
            for name in found:
                self.uses.setdefault(name, set()).add(where)
        return out


def _batch_dim(full: Any, small: Any, B: int, b: int) -> int | None:
    """The dimension of a tensor that tracks the number of rows: compared between a forward of B
    rows (``full``) and one of b rows (``small``). None: no such dimension (shared by all inputs);
    ``UNKNOWN``: the shapes change some other way."""
    if full is None:
        return None
    if small is None or len(full) != len(small):
        return UNKNOWN
    diff = [d for d in range(len(full)) if full[d] != small[d]]
    if not diff:
        return None
    if len(diff) == 1 and full[diff[0]] == B and small[diff[0]] == b:
        return diff[0]
    return UNKNOWN


def _guess_dim(full: Any, B: int) -> int | None:
    """Without a forward of another size: the first dimension if it is the batch size."""
    if full is None:
        return None
    return 0 if len(full) and full[0] == B else UNKNOWN


# Recorded calls and the context a rule works in -------------------------------------------------


#: autograd nodes that may lie between a vocabulary head's output and the logits without moving
#: an entry to another position or class: a clone (the recording's own), a dtype cast, a view or
#: alias of the same shape. A slice along the positions (``shift_labels``) is read separately.
_POSITIONWISE = frozenset(
    {
        "CloneBackward0",
        "ToCopyBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "AliasBackward0",
        "ReshapeAliasBackward0",
        "_ReshapeAliasBackward0",
    }
)


def _head_offset(logits: Tensor, head_out: Tensor) -> int | None:
    """The offset o with logits[:, t] = head_out[:, t + o] (up to a dtype cast), when the autograd
    chain from ``logits`` (B, T, C) back to ``head_out`` (B, T', C) holds nothing but
    ``_POSITIONWISE`` nodes of unchanged shape and slices of the positions with step 1; else None.
    """
    if logits.ndim != 3 or head_out.ndim != 3 or head_out.grad_fn is None:
        return None
    if logits.shape[0] != head_out.shape[0] or logits.shape[2] != head_out.shape[2]:
        return None
    node, target = logits.grad_fn, head_out.grad_fn
    shape, offset = tuple(logits.shape), 0
    for _ in range(64):
        if node is None:
            return None
        if node is target:
            return offset if shape == tuple(head_out.shape) else None
        nxt = [f for f, _ in node.next_functions if f is not None]
        if len(nxt) != 1:
            return None
        name = type(node).__name__
        size = getattr(node, "_saved_self_sym_sizes", None)
        if name == "SliceBackward0":
            size = tuple(cast(Any, size))
            dim, start, step = node._saved_dim, node._saved_start, node._saved_step  # type: ignore[attr-defined]
            if len(size) != 3 or dim != 1 or step != 1 or (size[0], size[2]) != shape[::2]:
                return None
            start = start - 2**64 if start >= 2**63 else start  # stored unsigned
            offset += min(max(start + size[1] if start < 0 else start, 0), size[1])
            shape = size
        elif name not in _POSITIONWISE or (size is not None and tuple(size) != shape):
            return None
        node = nxt[0]
    return None


@dataclass
class _HeadSplit:
    """A closed-form matrix head (``nn.Linear``, ``Conv1D``) called once, whose output is the
    logits with positions shifted by ``offset`` (``_head_offset``); ``tied``: the
    ``nn.Embedding`` handler sharing its weight, if any."""

    handler: _Handler
    call: _Call
    offset: int
    tied: _Handler | None

    @property
    def x(self) -> Tensor:
        """The head's input (B, T', D), as recorded (part of the graph)."""
        return cast(Tensor, self.call.leaves[cast(int, self.call.input_index())])

    def weight(self, dtype: torch.dtype) -> Tensor:
        """The head's weight as a (C, D) matrix in ``dtype``."""
        w = cast(Tensor, cast(Any, self.handler.module).weight).detach()
        return (w.t() if self.handler.rule == "hf_conv1d" else w).to(dtype)


class PerInputEngine:
    """Plans, for a model and a set of tracked parameters, how to get per-input gradients.

    Use ``engine.plan(forward, batch_size)``, ``with engine.recording(): out = model(batch)``,
    ``engine.finish_recording(batch_size)`` (False: the traced structure changed, plan again on this
    batch), optionally ``engine.verify(logits)``, then ``engine.accumulate(logits, cot, acc,
    weight)`` with cotangents of shape ``(K, *logits.shape)``; call ``engine.reset()`` before the
    next forward.
    """

    #: split per-position columns at a closed-form vocabulary head (``accumulate_positions``)
    head_split = True

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        max_memory_mib: float = MAX_MEMORY_MIB,
        product_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.params = params
        first = next(iter(params.values())).dtype if params else torch.float32
        self._acc_dtype = torch.promote_types(first, torch.float32)
        #: dtype of the per-input products (output gradients, per-input gradients): the
        #: model's own for a bfloat16 model (its GEMMs accumulate in float32), else the
        #: accumulation dtype (float16's range could overflow a per-input gradient); squares
        #: and sums are always in the accumulation dtype
        self.product_dtype = product_dtype or (first if first == torch.bfloat16 else self._dtype())
        self.max_bytes = max(1.0, max_memory_mib) * 2**20
        #: shares of the cap: the cotangent columns handed in, the output gradients of a chunk of
        #: columns, a rule's per-input buffers
        self.cotangent_bytes = self.max_bytes / 4
        self.column_bytes = self.max_bytes / 2
        self.rule_bytes = self.max_bytes / 4
        self.handlers: list[_Handler] | None = None
        #: parameters whose per-input gradients come from the whole-model route
        self.model_route: set[str] = set()
        self.shared: set[str] = set()
        self._trace: _Trace | None = None
        self._dims_known = False
        self._active = False
        self._batch_size = 0
        self._batched_model_route = True
        self._verified: set[Any] = set()
        #: routes forced by a failed check, by module path (kept across re-planning)
        self._forced: dict[str, str] = {}
        self._forced_model: set[str] = set()
        #: modules whose inputs are shared by the batch (leading dimension 1, no batch dimension),
        #: run on those inputs expanded to the batch while planning and recording: proven ones,
        #: ones waiting for their proof, and the reason for each one refused
        self.expanded: set[str] = set()
        self._expand_pending: set[str] = set()
        self._expand_refused: dict[str, str] = {}
        #: (leaf, dimension) of the model's inputs that carries the batch, and the rows of the
        #: forward running now (read from it)
        self._batch_leaf: tuple[int, int] | None = None
        self._forward_rows: int | None = None
        self.log: list[str] = []
        #: the whole-model route's log records of this plan (repeated when a pass reuses it)
        self._messages: list[tuple[Any, ...]] = []
        #: tracked parameters the graph of the first forward recorded after planning reaches
        self._used: frozenset[tuple[str, int]] | None = None
        self._verify_grads: dict[int, list[Tensor]] = {}
        #: the head split is refused for this engine (its check failed)
        self._head_split_refused = False
        #: path of the head the last ``accumulate_positions`` split off (None: not taken)
        self.split_head: str | None = None
        #: the most columns one backward of this engine took (a chunk's size)
        self.max_backward_columns = 0
        #: modules whose outputs are handed on without a clone (a recorded forward left them
        #: alone), and those whose outputs the forward rewrites in place (kept cloned)
        self._uncloned: set[str] = set()
        self._cloned: set[str] = set()

    def fit(self, bytes_each: float, share: float, what: str) -> int:
        """How many items of ``bytes_each`` fit in ``share`` bytes; refuses when not one does."""
        if bytes_each > share:
            need = bytes_each * self.max_bytes / share / 2**20
            raise FisherInputError(
                f"The per-input Fisher pass needs {bytes_each / 2**20:.0f} MiB at once for "
                f"{what}, more than its share ({share / 2**20:.0f} MiB) of "
                f"max_memory_mib={self.max_bytes / 2**20:.0f}. Pass max_memory_mib >= "
                f"{math.ceil(need)}, or use smaller batches or shorter sequences (or "
                "method='hutchinson': one ordinary backward per batch)."
            )
        return max(1, int(share // max(1.0, bytes_each)))

    # Planning -----------------------------------------------------------------------------------
    def _plan_key(self) -> Any:
        """What a kept plan must share with this pass: the tracked parameters (names, objects,
        dtypes, devices)."""
        return tuple((n, id(p), p.dtype, p.device) for n, p in self.params.items())

    def reuse_plan(self) -> bool:
        """Take the plan an earlier pass over this model left (False: there is none, or its
        tracked parameters differ). The caller records the first batch as usual; should its
        layout differ from the plan's, the caller plans again, as for any later batch."""
        kept = _PLANS.get(self.model)
        if kept is None or kept.key != self._plan_key():
            return False
        self._trace = kept.trace
        self.handlers = [
            _Handler(m, path, dict(names), rule) for m, path, names, rule in kept.handlers
        ]
        self.model_route = set(kept.model_route)
        self.shared = set(kept.shared)
        self._dims = dict(kept.dims)
        self._dims_known = True
        self.expanded = set(kept.expanded)
        self._expand_refused = dict(kept.expand_refused)
        self.log = list(kept.log)
        self._messages = list(kept.messages)
        self._used = kept.used
        self._uncloned = set(kept.uncloned)
        self._cloned = set(kept.cloned)
        for message in self._messages:
            logger.info(*message)
        return True

    def keep_plan(self) -> None:
        """Keep this plan, once a batch has been recorded with it, for later passes over the
        model; not one whose routes a failed check forced (a new pass plans the default routes
        and checks them again). Whether a structure passed the check is kept apart
        (``_VERIFIED``): a kept plan is checked like any other."""
        assert self.handlers is not None and self._trace is not None
        if self._forced or self._forced_model or self._expand_pending:
            return
        kept = _PLANS.get(self.model)
        if kept is not None and kept.trace is self._trace:
            return
        _PLANS[self.model] = _Plan(
            key=self._plan_key(),
            trace=self._trace,
            handlers=[(h.module, h.path, dict(h.names), h.rule) for h in self.handlers],
            model_route=set(self.model_route),
            shared=set(self.shared),
            dims=dict(self._dims),
            expanded=set(self.expanded),
            expand_refused=dict(self._expand_refused),
            log=list(self.log),
            messages=list(self._messages),
            used=self._used,
            uncloned=set(self._uncloned),
            cloned=set(self._cloned),
        )

    def same_uses(self, logits: Tensor) -> bool:
        """False when this forward's graph reaches other tracked parameters, or uses one of them
        a different number of times, than the forward recorded right after planning (a branch the
        plan never saw, a module called only now, a parameter used again outside its module):
        plan again on this batch. Shapes alone cannot tell (a module that did not run in the
        planning forward is not recorded at all; a use outside a module is not recorded)."""
        used = _parameter_uses(logits, {id(p): n for n, p in self.params.items()})
        if self._used is None:
            self._used = used
        return used == self._used

    def plan(self, forward: Callable[[], Any], batch_size: int | None = None) -> None:
        """Trace a forward of two rows of the batch (one if it has two), then assign every tracked
        parameter to the module whose forward contains all its uses.

        The rows are taken at the dimension of size ``batch_size`` of each tensor argument of the
        model (the first such dimension). Post-processing of the small output by ``forward`` may
        fail on mismatched shapes (masks, labels): that is ignored once the model has run. Should
        the small forward itself fail, planning runs again on the whole batch and batch
        dimensions are taken to be the first.
        """
        B = batch_size
        rows = 1 if B == 2 else 2
        self._messages = []
        self._used = None
        for path in sorted(self._expand_pending):
            why = self._prove_expansion(forward, B, path)
            if why is None:
                self.expanded.add(path)
                self.log.append(f"{path}: inputs shared by the batch, expanded to it")
            else:
                self._expand_refused[path] = why
        self._expand_pending.clear()
        for small in (B is not None, False):
            trace = _Trace(rows=rows if small else 0)
            try:
                self._traced(forward, trace, B if small else None)
                break
            except Exception:
                if not small:
                    raise
                if trace.finished:  # the model ran; what failed is the handling of its output
                    break
        self._trace = trace
        self._dims_known = False
        self._assign(trace)

    def _traced(self, forward: Callable[[], Any], trace: _Trace, B: int | None) -> None:
        """Run ``forward`` (its model inputs resized to ``trace.rows`` rows when ``B`` is given)
        and record call shapes and parameter uses into ``trace``."""
        by_id = {id(p): name for name, p in self.params.items()}
        stack: list[str] = []
        rows = trace.rows

        def pre(m: nn.Module, args: Any, kwargs: Any) -> None:
            path = paths[id(m)]
            stack.append(path)
            trace.calls.setdefault(path, []).append((_shapes(tree_flatten((args, kwargs))[0]), []))

        def post(m: nn.Module, _a: Any, _k: Any, out: Any) -> None:
            path = paths[id(m)]
            if stack and stack[-1] == path:
                stack.pop()
            trace.calls[path][-1][1].extend(_shapes(tree_flatten(out)[0]))

        def finished(*_: Any) -> None:
            trace.finished = True

        paths: dict[int, str] = {}
        hooks = []
        for path, module in self.model.named_modules():
            paths[id(module)] = path
            hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
        if B is not None:
            index = torch.arange(rows) % B
            hooks.append(
                self.model.register_forward_pre_hook(
                    self._resizer(B, index), with_kwargs=True, prepend=True
                )
            )
        hooks += self._expansion_hooks()
        hooks.append(self.model.register_forward_hook(finished))
        try:
            with torch.enable_grad(), _UseRecorder(by_id, stack, trace.uses):
                forward()
        finally:
            for h in hooks:
                h.remove()

    def _resizer(self, B: int, index: Tensor) -> Callable[..., Any]:
        """A forward pre-hook of the model keeping the rows ``index`` of every tensor argument
        (at its first dimension of size ``B``); notes which argument carries the batch."""

        def resize(_m: nn.Module, args: Any, kwargs: Any) -> Any:
            leaves, spec = tree_flatten((args, kwargs))
            out = []
            for i, t in enumerate(leaves):
                if isinstance(t, Tensor) and B in t.shape:
                    d = list(t.shape).index(B)
                    if not any(isinstance(o, Tensor) and B in o.shape for o in leaves[:i]):
                        self._batch_leaf = (i, d)
                    t = t.index_select(d, index.to(t.device))
                out.append(t)
            return tree_unflatten(out, spec)

        return resize

    def _rows_of(self, leaves: list[Any]) -> int | None:
        """The rows of a forward, from the model's arguments: the batch dimension of the
        argument that carried it when planning (else the first dimension of the first tensor)."""
        if self._batch_leaf is not None:
            i, d = self._batch_leaf
            t = leaves[i] if i < len(leaves) else None
            if isinstance(t, Tensor) and t.ndim > d:
                return int(t.shape[d])
        first = next((t for t in leaves if isinstance(t, Tensor) and t.ndim), None)
        return None if first is None else int(first.shape[0])

    def _expansion_hooks(self, paths: set[str] | None = None, rows: int | None = None) -> list[Any]:
        """Forward pre-hooks running the modules ``paths`` (default: the proven ones) on their
        inputs of leading dimension 1 expanded to ``rows`` (default: the rows of the forward
        running, read from the model's arguments): x.expand(rows, *x.shape[1:])."""
        paths = self.expanded if paths is None else paths
        if not paths:
            return []
        hooks = []
        if rows is None:
            self._forward_rows = None

            def note_rows(_m: nn.Module, args: Any, kwargs: Any) -> None:
                self._forward_rows = self._rows_of(tree_flatten((args, kwargs))[0])

            hooks.append(self.model.register_forward_pre_hook(note_rows, with_kwargs=True))

        def expand(_m: nn.Module, args: Any, kwargs: Any) -> Any:
            n = rows if rows is not None else self._forward_rows
            if n is None or n == 1:
                return None
            leaves, spec = tree_flatten((args, kwargs))
            leaves = [
                t.expand(n, *t.shape[1:])
                if isinstance(t, Tensor) and t.ndim and t.shape[0] == 1
                else t
                for t in leaves
            ]
            return tree_unflatten(leaves, spec)

        modules = dict(self.model.named_modules())
        for path in sorted(paths):
            hooks.append(
                modules[path].register_forward_pre_hook(expand, with_kwargs=True, prepend=True)
            )
        return hooks

    def _shared_inputs(self, h: _Handler) -> bool:
        """Whether every call of ``h``'s module has tensor inputs without a batch dimension, one
        at least of leading dimension 1, and outputs of leading dimension 1 without one (a
        position embedding looked up with ids of shape (1, T), broadcast over the batch)."""
        if not h.path or not h.calls:
            return False
        for c in h.calls:
            tensors = [(t, d) for t, d in zip(c.leaves, c.leaf_dims) if isinstance(t, Tensor)]
            if not tensors or any(d is not None for _, d in tensors):
                return False
            if not any(t.ndim and t.shape[0] == 1 for t, _ in tensors):
                return False
            if any(d is not None for d in c.out_dims) or not c.outputs:
                return False
            if any(o.ndim == 0 or o.shape[0] != 1 for o in c.outputs):
                return False
        return True

    def _prove_expansion(self, forward: Callable[[], Any], B: int | None, path: str) -> str | None:
        """None when module ``path`` may run on its shared inputs expanded to the batch, else why
        not: the model must merely broadcast the module's output over the batch.

        Proof on two rows of the batch: a forward with the module's inputs expanded to 2 rows and
        row r of its output shifted by a random delta_r (delta_0 = 0), against forwards of each
        row alone with the module's own (1, ...) output shifted by delta_r. Every output of the
        model with a batch dimension must agree row by row within the dtype's rounding
        (``VERIFY_RTOL``). A model that reads another row of the expanded output (indexing [0],
        a sum over the batch) or depends on its shape (``squeeze(0)``) differs or raises."""
        if B is None:
            return "inputs shared by the batch, and no batch size to expand them to"
        module = dict(self.model.named_modules())[path]
        P = 2
        gen = torch.Generator().manual_seed(_VERIFY_SEED)
        deltas: list[list[Tensor | None]] = []
        state: dict[str, Any] = {"row": None, "call": 0}

        def shift(_m: nn.Module, _a: Any, out: Any) -> Any:
            flat, spec = tree_flatten(out)
            r, j = state["row"], state["call"]
            state["call"] += 1
            if r is None:  # the expanded forward draws the shifts
                ds: list[Tensor | None] = []
                for t in flat:
                    if (
                        isinstance(t, Tensor)
                        and t.is_floating_point()
                        and t.ndim
                        and t.shape[0] == P
                    ):
                        scale = float(t.detach().double().pow(2).mean().sqrt()) or 1.0
                        d = torch.randn(t.shape, generator=gen, dtype=torch.float64) * scale
                        d[0] = 0
                        ds.append(d.to(device=t.device, dtype=t.dtype))
                    else:
                        ds.append(None)
                deltas.append(ds)
            else:
                ds = [None if d is None else d[r : r + 1] for d in deltas[j]]
            new = []
            for t, dt in zip(flat, ds):
                if dt is not None and (not isinstance(t, Tensor) or t.shape != dt.shape):
                    raise ValueError("the module's output changed shape between forwards")
                new.append(t if dt is None else t + dt)
            return tree_unflatten(new, spec)

        def run(index: Tensor, expand: bool, row: int | None) -> list[Any]:
            state["row"], state["call"] = row, 0
            got: list[list[Any]] = []

            def capture(_m: nn.Module, _a: Any, out: Any) -> None:
                if not got:
                    got.append(
                        [
                            t.detach() if isinstance(t, Tensor) else None
                            for t in tree_flatten(out)[0]
                        ]
                    )

            hooks = [
                self.model.register_forward_pre_hook(
                    self._resizer(B, index), with_kwargs=True, prepend=True
                ),
                self.model.register_forward_hook(capture),
                module.register_forward_hook(shift),
            ]
            if expand:
                hooks += self._expansion_hooks({path}, P)
            try:
                with torch.no_grad():
                    try:
                        forward()
                    except Exception:
                        if not got:  # the model itself failed
                            raise
            finally:
                for hk in hooks:
                    hk.remove()
            return got[0]

        try:
            full = run(torch.arange(P) % B, True, None)
            if not any(d is not None for ds in deltas for d in ds):
                return "inputs shared by the batch, but expanding them gives no batched output"
            singles = [run(torch.tensor([r % B]), False, r) for r in range(P)]
        except Exception as err:
            if _is_oom(err):
                raise
            first = str(err).splitlines()[0] if str(err) else ""
            return (
                "inputs shared by the batch; running it on them expanded to the batch fails "
                f"({type(err).__name__}: {first})"
            )
        changed = "inputs shared by the batch; running it on them expanded to the batch changes"
        compared = 0
        for r, one in enumerate(singles):
            if len(one) != len(full):
                return f"{changed} the model's outputs"
            for a, b in zip(full, one):
                if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point()):
                    continue
                d = _batch_dim(tuple(a.shape), tuple(b.shape), P, 1)
                if d is None:  # an output shared by the batch: nothing per input to compare
                    continue
                if d == UNKNOWN:
                    return f"{changed} the shapes of the model's outputs"
                ar, br = a.narrow(d, r, 1).double(), b.double()
                if not torch.equal(ar.isfinite(), br.isfinite()):
                    return f"{changed} the model's outputs (input {r})"
                ar, br = ar.nan_to_num(0.0, 0.0, 0.0), br.nan_to_num(0.0, 0.0, 0.0)
                diff = float((ar - br).abs().max()) if ar.numel() else 0.0
                tol = VERIFY_RTOL.get(a.dtype, 1e-4) * float(br.abs().max() if br.numel() else 0)
                if diff > tol + 1e-30:
                    rel = diff / max(float(br.abs().max()), 1e-30)
                    return f"{changed} the model's outputs (input {r} off by {rel:.2g}, relative)"
                compared += 1
        if not compared:
            return "inputs shared by the batch, and no output with a batch dimension to compare"
        return None

    def _assign(self, trace: _Trace) -> None:
        modules = dict(self.model.named_modules())
        owners: dict[str, list[tuple[str, str]]] = {}  # global name -> (module path, local name)
        by_id = {id(p): name for name, p in self.params.items()}
        for path, module in modules.items():
            for local, p in module.named_parameters(recurse=False):
                if id(p) in by_id:
                    owners.setdefault(by_id[id(p)], []).append((path, local))

        def within(path: str, anc: str) -> bool:
            return anc == "" or path == anc or path.startswith(anc + ".")

        assignment: dict[str, dict[str, str]] = {}
        self.model_route = set(self._forced_model & set(self.params))
        for name in self.params:
            if name in self.model_route:
                continue
            owned = owners.get(name, [])
            uses = trace.uses.get(name) or {p for p, _ in owned if p in trace.calls}
            if not uses:  # never used: its Fisher is zero
                continue
            # Keep only the outermost use sites: a module's forward contains its children's uses.
            sites = {u for u in uses if not any(v != u and within(u, v) for v in uses)}
            placed: dict[str, str] = {}
            for site in sites:
                # The site must reach the parameter by a name under it (an owner inside it);
                # otherwise take its nearest ancestor that contains an owner.
                anc = site
                while True:
                    inner = [(p, loc) for p, loc in owned if within(p, anc)]
                    if inner:
                        p, loc = inner[0]
                        rel = p[len(anc) + 1 :] if anc and p != anc else (p if not anc else "")
                        placed[anc] = f"{rel}.{loc}" if rel else loc
                        break
                    if not anc:
                        break
                    anc = anc.rpartition(".")[0]
            # Nested sites after climbing: keep the outermost again.
            keep = {a for a in placed if not any(b != a and within(a, b) for b in placed)}
            if OUTSIDE in uses or not keep or any(a not in trace.calls for a in keep):
                self.model_route.add(name)
                continue
            for a in keep:
                assignment.setdefault(a, {})[placed[a]] = name
        self.handlers = []
        for path, names in assignment.items():
            module = modules[path]
            rule = self._forced.get(path) or _closed_form_rule(module, set(names))
            self.handlers.append(_Handler(module, path, names, rule))
        uses_count: dict[str, int] = {}
        for h in self.handlers:
            for g in h.names.values():
                uses_count[g] = uses_count.get(g, 0) + len(trace.calls.get(h.path, []))
        self.shared = {g for g, n in uses_count.items() if n > 1}

    # Recording ----------------------------------------------------------------------------------
    @contextmanager
    def recording(self, batch_size: int | None = None) -> Iterator[None]:
        """Record the inputs and outputs of every handled module during a forward.

        An in-place op downstream (ReLU(inplace=True), x += ...) must not rewrite the tensor whose
        gradient we take, so each output is handed on as a clone (same shape, dtype and strides;
        the module's return value is otherwise unchanged) until a recorded forward has shown that
        nothing rewrites the module's outputs (``finish_recording``); from then on the outputs
        themselves are handed on, one op and one copy of the activation fewer per output, and
        every recorded forward checks their versions: one rewritten is recorded again, cloned.
        """
        assert self.handlers is not None, "call plan() first"
        hooks = []
        for h in self.handlers:

            def hook(_m: nn.Module, args: Any, kwargs: Any, out: Any, h: _Handler = h) -> Any:
                if not self._active:
                    return None
                leaves, spec = _flatten_call(args, kwargs)
                versions = [x._version if isinstance(x, Tensor) else -1 for x in leaves]
                flat, out_spec = ([out], None) if isinstance(out, Tensor) else tree_flatten(out)
                idx = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.requires_grad]
                kept = [flat[i] for i in idx]
                call = _Call(leaves, spec, versions, kept, idx, _shapes(flat))
                h.calls.append(call)
                if h.path in self._uncloned:
                    call.cloned = False
                    call.handed = [(t, t._version) for t in kept]
                    return None
                new = list(flat)
                for i in idx:
                    new[i] = flat[i].clone()
                rebuilt = new[0] if out_spec is None else tree_unflatten(new, out_spec)
                if type(rebuilt) is not type(out):
                    call.cloned = False  # the output cannot be rebuilt: handed on as it is
                    return None
                call.handed = [(new[i], new[i]._version) for i in idx]
                return rebuilt

            hooks.append(h.module.register_forward_hook(hook, with_kwargs=True))
        hooks += self._expansion_hooks()
        self._active = True
        try:
            yield
        finally:
            self._active = False
            for hk in hooks:
                hk.remove()
        if batch_size is not None:
            self._batch_size = batch_size

    def finish_recording(self, batch_size: int) -> bool:
        """Find the batch dimension of every recorded tensor (by comparing the planned shapes
        with this batch's). On later batches: False when the structure does not match the plan
        (plan again with this batch, then record again)."""
        assert self.handlers is not None and self._trace is not None
        self._batch_size = B = batch_size
        if not self._settle_clones():
            return False
        if self._dims_known:
            return self.same_layout(B)
        trace = self._trace
        for h in self.handlers:
            planned = trace.calls.get(h.path, [])
            comparable = bool(trace.rows) and trace.rows != B and len(planned) == len(h.calls)
            for j, c in enumerate(h.calls):
                full = _shapes(c.leaves)
                if comparable:
                    small, small_out = planned[j]
                    small = small + [None] * (len(full) - len(small))
                    small_out = small_out + [None] * (len(c.out_shapes) - len(small_out))
                    c.leaf_dims = [_batch_dim(f, s, B, trace.rows) for f, s in zip(full, small)]
                    c.out_dims = [
                        _batch_dim(c.out_shapes[i], small_out[i], B, trace.rows) for i in c.out_idx
                    ]
                else:
                    c.leaf_dims = [_guess_dim(f, B) for f in full]
                    c.out_dims = [_guess_dim(c.out_shapes[i], B) for i in c.out_idx]
        self._dims_known = True
        self._route()
        self._dims = {
            (h.path, j): (list(c.leaf_dims), list(c.out_dims), _shapes(c.leaves), c.out_shapes)
            for h in self.handlers
            for j, c in enumerate(h.calls)
        }
        # Modules with inputs shared by the batch: plan again (with the proof) and record again.
        return not self._expand_pending

    def _settle_clones(self) -> bool:
        """After a recorded forward: a module whose outputs, handed on as clones, were left
        alone by the rest of the forward hands on its outputs themselves from now on; one whose
        outputs were rewritten in place keeps its clones. False when an output handed on without
        a clone (by this choice) was rewritten: the recorded tensor is no longer the module's
        output, so the module keeps clones from now on and the caller plans and records again."""
        assert self.handlers is not None
        again = False
        for h in self.handlers:
            if not h.calls:
                continue
            rewritten = [c for c in h.calls if c.modified()]
            if rewritten:
                again |= h.path in self._uncloned and any(not c.cloned for c in rewritten)
                self._cloned.add(h.path)
                self._uncloned.discard(h.path)
            elif h.path not in self._cloned:
                self._uncloned.add(h.path)
            for c in h.calls:
                if c.cloned:
                    c.handed = []  # the clones need not outlive the forward
        return not again

    def _route(self) -> None:
        """Per handler: its rule if every call's layout suits it, else vjp; the whole-model route
        for parameters of a module with an output shared by all inputs or of unknown layout."""
        assert self.handlers is not None
        keep = []
        for h in self.handlers:
            rule = _RULES[h.rule]
            vjp_ok = all(_RULES["vjp"].layout_ok(h.module, c) for c in h.calls) and h.calls
            if not vjp_ok:
                tried = self.expanded | set(self._expand_refused)
                if h.path not in tried and self._shared_inputs(h):
                    # The whole-model route until the expansion is proven (the caller plans again).
                    self._expand_pending.add(h.path)
                    self._to_model_route(h, "inputs shared by the batch", quiet=True)
                elif h.path in self._expand_refused:
                    self._to_model_route(h, self._expand_refused[h.path])
                else:
                    self._to_model_route(
                        h, "an output without a batch dimension or of unknown layout"
                    )
                continue
            if h.rule not in ("vjp", "loop") and not all(
                rule.layout_ok(h.module, c) for c in h.calls
            ):
                h.rule = "vjp"
            keep.append(h)
        self.handlers = [h for h in keep if h.names]

    def _to_model_route(self, h: _Handler, why: str, quiet: bool = False) -> None:
        names = set(h.names.values())
        self.model_route |= names
        for other in self.handlers or []:
            other.names = {k: v for k, v in other.names.items() if v not in names}
        if quiet:
            return
        message = (
            "lightning_fisher: per-input gradients of module %r (%s) by the whole-model route: %s.",
            h.path or type(h.module).__name__,
            ", ".join(sorted(names)),
            why,
        )
        logger.info(*message)
        self._messages.append(message)
        self.log.append(f"{h.path}: model ({why})")

    def same_layout(self, batch_size: int) -> bool:
        """For batches after the first: every recorded call matches the stored layout."""
        assert self.handlers is not None
        for h in self.handlers:
            n = sum(1 for k in self._dims if k[0] == h.path)
            if len(h.calls) != n:
                return False
            for j, c in enumerate(h.calls):
                leaf_dims, out_dims, leaf_shapes, out_shapes = self._dims[(h.path, j)]
                full = _shapes(c.leaves)
                if len(full) != len(leaf_shapes):
                    return False
                pairs = [*zip(full, leaf_shapes, leaf_dims)]
                pairs += [(c.out_shapes[i], out_shapes[i], d) for i, d in zip(c.out_idx, out_dims)]
                for now, then, d in pairs:
                    if (now is None) != (then is None):
                        return False
                    if now is None:
                        continue
                    if len(now) != len(then):
                        return False
                    if d is not None and d >= 0 and now[d] != batch_size:
                        return False
                    if d is None and now != then:
                        return False
                c.leaf_dims, c.out_dims = list(leaf_dims), list(out_dims)
        return True

    def structure_key(self) -> Any:
        assert self.handlers is not None
        return (
            tuple(sorted(self.model_route)),
            tuple((h.path, h.rule, tuple(h.names.items()), len(h.calls)) for h in self.handlers),
            id(self._trace),
            self._head_split_refused,
        )

    def verified_key(self, dtype: torch.dtype) -> Any:
        """The recorded structure as a pass over the same model sees it again: handlers, rules,
        parameter names and batch dimensions of every call, the whole-model route, the dtype of
        the logits and the device (not the shapes: a new batch size or length is the same
        structure)."""
        assert self.handlers is not None
        return (
            tuple(sorted(self.model_route)),
            tuple(
                (
                    h.path,
                    h.rule,
                    tuple(h.names.items()),
                    tuple((tuple(c.leaf_dims), tuple(c.out_dims)) for c in h.calls),
                )
                for h in self.handlers
            ),
            tuple(
                sorted(
                    (n, tuple(sorted(w)))
                    for n, w in (self._trace.uses if self._trace else {}).items()
                )
            ),
            dtype,
            next(iter(self.params.values())).device.type if self.params else "cpu",
            self._head_split_refused,
        )

    def reset(self) -> None:
        for h in self.handlers or []:
            h.calls.clear()

    # Accumulation -------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        """The accumulation dtype: float32, or float64 for float64 models."""
        return self._acc_dtype

    def _check_versions(self) -> None:
        for h in self.handlers or []:
            for c in h.calls:
                if not c.cloned and c.modified():
                    raise FisherInputError(
                        f"The output of module {h.path!r} was modified in place after the forward; "
                        "per-input gradients would be wrong. Avoid in-place ops on the model's "
                        "tensors between its forward and the Fisher pass's backward."
                    )
                for leaf, version in zip(c.leaves, c.versions):
                    if isinstance(leaf, Tensor) and leaf._version != version:
                        raise FisherInputError(
                            f"The input of module {h.path!r} was modified in place after the module "
                            "ran; per-input gradients would be wrong. Avoid in-place ops on layer "
                            "inputs."
                        )

    def _output_grads(
        self, logits: Tensor, cot: Tensor, calls: list[tuple[_Handler, _Call]] | None = None
    ) -> list[tuple[_Handler, _Call, list[Tensor]]]:
        """Gradients ``(K, *output.shape)`` at the outputs of ``calls`` (default: every recorded
        call) for the K cotangents ``cot`` of ``logits`` (or of any tensor of the graph upstream
        of the logits), through one batched backward."""
        if calls is None:
            calls = [(h, c) for h in self.handlers or [] for c in h.calls]
        outputs = [o for _, c in calls for o in c.outputs]
        if not outputs:
            return []
        self.max_backward_columns = max(self.max_backward_columns, cot.shape[0])
        grads = batched_grad(logits, outputs, cot)
        it = iter(grads)
        out = []
        for h, c in calls:
            gs = [
                torch.zeros((cot.shape[0], *o.shape), dtype=o.dtype, device=o.device)
                if g is None
                else g
                for g, o in zip([next(it) for _ in c.outputs], c.outputs)
            ]
            out.append((h, c, gs))
        return out

    def accumulate(
        self, logits: Tensor, cotangents: Tensor, acc: dict[str, Tensor], weight: float = 1.0
    ) -> None:
        """acc[name] += weight * sum over inputs and columns of squared per-input gradients.

        ``cotangents`` has shape ``(K, *logits.shape)``; column k of input x is
        ``cotangents[k, x]``. Each input's columns must be zero outside that input.
        """
        assert self.handlers is not None
        self._batch_size = logits.shape[0]
        self._check_versions()
        calls = [c for h in self.handlers for c in h.calls]
        if calls:
            K = cotangents.shape[0]
            per_column = sum(o.numel() * o.element_size() for c in calls for o in c.outputs)
            per_column += cotangents.numel() // max(1, K) * cotangents.element_size()
            k_chunk = self.fit(per_column, self.column_bytes, "the output gradients of one column")
            for start in range(0, K, k_chunk):
                cot = cotangents if k_chunk >= K else cotangents[start : start + k_chunk]
                self._accumulate_chunk(self._output_grads(logits, cot), acc, weight)
        if self.model_route:
            self._model_route_sum_squares(logits, cotangents, acc, weight)

    # Per-position columns split at the vocabulary head ------------------------------------------
    def _head_split_for(self, logits: Tensor) -> _HeadSplit | None:
        """The recorded call whose output is the logits up to ops that keep every position
        (``_head_offset``), when it is a closed-form matrix head (``linear``/``hf_conv1d`` rule,
        batch first, called once) whose parameters are its own or, for the weight only, shared with
        one ``nn.Embedding`` call (tied input and output embeddings); else None (also with a
        whole-model route, or once a check refused the split)."""
        if (
            not self.head_split
            or self._head_split_refused
            or self.model_route
            or logits.ndim != 3
            or not logits.requires_grad
        ):
            return None
        for h in self.handlers or []:
            if h.rule not in ("linear", "hf_conv1d") or len(h.calls) != 1:
                continue
            c = h.calls[0]
            i = c.input_index()
            if i is None or len(c.outputs) != 1 or c.leaf_dims[i] != 0 or c.out_dims != [0]:
                continue
            x = c.leaves[i]
            if not isinstance(x, Tensor) or x.ndim != 3:
                continue
            y = c.outputs[0]
            offset = _head_offset(logits, y)
            if offset is None or offset < 0 or offset + logits.shape[1] > y.shape[1]:
                continue
            shared = [n for n in h.names.values() if n in self.shared]
            if not shared:
                return _HeadSplit(h, c, offset, None)
            if h.rule != "linear" or shared != [h.names.get("weight")]:
                return None
            uses = [g for g in self.handlers or [] if g is not h and shared[0] in g.names.values()]
            if len(uses) != 1 or uses[0].rule != "embedding" or len(uses[0].calls) != 1:
                return None
            return _HeadSplit(h, c, offset, uses[0])
        return None

    def accumulate_positions(
        self, logits: Tensor, cotangents: Tensor, acc: dict[str, Tensor], weight: float = 1.0
    ) -> bool:
        """Per-position columns of token-level logits (B, T, C) split at the vocabulary head.

        Column (k, t) of input x is ``cotangents[k, x]`` kept at position t only (zero elsewhere),
        the columns ``_per_position`` would hand to :meth:`accumulate` one chunk at a time. When
        the logits are the output of a closed-form matrix head z_t = W h_t + b (``_head_split_for``)
        nothing dense over (B, T, C) is formed per column:

        * the head's own per-input gradients u ⊗ h_t (weight) and u (bias), u = u_{k,x,t}, are
          squared and summed over every column at once by the Linear rule's one-position (L = 1)
          product over the B T rows: sum_{x,t} (sum_k u_{k,x,t}^2) h_{x,t}^2;
        * the gradient at the head's input is u W (B, D) at position t only, and one batched
          backward from the head's input (``batched_grad``) gives the gradients at every
          other recorded output; a chunk holds as many columns as the shares of the cap allow for
          those gradients (``column_bytes``) and the (B, C) slices of the columns
          (``cotangent_bytes``), many more positions than the dense columns would;
        * a weight tied to an ``nn.Embedding`` (input x's gradient A + S, A = u h_t^T from the
          head, S from the lookups) adds the embedding's squares and the cross term 2 A S on the
          looked-up rows, sum_k u_v (h_t . S_v) for token v.

        Columns zero for every input (masked positions) are skipped. The engine's check covers
        this route: on a batch where it applies, the check's gradients at the recorded outputs
        come from the same split (u W at the head's input, the backward from there, u at the
        head), so its signed sums use the per-input gradients the accumulation uses; a failed
        check refuses the split for this engine and checks the dense route instead.

        Returns False, doing nothing, where the split does not apply (the caller then takes the
        dense per-position columns).
        """
        assert self.handlers is not None
        split = self._head_split_for(logits)
        if split is None:
            self.split_head = None
            return False
        _, B, _, C = cotangents.shape
        self._batch_size = B
        self._check_versions()
        self.split_head = split.handler.path
        c, x = split.call, split.x
        y = c.outputs[0]
        body = [(h, cl) for h in self.handlers for cl in h.calls if cl is not c]
        backward = any(cl.outputs for _, cl in body) and x.requires_grad
        es = cotangents.element_size()
        # Per column: the gradients at the recorded outputs; the embedding rule's buffers (its
        # rows, their sums and squares in the accumulation dtype, not chunked); the gradient at
        # the head's input and about three more of the largest output's size alive inside the
        # backward; the (B, C) slice and (B, D) product at the head. Sized (and refused) before
        # anything is allocated.
        acc_size = self._dtype().itemsize
        sizes = [o.numel() * o.element_size() for _, cl in body for o in cl.outputs]
        per_column = sum(sizes) + 4 * max([x.numel() * x.element_size(), *sizes])
        per_column += sum(
            4 * acc_size * o.numel() for h, cl in body if h.rule == "embedding" for o in cl.outputs
        )
        per_column += B * C * es + B * x.shape[-1] * y.element_size()
        n = min(
            self.fit(per_column, self.column_bytes, "the output gradients of one column"),
            self.fit(B * C * es, self.cotangent_bytes, "the cotangents of one column"),
        )
        self._head_sum_squares(split, cotangents, acc, weight)
        if not backward:
            return True
        ts, ks = torch.nonzero(cotangents.ne(0).any(-1).any(1).t(), as_tuple=True)  # t-major
        w = split.weight(y.dtype)
        tied = split.tied.names["weight"] if split.tied is not None else None
        for j0 in range(0, ts.numel(), n):
            kj, tj = ks[j0 : j0 + n], ts[j0 : j0 + n]
            u = cotangents[kj, :, tj]  # (m, B, C): column j at its position
            gx = x.new_zeros((len(kj), *x.shape))
            gx[torch.arange(len(kj), device=x.device), :, tj + split.offset] = (
                u.to(y.dtype) @ w
            ).to(x.dtype)
            grad_map = self._output_grads(x, gx, body)
            del gx
            self._accumulate_chunk(grad_map, acc, weight, frozenset({tied} if tied else ()))
            if split.tied is not None:
                emb = next((e for e in grad_map if e[0] is split.tied), None)
                if emb is not None:
                    ctx = self._ctx(emb[0], emb[1], emb[2], dict(emb[0].names))
                    _RULES["embedding"].sum_squares(ctx, acc, weight)
                    self._tied_cross(split, ctx, u, tj, acc, weight)
        return True

    def _head_sum_squares(
        self, split: _HeadSplit, cotangents: Tensor, acc: dict[str, Tensor], weight: float
    ) -> None:
        """acc += weight * the squares of the head's own per-input gradients over every
        per-position column: its rule on the B T (input, position) pairs as inputs of one
        position each (L = 1 folds the columns)."""
        h, c = split.handler, split.call
        K, B, T, C = cotangents.shape
        x = split.x.detach()[:, split.offset : split.offset + T]
        rows = B * T
        call = _Call([x.reshape(rows, x.shape[-1])], None, [0], [], [0], [], [0], [0])
        g = cotangents.to(c.outputs[0].dtype).reshape(K, rows, C)
        saved = self._batch_size
        self._batch_size = rows
        try:
            _RULES[h.rule].sum_squares(self._ctx(h, call, [g], dict(h.names)), acc, weight)
        finally:
            self._batch_size = saved

    def _tied_cross(
        self,
        split: _HeadSplit,
        emb: _Ctx,
        u: Tensor,
        tj: Tensor,
        acc: dict[str, Tensor],
        weight: float,
    ) -> None:
        """acc[W] += 2 weight sum over the chunk's columns j and inputs x of A * S: A = u_j h_t^T
        from the head (u_j the column's (C,) slice at its position t = tj[j]), S the embedding's
        rows; on the rows v that x looks up, sum_j u_{j,v} h_t * S_{j,v} (one (m, R, D) product
        per input, R distinct tokens)."""
        tok, gk = cast(_EmbeddingRule, _RULES["embedding"])._rows(emb)  # (B, S), (m, B, S, D)
        target = acc[emb.names["weight"]]
        dt = target.dtype
        h = split.x.detach()[:, tj + split.offset].to(dt)  # (B, m, D)
        for b in range(tok.shape[0]):
            inv, uniq, used = _segments(tok[b])  # S segments, the first R the distinct tokens
            s_rows = gk.new_zeros(gk.shape[0], inv.numel(), gk.shape[-1]).index_add_(
                1, inv, gk[:, b]
            )
            a = u[:, b][:, uniq].to(dt)  # (m, S)
            cross = torch.einsum("mr,md,mrd->rd", a, h[b], s_rows.to(dt))
            target.index_add_(0, uniq, torch.where(used[:, None], cross, 0), alpha=2 * weight)

    def _split_check_grads(
        self, split: _HeadSplit, u: Tensor, calls: list[tuple[_Handler, _Call]]
    ) -> dict[int, list[Tensor]]:
        """The check's gradients at every recorded output (by ``id`` of the call) for the
        column ``u`` (B, T, C), as the head split computes them: u at the head's output, u W
        at its input and a backward from there to the other outputs."""
        c, x = split.call, split.x
        y = c.outputs[0]
        gy = torch.zeros((1, *y.shape), dtype=y.dtype, device=y.device)
        gy[0, :, split.offset : split.offset + u.shape[1]] = u
        out = {id(c): [gy]}
        body = [(h, cl) for h, cl in calls if cl is not c]
        grads = (
            self._output_grads(x, (gy @ split.weight(y.dtype)).to(x.dtype), body)
            if x.requires_grad
            else []
        )
        for _, cl, gs in grads:
            out[id(cl)] = gs
        for _, cl in body:  # outputs the head's input does not reach
            out.setdefault(
                id(cl),
                [torch.zeros((1, *o.shape), dtype=o.dtype, device=o.device) for o in cl.outputs],
            )
        return out

    def _ctx(self, h: _Handler, c: _Call, gs: list[Tensor], names: dict[str, str]) -> _Ctx:
        acc = self._dtype()
        dtype = self.product_dtype if _RULES[h.rule].model_dtype_products else acc
        return _Ctx(self, h, c, gs, names, dtype, acc)

    def _accumulate_chunk(
        self,
        grad_map: list[tuple[_Handler, _Call, list[Tensor]]],
        acc: dict[str, Tensor],
        weight: float,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        """The rules' sums of squares for one chunk of columns; the shared parameters ``skip``
        are left to the caller."""
        folded: list[_Ctx] = []
        folded_bytes = 0
        singles = []
        for h, c, gs in grad_map:
            single = {loc: g for loc, g in h.names.items() if g not in self.shared}
            if single:
                singles.append(self._ctx(h, c, gs, single))
        B = self._batch_size
        shared: dict[str, list[_Ctx]] = {}
        for name in self.shared - skip:
            shared[name] = [
                self._ctx(h, c, gs, {loc: name})
                for h, c, gs in grad_map
                for loc, g in h.names.items()
                if g == name
            ]
        # the route of every layer decided from one read (the tied pair's Linear included)
        _read_one_position(
            singles + [c for ctxs in shared.values() if _tied_pair(ctxs) for c in ctxs]
        )
        for ctx in singles:
            h = ctx.handler
            size = _folded_bytes(ctx)
            if size is not None and folded_bytes + size <= self.rule_bytes:
                folded.append(ctx)
                folded_bytes += size
            else:
                _RULES[h.rule].sum_squares(ctx, acc, weight)
        if folded:
            _folded_sum_squares(folded, acc, weight)
        # Shared parameters: per-input gradients summed over every use, then squared.
        for name, ctxs in shared.items():
            if not ctxs:
                continue
            if _tied_sum_squares(ctxs, acc, weight):
                continue
            uses = [(c.handler, c.call, c.grads, next(iter(c.names))) for c in ctxs]
            K = uses[0][2][0].shape[0]
            numel = self.params[name].numel()
            # (input, column) pairs per step; the squares add up over columns, so K is split too
            each = sum(c.square_bytes for c in ctxs) * numel
            pairs = self.fit(each, self.rule_bytes, f"shared parameter {name!r}")
            k = min(K, pairs)
            chunk = max(1, pairs // k)
            for k0 in range(0, K, k):
                cols = slice(k0, k0 + k)
                for lo in range(0, B, chunk):
                    hi = min(B, lo + chunk)
                    total = None
                    for h, c, gs, loc in uses:
                        ctx = self._ctx(h, c, [g[cols] for g in gs], {loc: name})
                        part = _RULES[h.rule].per_input(ctx, lo, hi)[name].to(acc[name].dtype)
                        total = part if total is None else total + part
                    assert total is not None
                    acc[name] += weight * total.pow(2).sum((0, 1))

    # The whole-model route ------------------------------------------------------------------------
    def _model_route_per_input(
        self, logits: Tensor, cot: Tensor, lo: int, hi: int
    ) -> dict[str, Tensor]:
        """Per-input gradients (hi - lo, K, *shape) of the whole-model-route parameters: each
        column restricted to one input, through one backward of the batch's graph."""
        K, b = cot.shape[0], hi - lo
        sep = torch.zeros((b, K, *cot.shape[1:]), dtype=cot.dtype, device=cot.device)
        rows = torch.arange(b, device=cot.device)
        sep[rows, :, lo + rows] = cot[:, lo:hi].transpose(0, 1)
        grads = self._model_route_grads(logits, sep.reshape(b * K, *cot.shape[1:]))
        return {n: g.reshape(b, K, *g.shape[1:]) for n, g in grads.items()}

    def _model_route_grads(self, logits: Tensor, sep: Tensor) -> dict[str, Tensor]:
        """Gradients ``(n, *shape)`` of the whole-model-route parameters for the n cotangents
        ``sep``, through one batched backward (or one backward per cotangent)."""
        names = sorted(self.model_route)
        params = [self.params[n] for n in names]
        if self._batched_model_route:
            grads = batched_grad(logits, params, sep)
        else:
            cols = [
                torch.autograd.grad(logits, params, s, retain_graph=True, allow_unused=True)
                for s in sep
            ]
            grads = tuple(
                None if cols[0][j] is None else torch.stack([col[j] for col in cols])  # type: ignore[misc]
                for j in range(len(params))
            )
        dtype = self._dtype()
        n_cols = sep.shape[0]
        return {
            n: (torch.zeros((n_cols, *p.shape), dtype=dtype, device=p.device) if g is None else g)
            .detach()
            .to(dtype)
            for n, p, g in zip(names, params, grads)
        }

    def _model_route_chunk(self, cot: Tensor) -> tuple[int, int]:
        """(columns, inputs) per backward of the whole-model route. Each (input, column) pair
        holds a cotangent shaped like the logits and a gradient of each of the route's
        parameters (with its float32 copy and square); the squares add up over columns, so a
        large K is split too."""
        # each gradient as autograd gives it, its copy in the accumulation dtype, the square
        acc = self._dtype().itemsize
        per = sum(
            (acc if p.dtype == self._dtype() else p.element_size() + acc) * p.numel()
            + acc * p.numel()
            for p in (self.params[n] for n in self.model_route)
        )
        per += cot[0].numel() * cot.element_size()
        pairs = self.fit(per, self.rule_bytes, "the whole-model route")
        k = min(cot.shape[0], pairs)
        return k, max(1, pairs // k)

    def _model_route_sum_squares(
        self, logits: Tensor, cot: Tensor, acc: dict[str, Tensor], weight: float
    ) -> None:
        B = logits.shape[0]
        k, chunk = self._model_route_chunk(cot)
        for k0 in range(0, cot.shape[0], k):
            part = cot[k0 : k0 + k]
            for lo in range(0, B, chunk):
                grads = self._model_route_per_input(logits, part, lo, min(B, lo + chunk))
                for name, t in grads.items():
                    acc[name] += weight * t.pow(2).sum((0, 1))

    # Self-verification ----------------------------------------------------------------------------
    def verify(
        self, logits: Tensor, first_rows: Callable[[int], Tensor | None] | None = None
    ) -> None:
        """Prove the per-input gradients on this batch (once per traced structure and model:
        a later pass over the same model with the same structure relies on the earlier proof).

        With balanced random signs s_x and a Gaussian cotangent u (both from a generator of their own,
        so the estimate's random draws are unchanged), compare per parameter
        sum_x s_x J_x^T u_x, built from the per-input gradients the accumulation uses, with one
        ordinary backward of the cotangent s_x u_x. A failing or raising route is replaced by the
        next one and checked again.

        ``first_rows(R)``, if given, runs the model on the batch's first R inputs and returns
        their logits. On a batch of at least ``2 * VERIFY_ROWS`` inputs the check then runs on
        that small forward (recorded like the batch's, with the batch dimensions already found),
        so its two backwards cost R inputs rather than the batch. Should the small forward fail
        or differ in structure from the batch's, the check runs on the batch itself.
        """
        assert self.handlers is not None
        if self.structure_key() in self._verified:
            return
        if self.verified_key(logits.dtype) in _VERIFIED.get(self.model, ()):
            self._verified.add(self.structure_key())  # proven by an earlier pass on this model
            return
        B = logits.shape[0]
        if (
            first_rows is not None
            and B >= 2 * VERIFY_ROWS
            and self._verify_on_first_rows(first_rows, B)
        ):
            return
        self._verify(logits)

    def _verify_on_first_rows(self, first_rows: Callable[[int], Tensor | None], B: int) -> bool:
        """The check on a separate forward of the first ``VERIFY_ROWS`` inputs; False when that
        forward cannot stand for the batch (it failed, or its recorded structure differs)."""
        assert self.handlers is not None
        R = VERIFY_ROWS
        saved = [(h, h.calls) for h in self.handlers]
        for h in self.handlers:
            h.calls = []
        try:
            try:
                with self.recording():
                    small = first_rows(R)
            except Exception as err:  # the batch's own check is always available
                if _is_oom(err):
                    raise
                logger.debug(
                    "lightning_fisher: the check's forward of %d inputs failed: %s", R, err
                )
                return False
            if small is None or small.ndim == 0 or small.shape[0] != R or not self.same_layout(R):
                return False
            if any(not c.cloned and c.modified() for h in self.handlers for c in h.calls):
                return False  # an output handed on without a clone was rewritten
            self._batch_size = R
            self._verify(small)
            return True
        finally:
            for h, calls in saved:
                h.calls = calls
            self._batch_size = B
            self._verify_grads = {}

    def _verify(self, logits: Tensor) -> None:
        """The signed-sum check on the recorded forward whose logits are ``logits``."""
        assert self.handlers is not None
        B = logits.shape[0]
        R = min(B, VERIFY_ROWS)
        gen = torch.Generator(device=logits.device).manual_seed(_VERIFY_SEED)
        u = torch.randn(logits.shape, generator=gen, device=logits.device, dtype=logits.dtype)
        u[R:] = 0
        s = torch.ones(B, device=logits.device, dtype=logits.dtype)
        order = torch.randperm(R, generator=gen, device=logits.device)
        s[:R] = torch.where(order < (R + 1) // 2, 1.0, -1.0).to(logits.dtype)
        signed = u * s.reshape(B, *([1] * (logits.ndim - 1)))
        names = list(self.params)
        calls = [c for h in self.handlers for c in h.calls]
        outputs = [o for c in calls for o in c.outputs]
        params: list[Tensor] = [self.params[n] for n in names]
        # Two plain backwards, each to what it is needed for: u to the recorded outputs (the
        # engine's input), s u to the parameters (the reference). One batched backward of both
        # columns to outputs and parameters computes twice the gradients and is slower.

        def output_grads(split: _HeadSplit | None) -> dict[int, list[Tensor]]:
            """The gradients at the recorded outputs, by the route the accumulation takes."""
            if split is not None:
                return self._split_check_grads(
                    split, u, [(h, c) for h in handlers for c in h.calls]
                )
            out_grads = (
                [
                    None if g is None else g.unsqueeze(0)
                    for g in torch.autograd.grad(
                        logits, outputs, u, retain_graph=True, allow_unused=True
                    )
                ]
                if outputs
                else []
            )
            it = iter(out_grads)
            return {
                id(c): [
                    torch.zeros((1, *o.shape), dtype=o.dtype, device=o.device) if g is None else g
                    for g, o in zip((next(it) for _ in c.outputs), c.outputs)
                ]
                for c in calls
            }

        handlers = self.handlers
        split = self._head_split_for(logits) if logits.ndim == 3 else None
        dtype = self._dtype()

        def reference() -> dict[str, Tensor]:
            """The signed sum by an ordinary backward, as tensors the check may overwrite."""
            grads = torch.autograd.grad(
                logits, params, signed, retain_graph=True, allow_unused=True
            )
            return dict(zip(names, _owned(grads, params, dtype, signed)))

        ref = reference()
        self._verify_grads = output_grads(split)
        # the lowest precision the forward computed in: under autocast a float32 model's layers
        # run in 16 bits, and their per-input gradients carry that rounding
        rtol = max(
            VERIFY_RTOL.get(t.dtype, 1e-4) for t in [logits, *outputs] if t.is_floating_point()
        )
        for attempt in range(8):
            if attempt:  # the last attempt overwrote the reference with its differences
                ref = reference()
            ref_norms = dict(zip(names, _norms(list(ref.values()))))
            if not all(math.isfinite(v) for v in ref_norms.values()):
                return  # NaN/Inf gradients: the pass reports them at the end; check a later batch
            # ref becomes ref - (the engine's signed sums), in place
            scale, errors = self._signed_sums(logits, u.unsqueeze(0), s, R, ref)
            bad: dict[str, str] = dict(errors)
            # Round-off floor: a gradient that is zero but for round-off (a key bias under
            # softmax attention) is compared with the scale of the whole model's gradients.
            floor = 100 * torch.finfo(dtype).eps * max(math.sqrt(v) for v in scale.values())
            for n, diff in zip(names, _norms([ref[n] for n in names])):
                if n in bad:
                    continue
                tol = rtol * (ref_norms[n] + math.sqrt(scale[n])) + floor + 1e-30
                if diff > tol or math.isnan(diff):
                    bad[n] = (
                        f"per-input gradients off by {diff / max(tol / rtol, 1e-30):.2g} (relative)"
                    )
            if not bad:
                self._verified.add(self.structure_key())
                _VERIFIED.setdefault(self.model, set()).add(self.verified_key(logits.dtype))
                return
            if split is not None:
                # The split's gradients differ: the dense columns from now on, checked again.
                logger.info(
                    "lightning_fisher: splitting the per-position columns at head %r failed the "
                    "per-input check (%s); dense per-position columns instead.",
                    split.handler.path,
                    next(iter(bad.values())),
                )
                self.log.append(f"{split.handler.path}: head split refused")
                self._head_split_refused = True
                split = None
                self._verify_grads = output_grads(None)
                continue
            self._fall_back(bad)
        raise FisherInputError("The per-input gradients could not be verified.")

    def _fall_back(self, bad: dict[str, str]) -> None:
        assert self.handlers is not None
        failing = [h for h in self.handlers if any(n in bad for n in h.names.values())]
        in_model = [n for n in bad if n in self.model_route]
        if in_model:
            if self._batched_model_route:
                self._batched_model_route = False
                logger.info(
                    "lightning_fisher: the whole-model route failed its check with a batched "
                    "backward (%s); one backward per column from now on.",
                    bad[in_model[0]],
                )
                return
            modules = sorted({n.rpartition(".")[0] or "<the model>" for n in in_model})
            raise FisherInputError(
                f"No per-input route gives correct gradients for module(s) {', '.join(modules[:5])} "
                f"(parameters {', '.join(sorted(in_model)[:5])}): "
                f"{bad[in_model[0]]}. The model does not seem to treat the inputs of a batch "
                "independently (or hides where they are). Use method='hutchinson' (one ordinary "
                "backward per batch, always correct) or method='batched'."
            )
        for h in failing:
            why = next(bad[n] for n in h.names.values() if n in bad)
            nxt = _NEXT[h.rule]
            if nxt == "model":
                self._forced_model |= set(h.names.values())
                self._to_model_route(h, f"the loop over inputs failed its check ({why})")
                continue
            logger.info(
                "lightning_fisher: module %r (%s) failed the per-input check with rule %r (%s); "
                "using %r instead.",
                h.path or type(h.module).__name__,
                type(h.module).__name__,
                h.rule,
                why,
                nxt,
            )
            self.log.append(f"{h.path}: {h.rule} -> {nxt} ({why})")
            h.rule = nxt
            self._forced[h.path] = nxt
        self.handlers = [h for h in self.handlers if h.names]

    def _signed_sums(
        self, logits: Tensor, u: Tensor, s: Tensor, rows: int, diff: dict[str, Tensor]
    ) -> tuple[dict[str, float], dict[str, str]]:
        """diff[name] -= sum_b s_b g_b, in place, from the engine's per-input gradients g_b for
        the single column ``u``; returns the sums of ||g_b||^2 (the scale of round-off) and the
        parameters whose route raised, with the error."""
        sizes: dict[str, list[Tensor]] = {n: [] for n in self.params}
        errors: dict[str, str] = {}
        B = self._batch_size = rows  # the rules see the first ``rows`` inputs (u is 0 beyond)
        sd = s[:rows].to(self.product_dtype)

        grad_map = [(h, c, self._verify_grads[id(c)]) for h in self.handlers or [] for c in h.calls]
        for h, c, gs in grad_map:
            ctx = self._ctx(h, c, gs, dict(h.names))
            try:
                size = _RULES[h.rule].subtract_signed_sum(ctx, sd.to(ctx.dtype), diff)
                for n, v in size.items():
                    sizes[n].append(v)
            except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError) as err:
                if _is_oom(err):
                    raise
                msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                errors.update(dict.fromkeys(h.names.values(), msg))
        if self.model_route:
            # This route separates the inputs by construction (cotangents restricted to one input,
            # backwards of the batch's graph): its per-input gradients for the first few inputs,
            # and the rest of the signed sum as one more column of the same batched backward.
            m = min(B, VERIFY_MODEL_ROUTE_ROWS)
            rest = torch.zeros_like(u)
            rest[0, m:B] = u[0, m:B] * s[m:B].reshape(-1, *([1] * (u.ndim - 2)))
            try:
                per = self._model_route_per_input(logits, u, 0, m)
                whole = self._model_route_grads(logits, rest) if m < B else {}
                for n, t in per.items():
                    t = t[:, 0]
                    diff[n].sub_((sd[:m].reshape(-1, *([1] * (t.ndim - 1))) * t).sum(0))
                    sizes[n].append(t.pow(2).sum())
                    if n in whole:
                        diff[n].sub_(whole[n][0])
                        sizes[n].append(whole[n][0].pow(2).sum())
            except (RuntimeError, NotImplementedError) as err:
                if _is_oom(err) or not self._batched_model_route:
                    raise
                errors.update(dict.fromkeys(self.model_route, f"{type(err).__name__}: {err}"))
        # One synchronisation for all the scales.
        flat = [torch.stack(v).sum().to(torch.float64) if v else None for v in sizes.values()]
        present = [t for t in flat if t is not None]
        values = iter(_floats(present))
        scale = {n: (next(values) if t is not None else 0.0) for n, t in zip(sizes, flat)}
        return scale, errors
