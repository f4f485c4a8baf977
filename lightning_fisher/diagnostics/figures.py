"""Figures of the Fisher diagonal and of its bounds, drawn with matplotlib's object API.

No ``pyplot``: figures are plain ``matplotlib.figure.Figure`` objects, so drawing them changes no
global state and needs no display. ``save_png`` and ``figure_to_rgb`` turn them into files and
arrays for loggers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from .statistics import (
    DETERMINISTIC,
    HUTCHINSON_LOWER,
    HUTCHINSON_UPPER,
    LOWER,
    UPPER,
    layer_values,
)

#: How each method is drawn in the bounds figure: label, colour, line style.
_STYLES: dict[str, tuple[str, str, str]] = {
    UPPER: ("upper bound  tr J'diag(p)J  (deterministic)", "tab:red", "-"),
    HUTCHINSON_UPPER: ("upper bound  tr J'diag(p)J  (hutchinson_upper)", "tab:red", "-"),
    "exact": ("F  (exact)", "black", "-"),
    "hutchinson": ("F  (hutchinson)", "black", "-"),
    LOWER: ("lower bound  tr J'λvv'J  (deterministic)", "tab:blue", "-"),
    HUTCHINSON_LOWER: ("lower bound  tr J'λvv'J  (hutchinson_lower)", "tab:blue", "-"),
    "empirical": ("empirical Fisher", "tab:green", "--"),
}
#: Methods without probe noise (their traces have no standard error).
DETERMINISTIC_METHODS = frozenset(DETERMINISTIC.values())

#: Margins (figure fractions) that fit the tick labels, axis labels and titles of the figures below.
_DENSITY_MARGINS = {"left": 0.075, "right": 0.975, "bottom": 0.1, "top": 0.935}
_BOUNDS_MARGINS = {"left": 0.068, "right": 0.975, "bottom": 0.115, "top": 0.93, "wspace": 0.16}


def _smoothed_density(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Density of ``x`` on the bins ``edges``: a histogram smoothed by a Gaussian kernel of
    Silverman's bandwidth (a binned kernel density estimate, linear in the number of bins)."""
    # Equal-width bins given as (count, range) take numpy's fast path (no sort).
    counts, _ = np.histogram(x, bins=edges.size - 1, range=(edges[0], edges[-1]))
    width = edges[1] - edges[0]
    std = float(x.std()) if x.size > 1 else 0.0
    h = 1.06 * std * x.size ** (-1 / 5) if std > 0 else width
    sigma = max(h / width, 1.0)
    # Cut the kernel at 4 sigma, and at the bin count so that mode='same' keeps the length.
    half = min(math.ceil(4 * sigma), (counts.size - 1) // 2)
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    smooth = np.convolve(counts.astype(np.float64), kernel / kernel.sum(), mode="same")
    return smooth / (x.size * width)


def plot_layer_density(
    fisher: Mapping[str, Tensor],
    threshold: float | None = 1e-5,
    title: str | None = None,
    bins: int = 200,
) -> Figure:
    """Per-layer density of log10 F_i over the diagonal entries of each layer (one curve a layer).

    Each curve integrates to the fraction of the layer's entries that are positive (exact zeros have
    no logarithm; their share is given in the legend). ``threshold`` draws a vertical line and puts
    each layer's fraction of entries below it in the legend.
    """
    values = layer_values(fisher)
    # Fixed margins, not a layout engine: constrained layout measures every text and makes
    # savefig draw the figure twice, which is most of the figure's cost.
    fig = Figure(figsize=(9, 5))
    fig.subplots_adjust(**_DENSITY_MARGINS)
    ax = fig.add_subplot()
    logs = {layer: np.log10(v[v > 0].double().numpy()) for layer, v in values.items()}
    positive = [x for x in logs.values() if x.size]
    if not positive:
        ax.text(
            0.5,
            0.5,
            "every diagonal entry is zero",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    else:
        lo = min(float(x.min()) for x in positive)
        hi = max(float(x.max()) for x in positive)
        if threshold is not None and threshold > 0:
            lo, hi = min(lo, math.log10(threshold)), max(hi, math.log10(threshold))
        lo, hi = math.floor(lo) - 0.5, math.ceil(hi) + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        centers = (edges[:-1] + edges[1:]) / 2
        colors = _layer_colors(len(logs))
        for color, (layer, x) in zip(colors, logs.items()):
            n = values[layer].numel()
            label = f"{layer}  ({n:,} entries"
            if threshold is not None:
                label += (
                    f", {float((values[layer] < threshold).double().mean()):.0%} < {threshold:g}"
                )
            if x.size < n:
                label += f", {1 - x.size / n:.0%} zero"
            label += ")"
            if not x.size:
                ax.plot([], [], color=color, label=label)
                continue
            ax.plot(
                centers, _smoothed_density(x, edges) * x.size / n, color=color, lw=1.6, label=label
            )
        if threshold is not None and threshold > 0:
            ax.axvline(
                math.log10(threshold), color="0.4", ls=":", lw=1.2, label=f"threshold {threshold:g}"
            )
        ax.set_xlim(lo, hi)
        ax.set_ylim(bottom=0)
        ax.legend(
            fontsize=8 if len(logs) <= 12 else 6, loc="upper left", ncol=1 if len(logs) <= 12 else 2
        )
    ax.set_xlabel("log10 of Fisher diagonal entry")
    ax.set_ylabel("density (per unit of log10)")
    ax.grid(alpha=0.3)
    method = getattr(fisher, "method", None)
    n_samples = getattr(fisher, "n_samples", None)
    default = "Fisher diagonal per layer"
    if method is not None:
        default += f": {method}" + (f", N = {n_samples:,} inputs" if n_samples else "")
    ax.set_title(title or default, y=1.0)  # a fixed y skips matplotlib's costly title placement
    return fig


_SUPERSCRIPT = str.maketrans(
    "-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079"
)


def _power_of_ten(value: float, _pos: Any = None) -> str:
    """Label a log axis tick 10^k as "10" with a Unicode superscript k (plain text: mathtext
    labels are re-parsed at every draw); ticks between powers of ten get no label."""
    if not value > 0:
        return ""
    k = round(math.log10(value))
    if not math.isclose(value, 10.0**k, rel_tol=1e-9):
        return ""
    return "10" + str(k).translate(_SUPERSCRIPT)


def _layer_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis" if n > 10 else "tab10"]
    if n > 10:
        return [cmap(i / max(1, n - 1) * 0.9) for i in range(n)]
    return [cmap(i) for i in range(n)]


def _series(history: Sequence[Mapping[str, float]], key: str) -> np.ndarray:
    return np.array([h.get(key, np.nan) for h in history], dtype=float)


def bound_series(history: Sequence[Mapping[str, float]]) -> dict[str, np.ndarray]:
    """Per evaluation, the traces of lower, F and upper and their standard errors (0 for a
    deterministic value, NaN when unknown): keys ``lower``, ``f``, ``upper`` and ``<key>_se``."""
    out: dict[str, np.ndarray] = {}
    for key, methods in (
        # the former names of the Hutchinson bounds last: histories logged before the rename
        ("lower", (LOWER, HUTCHINSON_LOWER, "hutchinson_lr")),
        ("f", ("exact", "hutchinson")),
        ("upper", (UPPER, HUTCHINSON_UPPER, "hutchinson_dg")),
    ):
        value = np.full(len(history), np.nan)
        se = np.full(len(history), np.nan)
        for m in reversed(methods):
            ys = _series(history, f"{m}/trace")
            es = (
                np.zeros(len(history))
                if m in DETERMINISTIC_METHODS
                else _series(history, f"{m}/trace_se")
            )
            here = np.isfinite(ys)
            value, se = np.where(here, ys, value), np.where(here, es, se)
        out[key], out[f"{key}_se"] = value, se
    return out


def order_breaks(history: Sequence[Mapping[str, float]], rtol: float = 1e-5) -> dict[str, Any]:
    """Evaluations where the traces break lower <= F <= upper, split by the noise of the
    estimates: ``noise`` (the excess is at most 2 standard errors of the difference, traces
    treated as independent), ``beyond`` (more than 2 s.e., or any break of deterministic
    traces beyond ``rtol``) and ``unknown`` (no standard error: ``probes=1``). Each is a list of
    ``(index, side)`` with side ``lower`` (lower > F) or ``upper`` (F > upper)."""
    b = bound_series(history)
    out: dict[str, list[tuple[int, str]]] = {"noise": [], "beyond": [], "unknown": []}
    for side, hi, lo in (("lower", "lower", "f"), ("upper", "f", "upper")):
        excess = b[hi] - b[lo]
        tol = rtol * np.maximum(np.abs(b[hi]), np.abs(b[lo]))
        noise = 2 * np.sqrt(b[f"{hi}_se"] ** 2 + b[f"{lo}_se"] ** 2)
        for i in np.flatnonzero(np.isfinite(excess) & (excess > tol)):
            if not np.isfinite(noise[i]):
                out["unknown"].append((int(i), side))
            elif excess[i] <= max(noise[i], tol[i]):
                out["noise"].append((int(i), side))
            else:
                out["beyond"].append((int(i), side))
    return out


def plot_bounds_history(history: Sequence[Mapping[str, float]], x: str = "step") -> Figure:
    """Traces of the upper bound, F, the lower bound and the empirical Fisher over training (left,
    log scale), and the ratios tr(lower)/tr(F) and tr(F)/tr(upper) (right; 1 means tight).

    ``history`` holds one mapping per evaluation with ``x`` (``step`` or ``epoch``) and the
    un-prefixed names of ``DiagnosticsResult.values`` (``<method>/trace``, ``bounds/...``).
    Stochastic traces and ratios with a standard error (``<method>/trace_se``,
    ``bounds/<ratio>_se``) get a band of +-2 s.e. Where the plotted traces break
    lower <= F <= upper the point is marked and the panel says so: an open circle when the
    break is within 2 s.e. (probe noise), a red cross when it is beyond (see ``order_breaks``).
    """
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2, gridspec_kw=_BOUNDS_MARGINS)  # fixed: see plot_layer_density
    xs = np.array([h.get(x, i) for i, h in enumerate(history)], dtype=float)

    def series(key: str) -> np.ndarray:
        return _series(history, key)

    marker = "o" if len(history) <= 30 else None
    b = bound_series(history)
    if np.isfinite(b["upper"]).any() and np.isfinite(b["lower"]).any():
        left.fill_between(xs, b["lower"], b["upper"], color="#f2ecd8", label="between the bounds")
    for method, (label, color, ls) in _STYLES.items():
        ys = series(f"{method}/trace")
        if not np.isfinite(ys).any():
            continue
        left.plot(xs, ys, color=color, ls=ls, marker=marker, ms=3, label=label)
        se = series(f"{method}/trace_se")
        if np.isfinite(se).any():
            left.fill_between(
                xs, np.clip(ys - 2 * se, 0, None), ys + 2 * se, color=color, alpha=0.15, lw=0
            )
    left.set_yscale("log")
    finite = np.concatenate([series(f"{m}/trace") for m in _STYLES])
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if finite.size and finite.max() < 30 * finite.min():
        # Within about a decade a log axis has few or no labelled powers of ten: label plainly.
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda v, _: f"{v:.3g}")
        left.yaxis.set_major_formatter(plain)
        left.yaxis.set_minor_formatter(plain)
    else:
        # Minor ticks at 2x and 5x only: every tick is several artists, and drawing them is most
        # of this figure's cost when the traces span decades.
        from matplotlib.ticker import FuncFormatter, LogLocator

        left.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        left.yaxis.set_major_formatter(FuncFormatter(_power_of_ten))
    breaks = order_breaks(history)
    for kind, style, label in (
        ("noise", {"mfc": "none", "mec": "tab:orange", "marker": "o", "ms": 9}, "within 2 s.e."),
        ("beyond", {"color": "red", "marker": "X", "ms": 9}, "beyond 2 s.e."),
        ("unknown", {"mfc": "none", "mec": "0.3", "marker": "s", "ms": 9}, "no s.e. (probes=1)"),
    ):
        if breaks[kind]:
            idx = [i for i, _ in breaks[kind]]
            marks = [b[side][i] for i, side in breaks[kind]]
            left.plot(xs[idx], marks, ls="none", label=f"order broken, {label}", **style)
    left.set_xlabel(x)
    left.set_ylabel("trace of the Fisher diagonal")
    left.set_title("Fisher trace and its bounds", y=1.0)
    left.grid(alpha=0.3, which="both")
    # The note heads the legend, so it never overlaps the traces or the legend entries.
    left.legend(fontsize=8, title=_order_note(history, breaks) or None, title_fontsize=7)

    for key, label, color in (
        ("bounds/lower_over_f", "tr(lower) / tr(F)", "tab:blue"),
        ("bounds/f_over_upper", "tr(F) / tr(upper)", "tab:red"),
        ("empirical/trace_ratio", "tr(empirical) / tr(F)", "tab:green"),
    ):
        ys = series(key)
        if np.isfinite(ys).any():
            right.plot(xs, ys, color=color, marker=marker, ms=3, label=label)
            se = series(f"{key}_se")
            if np.isfinite(se).any():
                right.fill_between(
                    xs, np.clip(ys - 2 * se, 0, None), ys + 2 * se, color=color, alpha=0.15, lw=0
                )
    right.axhline(1.0, color="0.4", ls=":", lw=1)
    right.set_ylim(bottom=0)
    right.set_xlabel(x)
    right.set_ylabel("ratio")
    right.set_title("Tightness of the bounds (1 = tight)", y=1.0)
    right.grid(alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    if len(history) == 1:
        for ax in (left, right):
            ax.set_xlim(xs[0] - 1, xs[0] + 1)
    return fig


def _order_note(history: Sequence[Mapping[str, float]], breaks: Mapping[str, Any]) -> str:
    """One line on how the bounds were computed and whether the plotted order holds."""
    det = [h.get("bounds/deterministic") for h in history]
    if not any(v is not None for v in det):
        return ""
    kinds = {"deterministic" if v else "Hutchinson" for v in det if v is not None}
    text = "bounds: " + " and ".join(sorted(kinds))
    n_noise, n_beyond, n_unknown = (len(breaks[k]) for k in ("noise", "beyond", "unknown"))
    if not (n_noise or n_beyond or n_unknown):
        return text + "; lower <= F <= upper at every evaluation"
    text += "\norder lower <= F <= upper broken"
    parts = []
    if n_noise:
        parts.append(f"{n_noise} within 2 s.e. (probe noise)")
    if n_beyond:
        parts.append(f"{n_beyond} beyond 2 s.e.")
    if n_unknown:
        parts.append(f"{n_unknown} without s.e.")
    return text + ": " + ", ".join(parts)


def plot_spectral_density(density: Any, ax: Any = None, label: str | None = None) -> Figure:
    """The SLQ spectral density of F (a ``SpectralDensity``) on a log axis, with a band of
    +-2 standard errors over the random starts; the share of eigenvalues below the density's
    floor (zero for practical purposes) is given in the legend. Draws on ``ax`` if given."""
    if ax is None:
        fig = Figure(figsize=(6.5, 4.2))
        fig.subplots_adjust(left=0.11, right=0.97, bottom=0.13, top=0.91)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    grid = density.grid.numpy()
    mean = density.density.numpy()
    se = density.density_se.numpy()
    n = density.per_start.shape[0]
    text = label or f"SLQ, {n} starts (band: +-2 s.e.)"
    ax.fill_between(
        grid, np.clip(mean - 2 * se, 0, None), mean + 2 * se, color="tab:blue", alpha=0.25
    )
    ax.plot(grid, mean, color="tab:blue", label=text)
    ax.axvline(density.floor, color="0.4", ls=":", lw=1)
    ax.plot(
        [], [], " ", label=f"{density.mass_below:.1%} of the spectrum below {density.floor:.1e}"
    )
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("eigenvalue of F")
    ax.set_ylabel("density per decade")
    ax.set_title("Spectral density of the Fisher", y=1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_spectrum(top: Any, density: Any = None) -> Figure:
    """The top-k eigenvalues of F (a ``LanczosResult``) on a log scale, with their Lanczos
    residuals as error bars; with a ``SpectralDensity``, its plot beside them."""
    panels = 2 if density is not None else 1
    fig = Figure(figsize=(5.5 * panels, 4.2))
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.13, top=0.91, wspace=0.25)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    values = top.eigenvalues.double().numpy()
    res = top.residuals.double().numpy()
    idx = np.arange(1, values.size + 1)
    ax.errorbar(idx, values, yerr=res, fmt="o", color="black", ms=4, capsize=3)
    ax.vlines(idx, values.min() * 0.5 if values.min() > 0 else 0, values, color="0.6", lw=1)
    if (values > 0).all():
        ax.set_yscale("log")
    ax.set_xticks(idx)
    ax.set_xlabel("index k")
    ax.set_ylabel("eigenvalue lambda_k of F")
    ax.set_title(f"Top eigenvalues of F (Lanczos, {top.iterations} steps)", y=1.0)
    ax.grid(alpha=0.3, which="both")
    if density is not None:
        plot_spectral_density(density, ax=axes[1])
    return fig


def figure_to_rgb(fig: Figure, dpi: int = 100) -> np.ndarray:
    """The figure rendered to an ``(H, W, 3)`` uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> str:
    """Write the figure as a PNG file (creating its folder); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path
