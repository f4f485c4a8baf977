"""Exact Fisher diagonal: our engine against the anchors, side by side.

One command runs the whole suite on one device::

    python -m benchmarks.exact_diagonal --device cpu    # -> results/exact_diagonal_cpu.{json,md}
    python -m benchmarks.exact_diagonal --device cuda   # -> results/exact_diagonal_gpu.{json,md}

For every model it builds one batch, computes the Fisher diagonal with every implementation that
can run, checks each against ``ours-exact`` (max over parameters of max |a - b| / max |b|), then
times all implementations interleaved (``--repeats`` rounds, medians) next to a plain training
step (forward + backward of the mean cross-entropy, train mode) that gives ``ratio_to_step``.

Implementations (rows of the report):

* ``ours-exact``, ``ours-hutchinson`` (one probe): ``lightning_fisher.estimate_fisher``;
* ``ours-upper`` and ``ours-lower`` (``rank=1``): the deterministic bounds upper >= F >= lower,
  timed but not compared (``max_rel_diff`` null: they bound F, they do not estimate it);
* ``backpack-diagggn-exact``: BackPACK's ``DiagGGNExact`` (``nn.Sequential`` models, ResNets via
  its converter), plus ``backpack-diagggn-mc`` and ``backpack-sum-grad-squared`` against our
  ``sample`` and ``empirical`` (extra rows, checked against those);
* ``curvlinops-hutchinson-diag``: ``hutchinson_diag`` of curvlinops' ``GGNLinearOperator``, one
  matvec; ``curvlinops-ggn-diagonal`` is reported as skipped: curvlinops has no exact GGN
  diagonal routine (only P matvecs with unit vectors, infeasible);
* ``nngeometry-pmatdiag``: ``FIM(..., PMatDiag)`` (layers nngeometry knows);
* ``reference-loop``: the per-input loop of the continual-learning reference code (one forward
  per input, one backward per class, ``p_c * grad**2``);
* ``vmap-exact``: the curvlinops-style route, ``vmap`` over inputs of ``vjp`` over classes (full
  per-input Jacobians), chunked under ``--vmap-memory-mib``;
* ``train-step``.

The two slow per-input routes (``reference-loop``, ``vmap-exact``) are timed on the first
``--slow-inputs`` inputs and their seconds are scaled to the batch (``extrapolated`` in the row);
``--slow-inputs 0`` runs them on the whole batch. Anchors that are not installed are skipped with
a note. Peak memory: CUDA ``max_memory_allocated`` above the baseline; on CPU the rise of the
resident set's high-water mark (``/proc/self/status`` VmHWM after resetting it), or null.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_fisher as lf
from benchmarks.bench_models import LogitsOnly, ReducedResNet18, ResNet18, bert_classifier, mlp
from benchmarks.common import device_name, fmt, report_header
from benchmarks.common import versions as base_versions
from lightning_fisher import _json as strict_json
from lightning_fisher.estimators.per_input import VERIFY_ROWS, forget_verified

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
Diag = dict[str, Tensor]


# Models and batches ---------------------------------------------------------------------------
@dataclass
class Case:
    """A model in eval mode with one batch; ``x`` is what the model takes, ``batch`` what our
    estimators take (``(x, y)`` or a dict with labels)."""

    name: str
    model: nn.Module
    x: Any
    y: Tensor
    n_classes: int
    kind: str  # "mlp", "cnn" or "bert"
    note: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def batch(self, lo: int = 0, hi: int | None = None) -> Any:
        x, y = self.rows(lo, hi)
        return {**x, "labels": y} if self.kind == "bert" else (x, y)

    def rows(self, lo: int = 0, hi: int | None = None) -> tuple[Any, Tensor]:
        hi = self.n if hi is None else hi
        if self.kind == "bert":
            return {k: v[lo:hi] for k, v in self.x.items()}, self.y[lo:hi]
        return self.x[lo:hi], self.y[lo:hi]

    def logits(self, model: nn.Module, x: Any) -> Tensor:
        return model(**x).logits if self.kind == "bert" else model(x)


MODELS = (
    "mlp-784-512-512-10",
    "mlp-3072-1024-1024-100",
    "mlp-2048-1024-1024-1000",
    "reduced-resnet18",
    "resnet18",
    "bert-6l-c4",
)


def build_case(name: str, device: torch.device, args: argparse.Namespace) -> Case:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name.startswith("mlp-"):
        sizes = [int(s) for s in name.split("-")[1:]]
        n = {10: 512, 100: 256, 1000: 128}[sizes[-1]]
        n = args.n.get(name, n)
        model = mlp(sizes)
        x = torch.randn(n, sizes[0], generator=gen)
        return _finish(
            Case(
                name, model, x, torch.randint(0, sizes[-1], (n,), generator=gen), sizes[-1], "mlp"
            ),
            device,
        )
    if name in ("reduced-resnet18", "resnet18"):
        n = args.n.get(name, 128)
        model = (
            ReducedResNet18(n_classes=10) if name == "reduced-resnet18" else ResNet18(n_classes=10)
        )
        _randomise_bn(model)
        x = torch.randn(n, 3, args.image_size, args.image_size, generator=gen)
        case = Case(name, model, x, torch.randint(0, 10, (n,), generator=gen), 10, "cnn")
        case.note = f"N={n}, {args.image_size}x{args.image_size} inputs"
        return _finish(case, device)
    if name == "bert-6l-c4":
        n = args.n.get(name, 32)
        model, origin = bert_classifier(4, args.bert_dir)
        T = args.seq_len
        ids = torch.randint(1000, model.config.vocab_size, (n, T), generator=gen)
        ids[:, 0] = 101
        mask = torch.ones(n, T, dtype=torch.long)
        x = {"input_ids": ids, "attention_mask": mask}
        case = Case(name, model, x, torch.randint(0, 4, (n,), generator=gen), 4, "bert")
        case.note = f"N={n}, T={T}, {origin}"
        return _finish(case, device)
    raise ValueError(name)


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so BatchNorm's Fisher is generic."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))


def _finish(case: Case, device: torch.device) -> Case:
    case.model = case.model.to(device).eval()
    case.x = (
        {k: v.to(device) for k, v in case.x.items()}
        if isinstance(case.x, dict)
        else case.x.to(device)
    )
    case.y = case.y.to(device)
    return case


def named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# Implementations ------------------------------------------------------------------------------
class Skip(Exception):
    """The implementation cannot run on this model (reason in the message)."""


def ours(
    case: Case,
    method: str,
    mem: float,
    lo: int = 0,
    hi: int | None = None,
    later: nn.Module | None = None,
    **kw: Any,
) -> Diag:
    """Our estimate on the case's batch. Every timed pass is the model's first: it plans and pays
    the self-check. With ``later`` (a copy of the case's model, kept across calls), a later pass
    over that copy: the plan and the check's proof of its first pass are reused
    (``verify_pass_ratio`` measures both over passes of several batches)."""
    model = later if later is not None else case.model
    if later is None:
        forget_verified(case.model)
    fd = lf.estimate_fisher(
        model, [case.batch(lo, hi)], method=method, max_memory_mib=mem, progress=False, **kw
    )
    return dict(fd.items())


def verify_pass_ratio(
    case: Case, method: str, mem: float, batches: int, repeats: int, device: torch.device
) -> tuple[float, float]:
    """Seconds of a pass over ``batches`` batches (the case's batch, repeated) with the
    self-check over seconds without it, for the model's first pass (the check runs on its first
    batch) and for a later pass over the same model (the structure is already proven, so no
    check runs). Medians of interleaved rounds, the order of the three kinds rotated each round
    (a fixed order biases the ratios by several percent on CPU)."""
    loader = [case.batch()] * batches
    times: dict[str, list[float]] = {"first": [], "later": [], "off": []}
    kinds = list(times)
    for r in range(repeats + 1):
        for kind in kinds[r % 3 :] + kinds[: r % 3]:
            if kind == "first":
                forget_verified(case.model)
            t0 = time.perf_counter()
            lf.estimate_fisher(
                case.model,
                loader,
                method=method,
                max_memory_mib=mem,
                progress=False,
                verify=kind != "off",
            )
            sync(device)
            if r:  # the first round warms up
                times[kind].append(time.perf_counter() - t0)
    off = statistics.median(times["off"])
    first, later = (statistics.median(times[k]) / off for k in ("first", "later"))
    print(
        f"  verify on/off, {method}, pass of {batches} batches: first {first:.3f}, "
        f"later {later:.3f}",
        flush=True,
    )
    return first, later


def train_step(case: Case) -> Callable[[], Any]:
    model = copy.deepcopy(case.model).train()  # BatchNorm statistics of the case stay untouched

    def step() -> None:
        loss = F.cross_entropy(case.logits(model, case.x), case.y)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def reference_loop(case: Case, n: int) -> Diag:
    """The continual-learning reference code: per input, one backward per class."""
    model = case.model
    params = named_params(model)
    est = {k: torch.zeros_like(p) for k, p in params.items()}
    x, _ = case.rows(0, n)
    for i in range(n):
        xi = {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i : i + 1]
        logp = F.log_softmax(case.logits(model, xi), -1)[0]
        p = logp.detach().exp()
        for c in range(case.n_classes):
            model.zero_grad(set_to_none=True)
            (-logp[c]).backward(retain_graph=c < case.n_classes - 1)
            for k, prm in params.items():
                if prm.grad is not None:
                    est[k] += p[c] * prm.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {k: v / n for k, v in est.items()}


def vmap_exact(case: Case, n: int, memory_mib: float) -> Diag:
    """curvlinops-style: per-input Jacobians (C x P) by vmap over inputs of vmap over classes of
    vjp; F = (1/N) sum_x [sum_c p_c J_c^2 - (sum_c p_c J_c)^2]."""
    from torch.func import functional_call, vjp, vmap

    model = case.model
    params = {k: p.detach() for k, p in named_params(model).items()}
    P = sum(p.numel() for p in params.values())
    C = case.n_classes
    x, _ = case.rows(0, n)
    bytes_per_class = 4 * P * 3  # Jacobian row, its square, and slack
    c_chunk = max(1, min(C, int(memory_mib * 2**20 // bytes_per_class)))
    b_chunk = max(1, int(memory_mib * 2**20 // (bytes_per_class * c_chunk)))
    eye = torch.eye(C, device=case.y.device)
    acc = {k: torch.zeros_like(p) for k, p in params.items()}

    def one(xi: Any, cls: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        def f(p: dict[str, Tensor]) -> Tensor:
            row = (
                {k: v.unsqueeze(0) for k, v in xi.items()}
                if isinstance(xi, dict)
                else xi.unsqueeze(0)
            )
            out = (
                functional_call(model, p, (), row)
                if isinstance(row, dict)
                else functional_call(model, p, (row,))
            )
            return (out.logits if case.kind == "bert" else out)[0]

        z, pull = vjp(f, params)
        prob = torch.softmax(z.detach(), -1)
        rows = vmap(lambda e: pull(e)[0])(eye[cls])  # {name: (c, *shape)}
        w = prob[cls]
        sq = {k: torch.einsum("c,c...->...", w, r * r) for k, r in rows.items()}
        lin = {k: torch.einsum("c,c...->...", w, r) for k, r in rows.items()}
        return sq, lin

    for lo in range(0, n, b_chunk):
        hi = min(n, lo + b_chunk)
        xs = {k: v[lo:hi] for k, v in x.items()} if isinstance(x, dict) else x[lo:hi]
        sq_tot: dict[str, Tensor] | None = None
        lin_tot: dict[str, Tensor] | None = None
        for c0 in range(0, C, c_chunk):
            cls = torch.arange(c0, min(C, c0 + c_chunk), device=case.y.device)
            if case.kind == "bert":  # HF's mask handling branches on data: loop over inputs
                rows = [one({k: v[i] for k, v in xs.items()}, cls) for i in range(hi - lo)]
                sq = {k: torch.stack([r[0][k] for r in rows]) for k in params}
                lin = {k: torch.stack([r[1][k] for r in rows]) for k in params}
            else:
                sq, lin = vmap(one, in_dims=(0, None), randomness="same")(xs, cls)
            sq_tot = sq if sq_tot is None else {k: sq_tot[k] + sq[k] for k in sq}
            lin_tot = lin if lin_tot is None else {k: lin_tot[k] + lin[k] for k in lin}
        assert sq_tot is not None and lin_tot is not None
        for k in acc:
            acc[k] += (sq_tot[k] - lin_tot[k] ** 2).sum(0)
    return {k: v / n for k, v in acc.items()}


def backpack_model(case: Case) -> tuple[nn.Module, nn.Module, dict[str, nn.Parameter]]:
    try:
        from backpack import extend
    except ImportError as e:
        raise Skip("backpack-for-pytorch is not installed") from e
    if case.kind == "bert":
        raise Skip("BackPACK has no extensions for Embedding, LayerNorm or attention")
    model = copy.deepcopy(case.model)
    params = named_params(model)
    try:
        ext = extend(model, use_converter=case.kind == "cnn")
    except Exception as e:
        raise Skip(f"BackPACK cannot extend this model: {type(e).__name__}: {e}") from e
    return ext, extend(nn.CrossEntropyLoss()), params


def backpack_run(
    bp: tuple[nn.Module, nn.Module, dict[str, nn.Parameter]], case: Case, ext_name: str
) -> Diag:
    from backpack import backpack, extensions

    model, lossf, params = bp
    ext = getattr(extensions, ext_name)()
    attr = {
        "DiagGGNExact": "diag_ggn_exact",
        "DiagGGNMC": "diag_ggn_mc",
        "SumGradSquared": "sum_grad_squared",
    }[ext_name]
    loss = lossf(model(case.x), case.y)
    with backpack(ext):
        loss.backward()
    out = {}
    for k, p in params.items():
        v = getattr(p, attr).detach()
        # DiagGGN* of the mean loss carry 1/N; SumGradSquared sums squared per-input gradients
        # of the mean loss (1/N^2 each), so N times it is the empirical Fisher (1/N) sum g^2.
        out[k] = v * case.n if ext_name == "SumGradSquared" else v
        p.grad = None
        delattr(p, attr)
    return out


def curvlinops_hutchinson(case: Case) -> Diag:
    try:
        from curvlinops import GGNLinearOperator, hutchinson_diag
    except ImportError as e:
        raise Skip(f"curvlinops-for-pytorch is not importable ({e})") from e
    model = LogitsOnly(case.model) if case.kind == "bert" else case.model
    params = named_params(case.model)
    data = [(case.x, case.y)]
    kw: dict[str, Any] = (
        {"batch_size_fn": lambda x: x["input_ids"].shape[0]} if case.kind == "bert" else {}
    )
    op = GGNLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        list(params.values()),
        data,
        check_deterministic=False,
        num_data=case.n,
        **kw,
    )
    flat = hutchinson_diag(op, 1)
    out, i = {}, 0
    for k, p in params.items():
        out[k] = flat[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def nngeometry_diag(case: Case) -> Diag:
    try:
        from nngeometry.layercollection import LayerCollection
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatDiag
    except ImportError as e:
        raise Skip("nngeometry is not installed") from e
    if case.kind == "bert":
        raise Skip("nngeometry has no Embedding layer and needs tensor inputs")
    try:
        lc = LayerCollection.from_model(case.model)
    except Exception as e:
        raise Skip(f"nngeometry: {e}") from e
    pm = FIM(
        case.model,
        (case.x, case.y),
        PMatDiag,
        variant="classif_logits",
        device=str(case.y.device),
        layer_collection=lc,
    )
    flat = pm.get_diag()
    mods = dict(case.model.named_modules())
    out, i = {}, 0
    for layer_id in lc.layers:
        m = mods[layer_id]
        for attr in ("weight", "bias"):
            p = getattr(m, attr, None)
            if p is not None:
                out[f"{layer_id}.{attr}"] = flat[i : i + p.numel()].reshape(p.shape)
                i += p.numel()
    return out


# Measurement ----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float | None]:
    """Run ``fn`` once; return its result and the peak memory it added (MiB) or None."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS")
    except OSError:
        base = None
    out = fn()
    peak = _status_kib("VmHWM")
    return out, None if base is None or peak is None else max(0.0, (peak - base) / 1024)


def max_rel_diff(got: Diag, want: Diag) -> float:
    """max over parameters of max |got - want| / max(max |want|, 1e-10 * the largest entry).

    The floor keeps parameters whose Fisher is zero up to roundoff from dominating: an attention
    key's bias (softmax ignores a shift shared by all keys) has entries around 1e-25 of the rest,
    pure noise in every implementation.
    """
    worst = 0.0
    floor = 1e-10 * max(float(w.abs().max()) for w in want.values())
    for k, w in want.items():
        if k not in got:
            raise KeyError(f"implementation returned no entry for {k!r}")
        scale = w.abs().max().clamp_min(max(floor, 1e-30))
        worst = max(worst, float((got[k].to(w.dtype) - w).abs().max() / scale))
    return worst


# Suite ----------------------------------------------------------------------------------------
def run_model(name: str, device: torch.device, args: argparse.Namespace) -> list[dict[str, Any]]:
    case = build_case(name, device, args)
    N = case.n
    slow_n = N if args.slow_inputs <= 0 else min(N, args.slow_inputs)
    mem = args.max_memory_mib
    print(
        f"\n== {name}: {sum(p.numel() for p in case.model.parameters()):,} parameters, "
        f"{case.note or f'N={N}'}",
        flush=True,
    )

    # implementation -> (callable used for timing, callable whose result is checked, reference
    # to check it against, scale of its seconds to the full batch)
    impls: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}

    def add(
        impl: str, run: Callable[[], Any], check: str | None, scale: float = 1.0, note: str = ""
    ) -> None:
        impls[impl] = {"run": run, "check": check, "scale": scale, "note": note}

    add("train-step", train_step(case), None)
    add("ours-exact", lambda: ours(case, "exact", mem), "exact")
    twin = copy.deepcopy(case.model)  # its plan and proof outlive the other rows' first passes
    later_note = "a later pass over the same model (plan and self-check proof reused)"
    add("ours-exact-later", lambda: ours(case, "exact", mem, later=twin), "exact", note=later_note)
    if args.verify_rows:
        add(
            "ours-exact-noverify",
            lambda: ours(case, "exact", mem, verify=False),
            "exact",
            note="verify=False (no self-check backward)",
        )
    add(
        "ours-hutchinson",
        lambda: ours(case, "hutchinson", mem, probes=1),
        None,
        note="one probe; stochastic, not compared",
    )
    # Deterministic bounds of F, not estimates of it: timed, not compared.
    add(
        "ours-upper",
        lambda: ours(case, "upper", mem),
        None,
        note="deterministic upper bound of F (columns sqrt(p_c) e_c); a bound, not compared",
    )
    add(
        "ours-lower",
        lambda: ours(case, "lower", mem, rank=1),
        None,
        note="deterministic lower bound of F, rank 1 (top eigenpair of I(p)); "
        "a bound, not compared",
    )
    extra = set(args.extra)
    if "sample" in extra:
        add("ours-sample", lambda: ours(case, "sample", mem), None, note="one draw per input")
    if "empirical" in extra:
        add("ours-empirical", lambda: ours(case, "empirical", mem), "empirical")
        add(
            "ours-empirical-later",
            lambda: ours(case, "empirical", mem, later=twin),
            "empirical",
            note=later_note,
        )
        if args.verify_rows:
            add(
                "ours-empirical-noverify",
                lambda: ours(case, "empirical", mem, verify=False),
                "empirical",
                note="verify=False (no self-check backward)",
            )
    try:
        bp = backpack_model(case)
        add("backpack-diagggn-exact", lambda: backpack_run(bp, case, "DiagGGNExact"), "exact")
        if "sample" in extra:
            add(
                "backpack-diagggn-mc",
                lambda: backpack_run(bp, case, "DiagGGNMC"),
                None,
                note="one MC sample; stochastic, not compared",
            )
        if "empirical" in extra:
            add(
                "backpack-sum-grad-squared",
                lambda: backpack_run(bp, case, "SumGradSquared"),
                "empirical",
                note="max_rel_diff against ours-empirical",
            )
    except Skip as e:
        skipped["backpack-diagggn-exact"] = str(e)
    skipped["curvlinops-ggn-diagonal"] = (
        "curvlinops 3.x has no exact GGN-diagonal routine (only P matvecs with unit vectors); "
        "its vmap route is the vmap-exact row"
    )
    try:
        import curvlinops  # noqa: F401

        add(
            "curvlinops-hutchinson-diag",
            lambda: curvlinops_hutchinson(case),
            None,
            note="one GGN matvec; stochastic, not compared",
        )
    except ImportError as e:
        skipped["curvlinops-hutchinson-diag"] = f"curvlinops-for-pytorch is not importable ({e})"
    try:
        import nngeometry  # noqa: F401

        if case.kind == "bert":
            raise Skip("nngeometry has no Embedding layer and needs tensor inputs")
        add("nngeometry-pmatdiag", lambda: nngeometry_diag(case), "exact")
    except ImportError:
        skipped["nngeometry-pmatdiag"] = "nngeometry is not installed"
    except Skip as e:
        skipped["nngeometry-pmatdiag"] = str(e)
    scale = N / slow_n
    sub_note = (
        "" if slow_n == N else f"timed on {slow_n} of {N} inputs, seconds scaled by {scale:g}"
    )
    add("reference-loop", lambda: reference_loop(case, slow_n), "exact-sub", scale, sub_note)
    add(
        "vmap-exact",
        lambda: vmap_exact(case, slow_n, args.vmap_memory_mib),
        "exact-sub",
        scale,
        sub_note,
    )
    if args.only:
        impls = {
            k: v for k, v in impls.items() if k in args.only or k in ("train-step", "ours-exact")
        }

    # Correctness (also the warm-up) and peak memory.
    refs: dict[str, Diag] = {}
    results: dict[str, dict[str, Any]] = {}
    for impl, spec in list(impls.items()):
        t0 = time.perf_counter()
        try:
            out, peak = measure_peak(spec["run"], device)
        except Skip as e:
            skipped[impl] = str(e)
            del impls[impl]
            continue
        except Exception as e:
            traceback.print_exc()
            skipped[impl] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            del impls[impl]
            continue
        first = time.perf_counter() - t0
        spec["first"] = first
        if impl == "ours-exact":
            refs["exact"] = out
            refs["exact-sub"] = out if slow_n == N else ours(case, "exact", mem, 0, slow_n)
        if impl == "ours-empirical":
            refs["empirical"] = out
        diff = None
        if spec["check"] is not None and spec["check"] in refs:
            diff = max_rel_diff(out, refs[spec["check"]])
        results[impl] = {"peak_mib": None if peak is None else round(peak, 1), "max_rel_diff": diff}
        print(
            f"  {impl:28s} first run {first:8.3f} s  "
            f"peak {peak if peak is None else round(peak)} MiB"
            f"  max_rel_diff {diff if diff is None else f'{diff:.2e}'}",
            flush=True,
        )
        if diff is not None and diff > args.tolerance:
            print(f"  !! {impl} disagrees with ours ({diff:.2e} > {args.tolerance:g})", flush=True)
        del out

    # Timing: every round runs every implementation once, in the same order.
    budget = args.time_budget
    # A route whose checked run already took longer than the budget is timed by that run alone.
    times: dict[str, list[float]] = {
        k: [spec["first"] * spec["scale"]] if spec["first"] > budget else []
        for k, spec in impls.items()
    }
    for _r in range(args.repeats):
        for impl, spec in impls.items():
            if times[impl] and sum(times[impl]) / spec["scale"] > budget:
                continue  # a slow route keeps the rounds it already has (budget in measured s)
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            spec["run"]()
            sync(device)
            times[impl].append((time.perf_counter() - t0) * spec["scale"])
    step = statistics.median(times["train-step"])
    rows = []
    for impl, spec in impls.items():
        sec = statistics.median(times[impl])
        row = {
            "model": name,
            "implementation": impl,
            "seconds": sec,
            "ratio_to_step": sec / step,
            **results[impl],
            "n_inputs": N,
            "n_classes": case.n_classes,
            "repeats": len(times[impl]),
            "extrapolated": spec["scale"] != 1.0,
            "note": spec["note"] or None,
        }
        rows.append(row)
        print(f"  {impl:28s} {sec:9.4f} s  {sec / step:8.2f}x step", flush=True)
    for impl, why in skipped.items():
        rows.append(
            {
                "model": name,
                "implementation": impl,
                "seconds": None,
                "ratio_to_step": None,
                "peak_mib": None,
                "max_rel_diff": None,
                "n_inputs": N,
                "n_classes": case.n_classes,
                "repeats": 0,
                "extrapolated": False,
                "note": f"skipped: {why}",
            }
        )
        print(f"  {impl:28s} skipped: {why}", flush=True)
    for row in rows:
        row["setting"] = case.note or f"N={N}"
    if args.verify_rows and rows:
        methods = ["exact"] + (["empirical"] if "empirical" in extra else [])
        rows[0]["verify_pass_ratio"] = {
            method: verify_pass_ratio(case, method, mem, args.verify_batches, args.repeats, device)
            for method in methods
            if args.only is None or f"ours-{method}" in args.only
        }
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def versions() -> dict[str, str | None]:
    return base_versions(
        "transformers", "backpack-for-pytorch", "curvlinops-for-pytorch", "nngeometry"
    )


def write_markdown(path: str, report: dict[str, Any]) -> None:
    lines = [
        *report_header(report["name"], report),
        "Ratios are medians of interleaved rounds in one process, relative to a training step "
        "(forward + backward) on the same batch. `max_rel_diff` is against ours-exact "
        "(ours-empirical for SumGradSquared); `*` marks seconds scaled from a subset of the batch.",
        "",
        "| model | implementation | seconds | ratio to step | peak MiB | max rel diff | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        star = "*" if r.get("extrapolated") else ""
        lines.append(
            f"| {r['model']} | {r['implementation']} | {fmt(r['seconds'], '.4f')}{star} | "
            f"{fmt(r['ratio_to_step'], '.2f')} | {fmt(r['peak_mib'], '.0f')} | "
            f"{fmt(r['max_rel_diff'], '.1e')} | {r.get('note') or ''} |"
        )
    lines += ["", "Settings: " + "; ".join(f"{m}: {s}" for m, s in report["settings"].items()), ""]
    if report.get("verify_overhead"):
        cols = list(next(iter(report["verify_overhead"].values())))
        lines += [
            "Self-verification (the self-check of the first batch of a model's first pass, on "
            f"its first {VERIFY_ROWS} inputs): seconds with `verify=True` (the default) over "
            "seconds with `verify=False`, for the model's first pass over the benchmark's one "
            "batch, over that batch repeated, and for a later pass over the repeated batch (the "
            "structure proven by the first pass, so no check runs):",
            "",
            "| model / method | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
            "|---|" + "---:|" * len(cols),
            *(
                f"| {k} | " + " | ".join(fmt(v.get(c), ".3f") for c in cols) + " |"
                for k, v in report["verify_overhead"].items()
            ),
            "",
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--n", nargs="*", default=[], metavar="MODEL=N", help="batch size per model")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--slow-inputs",
        type=int,
        default=16,
        help="inputs the reference loop and vmap route are timed on (0: all)",
    )
    ap.add_argument("--max-memory-mib", type=float, default=2048.0, help="our engine's memory cap")
    ap.add_argument("--vmap-memory-mib", type=float, default=4096.0)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--bert-dir", default=None, help="MiniLM-L6 model directory (config + weights)")
    ap.add_argument(
        "--extra", nargs="*", default=["sample", "empirical"], choices=("sample", "empirical")
    )
    ap.add_argument("--only", nargs="*", default=None, help="implementations to run (debugging)")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument(
        "--time-budget",
        type=float,
        default=120.0,
        help="seconds after which a route is not repeated further",
    )
    ap.add_argument(
        "--no-verify-rows",
        dest="verify_rows",
        action="store_false",
        help="leave out the verify=False rows (self-verification overhead)",
    )
    ap.add_argument(
        "--verify-batches",
        type=int,
        default=8,
        help="batches of the pass whose self-check overhead is also reported",
    )
    ap.add_argument("--out", default=None, help="report name (default exact_diagonal_<cpu|gpu>)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; 1 is steadier on a shared machine)",
    )
    args = ap.parse_args(argv)
    args.n = {k: int(v) for k, v in (s.split("=") for s in args.n)}
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 everywhere, like the anchors' defaults
    torch.backends.cudnn.allow_tf32 = False
    name = args.out or f"exact_diagonal_{'gpu' if device.type == 'cuda' else 'cpu'}"
    command = " ".join(
        ["python -m benchmarks.exact_diagonal", *(argv if argv is not None else sys.argv[1:])]
    )
    rows: list[dict[str, Any]] = []
    settings = {}
    t0 = time.time()

    def write() -> None:
        """The report so far (rewritten after every model, so a crash keeps what was measured)."""
        overhead = {}
        for m in settings:
            model_rows = [r for r in rows if r["model"] == m]
            sec = {r["implementation"]: r["seconds"] for r in model_rows}
            passes = model_rows[0].get("verify_pass_ratio", {}) if model_rows else {}
            for method in ("exact", "empirical"):
                on, off = sec.get(f"ours-{method}"), sec.get(f"ours-{method}-noverify")
                if on and off:
                    first, later = passes.get(method, (None, None))
                    overhead[f"{m}/{method}"] = {
                        "one_batch": round(on / off, 3),
                        f"pass_of_{args.verify_batches}": None
                        if first is None
                        else round(first, 3),
                        f"later_pass_of_{args.verify_batches}": (
                            None if later is None else round(later, 3)
                        ),
                    }
        report = {
            "name": name,
            "verify_overhead": overhead,
            "command": command,
            "device": device_name(device),
            "versions": versions(),
            "settings": settings,
            "max_memory_mib": args.max_memory_mib,
            "repeats": args.repeats,
            "wall_seconds": round(time.time() - t0, 1),
            "rows": rows,
        }
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, name + ".json"), "w") as f:
            strict_json.dump(
                report,
                f,
                indent=1,
                default=lambda v: None if isinstance(v, float) and math.isnan(v) else v,
            )
        write_markdown(os.path.join(RESULTS, name + ".md"), report)

    for m in args.models:
        model_rows = run_model(m, device, args)
        settings[m] = model_rows[0]["setting"] if model_rows else ""
        rows += model_rows
        write()
        print(f"   ({time.time() - t0:.0f} s so far)", flush=True)
    print(f"\nwrote {os.path.join(RESULTS, name)}.json/.md in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
