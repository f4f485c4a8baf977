"""lightning-fisher: Fisher information for PyTorch Lightning.

Estimators and math are plain torch (no Lightning import needed); the callbacks (``EWC``,
``FisherTraceRegularizer``, ``FisherDiagnostics``, ...) are imported lazily from
``lightning_fisher.callbacks``. ``top_eigenvalues`` and ``spectral_density`` give the Fisher's
spectrum in parameter space from exact Fisher-vector products (``FisherOperator``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import sharded  # noqa: F401  (lf.sharded: helpers for FSDP2-sharded state)
from ._version import __version__
from .estimators import (
    METHODS,
    REGISTRY,
    EstimatorInfo,
    estimate_fisher,
    estimate_fishers,
    fisher_from_optimizer,
)
from .ewc import ElasticWeightConsolidation
from .fisher_diagonal import FisherDiagonal
from .options import FisherOptions
from .outputs import FisherInputError
from .spectrum import FisherOperator, lanczos, spectral_density, top_eigenvalues

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the callbacks load on first use
    from .callbacks import EWC, FisherDiagnostics, FisherMonitor, FisherTraceRegularizer

_CALLBACKS = ("EWC", "FisherDiagnostics", "FisherMonitor", "FisherTraceRegularizer")


def __getattr__(name: str) -> Any:
    # Callbacks import Lightning; keep `import lightning_fisher` light for plain-torch users.
    if name in _CALLBACKS:
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_fisher' has no attribute {name!r}")


__all__ = [
    "EWC",
    "METHODS",
    "REGISTRY",
    "ElasticWeightConsolidation",
    "EstimatorInfo",
    "FisherDiagnostics",
    "FisherDiagonal",
    "FisherInputError",
    "FisherMonitor",
    "FisherOperator",
    "FisherOptions",
    "FisherTraceRegularizer",
    "__version__",
    "estimate_fisher",
    "estimate_fishers",
    "fisher_from_optimizer",
    "lanczos",
    "spectral_density",
    "top_eigenvalues",
]
