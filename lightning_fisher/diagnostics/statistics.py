"""Spectral and bound diagnostics of the Fisher, computed from a model and a loader (plain torch).

``compute_diagnostics`` runs the estimators named in ``methods`` in one shared pass (``lf.estimate_fishers``)
and summarises them:

* traces, global and per layer (a layer is a parameter's name without its last component), for
  every method;
* the bound ratios tr(lower) / tr(F) and tr(F) / tr(upper), lower = (1/N) sum_x J^T Lambda_k J
  (the top-k eigenpairs of I(p)), upper = (1/N) sum_x J^T diag(p) J; both lie in [0, 1].
  With at most ``deterministic_bounds_max_classes`` classes the bounds and F are computed
  exactly (``upper``, ``lower`` with its certificate, ``exact``: the order lower <= F <= upper
  holds entry by entry and for C = 2 lower = F); above it by their unbiased Hutchinson
  estimates (``hutchinson_upper``, ``hutchinson_lower``, ``hutchinson``), whose traces carry
  standard errors over the probes;
* kernel-space statistics over the inputs (``kernel_summary``);
* per layer, the fraction of diagonal entries of F below a threshold (``fraction_below``);
* the coefficient of variation over probes (``probe_cv``) of the Hutchinson estimators, measured
  from ``probes`` one-probe estimates with seeds ``seed, seed + 1, ...``, whose mean is the logged
  estimate;
* the relative gap between the empirical Fisher E and F, sum_i |E_i - F_i| / sum_i F_i
  (``empirical_gap``);
* optionally the parameter-space spectrum of F on the same batches: its top-k eigenvalues by
  Lanczos and its spectral density by stochastic Lanczos quadrature (``lightning_fisher.spectrum``).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..estimators import DATA_METHODS, build_estimators, lookup
from ..estimators.base import _all_reduce, eval_mode, run_passes
from ..fisher_diagonal import FisherDiagonal
from ..kernel import kernel_statistics
from ..options import FisherOptions, check, closest
from ..outputs import (
    ClassSelector,
    FisherInputError,
    ModelOutputs,
    OutputFn,
    model_outputs,
    move_batch,
)
from ..sharded import (
    as_sharded_like,
    is_fsdp1,
    is_fsdp2,
    local_tensor,
    reduce_shard_statistics,
    sample_entries,
    whole_numel,
)
from ..sharded_fsdp1 import Piece, clean_name
from ..spectrum import LanczosResult, SpectralDensity, spectral_density, top_eigenvalues

#: Methods ``compute_diagnostics`` runs unless told otherwise: F, its upper and lower bound, and E
#: (with few classes the first three are replaced by their deterministic counterparts).
DEFAULT_METHODS: tuple[str, ...] = (
    "hutchinson",
    "hutchinson_upper",
    "hutchinson_lower",
    "empirical",
)
#: Estimators whose randomness is a probe vector, so that a CV over probes is meaningful.
PROBE_METHODS = frozenset({"hutchinson", "hutchinson_upper", "hutchinson_lower"})
#: The deterministic bounds, and their unbiased Hutchinson estimates.
UPPER, LOWER = "upper", "lower"
HUTCHINSON_UPPER, HUTCHINSON_LOWER = "hutchinson_upper", "hutchinson_lower"
#: What each stochastic method becomes when the bounds are computed deterministically.
DETERMINISTIC = {"hutchinson": "exact", HUTCHINSON_UPPER: UPPER, HUTCHINSON_LOWER: LOWER}
#: Default of ``deterministic_bounds_max_classes``: ``exact`` and ``upper`` cost C backward
#: columns per input, affordable on a diagnostics subset up to a few dozen classes.
DETERMINISTIC_BOUNDS_MAX_CLASSES = 32
#: Histograms and layer densities read at most this many entries of each parameter's diagonal
#: (a fixed random sample above it; ``lightning_fisher.sharded.sample_entries``).
HISTOGRAM_ENTRIES = 1 << 16
#: Defaults of the spectral density: Rademacher starts, Lanczos steps per start.
SLQ_STARTS = 4
SLQ_ITERS = 30
#: Why the parameter-space spectrum is refused on sharded models.
SHARDED_SPECTRUM_REFUSAL = (
    "the parameter-space spectrum (top eigenvalues, spectral density) is not available on an "
    "FSDP-sharded model: its Lanczos iterations need Fisher-vector products F v on whole "
    "parameter vectors (lightning_fisher.spectrum differentiates unsharded parameters), which "
    "are not implemented for sharded ones. Leave eigenvalues=0 and the spectral density off; "
    "traces, bounds, fractions and histograms are supported on sharded models"
)
#: ``kernel_summary`` handles at most this many probabilities (rows x classes) at once.
KERNEL_CHUNK_ELEMENTS = 1 << 20


#: FSDP1 pieces of a diagonal by parameter name (``sharded_fsdp1.pieces(model)``), or ``None``
Pieces = Mapping[str, Piece] | None


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its name without the last component (as
    ``FisherDiagonal.layer_traces`` groups them), without FSDP1's wrapper prefixes (the layer's
    name in the unwrapped model)."""
    name = clean_name(name)
    return name.rsplit(".", 1)[0] if "." in name else name


def _aligned(fd: Mapping[str, Tensor], pieces: Pieces) -> list[Piece | None] | None:
    """``pieces`` in the order of ``fd``'s names (``None`` for a name that is no piece)."""
    return None if pieces is None else [pieces.get(k) for k in fd]


def layer_values(fd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every layer's diagonal entries as one flat float32 CPU vector, layers in parameter order."""
    parts: dict[str, list[Tensor]] = {}
    for name, t in fd.items():
        parts.setdefault(layer_of(name), []).append(t.detach().reshape(-1).float().cpu())
    return {layer: torch.cat(ts) for layer, ts in parts.items()}


def fraction_below(
    fd: Mapping[str, Tensor], threshold: float = 1e-5, pieces: Pieces = None
) -> dict[str, float]:
    """Per layer, the fraction of diagonal entries F_i < ``threshold`` (of a sharded diagonal,
    DTensors or the FSDP1 local pieces named in ``pieces``: the local counts summed over the
    ranks, a collective)."""
    if not fd:
        return {}
    # Counts per parameter, one host sync for all, no concatenated copy of the diagonal.
    tensors = list(fd.values())
    where = _aligned(fd, pieces)
    local = torch.stack([(local_tensor(t) < threshold).sum() for t in tensors])
    counts = reduce_shard_statistics(local, tensors, pieces=where).tolist()
    below: dict[str, list[int]] = {}
    for i, ((name, t), count) in enumerate(zip(fd.items(), counts)):
        entry = below.setdefault(layer_of(name), [0, 0])
        entry[0] += int(count)
        entry[1] += whole_numel(t, where[i] if where is not None else None)
    return {layer: k / n if n else float("nan") for layer, (k, n) in below.items()}


def log10_layer_values(fd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per layer, log10 F_i of the strictly positive entries (exact zeros have no logarithm)."""
    return {layer: v[v > 0].double().log10() for layer, v in layer_values(fd).items()}


def mean_fisher(fds: Sequence[FisherDiagonal]) -> FisherDiagonal:
    """The entry-wise mean (1/P) sum_p F^(p) of one-probe estimates, recording ``probes=P``."""
    if not fds:
        raise ValueError("mean_fisher needs at least one Fisher diagonal.")
    first = fds[0]
    names = list(first)
    # on local shards (sharded diagonals are placed alike), the result placed like the first
    if len(fds) == 1:
        values = [local_tensor(first[k]).clone() for k in names]
    else:  # sum, then one scaling: a few fused passes, no stacked copy
        values = list(
            torch._foreach_add(
                [local_tensor(fds[0][k]) for k in names], [local_tensor(fds[1][k]) for k in names]
            )
        )
        for fd in fds[2:]:
            torch._foreach_add_(values, [local_tensor(fd[k]) for k in names])
        torch._foreach_div_(values, float(len(fds)))
    tensors = {k: as_sharded_like(v, first[k]) for k, v in zip(names, values)}
    options = {**first.options, "probes": len(fds), "seeds": [fd.options.get("seed") for fd in fds]}
    out = FisherDiagonal(tensors, first.n_samples, first.method, options)
    out.piece_names, out.piece_group = first.piece_names, first.piece_group  # FSDP1 pieces
    return out


def probe_cv(
    fds: Sequence[FisherDiagonal],
    traces: Sequence[float] | None = None,
    mean: Mapping[str, Tensor] | None = None,
    pieces: Pieces = None,
) -> dict[str, float]:
    """Coefficient of variation over independent one-probe estimates F^(1..P).

    Returns ``cv`` = mean over entries i (with a positive mean) of std_p(F_i^(p)) / mean_p(F_i^(p)),
    ``cv_max`` = the largest of those, and ``cv_trace`` = std_p(tr F^(p)) / mean_p(tr F^(p));
    standard deviations are the unbiased ones. With Rademacher probes an entry's CV is at most
    sqrt(2) (Sun 2026), less once it averages over several batches. ``traces`` (the tr F^(p))
    and ``mean`` (``mean_fisher(fds)``): when the caller has them already. ``pieces``: the
    FSDP1 local pieces among the tensors (sums and maxima then cover every rank's piece).

    Computed per entry as sqrt(sum_p (F^(p) / mean - 1)^2 / (P - 1)), for P = 2 as
    |F^(1) - F^(2)| / (sqrt(2) mean): never squaring a deviation of the size of an entry, whose
    square is often a float32 subnormal (slow on CPUs).
    """
    P = len(fds)
    if P < 2:
        raise ValueError(f"A coefficient of variation needs at least 2 probes; got {P}.")
    # For P = 2 the loop sums |F1 - F2| / m, m = F1 + F2 or the mean; the CV is that times scale.
    scale = (math.sqrt(2.0) if mean is None else 1 / math.sqrt(2.0)) if P == 2 else 1.0
    parts = []  # per parameter: sum of the CVs (float64), entries kept, largest CV
    for name in fds[0]:
        xs = [local_tensor(fd[name]).float() for fd in fds]
        m = local_tensor(mean[name]).float() if mean is not None else None
        if P == 2:
            m = xs[0] + xs[1] if m is None else m
            cv = (xs[0] - xs[1]).abs_().div_(m)  # times scale, applied to the sums below
        else:
            m = torch.stack(xs).mean(0) if m is None else m
            cv = torch.stack(xs).div_(m).sub_(1.0).square_().sum(0).div_(P - 1).sqrt_()
        cv.nan_to_num_(0.0)  # 0/0: an entry that is zero in every probe has no CV
        parts.append(
            torch.stack(
                [
                    cv.sum(dtype=torch.float64),
                    torch.count_nonzero(m).double(),  # entries are >= 0: nonzero mean = positive
                    cv.max().double() if cv.numel() else cv.new_zeros((), dtype=torch.float64),
                ]
            )
        )
    if parts:  # a sharded diagonal: sums and counts over the ranks' shards, the largest CV
        whole = list(fds[0].values())
        where = _aligned(fds[0], pieces)
        rows = torch.stack(parts)
        rows = torch.cat(
            [
                reduce_shard_statistics(rows[:, :2].contiguous(), whole, pieces=where),
                reduce_shard_statistics(rows[:, 2:].contiguous(), whole, "max", where),
            ],
            1,
        )
    sums = rows.tolist() if parts else []  # one host sync
    total = scale * sum(r[0] for r in sums)
    n_keep = int(sum(r[1] for r in sums))
    cv_max = scale * max((r[2] for r in sums), default=0.0)
    tr = torch.tensor(
        list(traces) if traces is not None else [fd.trace() for fd in fds], dtype=torch.float64
    )
    return {
        "cv": total / n_keep if n_keep else float("nan"),
        "cv_max": cv_max if n_keep else float("nan"),
        "cv_trace": float(tr.std() / tr.mean()) if tr.mean() > 0 else float("nan"),
    }


def empirical_gap(
    empirical: FisherDiagonal,
    fisher: FisherDiagonal,
    traces: tuple[float, float] | None = None,
    pieces: Pieces = None,
) -> dict[str, float]:
    """``rel_gap`` = sum_i |E_i - F_i| / sum_i F_i and ``trace_ratio`` = tr(E) / tr(F).

    ``traces``: (tr E, tr F), when the caller has them; ``pieces``: the FSDP1 local pieces
    among the tensors (the gap then sums every rank's piece)."""
    if set(empirical) != set(fisher) or any(empirical[k].shape != fisher[k].shape for k in fisher):
        raise ValueError("The empirical Fisher and the Fisher cover different parameters.")
    tr_e, total = traces if traces is not None else (empirical.trace(), fisher.trace())
    if total <= 0:
        return {"rel_gap": float("nan"), "trace_ratio": float("nan")}
    gaps = [
        (local_tensor(empirical[k]) - local_tensor(fisher[k])).abs_().sum(dtype=torch.float64)
        for k in fisher
    ]
    whole = list(fisher.values())
    gap = (
        float(
            reduce_shard_statistics(torch.stack(gaps), whole, pieces=_aligned(fisher, pieces)).sum()
        )
        if gaps
        else 0.0
    )
    return {"rel_gap": gap / total, "trace_ratio": tr_e / total}


def kernel_summary(
    model: nn.Module,
    dataloader: Iterable[Any],
    max_batches: int | None = None,
    output_fn: OutputFn | None = None,
    classes: ClassSelector | None = None,
    shift_labels: bool = False,
) -> dict[str, float]:
    """Means over the inputs of the spectrum of I(p) = diag(p) - p p^T (forward passes only).

    Returns ``lambda_max`` (mean largest eigenvalue), ``trace`` (mean 1 - ||p||^2),
    ``one_minus_pmax`` (mean 1 - max_y p_y), ``lambda_max_lower`` / ``lambda_max_upper`` (means of
    its bounds max(max_i p_i (1 - p_i), p_(2)) and p_(1)), how close it sits to them as
    ``lower_over_lambda_max`` = mean(lower) / mean(lambda_max) and ``lambda_max_over_upper`` =
    mean(lambda_max) / mean(upper) (1 means tight), and ``n_inputs``. Under ``torch.distributed``
    the sums cover every rank's shard.
    """
    device = next(model.parameters()).device
    sums = _KernelSums(device)
    with eval_mode(model), torch.no_grad():
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            sums.add(
                model_outputs(model, move_batch(batch, device), output_fn, classes, shift_labels)
            )
    return sums.summary()


class _KernelSums:
    """Sums over inputs of the kernel-space statistics of ``kernel_summary``, batch by batch: fed
    by its own forwards, or by the Fisher pass's (``compute_diagnostics``)."""

    KEYS = ("lambda_max", "trace", "one_minus_pmax", "lambda_max_lower", "lambda_max_upper")

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(self.KEYS) + 1, dtype=torch.float64, device=device)

    def add(self, out: ModelOutputs) -> None:
        p = torch.softmax(out.logits.detach().double(), -1)[out.mask]
        # Rows in chunks: for large vocabularies the eigen-solver holds a few C-sized vectors
        # per row, which must not scale with the number of tokens.
        rows = max(1, KERNEL_CHUNK_ELEMENTS // p.shape[-1])
        for chunk in p.split(rows):
            stats = kernel_statistics(chunk)
            self.sums[:-1] += torch.stack([stats[k].sum() for k in self.KEYS])
        self.sums[-1] += p.shape[0]

    def summary(self) -> dict[str, float]:
        """The means over inputs (over every rank's shard under ``torch.distributed``)."""
        _all_reduce([self.sums])
        n = float(self.sums[-1])
        if n == 0:
            raise ValueError("The dataloader gave no inputs to compute kernel statistics on.")
        means = {k: float(s) / n for k, s in zip(self.KEYS, self.sums[:-1].tolist())}
        lam = means["lambda_max"]
        means["lower_over_lambda_max"] = means["lambda_max_lower"] / lam if lam > 0 else 1.0
        means["lambda_max_over_upper"] = lam / means["lambda_max_upper"]
        means["n_inputs"] = n
        return means


@dataclass
class DiagnosticsResult:
    """What one diagnostics pass found.

    Attributes:
        fishers: method -> Fisher diagonal (for probe methods, the mean of the one-probe estimates).
        values: global statistics, ``name -> value`` without prefix (``exact/trace``, ...).
        reference: the method taken as F (``exact`` or ``hutchinson``), or ``None``.
        layers: one row per layer: ``layer``, ``numel``, ``frac_below`` and ``trace/<method>``.
        spectrum: the top eigenvalues of F by Lanczos (``LanczosResult``), when asked for.
        density: the SLQ spectral density of F (``SpectralDensity``), when asked for.
        entries: per parameter, the entries of the shown diagonal (``density_fisher``) that
            histograms and densities read: all of them up to ``histogram_entries``, else a fixed
            random sample of that size (the same for a sharded and an unsharded model).
    """

    fishers: dict[str, FisherDiagonal]
    values: dict[str, float]
    reference: str | None
    layers: list[dict[str, Any]] = field(default_factory=list)
    spectrum: LanczosResult | None = None
    density: SpectralDensity | None = None
    entries: dict[str, Tensor] = field(default_factory=dict)

    def scalars(self, prefix: str = "fisher") -> dict[str, float]:
        """Global and per-layer scalars (``<method>/trace/<layer>``, ``frac_below/<layer>``), each
        name behind ``prefix/``: ready for ``logger.log_metrics``."""
        out = dict(self.values)
        for row in self.layers:
            out[f"frac_below/{row['layer']}"] = row["frac_below"]
            for key, value in row.items():
                if key.startswith("trace/"):
                    out[f"{key[len('trace/') :]}/trace/{row['layer']}"] = value
        return {f"{prefix}/{k}" if prefix else k: v for k, v in out.items()}

    @property
    def density_fisher(self) -> FisherDiagonal:
        """The diagonal shown in densities and histograms: F, else the first method's."""
        return self.fishers[self.reference or next(iter(self.fishers))]

    @property
    def shown_entries(self) -> Mapping[str, Tensor]:
        """What histograms and densities read: ``entries``, else the whole ``density_fisher``."""
        return self.entries or self.density_fisher


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Validate a list of estimator names; return it as a tuple without repeats."""
    if isinstance(methods, str):
        methods = (methods,)
    if not isinstance(methods, Sequence):
        raise FisherInputError(
            f"methods must be a list of Fisher method names; got {type(methods).__name__}."
        )
    if not methods:
        raise FisherInputError("methods is empty; name at least one Fisher estimator.")
    unknown = []
    names = []
    for m in methods:
        try:
            info = lookup(m)  # resolves the deprecated names of the bound estimates
        except FisherInputError:
            unknown.append(m)
            continue
        if not info.data_pass:
            unknown.append(m)
        names.append(info.name)
    if unknown:
        raise FisherInputError(
            f"Unknown Fisher method(s) {unknown} for the diagnostics; choose from "
            f"{', '.join(DATA_METHODS)}.{''.join(closest(m, DATA_METHODS) for m in unknown)}"
        )
    return tuple(dict.fromkeys(names))


def resolve_methods(
    methods: Sequence[str], n_classes: int, deterministic_bounds_max_classes: int | None
) -> tuple[str, ...]:
    """The methods a diagnostics pass runs for ``n_classes`` classes: with at most
    ``deterministic_bounds_max_classes`` (``None`` or 0: never) the stochastic ``hutchinson``,
    ``hutchinson_upper`` and ``hutchinson_lower`` become ``exact``, ``upper`` and ``lower``; every
    other method runs as named."""
    limit = deterministic_bounds_max_classes or 0
    if n_classes > limit:
        return tuple(methods)
    return tuple(dict.fromkeys(DETERMINISTIC.get(m, m) for m in methods))


def count_classes(
    model: nn.Module,
    batches: Iterable[Any],
    output_fn: OutputFn | None = None,
    classes: ClassSelector | None = None,
    shift_labels: bool = False,
) -> int:
    """C, the number of classes that count, from one forward of the first batch."""
    first = next(iter(batches), None)
    if first is None:
        raise FisherInputError("The dataloader gave no batches; the diagnostics need at least one.")
    device = next(model.parameters()).device
    batch = move_batch(first, device)

    def forward() -> ModelOutputs:
        return model_outputs(model, batch, output_fn, classes, shift_labels)

    with eval_mode(model), torch.no_grad():
        if is_fsdp1(model):  # the hook goes on before the first forward; through the root
            from ..sharded_fsdp1 import ensure_fisher_hook, forward_through_root

            ensure_fisher_hook(model)
            out = forward_through_root(model, forward)
        else:
            out = forward()
    return int(out.logits.shape[-1])


def warn_unused_spectrum_options(
    who: str,
    eigenvalues: int,
    lanczos_iters: int | None,
    density: bool,
    slq_starts: int,
    slq_iters: int,
    density_name: str = "density",
) -> None:
    """Warn about settings of the spectrum that are ignored because it is off: ``lanczos_iters``
    without ``eigenvalues``, ``slq_starts`` / ``slq_iters`` away from their defaults without
    ``density``."""
    ignored = []
    if lanczos_iters is not None and not eigenvalues:
        ignored.append(f"lanczos_iters={lanczos_iters} (used only with eigenvalues >= 1)")
    if not density:
        ignored += [
            f"{name}={value} (used only with {density_name}=True)"
            for name, value, default in (
                ("slq_starts", slq_starts, SLQ_STARTS),
                ("slq_iters", slq_iters, SLQ_ITERS),
            )
            if value != default
        ]
    if ignored:
        warnings.warn(f"{who}: {'; '.join(ignored)} is ignored.", UserWarning, stacklevel=3)


def compute_diagnostics(
    model: nn.Module,
    dataloader: Iterable[Any],
    methods: Sequence[str] = DEFAULT_METHODS,
    probes: int = 2,
    max_batches: int | None = 1,
    threshold: float = 1e-5,
    seed: int = 0,
    output_fn: OutputFn | None = None,
    classes: ClassSelector | None = None,
    kernel: bool = True,
    shift_labels: bool = False,
    *,
    deterministic_bounds_max_classes: int | None = DETERMINISTIC_BOUNDS_MAX_CLASSES,
    rank: int = 1,
    n_classes: int | None = None,
    eigenvalues: int = 0,
    lanczos_iters: int | None = None,
    density: bool = False,
    slq_starts: int = SLQ_STARTS,
    slq_iters: int = SLQ_ITERS,
    options: FisherOptions | None = None,
    histogram_entries: int | None = HISTOGRAM_ENTRIES,
    causal: bool = False,
) -> DiagnosticsResult:
    """Estimate the Fisher with every method in ``methods`` and summarise it (see module doc).

    ``options`` (a ``FisherOptions``) gives the estimators' other options (``param_filter``,
    ``max_memory_mib``, ``ignore_index``, ...); the arguments here override its ``output_fn``,
    ``classes``, ``shift_labels`` and ``causal`` when set, and always set ``max_batches``, the
    seeds, the probes and the rank (so ``**hf.lm_fisher_kwargs(model)`` fits here too).

    With C <= ``deterministic_bounds_max_classes`` classes (``None`` or 0: never) the
    stochastic ``hutchinson``, ``hutchinson_upper`` and ``hutchinson_lower`` in ``methods`` run as
    ``exact``, ``upper`` and ``lower`` (rank ``rank``); C is read from one forward of the first
    batch unless ``n_classes`` gives it. Probe methods (``hutchinson*``) run ``probes`` times
    with ``probes=1`` and seeds ``seed + i``; their logged estimate is the mean, so ``probes``
    trades cost for noise and a CV and a standard error need ``probes >= 2``. Other methods run
    once with ``seed``. Every pass stops after ``max_batches`` batches.

    The names in ``DiagnosticsResult.values``:

    * ``<method>/trace``; for probe methods with ``probes >= 2`` also ``<method>/trace_se``
      (standard error of the mean over probes, s/sqrt(P)), ``<method>/cv``, ``<method>/cv_max``,
      ``<method>/cv_trace``;
    * ``n_classes``, ``bounds/deterministic`` (1 or 0), ``bounds/lower_over_f``,
      ``bounds/f_over_upper`` and, when a side is stochastic, ``bounds/lower_over_f_se`` /
      ``bounds/f_over_upper_se`` (first-order propagation of the traces' standard errors,
      treated as independent); with all three deterministic, ``bounds/order_violations``
      (entries where U >= F >= L fails beyond float tolerance: 0 unless something is wrong) and
      ``bounds/lower_f_rel_diff`` (max_i |L_i - F_i| / F_i; 0 up to rounding for C = 2);
    * ``certificate/<key>`` for a deterministic ``lower`` (see ``LowerEstimator.certificate``);
    * ``kernel/<statistic>`` (see ``kernel_summary``), ``frac_below/min_layer``,
      ``frac_below/max_layer``, ``empirical/rel_gap``, ``empirical/trace_ratio``;
    * with ``eigenvalues=k`` (k >= 1): ``eig_1`` .. ``eig_k``, the k largest eigenvalues of F
      on the same batches by Lanczos on exact Fisher-vector products (``lanczos_iters`` steps at
      most, each one pass over the batches), their residuals ``eig_residual_<i>`` and
      ``eig_iterations``;
    * with ``density=True``: the SLQ spectral density of F (``slq_starts`` Rademacher starts x
      ``slq_iters`` products) summarised as ``spectral_mean`` (tr(F) / P) with
      ``spectral_mean_se``, ``spectral_trace`` (its estimate of tr(F)) and
      ``spectral_mass_below`` (share of eigenvalues below 1e-8 x the largest).

    ``DiagnosticsResult.scalars`` adds the per-layer ``<method>/trace/<layer>`` and
    ``frac_below/<layer>``; ``DiagnosticsResult.entries`` holds at most ``histogram_entries``
    entries per parameter (``None``: all) for histograms.

    On an FSDP2-sharded model (``fully_shard``; call this on every rank) the diagonals stay
    sharded and every number above is the unsharded run's: traces, counts and sums of the local
    shards are summed over the ranks, maxima taken over them, and the histogram sample is drawn
    in the whole parameter's index space and gathered (bounded by ``histogram_entries``). The
    same holds on an FSDP1 model (``FullyShardedDataParallel`` with ``use_orig_params=True``),
    whose diagonals are each rank's flat piece of every parameter: sums over the pieces, the
    sample drawn in the whole parameter's flat index space, layers and ``entries`` named as in
    the unwrapped model. The spectrum (``eigenvalues``, ``density``) is refused on both.
    """
    methods = check_methods(methods)
    fsdp1 = is_fsdp1(model)
    if (eigenvalues or density) and (is_fsdp2(model) or fsdp1):
        raise FisherInputError(f"compute_diagnostics: {SHARDED_SPECTRUM_REFUSAL}.")
    who = "compute_diagnostics"
    check(
        who,
        model=("module", model),
        dataloader=("batches", dataloader),
        histogram_entries=("positive_int_or_none", histogram_entries),
        probes=("positive_int", probes),
        max_batches=("positive_int_or_none", max_batches),
        threshold=("positive_number", threshold),
        seed=("integer", seed),
        rank=("positive_int", rank),
        n_classes=("positive_int_or_none", n_classes),
        eigenvalues=("non_negative_int", eigenvalues),
        lanczos_iters=("positive_int_or_none", lanczos_iters),
        slq_starts=("positive_int", slq_starts),
        slq_iters=("positive_int", slq_iters),
        deterministic_bounds_max_classes=(
            "non_negative_int",
            deterministic_bounds_max_classes or 0,
        ),
        kernel=("flag", kernel),
        shift_labels=("flag", shift_labels),
        density=("flag", density),
        causal=("flag", causal),
    )
    warn_unused_spectrum_options(who, eigenvalues, lanczos_iters, density, slq_starts, slq_iters)
    if max_batches is not None:
        # Every pass sees the same batches (a shuffling loader would give each method its own, and
        # the ratios would compare different data), and the loader is iterated once, not per pass.
        dataloader = list(itertools.islice(dataloader, max_batches))
    elif iter(dataloader) is dataloader:  # a one-shot iterator: keep its batches for every pass
        dataloader = list(dataloader)
    base = FisherOptions.build(options, progress=False, max_batches=max_batches)
    if output_fn is not None:
        base.output_fn = output_fn
    if classes is not None:
        base.classes = classes
    if shift_labels:  # causal LMs: position t predicts token t + 1
        base.shift_labels = True
    if causal:
        base.causal = True
    output_fn, classes, shift_labels = base.output_fn, base.classes, base.shift_labels
    wants_deterministic = bool(deterministic_bounds_max_classes) and any(
        m in DETERMINISTIC for m in methods
    )
    if n_classes is None and wants_deterministic:
        n_classes = count_classes(model, dataloader, output_fn, classes, shift_labels)
    # FSDP1: each diagonal is this rank's flat piece of every parameter (read after the first
    # forward, which lays the pieces out)
    pieces: Pieces = None
    if n_classes is not None:
        methods = resolve_methods(methods, n_classes, deterministic_bounds_max_classes)
    # One pass over the data for every method and probe: the forwards are shared (also with the
    # kernel statistics), the backwards batched, and each estimate equals its own
    # `estimate_fisher` with the same seed.
    specs: list[dict[str, Any]] = [
        {"method": m, "seed": seed + i, "probes": 1}
        | ({"rank": rank} if m in (LOWER, HUTCHINSON_LOWER) else {})
        for m in methods
        for i in range(probes if m in PROBE_METHODS else 1)
    ]
    estimators = build_estimators(specs, options=base)
    kernel_sums = _KernelSums(next(model.parameters()).device) if kernel else None
    runs = run_passes(
        model, dataloader, estimators, kernel_sums.add if kernel_sums is not None else None
    )
    # Per-parameter traces once per estimate; every trace below is a sum of these (a method's
    # mean over probes has the mean of the probes' traces).
    run_traces = [fd.traces() for fd in runs]
    if fsdp1:
        from ..sharded_fsdp1 import pieces as fsdp1_pieces

        pieces = fsdp1_pieces(model)
    fishers: dict[str, FisherDiagonal] = {}
    traces: dict[str, dict[str, float]] = {}
    s: dict[str, float] = {}
    se: dict[str, float] = {}  # standard error of each method's trace (0: deterministic)
    for method in methods:
        mine = [i for i, spec in enumerate(specs) if spec["method"] == method]
        fds = [runs[i] for i in mine]
        if method in PROBE_METHODS:
            fishers[method] = mean_fisher(fds)
            traces[method] = {
                k: sum(run_traces[i][k] for i in mine) / len(mine) for k in run_traces[mine[0]]
            }
            if probes > 1:
                per_probe = [sum(run_traces[i].values()) for i in mine]
                for k, v in probe_cv(fds, per_probe, fishers[method], pieces).items():
                    s[f"{method}/{k}"] = v
                std = float(torch.tensor(per_probe, dtype=torch.float64).std())
                se[method] = std / math.sqrt(probes)
                s[f"{method}/trace_se"] = se[method]
            else:
                se[method] = float("nan")
        else:
            fishers[method], traces[method] = fds[0], run_traces[mine[0]]
            se[method] = 0.0
    totals = {m: float(sum(t.values())) for m, t in traces.items()}
    for method in fishers:
        s[f"{method}/trace"] = totals[method]

    reference = "exact" if "exact" in fishers else "hutchinson" if "hutchinson" in fishers else None
    upper = next((m for m in (UPPER, HUTCHINSON_UPPER) if m in fishers), None)
    lower = next((m for m in (LOWER, HUTCHINSON_LOWER) if m in fishers), None)
    if n_classes is not None:
        s["n_classes"] = float(n_classes)
    if upper is not None or lower is not None:
        s["bounds/deterministic"] = float(
            reference == "exact" and upper in (UPPER, None) and lower in (LOWER, None)
        )
    if reference is not None:
        tr_f = totals[reference]
        if lower is not None:
            ratio = totals[lower] / tr_f if tr_f > 0 else float("nan")
            s["bounds/lower_over_f"] = ratio
            if se[lower] or se[reference]:
                s["bounds/lower_over_f_se"] = _ratio_se(
                    ratio, totals[lower], se[lower], tr_f, se[reference]
                )
        if upper is not None:
            tr_u = totals[upper]
            ratio = tr_f / tr_u if tr_u > 0 else float("nan")
            s["bounds/f_over_upper"] = ratio
            if se[upper] or se[reference]:
                s["bounds/f_over_upper_se"] = _ratio_se(ratio, tr_f, se[reference], tr_u, se[upper])
        if reference == "exact" and upper == UPPER and lower == LOWER:
            f = fishers["exact"]
            s["bounds/order_violations"] = float(
                order_violations(fishers[UPPER], f, fishers[LOWER], pieces=pieces)["total"]
            )
            s["bounds/lower_f_rel_diff"] = lower_relative_difference(
                fishers[LOWER], f, pieces=pieces
            )
        if "empirical" in fishers:
            gap = empirical_gap(
                fishers["empirical"], fishers[reference], (totals["empirical"], tr_f), pieces
            )
            for k, v in gap.items():
                s[f"empirical/{k}"] = v
    if LOWER in fishers:
        s.update(certificate_scalars(fishers[LOWER], "certificate"))
    shown = fishers[reference or methods[0]]
    below = fraction_below(shown, threshold, pieces)
    entries = sample_entries(dict(shown), histogram_entries, seed, pieces)
    if fsdp1:  # keyed like the unwrapped model's parameters
        entries = {clean_name(k): v for k, v in entries.items()}
    s["frac_below/min_layer"] = min(below.values())
    s["frac_below/max_layer"] = max(below.values())
    if kernel_sums is not None:
        stats = kernel_sums.summary()
        s.update({f"kernel/{k}": v for k, v in stats.items() if k != "n_inputs"})

    spectrum = dens = None
    spec_kw: dict[str, Any] = {
        "seed": seed,
        "output_fn": output_fn,
        "classes": classes,
        "shift_labels": shift_labels,
        "max_batches": max_batches,
    }
    if eigenvalues:
        spectrum = top_eigenvalues(model, dataloader, eigenvalues, lanczos_iters, **spec_kw)
        for i, (value, res) in enumerate(
            zip(spectrum.eigenvalues.tolist(), spectrum.residuals.tolist()), 1
        ):
            s[f"eig_{i}"] = value
            s[f"eig_residual_{i}"] = res
        s["eig_iterations"] = float(spectrum.iterations)
    if density:
        dens = spectral_density(model, dataloader, slq_starts, slq_iters, **spec_kw)
        s["spectral_mean"] = dens.mean
        s["spectral_mean_se"] = dens.mean_se
        s["spectral_trace"] = dens.mean * dens.dim
        s["spectral_mass_below"] = dens.mass_below

    numel: dict[str, int] = {}
    for name, t in fishers[methods[0]].items():
        size = whole_numel(t, pieces.get(name) if pieces is not None else None)
        numel[layer_of(name)] = numel.get(layer_of(name), 0) + size
    layer_traces = {m: _by_layer(t) for m, t in traces.items()}
    layers = [
        {"layer": layer, "numel": numel[layer], "frac_below": below[layer]}
        | {f"trace/{m}": layer_traces[m][layer] for m in fishers}
        for layer in numel
    ]
    return DiagnosticsResult(
        fishers, {k: float(v) for k, v in s.items()}, reference, layers, spectrum, dens, entries
    )


def _ratio_se(ratio: float, a: float, se_a: float, b: float, se_b: float) -> float:
    """Standard error of a / b by first-order propagation, a and b independent:
    se(a / b) = |a / b| sqrt((se_a / a)^2 + (se_b / b)^2)."""
    if not (a > 0 and b > 0):
        return float("nan")
    return abs(ratio) * math.sqrt((se_a / a) ** 2 + (se_b / b) ** 2)


def _by_layer(traces: Mapping[str, float]) -> dict[str, float]:
    """Per-parameter traces summed by layer (as ``FisherDiagonal.layer_traces`` does)."""
    out: dict[str, float] = {}
    for name, value in traces.items():
        out[layer_of(name)] = out.get(layer_of(name), 0.0) + value
    return out


def _check_same_parameters(*fds: Mapping[str, Tensor]) -> None:
    first = fds[0]
    for other in fds[1:]:
        if set(other) != set(first) or any(other[k].shape != first[k].shape for k in first):
            raise ValueError("The Fisher diagonals cover different parameters.")


def order_violations(
    upper: Mapping[str, Tensor],
    fisher: Mapping[str, Tensor],
    lower: Mapping[str, Tensor],
    rtol: float = 1e-5,
    atol: float | None = None,
    pieces: Pieces = None,
) -> dict[str, int]:
    """Entries where upper >= F >= lower fails beyond float tolerance.

    Entry i breaks ``upper >= F`` when F_i - U_i > rtol max(U_i, F_i) + atol, and
    ``F >= lower`` when L_i - F_i > rtol max(F_i, L_i) + atol; ``atol`` defaults to
    1e-6 max_j F_j (float32 sums of squares lose about that much on entries far below the
    largest). Deterministic bounds never break the order in exact arithmetic, so any count
    above zero is a defect (or a too tight tolerance); Hutchinson estimates of the bounds break
    it by noise. ``pieces``: the FSDP1 local pieces among the tensors (counted over every
    rank). Returns ``{"upper": n, "lower": n, "total": n}``.
    """
    _check_same_parameters(upper, fisher, lower)
    if atol is None:
        atol = 1e-6 * _largest(fisher, pieces)
    counts = []
    for k in fisher:
        u, f, lo = (local_tensor(t[k]).double() for t in (upper, fisher, lower))
        over = ((f - u) > rtol * torch.maximum(u.abs(), f.abs()) + atol).sum()
        under = ((lo - f) > rtol * torch.maximum(f.abs(), lo.abs()) + atol).sum()
        counts.append(torch.stack([over, under]))
    if not counts:
        return {"upper": 0, "lower": 0, "total": 0}
    above, below = (
        int(c)
        for c in reduce_shard_statistics(
            torch.stack(counts), list(fisher.values()), pieces=_aligned(fisher, pieces)
        ).sum(0)
    )
    return {"upper": above, "lower": below, "total": above + below}


def _largest(fd: Mapping[str, Tensor], pieces: Pieces = None) -> float:
    """max_i |F_i| over every entry (over every rank's shard or piece of a sharded diagonal)."""
    where = _aligned(fd, pieces) or [None] * len(fd)
    kept = [(t, p) for t, p in zip(fd.values(), where) if whole_numel(t, p)]
    if not kept:
        return 0.0
    local = torch.stack(
        [
            local_tensor(t).abs().max().double()
            if local_tensor(t).numel()
            else torch.zeros((), dtype=torch.float64, device=local_tensor(t).device)
            for t, _ in kept
        ]
    )
    tensors = [t for t, _ in kept]
    return float(
        reduce_shard_statistics(
            local, tensors, "max", [p for _, p in kept] if pieces else None
        ).max()
    )


def lower_relative_difference(
    lower: Mapping[str, Tensor],
    fisher: Mapping[str, Tensor],
    floor: float = 1e-6,
    pieces: Pieces = None,
) -> float:
    """max_i |L_i - F_i| / F_i over the entries with F_i > ``floor`` x max_j F_j (entries that
    are zero for practical purposes have no meaningful relative difference). 0 means L = F.
    ``pieces``: the FSDP1 local pieces among the tensors (the maximum over every rank)."""
    _check_same_parameters(lower, fisher)
    top = _largest(fisher, pieces)
    if top <= 0:
        return 0.0
    worst = []
    for k in fisher:
        f, lo = local_tensor(fisher[k]).double(), local_tensor(lower[k]).double()
        keep = f > floor * top
        rel = (lo[keep] - f[keep]).abs() / f[keep]
        worst.append(rel.max() if rel.numel() else rel.new_zeros(()))
    if not worst:
        return 0.0
    return float(
        reduce_shard_statistics(
            torch.stack(worst), list(fisher.values()), "max", _aligned(fisher, pieces)
        ).max()
    )


def lower_gap_bound(
    lower: FisherDiagonal,
    gram: Mapping[str, Tensor],
    upper: Mapping[str, Tensor] | None = None,
) -> FisherDiagonal:
    """An entrywise bound B on the gap of a ``lower`` estimate: 0 <= F_i - L_i <= B_i.

    B = c Gamma with c = ``lower.certificate["tail_eigenvalue_max"]`` (the largest dropped
    eigenvalue of I(p) over the inputs) and ``gram`` the diagonal of
    Gamma = (1/N) sum_x J_x^T (I - 1 1^T / C) J_x on the same inputs; with ``upper`` (the
    deterministic upper bound on the same inputs) B = min(c Gamma, U - L). The proof is in
    docs/math.md.
    """
    cert = lower.certificate
    if cert is None or "tail_eigenvalue_max" not in cert:
        raise FisherInputError(
            f"lower_gap_bound needs a `lower` estimate with its certificate; got method "
            f"{lower.method!r} with certificate {cert!r}."
        )
    _check_same_parameters(lower, gram)
    c = float(cert["tail_eigenvalue_max"])
    bound = {k: c * gram[k].double() for k in lower}
    if upper is not None:
        _check_same_parameters(lower, upper)
        bound = {
            k: torch.minimum(b, (upper[k].double() - lower[k].double()).clamp_min(0))
            for k, b in bound.items()
        }
    return FisherDiagonal(bound, lower.n_samples, "lower_gap_bound", {"c": c})


def certificate_scalars(fd: FisherDiagonal, prefix: str = "certificate") -> dict[str, float]:
    """The numbers of ``fd.certificate`` as floats named ``<prefix>/<key>`` (for loggers);
    empty when the estimate carries no certificate."""
    if fd.certificate is None:
        return {}
    return {
        f"{prefix}/{k}" if prefix else k: float(v)
        for k, v in fd.certificate.items()
        if isinstance(v, (int, float))
    }


def spectrum_scalars(
    top: Any = None, density: Any = None, prefix: str = "spectrum"
) -> dict[str, float]:
    """Scalars of the parameter-space spectrum: ``lambda_1 .. lambda_k`` and their Lanczos
    residuals from a ``LanczosResult`` (``top``), and from a ``SpectralDensity`` the SLQ
    ``mean`` (estimate of tr(F) / P) with its standard error and ``mass_below`` (share of
    eigenvalues below the density's floor)."""
    out: dict[str, float] = {}
    if top is not None:
        for i, (value, res) in enumerate(zip(top.eigenvalues.tolist(), top.residuals.tolist())):
            out[f"lambda_{i + 1}"] = value
            out[f"residual_{i + 1}"] = res
        out["lanczos_iterations"] = float(top.iterations)
    if density is not None:
        out["slq_mean"] = density.mean
        out["slq_mean_se"] = density.mean_se
        out["slq_mass_below"] = density.mass_below
    return {f"{prefix}/{k}" if prefix else k: v for k, v in out.items()}
