"""Lightning callbacks: ``EWC``, ``FishMask``, ``FisherMonitor``, ``FisherTraceRegularizer``, ``FisherDiagnostics``."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EWC": "lightning_fisher.callbacks.ewc",
    "FishMask": "lightning_fisher.callbacks.fish_mask",
    "FisherMonitor": "lightning_fisher.callbacks.monitor",
    "FisherTraceRegularizer": "lightning_fisher.callbacks.trace_regularizer",
    "FisherDiagnostics": "lightning_fisher.callbacks.diagnostics",
}


def __getattr__(name: str) -> Any:
    # Import each callback on first use, so one module's heavier imports do not load the others.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_fisher.callbacks' has no attribute {name!r}")


__all__ = ["EWC", "FishMask", "FisherDiagnostics", "FisherMonitor", "FisherTraceRegularizer"]
