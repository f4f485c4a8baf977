"""``FisherOptions``: the options every Fisher estimator understands, checked when they are set.

One object carries them from ``estimate_fisher``, the callbacks and the diagnostics to the data
pass; each default is stated once, here. A bad value raises a ``FisherInputError`` naming the
option when the object is built (or the attribute set), before any data is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

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
                f"{closest(name, _CHECKS)}"
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
                + "".join(closest(u, cls.names()) for u in unknown)
            )
        return dataclasses.replace(options if options is not None else cls(), **overrides)

    def public(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """The values of ``keys`` (what an estimate records of its options)."""
        return {k: getattr(self, k) for k in keys}


#: A check ``check(label, value)``: raises a ``FisherInputError`` saying ``label`` (the argument's
#: name, prefixed by the function or callback it belongs to) must be something else.
Check = Callable[[str, Any], None]


def label(who: str, name: str) -> str:
    """How an argument is named in messages: ``"EWC: gamma"``, or ``"gamma"`` without ``who``."""
    return f"{who}: {name}" if who else name


def closest(value: Any, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the choice closest to a mistyped string, else ``""``."""
    if not isinstance(value, str):
        return ""
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6)
    return f" Did you mean {lowered[match[0]]!r}?" if match else ""


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        extra = (
            " (the rank k >= 1 is the number of eigenpairs of I(p) that `lower` and "
            "`hutchinson_lower` keep: rank=1 costs what `empirical` costs, rank >= C-1 gives "
            "`exact`)"
            if name.endswith("rank")
            else ""
        )
        raise FisherInputError(f"{name} must be a positive integer{extra}; got {value!r}.")


def _positive_int_or_none(name: str, value: Any) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        raise FisherInputError(f"{name} must be a positive integer or None; got {value!r}.")


def _non_negative_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise FisherInputError(f"{name} must be a non-negative integer; got {value!r}.")


def _integer(name: str, value: Any) -> None:
    if not _is_int(value):
        raise FisherInputError(f"{name} must be an integer; got {value!r}.")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise FisherInputError(f"{name} must be True or False; got {value!r}.")


def _flag_or_none(name: str, value: Any) -> None:
    if value is not None:
        _flag(name, value)


def _choice(allowed: tuple[str, ...]) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, str) or value not in allowed:
            raise FisherInputError(
                f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}."
                f"{closest(value, allowed)}"
            )

    return check


def _callable_or_none(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise FisherInputError(f"{name} must be a callable or None; got {type(value).__name__}.")


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    allow_none: bool = False,
) -> Check:
    """A check for a finite real number in [low, high] (``(low, high]`` with ``low_open``)."""
    if low is None:
        wanted = "a finite number"
    elif high is None:
        wanted = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    if allow_none:
        wanted += " or None"

    def check(name: str, value: Any) -> None:
        if value is None and allow_none:
            return
        ok = (
            not isinstance(value, bool)
            and isinstance(value, numbers.Real)
            and math.isfinite(float(value))
            and (low is None or (float(value) > low if low_open else float(value) >= low))
            and (high is None or float(value) <= high)
        )
        if not ok:
            raise FisherInputError(f"{name} must be {wanted}; got {value!r}.")

    return check


_positive_number = number(0.0, low_open=True)


def _classes(name: str, value: Any) -> None:
    if value is None or callable(value):
        return
    bad = FisherInputError(
        f"{name} must be a sequence of class indices (integers >= 0) or a callable "
        f"classes(batch); got {value!r}."
    )
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise bad
    items = value.tolist() if hasattr(value, "tolist") else list(value)
    if not isinstance(items, list) or not all(_is_int(c) for c in items):
        raise bad
    if not items or min(items) < 0:
        raise FisherInputError(f"{name} must list at least one class index >= 0; got {value!r}.")


def _mapping_or_none(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise FisherInputError(
            f"{name} must be a mapping of option names to values (a dict) or None; got "
            f"{type(value).__name__}."
        )


def _name_or_none(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise FisherInputError(f"{name} must be a non-empty string or None; got {value!r}.")


def _names_or_none(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise FisherInputError(
            f"{name} must be an iterable of parameter names (a list) or None; got {value!r}"
            + (" (a single name: wrap it in a list)." if isinstance(value, str) else ".")
        )


def _module(name: str, value: Any) -> None:
    if not isinstance(value, nn.Module):
        raise FisherInputError(f"{name} must be a torch.nn.Module; got {type(value).__name__}.")


def _batches(name: str, value: Any) -> None:
    if isinstance(value, (str, bytes, Tensor, Mapping)) or not isinstance(value, Iterable):
        raise FisherInputError(
            f"{name} must be an iterable of batches (a DataLoader, or a list of batches); got "
            f"{type(value).__name__}"
            + (" (a single tensor: wrap the batch in a list)" if isinstance(value, Tensor) else "")
            + "."
        )


#: The checks of arguments beyond the estimator options (callbacks and public functions), by kind.
CHECKS_BY_KIND: Mapping[str, Check] = {
    "positive_int": _positive_int,
    "positive_int_or_none": _positive_int_or_none,
    "non_negative_int": _non_negative_int,
    "integer": _integer,
    "flag": _flag,
    "callable_or_none": _callable_or_none,
    "classes": _classes,
    "positive_number": _positive_number,
    "non_negative_number": number(0.0),
    "fraction": number(0.0, 1.0),
    "mapping_or_none": _mapping_or_none,
    "name_or_none": _name_or_none,
    "module": _module,
    "batches": _batches,
    "names_or_none": _names_or_none,
    "positive_number_or_none": number(0.0, low_open=True, allow_none=True),
}


def check(who: str, **arguments: tuple[str, Any]) -> None:
    """Check arguments by kind: ``check("EWC", gamma=("non_negative_number", gamma), seed=("integer", seed))``.

    Raises a ``FisherInputError`` naming ``who``, the argument, the value and what is expected.
    """
    for name, (kind, value) in arguments.items():
        CHECKS_BY_KIND[kind](label(who, name), value)


def check_param_filter(
    who: str, model: nn.Module, param_filter: Callable[[str], bool] | None
) -> None:
    """Raise a ``FisherInputError`` when ``param_filter`` excludes every trainable parameter of
    ``model`` (a model with no parameters yet, built later, is not checked)."""
    if param_filter is None:
        return
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if names and not any(param_filter(n) for n in names):
        shown = ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else "")
        raise FisherInputError(
            f"{label(who, 'param_filter')} excludes every one of the model's {len(names)} "
            f"trainable parameters ({shown}), which leaves no trainable parameters to estimate a "
            "Fisher for; expected a predicate that is True for the names to keep."
        )


def check_choice(who: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise a ``FisherInputError`` for ``value`` not in ``allowed`` (with the closest choice)."""
    _choice(allowed)(label(who, name), value)


_CHECKS: Mapping[str, Check] = {
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


#: Options that only some methods read, and the methods that read them. Set to anything but the
#: default for methods that all ignore it, an option warns (``warn_ignored_options``).
METHOD_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "mc_samples": ("sample",),
    "probes": ("hutchinson", "hutchinson_upper", "hutchinson_lower"),
    "probe_distribution": ("hutchinson", "hutchinson_upper", "hutchinson_lower"),
    "rank": ("lower", "hutchinson_lower"),
    "eigen_method": ("lower", "hutchinson_lower"),
    "exact_max_classes": ("exact", "upper"),
}
#: every option at its default
DEFAULT_OPTIONS = FisherOptions()
_warned_ignored: set[tuple[str, str, str]] = set()


def ignored_options(options: FisherOptions, methods: Sequence[str]) -> list[str]:
    """The method-specific options of ``options`` set away from their default that none of
    ``methods`` (registered names) reads."""
    return [
        name
        for name, readers in METHOD_OPTIONS.items()
        if getattr(options, name) != getattr(DEFAULT_OPTIONS, name)
        and not any(m in readers for m in methods)
    ]


def warn_ignored_options(who: str, options: FisherOptions, methods: Sequence[str]) -> None:
    """Warn (once per process for each method, option and value) about options that the chosen
    methods ignore, naming the methods that do read them."""
    for name in ignored_options(options, methods):
        value = getattr(options, name)
        key = (who + ":" + ",".join(methods), name, repr(value))
        if key in _warned_ignored:
            continue
        _warned_ignored.add(key)
        chosen = ", ".join(map(repr, methods))
        warnings.warn(
            f"{label(who, name)}={value!r} is ignored by method {chosen}; it is read only by "
            f"{', '.join(METHOD_OPTIONS[name])}.",
            UserWarning,
            stacklevel=3,
        )
