"""Fisher estimators: one file per estimator, the shared data pass in ``base``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..fisher_diagonal import FisherDiagonal
from ..outputs import ClassSelector, OutputFn
from .base import Estimator, FisherOptions, run_passes
from .batched import BatchedEstimator
from .empirical import EmpiricalEstimator
from .exact import ExactEstimator
from .hutchinson import HutchinsonEstimator, HutchinsonLowerEstimator, HutchinsonUpperEstimator
from .lower import LowerEstimator
from .sample import SampleEstimator
from .squisher import fisher_from_optimizer
from .upper import UpperEstimator

ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls
    for cls in (
        ExactEstimator,
        SampleEstimator,
        EmpiricalEstimator,
        BatchedEstimator,
        HutchinsonEstimator,
        HutchinsonUpperEstimator,
        HutchinsonLowerEstimator,
        UpperEstimator,
        LowerEstimator,
    )
}
METHODS = tuple(ESTIMATORS)


def estimate_fisher(
    model: nn.Module,
    dataloader: Iterable[Any],
    method: str = "exact",
    max_samples: int | None = None,
    mc_samples: int = 1,
    probes: int = 1,
    output_fn: OutputFn | None = None,
    *,
    rank: int = 1,
    probe_distribution: str = "rademacher",
    eigen_method: str = "auto",
    classes: ClassSelector | None = None,
    shift_labels: bool = False,
    param_filter: Callable[[str], bool] | None = None,
    max_memory_mib: float = 1024.0,
    max_batches: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    sync_distributed: bool = True,
    exact_max_classes: int | None = None,
    verify: bool = True,
    ignore_index: int = -100,
) -> FisherDiagonal:
    """Estimate the diagonal of the Fisher information of ``model`` on ``dataloader``.

    The scale is averaged over inputs: F = (1/N) sum_x J^T I(p) J.

    Args:
        model: a classifier (any ``nn.Module``); the pass runs in eval mode and restores each
            submodule's mode; BatchNorm statistics are left untouched.
        dataloader: any iterable of batches: ``(x, y)`` tuples, dicts (Hugging Face style) or tensors.
        method: ``exact``, ``sample``, ``empirical``, ``batched``, ``hutchinson`` (unbiased F),
            ``hutchinson_dg`` (upper bound) or ``hutchinson_lr`` (lower bound), both unbiased
            estimates, or the deterministic bounds ``upper`` (diag of (1/N) sum_x J^T diag(p) J,
            C columns per input) and ``lower`` (top-``rank`` eigenpairs of I(p), ``rank``
            columns per input; its result carries a ``certificate`` on its gap to F).
        max_samples: use ``n`` random inputs only (EXACT(n)); all data if ``None``.
        mc_samples: label draws per input for ``sample``.
        probes: probe vectors per batch for the ``hutchinson*`` methods.
        output_fn: ``output_fn(model, batch) -> output`` when calling ``model`` on the batch is not
            how the logits are obtained.
        rank: number k of eigenpairs of I(p) in ``hutchinson_lr`` and ``lower``.
        probe_distribution: ``rademacher`` (CV <= sqrt 2) or ``gaussian``.
        eigen_method: ``auto``, ``eigh`` or ``power`` for ``hutchinson_lr`` and ``lower``.
        classes: restrict the classes that count (the active head of a task-incremental model).
        shift_labels: causal LMs: logits at position t predict the token at t + 1.
        param_filter: keep only parameters whose name passes this predicate.
        max_memory_mib: cap on the memory of materialised per-input gradients (chunks are sized
            to fit).
        max_batches: stop after this many batches.
        seed: seeds label draws, probes and the EXACT(n) subset.
        progress: show a progress bar (``None``: on interactive terminals for multi-batch passes).
        sync_distributed: under ``torch.distributed``, sum over ranks so that every rank gets the
            Fisher of the union of the shards.
        exact_max_classes: raise the refusal threshold of ``exact`` and ``upper`` for large
            class counts.
        verify: per-input methods (``exact``, ``sample``, ``empirical``, ``upper``, ``lower``) check their per-input
            gradients on the first batch of each traced structure: with random signs s_x, the
            signed sum sum_x s_x J_x^T u_x must equal one ordinary backward of the cotangent
            s_x u_x. A layer rule that fails is replaced by a slower correct route (logged);
            ``False`` skips the check (one backward less).
        ignore_index: label value of inputs that do not count (PyTorch's and Hugging Face's -100).

    Returns:
        A ``FisherDiagonal`` with one float32 tensor per trainable parameter.
    """
    return estimate_fishers(
        model,
        dataloader,
        [method],
        max_samples=max_samples,
        mc_samples=mc_samples,
        probes=probes,
        output_fn=output_fn,
        rank=rank,
        probe_distribution=probe_distribution,
        eigen_method=eigen_method,
        classes=classes,
        shift_labels=shift_labels,
        param_filter=param_filter,
        max_memory_mib=max_memory_mib,
        max_batches=max_batches,
        seed=seed,
        progress=progress,
        sync_distributed=sync_distributed,
        exact_max_classes=exact_max_classes,
        verify=verify,
        ignore_index=ignore_index,
    )[0]


def _check_method(method: str) -> None:
    if method not in ESTIMATORS:
        raise ValueError(
            f"Unknown Fisher method {method!r}. Choose one of {', '.join(METHODS)}, or use "
            "`fisher_from_optimizer` for the Squisher."
        )


def estimate_fishers(
    model: nn.Module,
    dataloader: Iterable[Any],
    methods: Sequence[str | Mapping[str, Any]],
    **options: Any,
) -> list[FisherDiagonal]:
    """Several estimates from one pass over the data: one forward per batch, shared by all.

    ``methods`` lists method names, or mappings with a ``method`` key and per-estimate overrides
    of the estimator options (``seed``, ``probes``, ``mc_samples``, ``rank``,
    ``probe_distribution``), e.g. ``[{"method": "hutchinson", "seed": s} for s in range(4)]``.
    ``options`` are those of :func:`estimate_fisher` and apply to all. Each result equals what
    ``estimate_fisher`` returns for that method and options alone; only the forwards are shared.
    """
    return run_passes(model, dataloader, build_estimators(methods, **options))


def build_estimators(methods: Sequence[str | Mapping[str, Any]], **options: Any) -> list[Estimator]:
    """The estimators ``estimate_fishers(model, loader, methods, **options)`` runs (for callers
    that run the pass themselves with ``run_passes``)."""
    if not methods:
        raise ValueError("estimate_fishers needs at least one method.")
    per_estimate = {"seed", "probes", "mc_samples", "rank", "probe_distribution", "eigen_method"}
    estimators = []
    for spec in methods:
        spec = {"method": spec} if isinstance(spec, str) else dict(spec)
        method = spec.pop("method")
        _check_method(method)
        unknown = set(spec) - per_estimate
        if unknown:
            raise ValueError(
                f"Per-method options may only be {sorted(per_estimate)}; got {sorted(unknown)}."
            )
        merged = {**options, **spec}
        limit = merged.pop("exact_max_classes", None)
        extra = {"exact_max_classes": limit} if limit is not None else {}
        estimators.append(ESTIMATORS[method](FisherOptions(**merged, extra=extra)))
    return estimators


__all__ = [
    "ESTIMATORS",
    "METHODS",
    "estimate_fisher",
    "estimate_fishers",
    "fisher_from_optimizer",
]
