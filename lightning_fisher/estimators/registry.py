"""The estimator registry: every Fisher method by name, with its class, cost and properties.

Validation (an unknown method's error lists the registry), the table in ``docs/estimators.md``
and the command line's help are all read from ``REGISTRY``; adding an estimator is one class
and one ``EstimatorInfo`` here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..options import closest
from ..outputs import FisherInputError
from .base import Estimator
from .batched import BatchedEstimator
from .empirical import EmpiricalEstimator
from .exact import ExactEstimator
from .hutchinson import HutchinsonEstimator, HutchinsonLowerEstimator, HutchinsonUpperEstimator
from .lower import LowerEstimator
from .sample import SampleEstimator
from .squisher import SquisherEstimator
from .upper import UpperEstimator


@dataclass(frozen=True)
class EstimatorInfo:
    """One registered method.

    Attributes:
        name: the ``method=`` string.
        cls: the estimator class (a data-pass ``Estimator``, or ``SquisherEstimator``).
        cost: what one estimate costs, in backward passes (or ``free``).
        needs_labels: whether the data must carry labels.
        deterministic: whether the same data, model and options give the same result without a
            seed (stochastic methods draw labels or probes from ``seed``).
        description: one line on what it estimates.
        data_pass: ``False`` for a method that reads its estimate from context (the Squisher:
            an optimizer and the training batch size) instead of a pass over data.
    """

    name: str
    cls: type[Estimator] | type[SquisherEstimator]
    cost: str
    needs_labels: bool
    deterministic: bool
    description: str
    data_pass: bool = True


REGISTRY: dict[str, EstimatorInfo] = {
    info.name: info
    for info in (
        EstimatorInfo(
            "exact",
            ExactEstimator,
            "C - 1 backward columns per input",
            False,
            True,
            "the Fisher diagonal F = (1/N) sum_x J^T I(p) J; with max_samples=n, EXACT(n)",
        ),
        EstimatorInfo(
            "sample",
            SampleEstimator,
            "mc_samples backward columns per input",
            False,
            False,
            "unbiased F from labels drawn from the model's p(y|x)",
        ),
        EstimatorInfo(
            "empirical",
            EmpiricalEstimator,
            "1 backward column per input",
            True,
            True,
            "squared gradients of the true labels' log-likelihood (not F; below it when confident)",
        ),
        EstimatorInfo(
            "batched",
            BatchedEstimator,
            "1 backward per batch",
            True,
            True,
            "squared gradient of the batch-mean log-likelihood (about F / batch size)",
        ),
        EstimatorInfo(
            "hutchinson",
            HutchinsonEstimator,
            "1 backward per batch and probe",
            False,
            False,
            "unbiased F from random probes (Rademacher CV <= sqrt 2)",
        ),
        EstimatorInfo(
            "hutchinson_upper",
            HutchinsonUpperEstimator,
            "1 backward per batch and probe",
            False,
            False,
            "unbiased estimate of the upper bound diag(J^T diag(p) J) >= F",
        ),
        EstimatorInfo(
            "hutchinson_lower",
            HutchinsonLowerEstimator,
            "1 backward per batch and probe",
            False,
            False,
            "unbiased estimate of the rank-k lower bound <= F (= F for C = 2)",
        ),
        EstimatorInfo(
            "upper",
            UpperEstimator,
            "C backward columns per input",
            False,
            True,
            "the upper bound diag(J^T diag(p) J) >= F, exactly",
        ),
        EstimatorInfo(
            "lower",
            LowerEstimator,
            "rank backward columns per input",
            False,
            True,
            "the rank-k lower bound <= F, exactly, with a certificate on its gap to F",
        ),
        EstimatorInfo(
            "squisher",
            SquisherEstimator,
            "free (no data pass)",
            False,
            True,
            "batch size x Adam's exp_avg_sq; needs optimizer= and batch_size=",
            data_pass=False,
        ),
    )
}

#: old names of the bound estimators, kept working with a ``FutureWarning``
ALIASES = {"hutchinson_dg": "hutchinson_upper", "hutchinson_lr": "hutchinson_lower"}
_warned: set[str] = set()


def lookup(method: str) -> EstimatorInfo:
    """The registered method ``method`` (an old alias warns once per process and resolves).

    Raises ``FisherInputError`` listing the registry for an unknown name.
    """
    if isinstance(method, str) and method in ALIASES:
        new = ALIASES[method]
        if method not in _warned:
            _warned.add(method)
            warnings.warn(
                f"method={method!r} is deprecated; use {new!r} (same estimator, same results).",
                FutureWarning,
                stacklevel=3,
            )
        method = new
    info = REGISTRY.get(method) if isinstance(method, str) else None
    if info is None:
        raise FisherInputError(
            f"Unknown Fisher method {method!r}. Choose one of {', '.join(REGISTRY)} "
            f"(deprecated aliases: {', '.join(ALIASES)}).{closest(method, REGISTRY)}"
        )
    return info


def markdown_table() -> str:
    """The registry as a Markdown table (the one in ``docs/estimators.md``)."""
    rows = [
        "| method | cost | labels | deterministic | estimates |",
        "|---|---|---|---|---|",
    ]
    for info in REGISTRY.values():
        rows.append(
            f"| `{info.name}` | {info.cost} | {'yes' if info.needs_labels else 'no'} | "
            f"{'yes' if info.deterministic else 'no'} | {info.description} |"
        )
    return "\n".join(rows)


def help_text() -> str:
    """The registry as plain text, one method a line (the command line's help)."""
    width = max(len(n) for n in REGISTRY)
    return "\n".join(
        f"  {info.name:<{width}}  {info.description} [{info.cost}"
        f"{'; needs labels' if info.needs_labels else ''}"
        f"{'' if info.deterministic else '; stochastic'}]"
        for info in REGISTRY.values()
    )
