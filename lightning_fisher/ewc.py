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

import math
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _ewc_fused_cpu
from .fisher_diagonal import FisherDiagonal
from .outputs import FisherInputError
from .sharded import is_dtensor, local_tensor, refuse_fsdp1
from .sharded_fsdp1 import sum_over_ranks

MODES = ("online", "separate")
#: per task: parameters, their Fisher, anchors and workspace buffers
_Terms = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


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


class ElasticWeightConsolidation:
    r"""The consolidated EWC state of a model and its penalty, usable from any training loop.

    After training a task, :meth:`consolidate` stores that task's Fisher diagonal with the current
    parameters as anchors theta*. While training the next tasks, either add :meth:`penalty`

        P(theta) = (lam / 2) sum_t sum_i F_t,i (theta_i - theta*_t,i)^2

    to the loss, or call :meth:`add_penalty_grad` after ``loss.backward()``: it adds the exact
    gradient ``lam * sum_t F_t * (theta - theta*_t)`` to ``.grad`` without building a graph (two
    in-place passes over the parameters per task; on CUDA three ``foreach`` launches; with
    ``cpu_kernel=True`` one). Both routes give the same update.

    ``mode="separate"`` keeps a Fisher and an anchor per task; ``mode="online"`` keeps one pair,
    F <- gamma F + F_new, theta* <- theta_new, where a parameter new since the last task (a new
    head) counts as zero on the old side.

    Memory: per consolidated parameter a float32 Fisher and an anchor (the parameter's dtype) per
    stored task, and, once :meth:`add_penalty_grad` ran, a workspace buffer shared by the tasks.

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
        gamma: decay of the old Fisher in online mode (>= 0).
        method: the estimator the Fishers come from, kept in :meth:`state_dict` so that state is
            never mixed across scales; ``None``: the first consolidated Fisher's ``method``.
        cpu_kernel: on CPU, add the gradient with a one-pass C loop (reads each of grad, F, theta
            and theta* once, writes grad once; the roundings of the loss's gradient), compiled
            once per process with the system C compiler. Used for float32 tensors while PyTorch
            runs one CPU thread (the loop is single-threaded); otherwise, or without a compiler (a
            warning), PyTorch's ops.
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
    ) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise FisherInputError(f"EWC: lam must be a finite number >= 0; got {lam!r}.")
        if not (math.isfinite(lam) and lam >= 0):
            raise FisherInputError(f"EWC: lam must be a finite number >= 0; got {lam!r}.")
        if mode not in MODES:
            raise FisherInputError(f"EWC: mode must be 'online' or 'separate'; got {mode!r}.")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise FisherInputError(f"EWC: gamma must be a finite number >= 0; got {gamma!r}.")
        if not (math.isfinite(gamma) and gamma >= 0):
            raise FisherInputError(f"EWC: gamma must be a finite number >= 0; got {gamma!r}.")
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
        #: number of consolidated tasks (in online mode, tasks folded into the one Fisher)
        self.task_count = 0
        self._tasks: list[_Task] = []
        self._terms_cache: dict[tuple[int, int | None], _TermsEntry] = {}
        self._kernel_reported = False  # the caller heard whether the C loop is available

    # Read access -----------------------------------------------------------------------------
    @property
    def fishers(self) -> list[FisherDiagonal]:
        """The stored Fisher diagonals: one in online mode, one per task in separate mode."""
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

        Returns:
            ``fisher`` on the parameters' device. On any error the stored state is unchanged.
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
        device = next(iter(params.values())).device
        fisher = fisher.to(device)
        self._to_device(device)
        if self.mode == "online" and self._tasks:
            combined = self._tasks[0].fisher.scale(self.gamma) + fisher
            self._tasks = [_Task(combined, _anchor(params, combined))]
        else:
            self._tasks.append(_Task(fisher, _anchor(params, fisher)))
        if self.method is None:
            self.method = fisher.method
        self.task_count += 1
        self.invalidate_caches()
        return fisher

    # The penalty -----------------------------------------------------------------------------
    def penalty(self, module: nn.Module | None = None) -> Tensor:
        """(lam / 2) sum_t sum_i F_t,i (theta_i - theta*_t,i)^2, differentiable in the module's
        parameters (a float32 zero before the first consolidation)."""
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
                term = (f * (params[name] - task.anchor[name]).pow(2)).sum()
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
            for params, fishers, anchors, work in entry.terms:
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
        device = owned[0].device if owned else torch.device("cpu")
        self._to_device(device)
        work = {id(p): torch.empty_like(local_tensor(p)) for p in owned}
        terms: list[_Terms] = []
        for task in self._tasks:
            ps = [p for p in owned if names[id(p)] in task.fisher]
            terms.append(
                (
                    ps,
                    [local_tensor(task.fisher[names[id(p)]]) for p in ps],
                    [local_tensor(task.anchor[names[id(p)]]) for p in ps],
                    [work[id(p)] for p in ps],
                )
            )
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
        """Move the stored Fishers and anchors to ``device`` (in place); returns ``self``."""
        self._to_device(torch.device(device))
        return self

    def _to_device(self, device: torch.device) -> None:
        for task in self._tasks:
            if any(t.device != device for t in task.anchor.values()):
                task.fisher = task.fisher.to(device)
                task.anchor = {k: v.to(device) for k, v in task.anchor.items()}
                self.invalidate_caches()

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
            fisher = FisherDiagonal.from_state_dict(entry["fisher"])
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
            combined = combined.scale(self.gamma) + task.fisher
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


def _anchor(params: Mapping[str, Tensor], fisher: FisherDiagonal) -> dict[str, Tensor]:
    return {n: params[n].detach().clone() for n in fisher}


__all__ = ["MODES", "ElasticWeightConsolidation"]
