"""``FisherOptions``: the options every Fisher estimator understands, checked when they are set.

One object carries them from ``estimate_fisher``, the callbacks and the diagnostics to the data
pass; each default is stated once, here. A bad value raises a ``FisherInputError`` naming the
option when the object is built (or the attribute set), before any data is read.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .outputs import IGNORE_INDEX, ClassSelector, FisherInputError, OutputFn

#: Above this many classes ``exact`` and ``upper`` refuse to run (C backward columns per input).
EXACT_MAX_CLASSES = 1024
#: Cap on the memory of the per-input (or per-probe) gradients materialised at once, in MiB.
MAX_MEMORY_MIB = 1024.0
PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")
EIGEN_METHODS = ("auto", "eigh", "power")
#: What one input of token-level outputs (B, T, C) is: a position, or a whole sequence.
GRANULARITIES = ("token", "sequence")
#: How token-level per-input methods get their gradients: one per sequence or one per position.
TOKEN_ROUTES = ("auto", "sequence", "position")


@dataclass
class FisherOptions:
    """Options of a Fisher estimate, validated when set.

    Attributes:
        max_samples: use ``n`` random inputs only (EXACT(n)); all data if ``None``.
        mc_samples: label draws per input for ``sample``.
        probes: probe vectors per batch for the ``hutchinson*`` methods (one backward each).
        rank: number k of eigenpairs of I(p) kept by ``hutchinson_lower`` and ``lower``.
        probe_distribution: ``rademacher`` (each entry +-1; CV <= sqrt 2) or ``gaussian``.
        eigen_method: ``auto``, ``eigh`` or ``power`` for ``hutchinson_lower`` and ``lower``.
        output_fn: ``output_fn(model, batch) -> output`` when calling ``model`` on the batch is not
            how the logits are obtained.
        classes: restrict the classes that count (the active head of a task-incremental model): a
            sequence of class indices or a callable ``classes(batch)``.
        shift_labels: causal LMs: logits at position t predict the token at t + 1.
        param_filter: keep only parameters whose name passes this predicate.
        max_memory_mib: cap on the memory the per-input pass materialises at once: cotangent
            columns, the output gradients of a chunk of columns and a layer's per-input
            gradients (chunks are sized so that together they fit; when a single column or
            input does not, the pass refuses with the cap it would need).
        max_batches: stop after this many batches.
        seed: seeds label draws, probes and the EXACT(n) subset.
        progress: show a progress bar (``None``: on interactive terminals for multi-batch passes).
        sync_distributed: under ``torch.distributed``, sum over ranks so that every rank gets the
            Fisher of the union of the shards.
        verify: per-input methods (``exact``, ``sample``, ``empirical``, ``upper``, ``lower``)
            check their per-input gradients on the first batch of each traced structure: with
            random signs s_x, the signed sum sum_x s_x J_x^T u_x must equal one ordinary backward
            of the cotangent s_x u_x. A layer rule that fails is replaced by a slower correct
            route (logged); ``False`` skips the check (one backward less).
        ignore_index: label value of inputs that do not count (PyTorch's and Hugging Face's -100).
        exact_max_classes: the class count above which ``exact`` and ``upper`` refuse to run.
        granularity: for token-level outputs (B, T, C), what one input is. ``"token"``: every
            counted position, F = (1/N_tokens) sum_{s,t} J_{s,t}^T I(p_{s,t}) J_{s,t} (every
            method). ``"sequence"`` (``empirical`` and ``sample`` only): one gradient per sequence,
            g_s = grad sum_t log p(y_t) over its counted positions, F_seq = (1/N_seq) sum_s g_s^2.
            Outputs (B, C) are the same under both.
        token_route: how ``granularity="token"`` gets its gradients. ``"position"``: one
            per-position gradient each (exact for every method, cost grows with T).
            ``"sequence"`` (``sample`` only): the squared gradient of sum_t log p(y_t) with
            y_t ~ p_t drawn independently, one backward per sequence; the cross terms vanish in
            expectation, so it is unbiased for the same token-level Fisher, with more variance.
            ``"auto"``: ``"sequence"`` for ``sample``, ``"position"`` for the others.
        causal: token-level logits at position t depend on the inputs at positions <= t only (a
            causal LM; ``hf.lm_fisher_kwargs`` sets it for Hugging Face causal LMs). The
            per-position route then runs each block of positions [a, b) through a forward of
            the batch's first b positions (the causal cut: about half the backward arithmetic
            of a long sequence), and refuses a batch whose prefix logits differ from the whole
            sequence's beyond rounding. The same Fisher, up to rounding. Sharded (FSDP) passes
            do not cut.

    ``FisherOptions.build(options, **overrides)`` gives a copy with some options replaced and
    refuses unknown names.
    """

    max_samples: int | None = None
    mc_samples: int = 1
    probes: int = 1
    rank: int = 1
    probe_distribution: str = "rademacher"
    eigen_method: str = "auto"
    output_fn: OutputFn | None = None
    classes: ClassSelector | None = None
    shift_labels: bool = False
    param_filter: Callable[[str], bool] | None = None
    max_memory_mib: float = MAX_MEMORY_MIB
    max_batches: int | None = None
    seed: int = 0
    progress: bool | None = None
    sync_distributed: bool = True
    verify: bool = True
    ignore_index: int = IGNORE_INDEX
    exact_max_classes: int = EXACT_MAX_CLASSES
    granularity: str = "token"
    token_route: str = "auto"
    causal: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _CHECKS:
            raise FisherInputError(
                f"Unknown Fisher estimator option {name!r}; the options are {sorted(_CHECKS)}."
            )
        _CHECKS[name](name, value)
        super().__setattr__(name, value)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, options: FisherOptions | None = None, /, **overrides: Any) -> FisherOptions:
        """A copy of ``options`` (default: all defaults) with ``overrides`` applied.

        Raises ``FisherInputError`` for a name that is not an option or a value it refuses.
        """
        if options is not None and not isinstance(options, FisherOptions):
            raise FisherInputError(
                f"options must be a FisherOptions (or None); got {type(options).__name__}."
            )
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise FisherInputError(
                f"unknown Fisher estimator option(s) {unknown}; the options of "
                f"`lf.FisherOptions` are {sorted(cls.names())}."
            )
        return dataclasses.replace(options if options is not None else cls(), **overrides)

    def public(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """The values of ``keys`` (what an estimate records of its options)."""
        return {k: getattr(self, k) for k in keys}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        extra = (
            " (the rank k >= 1 is the number of eigenpairs of I(p) that `lower` and "
            "`hutchinson_lower` keep: rank=1 costs what `empirical` costs, rank >= C-1 gives "
            "`exact`)"
            if name == "rank"
            else ""
        )
        raise FisherInputError(f"{name} must be a positive integer{extra}; got {value!r}.")


def _positive_int_or_none(name: str, value: Any) -> None:
    if value is not None:
        try:
            _positive_int(name, value)
        except FisherInputError:
            raise FisherInputError(
                f"{name} must be a positive integer or None; got {value!r}."
            ) from None


def _integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FisherInputError(f"{name} must be an integer; got {value!r}.")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise FisherInputError(f"{name} must be True or False; got {value!r}.")


def _flag_or_none(name: str, value: Any) -> None:
    if value is not None:
        _flag(name, value)


def _choice(allowed: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value not in allowed:
            raise FisherInputError(
                f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}."
            )

    return check


def _callable_or_none(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise FisherInputError(f"{name} must be a callable or None; got {type(value).__name__}.")


def _positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise FisherInputError(f"{name} must be a positive number; got {value!r}.")


def _classes(name: str, value: Any) -> None:
    if value is None or callable(value):
        return
    try:
        indices = [int(c) for c in value]
    except (TypeError, ValueError):
        raise FisherInputError(
            f"{name} must be a sequence of class indices or a callable classes(batch); "
            f"got {value!r}."
        ) from None
    if not indices or min(indices) < 0:
        raise FisherInputError(f"{name} must list at least one class index >= 0; got {value!r}.")


_CHECKS: Mapping[str, Callable[[str, Any], None]] = {
    "max_samples": _positive_int_or_none,
    "mc_samples": _positive_int,
    "probes": _positive_int,
    "rank": _positive_int,
    "probe_distribution": _choice(PROBE_DISTRIBUTIONS),
    "eigen_method": _choice(EIGEN_METHODS),
    "output_fn": _callable_or_none,
    "classes": _classes,
    "shift_labels": _flag,
    "param_filter": _callable_or_none,
    "max_memory_mib": _positive_number,
    "max_batches": _positive_int_or_none,
    "seed": _integer,
    "progress": _flag_or_none,
    "sync_distributed": _flag,
    "verify": _flag,
    "ignore_index": _integer,
    "exact_max_classes": _positive_int,
    "granularity": _choice(GRANULARITIES),
    "token_route": _choice(TOKEN_ROUTES),
    "causal": _flag,
}
