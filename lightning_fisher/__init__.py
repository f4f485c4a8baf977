"""lightning-fisher: Fisher information for PyTorch Lightning.

Estimators and math are plain torch (no Lightning import needed); the callbacks (``EWC``,
``FisherTraceRegularizer``, ``FisherDiagnostics``, ...) are imported lazily from
``lightning_fisher.callbacks``.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .estimators import METHODS, estimate_fisher, fisher_from_optimizer
from .fisher_diagonal import FisherDiagonal
from .outputs import FisherInputError

_LAZY = {
    "EWC": "lightning_fisher.callbacks.ewc",
    "FisherMonitor": "lightning_fisher.callbacks.monitor",
    "FisherTraceRegularizer": "lightning_fisher.callbacks.trace_regularizer",
    "FisherDiagnostics": "lightning_fisher.callbacks.diagnostics",
}


def __getattr__(name: str) -> Any:
    # Callbacks import Lightning; keep `import lightning_fisher` light for plain-torch users.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_fisher' has no attribute {name!r}")


__all__ = [
    "EWC",
    "METHODS",
    "FisherDiagnostics",
    "FisherDiagonal",
    "FisherInputError",
    "FisherMonitor",
    "FisherTraceRegularizer",
    "__version__",
    "estimate_fisher",
    "fisher_from_optimizer",
]
