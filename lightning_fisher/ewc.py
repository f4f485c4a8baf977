r"""Elastic Weight Consolidation in plain PyTorch (no Lightning needed).

Over the consolidated tasks t, with Fisher diagonals F_t and anchors theta*_t, the penalty and its
gradient are

    P(theta) = (lambda / 2) sum_t sum_i F_t,i (theta_i - theta*_t,i)^2,
    grad P   = lambda sum_t F_t (theta - theta*_t).

``mode="separate"`` keeps one (F_t, theta*_t) per task; ``mode="online"`` keeps one pair, updated
at each consolidation as F <- gamma F + F_new and theta* <- theta_new.

:class:`ElasticWeightConsolidation` holds that state and applies it, either as a loss term
(:meth:`~ElasticWeightConsolidation.penalty`) or by adding the exact gradient to ``.grad``
(:meth:`~ElasticWeightConsolidation.add_penalty_grad`); both give the same update. The Lightning
callback ``lf.EWC`` wraps it and decides when to consolidate.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _ewc_fused_cpu
from .fisher_diagonal import FisherDiagonal
from .options import check
from .outputs import FisherInputError
from .sharded import is_dtensor, local_tensor, refuse_fsdp1
from .sharded_fsdp1 import sum_over_ranks

MODES = ("online", "separate")
#: storage dtypes of the Fisher (``state_dtype``); the arithmetic is float32 (or wider) whatever
#: the storage
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

logger = logging.getLogger("lightning_fisher")
#: per task: parameters, their Fisher, anchors, and whether each takes the route with a persistent
#: theta - theta* buffer (the others go one tensor at a time, with temporaries)
_Terms = tuple[list[Tensor], list[Tensor], list[Tensor], list[bool]]


@dataclass
class _Task:
    """One consolidated (Fisher, anchor) pair; tensors live on the parameters' device."""

    fisher: FisherDiagonal
    anchor: dict[str, Tensor]


@dataclass
class _TermsEntry:
    """The cached terms of one (module, optimizer) pair; the weak references tell a reused id."""

    module: weakref.ref[nn.Module]
    optimizer: weakref.ref[torch.optim.Optimizer] | None
    device: torch.device
    terms: list[_Terms]
    kernel_fits: bool | None = None  # F, theta, theta* suit the C loop (checked on first use)
    #: theta - theta* workspace by parameter id, shared by the tasks, allocated on first use
    buffers: dict[int, Tensor] = field(default_factory=dict)

    def buffer(self, key: int, like: Tensor) -> Tensor:
        if key not in self.buffers:
            self.buffers[key] = torch.empty_like(like)
        return self.buffers[key]


@dataclass(frozen=True)
class StateBytes:
    """Bytes of EWC state (:meth:`ElasticWeightConsolidation.state_bytes`).

    Attributes:
        fisher: the stored Fisher diagonals, every task.
        anchor: the stored anchors theta*, every task.
        workspace: the persistent buffers of :meth:`~ElasticWeightConsolidation.add_penalty_grad`
            (theta - theta* for parameters stored in float32 or wider, shared by the tasks),
            allocated once the two-pass or ``foreach`` route ran (not by the C loop or the
            compiled update, nor by the one-tensor-at-a-time route, whose temporaries live one
            parameter at a time).
        total: ``fisher + anchor + workspace``.
        on_device: the part held on the parameters' device (``total`` without ``offload``;
            with ``offload="cpu"`` the workspace only, plus one parameter's F and theta* in
            transit during the update).
        per_parameter: Fisher and anchor bytes of each parameter, summed over the tasks.
    """

    fisher: int
    anchor: int
    workspace: int
    total: int
    on_device: int
    per_parameter: dict[str, int]


class ElasticWeightConsolidation:
    r"""The consolidated EWC state of a model and its penalty, usable from any training loop.

    After training a task, :meth:`consolidate` stores that task's Fisher diagonal with the current
    parameters as anchors theta*. While training the next tasks, either add :meth:`penalty`

        P(theta) = (lam / 2) sum_t sum_i F_t,i (theta_i - theta*_t,i)^2

    to the loss, or call :meth:`add_penalty_grad` after ``loss.backward()``: it adds the exact
    gradient ``lam * sum_t F_t * (theta - theta*_t)`` to ``.grad`` without building a graph. Both
    routes give the same update, computed in float32 (float64 for float64 parameters or state)
    whatever the dtypes the parameters and the state are stored in: F, theta and theta* are cast
    up, and the sum is rounded once into ``.grad``.

    Routes of :meth:`add_penalty_grad`, per task: on CUDA one pass over memory per tensor (reads
    g, F, theta, theta* once, writes g once) by an update compiled with ``torch.compile`` on the
    first step (``compile_update=True``, the default; where it does not compile, a logged warning
    and the ``foreach`` route: three launches that move nine tensors' worth of memory, with a
    workspace buffer); on CPU two in-place passes with a persistent
    workspace, or one with ``cpu_kernel=True``. Parameters narrower than float32 (bf16, fp16) and
    offloaded state go one tensor at a time, with float32 temporaries the size of one parameter.

    ``mode="separate"`` keeps a Fisher and an anchor per task; ``mode="online"`` keeps one pair,
    F <- gamma F + F_new, theta* <- theta_new, where a parameter new since the last task (a new
    head) counts as zero on the old side.

    Memory (:meth:`state_bytes` counts it): per consolidated parameter and stored task a Fisher
    in ``state_dtype`` (float32 by default: 4 bytes an entry; bfloat16 or float16: 2) and an
    anchor in the parameter's dtype, and, for parameters stored in float32 or wider once the
    two-pass or ``foreach`` route of :meth:`add_penalty_grad` ran, a workspace buffer shared by
    the tasks.
    Anchors keep the parameter's dtype: a rounded theta* would move the penalty's minimum away
    from the parameters the task ended with (a bf16 model's anchors are bf16 already).
    ``offload="cpu"`` keeps Fishers and anchors in (pinned) CPU memory instead of the GPU's and
    copies each parameter's F and theta* to the GPU for every update: it trades PCIe traffic
    each optimizer step (the state's bytes, e.g. 4 bytes per parameter for a bf16 Fisher and a
    bf16 anchor: about 5 GB for 1.3B parameters, some 0.1 s at 50 GB/s) for GPU memory.

    Example::

        ewc = lf.ElasticWeightConsolidation(model, lam=1e5, mode="online")
        # ... train task A ...
        ewc.consolidate(lf.estimate_fisher(model, loader_a, method="exact"))
        # ... train task B: loss.backward(); ewc.add_penalty_grad(); opt.step()

    Args:
        model: the model whose parameters are consolidated; the methods' ``module`` argument
            overrides it (``None``: every call names its module).
        lam: penalty strength lambda (>= 0). Its best value depends on the model, the data and
            the Fisher estimator's scale: search a grid of powers of 10.
        mode: ``"online"`` or ``"separate"``.
        gamma: decay of the old Fisher in online mode, in (0, 1] (0 and values above 1 warn).
        method: the estimator the Fishers come from, kept in :meth:`state_dict` so that state is
            never mixed across scales; ``None``: the first consolidated Fisher's ``method``.
        cpu_kernel: on CPU, add the gradient with a one-pass C loop (reads each of grad, F, theta
            and theta* once, writes grad once; the roundings of the loss's gradient), compiled
            once per process with the system C compiler. Used for float32 tensors while PyTorch
            runs one CPU thread (the loop is single-threaded); otherwise, or without a compiler (a
            warning), PyTorch's ops.
        state_dtype: storage dtype of the Fisher diagonals: ``None`` or ``torch.float32`` (the
            default), ``torch.bfloat16`` or ``torch.float16`` (half the bytes), ``torch.float64``
            (or the names ``"bf16"``, ``"float16"``, ...). Estimates are accumulated in float32;
            the cast happens at consolidation, after the online sum gamma F + F_new, which is
            computed in float32. bfloat16 keeps float32's range with 8 bits of mantissa (entries
            within 2^-9 relative); float16 has 11 bits but flushes entries below about 6e-8 to
            zero and cannot hold entries above 65504 (refused at consolidation).
        offload: ``False`` (state on the parameters' device) or ``"cpu"`` (state in CPU memory,
            pinned when CUDA is available; each parameter's F and theta* copied to the device
            at every update). Not for FSDP2 (sharded) parameters.
        compile_update: on CUDA, fuse the gradient update into one pass per tensor with
            ``torch.compile`` (compiled on the first step; where it fails, logged, the
            ``foreach`` ops). On an H200 with a 1.3B bf16 GPT-2 the step with EWC takes
            1.031-1.035x the step without it, against 1.23x by the ``foreach`` ops.
            ``False`` keeps the ``foreach`` ops (no compilation). Ignored on CPU.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        lam: float,
        mode: str = "online",
        gamma: float = 1.0,
        method: str | None = None,
        cpu_kernel: bool = False,
        state_dtype: torch.dtype | str | None = None,
        offload: bool | str = False,
        compile_update: bool = True,
    ) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise FisherInputError(f"EWC: lam must be a finite number >= 0; got {lam!r}.")
        if not (math.isfinite(lam) and lam >= 0):
            raise FisherInputError(f"EWC: lam must be a finite number >= 0; got {lam!r}.")
        if mode not in MODES:
            raise FisherInputError(f"EWC: mode must be 'online' or 'separate'; got {mode!r}.")
        check("EWC", gamma=("non_negative_number", gamma))
        if not 0 < gamma <= 1:
            warnings.warn(
                f"EWC: gamma={gamma!r} is outside (0, 1]: "
                + (
                    "online EWC forgets every earlier task's Fisher at each consolidation."
                    if gamma == 0
                    else "online EWC multiplies the earlier tasks' Fisher by gamma at each "
                    "consolidation, so it grows without bound."
                ),
                UserWarning,
                stacklevel=2,
            )
        if method is not None and (not isinstance(method, str) or not method):
            raise FisherInputError(f"EWC: method must be a method name or None; got {method!r}.")
        if model is not None and not isinstance(model, nn.Module):
            raise FisherInputError(
                f"EWC: model must be a torch.nn.Module or None; got {type(model).__name__}."
            )
        self.model = model
        self.lam = float(lam)
        self.mode = mode
        self.gamma = float(gamma)
        self.method = method
        self.cpu_kernel = bool(cpu_kernel)
        #: storage dtype of the Fisher diagonals
        self.state_dtype = check_state_dtype(state_dtype)
        #: where the Fishers and anchors live: ``"cpu"`` (offloaded) or ``None`` (the parameters'
        #: device)
        self.offload: str | None = check_offload(offload)
        self.compile_update = bool(compile_update)
        self._compile_failed = False  # torch.compile of the update failed once: eager from then on
        #: number of consolidated tasks (in online mode, tasks folded into the one Fisher)
        self.task_count = 0
        self._tasks: list[_Task] = []
        self._terms_cache: dict[tuple[int, int | None], _TermsEntry] = {}
        self._kernel_reported = False  # the caller heard whether the C loop is available

    # Read access -----------------------------------------------------------------------------
    @property
    def fishers(self) -> list[FisherDiagonal]:
        """The stored Fisher diagonals: one in online mode, one per task in separate mode. Their
        tensors are in ``state_dtype`` (and in CPU memory with ``offload="cpu"``)."""
        return [t.fisher for t in self._tasks]

    @property
    def anchors(self) -> list[dict[str, Tensor]]:
        """The stored anchor parameters theta*, matching :attr:`fishers`."""
        return [t.anchor for t in self._tasks]

    def _module(self, module: nn.Module | None) -> nn.Module:
        chosen = module if module is not None else self.model
        if chosen is None:
            raise FisherInputError(
                "EWC: no module given: pass the model to ElasticWeightConsolidation(model, ...) "
                "or to this call."
            )
        return chosen

    # Consolidation ---------------------------------------------------------------------------
    def consolidate(
        self, fisher: FisherDiagonal, module: nn.Module | None = None
    ) -> FisherDiagonal:
        """Store ``fisher`` (the finished task's Fisher diagonal) with the anchors theta* = theta.

        Online mode: F <- gamma F + fisher, theta* <- theta; separate mode: append (fisher, theta).

        The Fisher is stored in ``state_dtype`` (after the online sum, which is float32), in CPU
        memory with ``offload="cpu"``.

        Returns:
            ``fisher`` (float32) on the state's device: the parameters', or the CPU with
            ``offload="cpu"``. On any error the stored state is unchanged.
        """
        module = self._module(module)
        if not isinstance(fisher, FisherDiagonal):
            raise FisherInputError(
                f"EWC: consolidate needs a FisherDiagonal (e.g. from lf.estimate_fisher); got "
                f"{type(fisher).__name__}."
            )
        refuse_fsdp1(module, "EWC")
        params = dict(module.named_parameters())
        fisher.check_matches(module)
        for name, t in fisher.items():
            if not torch.isfinite(t).all():
                raise FisherInputError(
                    f"EWC: the Fisher of {name!r} has NaN/Inf entries; nothing was consolidated. "
                    "Check the model and data for NaN/Inf (or fp16 overflow)."
                )
        self._refuse_sharded_offload(params.values())
        device = next(iter(params.values())).device
        home = self._home(device)
        fisher = fisher.to(home)
        self._to_device(device)
        pin = self._pin()
        if self.mode == "online" and self._tasks:
            # F <- gamma F + F_new in float32, then stored in state_dtype
            stored = _merge(self._tasks[0].fisher, fisher, self.gamma, self.state_dtype, pin)
            self._tasks = [_Task(stored, _anchor(params, stored, home, pin))]
        else:
            stored = _stored(fisher, self.state_dtype, home, pin)
            self._tasks.append(_Task(stored, _anchor(params, stored, home, pin)))
        if self.method is None:
            self.method = fisher.method
        self.task_count += 1
        self.invalidate_caches()
        return fisher

    # The penalty -----------------------------------------------------------------------------
    def penalty(self, module: nn.Module | None = None) -> Tensor:
        """(lam / 2) sum_t sum_i F_t,i (theta_i - theta*_t,i)^2, differentiable in the module's
        parameters (a float32 zero before the first consolidation).

        Computed in float32 (float64 for float64 parameters or state) whatever the dtypes of the
        parameters and the stored state: F, theta and theta* are cast up before the difference.
        """
        module = self._module(module)
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
                p, a = params[name], task.anchor[name]
                if f.device != p.device:  # offloaded: this parameter's F and theta* in transit
                    f, a = f.to(p.device), a.to(p.device)
                dtype = _compute_dtype(p, f)
                term = (f.to(dtype) * (p.to(dtype) - a.to(dtype)).pow(2)).sum()
                if is_dtensor(term):  # FSDP2: a sum over shards, replicated on every rank
                    term = term.full_tensor()  # type: ignore[attr-defined]
                total = total + term
        total = sum_over_ranks(total, module)  # FSDP1: each rank summed its own pieces
        return 0.5 * self.lam * total

    def add_penalty_grad(
        self,
        module: nn.Module | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scale: float = 1.0,
        with_penalty: bool = False,
    ) -> Tensor | None:
        """Add ``scale * lam * sum_t F_t * (theta - theta*_t)`` (the gradient of :meth:`penalty`,
        times ``scale``) to the parameters' ``.grad``, in place and without a graph.

        Call it after the backward pass and before ``optimizer.step()`` (after gradient
        accumulation and any all-reduce; before clipping, so the update equals the one from
        ``loss + penalty()``). A parameter without a gradient gets one (the loss route would
        give it one too).

        Args:
            module: the model; default: the one given at construction.
            optimizer: restrict the update to this optimizer's trainable parameters (default: all
                trainable parameters of the module).
            scale: factor on the added gradient, e.g. the loss scale of fp16 AMP when the
                optimizer unscales inside its own ``step``.
            with_penalty: also return the penalty's value (two more passes).

        Returns:
            The penalty's value (float32, not scaled by ``scale``) with ``with_penalty``, else
            ``None``.

        The parameters, Fishers and anchors it visits are cached per (module, optimizer); call
        :meth:`invalidate_caches` after changing an optimizer's parameter groups or a module's
        parameter objects (moving the module to another device is detected).
        """
        module = self._module(module)
        step = scale * self.lam
        value: Tensor | None = None
        mesh: Any = None
        with torch.no_grad():
            entry = self._terms(module, optimizer)
            for params, fishers, anchors, wide in entry.terms:
                keys = [id(p) for p in params]
                grads = []
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
                if params and is_dtensor(params[0]):
                    mesh = params[0].device_mesh  # type: ignore[attr-defined]
                    # FSDP2 parameters: the update is elementwise, so each rank updates its shards
                    params = [local_tensor(p) for p in params]
                    grads = [local_tensor(g) for g in grads]
                if not with_penalty and self._fused_add(
                    entry, grads, fishers, params, anchors, step
                ):
                    continue
                if self._compiled_add(entry, grads, fishers, params, anchors, step):
                    if with_penalty:  # with temporaries: no persistent workspace on the GPU
                        part = _penalty_sum(fishers, params, anchors)
                        value = part if value is None else value + part
                    continue
                fast = [
                    i
                    for i, (w, g, p) in enumerate(zip(wide, grads, params))
                    if w and g.dtype == p.dtype
                ]
                if len(fast) < len(params):
                    # narrower than float32, or offloaded: one parameter at a time, cast up
                    for i in sorted(set(range(len(params))) - set(fast)):
                        one = _add_term(
                            grads[i], fishers[i], params[i], anchors[i], step, with_penalty
                        )
                        if one is not None:
                            value = one if value is None else value + one
                    grads, fishers, params, anchors = (
                        [ts[i] for i in fast] for ts in (grads, fishers, params, anchors)
                    )
                    keys = [keys[i] for i in fast]
                    if not fast:
                        continue
                work = [entry.buffer(k, p) for k, p in zip(keys, params)]
                # work = theta - theta* in place on a persistent workspace (no allocation per step).
                if _use_foreach(entry.device):
                    torch._foreach_copy_(work, params)
                    torch._foreach_sub_(work, anchors)
                else:
                    for w, p, a in zip(work, params, anchors):
                        torch.sub(p, a, out=w)
                # grad += (step F) (theta - theta*): step times F first, as in the loss's gradient
                torch._foreach_addcmul_(grads, fishers, work, value=step)
                if with_penalty:
                    squares = torch._foreach_mul(work, work)
                    torch._foreach_mul_(squares, fishers)  # F (theta - theta*)^2 >= 0
                    part = torch.stack(torch._foreach_norm(squares, 1)).float().sum()
                    value = part if value is None else value + part
        if not with_penalty:
            return None
        if value is None:
            value = torch.zeros((), dtype=torch.float32, device=entry.device)
        if mesh is not None:  # each rank summed its own shards
            dist.all_reduce(value, group=mesh.get_group())
        else:
            value = sum_over_ranks(value, module)  # FSDP1: each rank summed its own pieces
        return 0.5 * self.lam * value

    def prepare_cpu_kernel(self) -> bool:
        """Build the one-pass C loop now (once per process); whether it is available. The caller
        reports a missing compiler: :meth:`add_penalty_grad` then falls back without a warning."""
        self._kernel_reported = True
        return _ewc_fused_cpu.load() is not None

    def _fused_add(
        self,
        entry: _TermsEntry,
        grads: list[Tensor],
        fishers: list[Tensor],
        params: list[Tensor],
        anchors: list[Tensor],
        step: float,
    ) -> bool:
        """grads += (step F) (theta - theta*) in one pass with the C loop; ``False`` (nothing
        added) where it does not apply."""
        if not self.cpu_kernel or entry.device.type != "cpu" or torch.get_num_threads() != 1:
            return False  # ATen's ops use the other threads; the loop would not
        kernel = _ewc_fused_cpu.load()
        if kernel is None:
            if not self._kernel_reported:
                self._kernel_reported = True
                warnings.warn(_NO_COMPILER, stacklevel=3)
            return False
        if entry.kernel_fits is None:  # F, theta, theta* are fixed while the cache lives
            entry.kernel_fits = all(
                _ewc_fused_cpu.fits(t) and t.shape == p.shape
                for ps, fs, ans, _ in entry.terms
                for p, f, a in zip(ps, fs, ans)
                for t in (p, f, a)
            )
        # grads are new tensors at every step (zero_grad sets them to None)
        if not entry.kernel_fits or not all(
            _ewc_fused_cpu.fits(g) and g.shape == p.shape for g, p in zip(grads, params)
        ):
            return False
        for g, f, p, a in zip(grads, fishers, params, anchors):
            kernel(g.data_ptr(), f.data_ptr(), p.data_ptr(), a.data_ptr(), step, g.numel())
        return True

    def _compiled_add(
        self,
        entry: _TermsEntry,
        grads: list[Tensor],
        fishers: list[Tensor],
        params: list[Tensor],
        anchors: list[Tensor],
        step: float,
    ) -> bool:
        """grads += (step F) (theta - theta*) in one pass per tensor on CUDA, by the update
        compiled with ``torch.compile``; ``False`` (nothing added) where it does not apply or does
        not compile (logged once)."""
        if (
            not self.compile_update
            or self._compile_failed
            or entry.device.type != "cuda"
            or self.offload is not None  # the one-tensor-at-a-time route streams the state
            or not params
            or any(f.device != p.device for f, p in zip(fishers, params))  # offloaded
        ):
            return False
        try:
            update = _compiled_update()
            update(
                grads,
                fishers,
                params,
                anchors,
                torch.full((), step, dtype=torch.float64, device=entry.device),
            )
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # compilation happens before the graph writes any gradient
            self._compile_failed = True
            logger.warning(
                "EWC: torch.compile of the one-pass penalty-gradient update failed (%s: %s); "
                "using the foreach route (same update, more passes over memory).",
                type(err).__name__,
                err,
            )
            return False
        return True

    def invalidate_caches(self) -> None:
        """Forget the cached per-(module, optimizer) terms of :meth:`add_penalty_grad`."""
        self._terms_cache.clear()

    def _terms(self, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> _TermsEntry:
        """Per task: the trainable parameters (the optimizer's, if given) that have a Fisher,
        with F, theta* and a workspace buffer per parameter (shared by the tasks)."""
        key = (id(module), None if optimizer is None else id(optimizer))
        entry = self._terms_cache.get(key)
        if entry is not None:
            same = entry.module() is module and (
                optimizer is None
                or (entry.optimizer is not None and entry.optimizer() is optimizer)
            )
            first = next(iter(entry.terms[0][0]), None) if entry.terms else None
            if same and (first is None or first.device == entry.device):
                return entry
        names = {id(p): n for n, p in module.named_parameters()}
        if optimizer is None:
            candidates: Iterable[Tensor] = module.parameters()
        else:
            candidates = (p for g in optimizer.param_groups for p in g["params"])
        owned = [p for p in candidates if p.requires_grad and id(p) in names]
        self._refuse_sharded_offload(owned)
        device = owned[0].device if owned else torch.device("cpu")
        self._to_device(device)
        terms: list[_Terms] = []
        for task in self._tasks:
            ps = [p for p in owned if names[id(p)] in task.fisher]
            fs = [local_tensor(task.fisher[names[id(p)]]) for p in ps]
            ans = [local_tensor(task.anchor[names[id(p)]]) for p in ps]
            # a persistent theta - theta* buffer where the parameter's dtype is the arithmetic's
            wide = [
                self.offload is None and a.dtype == p.dtype == _compute_dtype(p, f)
                for p, f, a in zip(ps, fs, ans)
            ]
            terms.append((ps, fs, ans, wide))
        entry = _TermsEntry(
            weakref.ref(module),
            None if optimizer is None else weakref.ref(optimizer),
            device,
            terms,
        )
        self._terms_cache[key] = entry
        return entry

    # Placement and checks --------------------------------------------------------------------
    def to(self, device: torch.device | str) -> ElasticWeightConsolidation:
        """Move the stored Fishers and anchors to ``device`` (in place; with ``offload="cpu"``
        they stay in CPU memory); returns ``self``."""
        self._to_device(torch.device(device))
        return self

    def _home(self, device: torch.device) -> torch.device:
        """Where the state lives for parameters on ``device``."""
        return torch.device("cpu") if self.offload is not None else device

    def _to_device(self, device: torch.device) -> None:
        home, pin = self._home(device), self._pin()
        for task in self._tasks:
            tensors = [*task.fisher.values(), *task.anchor.values()]
            if any(t.device != home or (pin and not _is_pinned(t)) for t in tensors):
                task.fisher = _with_tensors(
                    task.fisher, {k: _place(v, home, pin) for k, v in task.fisher.items()}
                )
                task.anchor = {k: _place(v, home, pin) for k, v in task.anchor.items()}
                self.invalidate_caches()

    def _pin(self) -> bool:
        """Whether offloaded state goes to pinned memory (asynchronous copies to the GPU)."""
        return self.offload is not None and torch.cuda.is_available()

    def _refuse_sharded_offload(self, params: Iterable[Tensor]) -> None:
        if self.offload is not None and any(is_dtensor(p) for p in params):
            raise FisherInputError(
                "EWC(offload='cpu') keeps whole tensors in CPU memory, but the parameters are "
                "sharded (FSDP2 DTensors), where each rank already stores only its shard of the "
                "state; use offload=False, with state_dtype=torch.bfloat16 to halve the Fisher."
            )

    def state_bytes(self) -> StateBytes:
        """Bytes of the stored EWC state: Fishers (``state_dtype``), anchors (the parameters'
        dtype) and the update's persistent workspace, per parameter and in total, and the part
        held on the parameters' device. Sharded (FSDP2) state counts this rank's shards."""
        per: dict[str, int] = {}
        fisher = anchor = 0
        for task in self._tasks:
            for name, f in task.fisher.items():
                fb, ab = _nbytes(f), _nbytes(task.anchor[name])
                fisher, anchor = fisher + fb, anchor + ab
                per[name] = per.get(name, 0) + fb + ab
        buffers = {
            w.data_ptr(): _nbytes(w)
            for entry in self._terms_cache.values()
            for w in entry.buffers.values()
        }
        workspace = sum(buffers.values())
        total = fisher + anchor + workspace
        on_device = workspace if self.offload is not None else total
        return StateBytes(fisher, anchor, workspace, total, on_device, per)

    def check_matches(self, module: nn.Module | None = None) -> None:
        """Raise a ``ValueError`` naming the difference if a stored Fisher has a parameter the
        module lacks or one of another shape."""
        module = self._module(module)
        for task in self._tasks:
            task.fisher.check_matches(module)

    # State -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The settings the state depends on (``method``, ``mode``, ``gamma``), ``task_count`` and
        per stored task its Fisher (``FisherDiagonal.state_dict``) and anchors (copies)."""
        return {
            "method": self.method,
            "mode": self.mode,
            "gamma": self.gamma,
            "task_count": self.task_count,
            "tasks": [
                {
                    "fisher": t.fisher.state_dict(),
                    "anchor": {k: v.clone() for k, v in t.anchor.items()},
                }
                for t in self._tasks
            ],
        }

    def load_state_dict(
        self, state_dict: Mapping[str, Any], module: nn.Module | None = None
    ) -> None:
        """Restore :meth:`state_dict`'s output, checked against this object's settings.

        Another ``method`` raises (the Fishers' scales differ, and lambda with them).
        ``mode="separate"`` state loaded into ``mode="online"`` is converted, with a warning:
        F = sum_t gamma^(T-t) F_t, anchored at each parameter's latest anchor. Online state of
        more than one task cannot be split into separate tasks and raises. With a module (the
        argument or the one given at construction) the parameter names and shapes are checked.
        Nothing changes unless everything is valid.
        """
        method = state_dict.get("method", self.method)
        if self.method is not None and method is not None and method != self.method:
            raise FisherInputError(
                f"EWC: the checkpoint's Fisher diagonals were estimated with method={method!r}, "
                f"but this EWC has method={self.method!r}. The methods' scales differ (and "
                f"lambda with them), so they are not mixed: resume with EWC(method={method!r}, ...)."
            )
        mode = state_dict.get("mode", self.mode)
        if mode not in MODES:
            raise FisherInputError(f"EWC: corrupt checkpoint state: unknown mode {mode!r}.")
        task_count = int(state_dict["task_count"])
        if mode == "online" and self.mode == "separate" and task_count > 1:
            raise FisherInputError(
                "EWC: the checkpoint holds mode='online' state (one Fisher summed over "
                f"{task_count} tasks), which cannot be split into the per-task "
                "Fishers of mode='separate'; resume with EWC(mode='online', ...)."
            )
        check = module if module is not None else self.model
        tasks = []
        for entry in state_dict["tasks"]:
            # cast to this object's state_dtype: a float32 checkpoint loads into bf16 state
            fisher = _fisher_from_state(entry["fisher"], self.state_dtype)
            anchor = dict(entry["anchor"])
            if set(anchor) != set(fisher):
                raise FisherInputError(
                    "EWC: corrupt checkpoint state: anchor and Fisher names differ."
                )
            if check is not None:
                try:
                    fisher.check_matches(check)
                except ValueError as err:
                    raise FisherInputError(
                        f"EWC: cannot restore the checkpoint's EWC state: {err} Resume with the "
                        "model the checkpoint was written from."
                    ) from None
            tasks.append(_Task(fisher, anchor))
        if mode == "separate" and self.mode == "online" and len(tasks) > 1:
            n_tasks, tasks = len(tasks), [self._as_online(tasks)]
            warnings.warn(
                f"EWC: converted the checkpoint's mode='separate' state ({n_tasks} tasks) to "
                f"mode='online': F = sum_t gamma^(T-t) F_t with gamma={self.gamma}, anchored at "
                "the latest task.",
                stacklevel=2,
            )
        self._tasks = tasks
        self.task_count = task_count
        if self.method is None:
            self.method = method
        self.invalidate_caches()

    def _as_online(self, tasks: list[_Task]) -> _Task:
        """What online EWC keeps from the same per-task estimates: F = sum_t gamma^(T-t) F_t (a
        parameter a task has no entry for counts as zero there), anchored at each parameter's
        latest anchor."""
        combined = tasks[0].fisher
        anchor = dict(tasks[0].anchor)
        for task in tasks[1:]:
            combined = _merge(combined, task.fisher, self.gamma, self.state_dtype, False)
            anchor.update(task.anchor)
        return _Task(combined, {n: anchor[n] for n in combined})


_NO_COMPILER = (
    "EWC(cpu_kernel=True): no C compiler could build the kernel; using PyTorch's ops "
    "(same result, one more pass over the parameters)."
)


def _use_foreach(device: torch.device) -> bool:
    """Whether theta - theta* is formed with the multi-tensor ops: on CUDA two launches instead
    of two per tensor; on CPU, where the update is memory-bound, one pass per tensor (read theta
    and theta*, write the difference) moves fewer bytes than a copy and a subtraction."""
    return device.type != "cpu"


def _anchor(
    params: Mapping[str, Tensor], fisher: FisherDiagonal, home: torch.device, pin: bool
) -> dict[str, Tensor]:
    """theta* = theta (copies, the parameters' dtype) on ``home``."""
    out = {}
    for n in fisher:
        p = params[n].detach()
        out[n] = _place(p.clone() if p.device == home else p.to(home), home, pin)
    return out


_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def check_state_dtype(value: Any) -> torch.dtype:
    """The Fisher's storage dtype from ``state_dtype`` (``None``: float32)."""
    if value is None:
        return torch.float32
    dtype = _DTYPE_NAMES.get(value.lower()) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or dtype not in STATE_DTYPES:
        found = (
            f"{value!r} (not a floating-point dtype)"
            if isinstance(value, torch.dtype)
            else repr(value)
        )
        raise FisherInputError(
            f"EWC: state_dtype must be None (float32), torch.float32, torch.bfloat16, "
            f"torch.float16 or torch.float64 (or one of the names {sorted(_DTYPE_NAMES)}); got "
            f"{found}."
        )
    return dtype


def check_offload(value: Any) -> str | None:
    """``offload``: ``False``/``None`` (state on the parameters' device) or ``"cpu"``."""
    if value is None or value is False:
        return None
    if value == "cpu" and isinstance(value, str):
        return "cpu"
    raise FisherInputError(
        f"EWC: offload must be False (state on the parameters' device) or 'cpu' (state in "
        f"CPU memory, copied to the device at each step); got {value!r}."
    )


def _compute_dtype(p: Tensor, f: Tensor) -> torch.dtype:
    """The arithmetic's dtype for a parameter and its Fisher: float32, or float64 if either is."""
    return torch.promote_types(torch.promote_types(p.dtype, f.dtype), torch.float32)


def _add_term(
    g: Tensor, f: Tensor, p: Tensor, a: Tensor, step: float, with_value: bool
) -> Tensor | None:
    """g += (step F) (theta - theta*) for one parameter, in float32 (or wider) whatever the
    dtypes of g, F, theta and theta*, rounded once into g; with ``with_value`` also returns
    sum F (theta - theta*)^2. Offloaded F and theta* are copied to the parameter's device first."""
    if f.device != p.device:
        f, a = f.to(p.device, non_blocking=True), a.to(p.device, non_blocking=True)
    dtype = _compute_dtype(p, f)
    d = p.to(dtype) - a.to(dtype)
    if g.dtype == dtype:
        g.addcmul_(f, d, value=step)
    else:
        g.copy_(g.to(dtype).addcmul_(f, d, value=step))
    return d.square_().mul_(f).sum() if with_value else None


def _penalty_sum(fishers: list[Tensor], params: list[Tensor], anchors: list[Tensor]) -> Tensor:
    """sum F (theta - theta*)^2 over the tensors, in float32 (or wider), one tensor at a time."""
    total = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for f, p, a in zip(fishers, params, anchors):
        dtype = _compute_dtype(p, f)
        total = total + (p.to(dtype) - a.to(dtype)).square_().mul_(f).sum()
    return total


def _update_lists(
    grads: list[Tensor],
    fishers: list[Tensor],
    params: list[Tensor],
    anchors: list[Tensor],
    step: Tensor,
) -> None:
    """The update of :func:`_add_term`, written for ``torch.compile`` to fuse into one kernel per
    tensor (reads g, F, theta, theta* once, writes g once)."""
    for g, f, p, a in zip(grads, fishers, params, anchors):
        dtype = _compute_dtype(p, f)
        d = p.to(dtype) - a.to(dtype)
        g.copy_(g.to(dtype) + (step.to(dtype) * f.to(dtype)) * d)


_COMPILED: Any = None


def _compiled_update() -> Any:
    """:func:`_update_lists` compiled once per process (whole graph, or an error)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_update_lists, fullgraph=True)
    return _COMPILED


def _is_pinned(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.is_pinned()


def _place(t: Tensor, home: torch.device, pin: bool) -> Tensor:
    """``t`` on ``home``, in pinned memory with ``pin``."""
    t = t.to(home)
    return t.pin_memory() if pin and not t.is_pinned() else t


def _nbytes(t: Tensor) -> int:
    local = local_tensor(t)
    return local.numel() * local.element_size()


def _with_tensors(meta: FisherDiagonal, tensors: Mapping[str, Tensor]) -> FisherDiagonal:
    """A FisherDiagonal with ``meta``'s description holding ``tensors`` as they are: the stored
    state keeps ``state_dtype`` (the constructor would cast to float32)."""
    out = FisherDiagonal({}, meta.n_samples, meta.method, meta.options, meta.certificate)
    out._tensors = dict(tensors)
    return out


def _stored(
    fisher: FisherDiagonal, dtype: torch.dtype, home: torch.device, pin: bool
) -> FisherDiagonal:
    """``fisher`` cast to the storage dtype on ``home``; refuses entries the dtype cannot hold."""
    tensors = {}
    for name, t in fisher.items():
        cast_t = t.to(device=home, dtype=dtype)
        if dtype != t.dtype and not torch.isfinite(cast_t).all():
            raise FisherInputError(
                f"EWC: the Fisher of {name!r} overflows state_dtype={dtype} (largest entry "
                f"{float(t.abs().max()):.4g}, the dtype's largest {torch.finfo(dtype).max:.4g}); "
                "nothing was consolidated. Use state_dtype=torch.bfloat16, which has float32's "
                "range."
            )
        tensors[name] = _place(cast_t, home, pin)
    return _with_tensors(fisher, tensors)


def _merge(
    old: FisherDiagonal, new: FisherDiagonal, gamma: float, dtype: torch.dtype, pin: bool
) -> FisherDiagonal:
    """gamma old + new (a parameter on one side only counts as zero on the other), computed in
    float32 (float64 for float64 state) and stored in ``dtype`` on ``new``'s device."""
    tensors: dict[str, Tensor] = {}
    for name in [*old, *(k for k in new if k not in old)]:
        a, b = old.get(name), new.get(name)
        if a is not None and b is not None and a.shape != b.shape:
            raise FisherInputError(
                f"EWC: cannot add Fisher diagonals: {name!r} has shapes {tuple(a.shape)} and "
                f"{tuple(b.shape)}."
            )
        if a is None:
            assert b is not None
            tensors[name] = b
            continue
        total = a.to(torch.promote_types(a.dtype, torch.float32)) * gamma
        tensors[name] = total if b is None else total + b.to(total.device)
    method = old.method if old.method == new.method else f"{old.method}+{new.method}"
    combined = FisherDiagonal({}, old.n_samples + new.n_samples, method, old.options)
    home = next(iter(new.values())).device if len(new) else torch.device("cpu")
    return _stored(_with_tensors(combined, tensors), dtype, home, pin)


def _fisher_from_state(state: Mapping[str, Any], dtype: torch.dtype) -> FisherDiagonal:
    """``FisherDiagonal.from_state_dict`` with the tensors cast to ``dtype`` directly."""
    meta = FisherDiagonal.from_state_dict({**state, "tensors": {}})
    return _with_tensors(meta, {k: v.detach().to(dtype) for k, v in state["tensors"].items()})


__all__ = ["MODES", "STATE_DTYPES", "ElasticWeightConsolidation", "StateBytes"]
