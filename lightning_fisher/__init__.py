"""lightning-fisher: Fisher information for PyTorch Lightning.

Estimators and math are plain torch (no Lightning import needed); the callbacks (``EWC``,
``FisherTraceRegularizer``, ``FisherDiagnostics``, ...) are imported lazily from
``lightning_fisher.callbacks``. ``top_eigenvalues`` and ``spectral_density`` give the Fisher's
spectrum in parameter space from exact Fisher-vector products (``FisherOperator``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import masks, merge, sharded, task2vec  # noqa: F401  (sharded: helpers for FSDP2 state)
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
from .masks import fish_mask, fisher_prune, fisher_pruning_scores
from .merge import fisher_merge
from .options import FisherOptions
from .outputs import FisherInputError
from .spectrum import FisherOperator, lanczos, spectral_density, top_eigenvalues
from .task2vec import task2vec_distance, task_embedding

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the callbacks load on first use
    from .callbacks import EWC, FisherDiagnostics, FisherMonitor, FisherTraceRegularizer, FishMask

_CALLBACKS = ("EWC", "FishMask", "FisherDiagnostics", "FisherMonitor", "FisherTraceRegularizer")


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
    "FishMask",
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
    "fish_mask",
    "fisher_from_optimizer",
    "fisher_merge",
    "fisher_prune",
    "fisher_pruning_scores",
    "lanczos",
    "spectral_density",
    "task2vec_distance",
    "task_embedding",
    "top_eigenvalues",
]
