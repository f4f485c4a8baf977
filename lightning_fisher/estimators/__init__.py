"""Fisher estimators: one file per estimator, the shared data pass in ``base``."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..fisher_diagonal import FisherDiagonal
from ..options import (
    DEFAULT_OPTIONS,
    FisherOptions,
    check,
    check_param_filter,
    warn_ignored_options,
)
from ..outputs import FisherInputError
from .base import Estimator, run_passes
from .registry import ALIASES, REGISTRY, EstimatorInfo, lookup
from .squisher import SquisherEstimator, fisher_from_optimizer

#: the data-pass estimator classes by method name
ESTIMATORS: dict[str, type[Estimator]] = {
    info.name: info.cls  # type: ignore[misc]
    for info in REGISTRY.values()
    if info.data_pass
}
#: every registered method name (``squisher`` included: it reads an optimizer, not data)
METHODS = tuple(REGISTRY)
#: the methods that estimate from a pass over data (what the callbacks' data passes run)
DATA_METHODS = tuple(ESTIMATORS)


def estimate_fisher(
    model: nn.Module,
    dataloader: Iterable[Any] | None,
    method: str = "exact",
    *,
    options: FisherOptions | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    batch_size: int | None = None,
    bias_correction: bool = True,
    **overrides: Any,
) -> FisherDiagonal:
    """Estimate the diagonal of the Fisher information of ``model`` on ``dataloader``.

    The scale is averaged over inputs: F = (1/N) sum_x J^T I(p) J.

    Args:
        model: a classifier (any ``nn.Module``); the pass runs in eval mode and restores each
            submodule's mode; BatchNorm statistics are left untouched. Normalisation by batch
            statistics that eval mode leaves on is refused (except by ``batched``), dropout that it
            leaves on warns.
        dataloader: any iterable of batches: ``(x, y)`` tuples, dicts (Hugging Face style) or
            tensors (``None`` for ``squisher``).
        method: a registered method (``lf.METHODS``; the table in the docs): ``exact``,
            ``sample``, ``empirical``, ``batched``, ``hutchinson`` (unbiased F),
            ``hutchinson_upper`` (upper bound) or ``hutchinson_lower`` (lower bound), both
            unbiased estimates, the deterministic bounds ``upper`` (diag of
            (1/N) sum_x J^T diag(p) J, C columns per input) and ``lower`` (top-``rank``
            eigenpairs of I(p), ``rank`` columns per input; its result carries a
            ``certificate`` on its gap to F), or ``squisher`` (``batch_size`` times Adam's
            ``exp_avg_sq`` of ``optimizer``, no data pass). ``hutchinson_dg`` and
            ``hutchinson_lr`` are deprecated names of the two bound estimates.
        options: a ``FisherOptions`` (see it for every option and its default).
        optimizer: the Adam/AdamW optimizer ``squisher`` reads (ignored by the other methods).
        batch_size: the training batch size B of ``squisher`` (F = B * exp_avg_sq).
        bias_correction: whether ``squisher`` bias-corrects ``exp_avg_sq``.
        **overrides: options by name (``max_samples=``, ``probes=``, ``seed=``, ...), applied on
            top of ``options``.

    Returns:
        A ``FisherDiagonal`` with one float32 tensor per trainable parameter.
    """
    info = lookup(method)
    check("estimate_fisher", model=("module", model))
    if not info.data_pass:
        given = FisherOptions.build(options, **overrides)  # a typo is still an error
        unused = [
            n for n in FisherOptions.names() if getattr(given, n) != getattr(DEFAULT_OPTIONS, n)
        ]
        if dataloader is not None:
            unused.insert(0, "dataloader")
        if unused:
            warnings.warn(
                f"estimate_fisher(method={info.name!r}) reads Adam's exp_avg_sq and no data; it "
                f"ignores {', '.join(unused)}.",
                UserWarning,
                stacklevel=2,
            )
        return SquisherEstimator.from_context(
            model, optimizer=optimizer, batch_size=batch_size, bias_correction=bias_correction
        )
    squisher_only = [
        name
        for name, value, default in (
            ("optimizer", optimizer, None),
            ("batch_size", batch_size, None),
            ("bias_correction", bias_correction, True),
        )
        if value is not default
    ]
    if squisher_only:
        warnings.warn(
            f"estimate_fisher(method={info.name!r}) ignores {', '.join(squisher_only)}; only "
            "method='squisher' reads them.",
            UserWarning,
            stacklevel=2,
        )
    return estimate_fishers(model, dataloader, [info.name], options=options, **overrides)[0]


def estimate_fishers(
    model: nn.Module,
    dataloader: Iterable[Any] | None,
    methods: Sequence[str | Mapping[str, Any]],
    *,
    options: FisherOptions | None = None,
    **overrides: Any,
) -> list[FisherDiagonal]:
    """Several estimates from one pass over the data: one forward per batch, shared by all.

    ``methods`` lists method names, or mappings with a ``method`` key and per-estimate overrides
    of the estimator options (``seed``, ``probes``, ``mc_samples``, ``rank``,
    ``probe_distribution``, ``eigen_method``), e.g.
    ``[{"method": "hutchinson", "seed": s} for s in range(4)]``. ``options`` and ``overrides``
    are those of :func:`estimate_fisher` and apply to all. Each result equals what
    ``estimate_fisher`` returns for that method and options alone; only the forwards are shared.
    """
    check("estimate_fisher", model=("module", model))
    estimators = build_estimators(methods, options=options, **overrides)
    if dataloader is None:
        raise FisherInputError(
            "estimate_fisher needs a dataloader (an iterable of batches); only "
            "method='squisher' takes None."
        )
    check("estimate_fisher", dataloader=("batches", dataloader))
    check_param_filter("estimate_fisher", model, estimators[0].options.param_filter)
    return run_passes(model, dataloader, estimators)


#: options that a method mapping of ``estimate_fishers`` may set for its own estimate
PER_ESTIMATE = (
    "seed",
    "probes",
    "mc_samples",
    "rank",
    "probe_distribution",
    "eigen_method",
    "granularity",
    "token_route",
)


def build_estimators(
    methods: Sequence[str | Mapping[str, Any]],
    *,
    options: FisherOptions | None = None,
    **overrides: Any,
) -> list[Estimator]:
    """The estimators ``estimate_fishers(model, loader, methods, ...)`` runs (for callers that
    run the pass themselves with ``run_passes``). Every option is checked here, before data."""
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, Sequence) or not methods:
        raise FisherInputError(
            "estimate_fishers needs a non-empty list of methods (names, or mappings with a "
            f"'method' key); got {methods!r}."
        )
    common = FisherOptions.build(options, **overrides)
    estimators = []
    for spec in methods:
        if not isinstance(spec, (str, Mapping)) or (
            isinstance(spec, Mapping) and "method" not in spec
        ):
            raise FisherInputError(
                "estimate_fishers: each method must be a name or a mapping with a 'method' key "
                f"(and per-method options {', '.join(PER_ESTIMATE)}); got {spec!r}."
            )
        spec = {"method": spec} if isinstance(spec, str) else dict(spec)
        info = lookup(spec.pop("method"))
        if not info.data_pass:
            raise FisherInputError(
                f"method={info.name!r} reads no data; call estimate_fisher(model, None, "
                f"{info.name!r}, optimizer=..., batch_size=...) for it."
            )
        unknown = set(spec) - set(PER_ESTIMATE)
        if unknown:
            raise FisherInputError(
                f"Per-method options may only be {sorted(PER_ESTIMATE)}; got {sorted(unknown)}."
            )
        estimators.append(ESTIMATORS[info.name](FisherOptions.build(common, **spec)))
        if spec:  # a per-method option the method ignores
            warn_ignored_options("estimate_fishers", estimators[-1].options, [info.name])
    warn_ignored_options("estimate_fisher", common, [e.name for e in estimators])
    return estimators


__all__ = [
    "ALIASES",
    "DATA_METHODS",
    "ESTIMATORS",
    "METHODS",
    "REGISTRY",
    "EstimatorInfo",
    "FisherOptions",
    "estimate_fisher",
    "estimate_fishers",
    "fisher_from_optimizer",
    "lookup",
]
