"""Spectral and bound diagnostics of the Fisher (plain torch and matplotlib, no Lightning).

``compute_diagnostics(model, loader)`` gives traces, bound ratios, kernel-space statistics, the
fraction of small diagonal entries per layer, the CV over probes and the empirical-Fisher gap;
``plot_layer_density`` and ``plot_bounds_history`` draw them. The ``FisherDiagnostics`` callback
logs all of it during training.
"""

from __future__ import annotations

from .figures import (
    figure_to_rgb,
    plot_bounds_history,
    plot_layer_density,
    plot_spectral_density,
    plot_spectrum,
    save_png,
)
from .statistics import (
    DEFAULT_METHODS,
    DiagnosticsResult,
    certificate_scalars,
    compute_diagnostics,
    empirical_gap,
    fraction_below,
    kernel_summary,
    layer_values,
    log10_layer_values,
    lower_gap_bound,
    lower_relative_difference,
    mean_fisher,
    order_violations,
    probe_cv,
    spectrum_scalars,
)

__all__ = [
    "DEFAULT_METHODS",
    "DiagnosticsResult",
    "certificate_scalars",
    "compute_diagnostics",
    "empirical_gap",
    "figure_to_rgb",
    "fraction_below",
    "kernel_summary",
    "layer_values",
    "log10_layer_values",
    "lower_gap_bound",
    "lower_relative_difference",
    "mean_fisher",
    "order_violations",
    "plot_bounds_history",
    "plot_layer_density",
    "plot_spectral_density",
    "plot_spectrum",
    "probe_cv",
    "save_png",
    "spectrum_scalars",
]
