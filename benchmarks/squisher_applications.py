"""The Fisher's other users with the Squisher beside the Fisher: merging, FISH masks, pruning.

Three applications, each with the Fisher (``exact``, on held-out training inputs), the Squisher
(B x Adam's ``exp_avg_sq`` of the fine-tune that made the model; free) and the paper's baseline,
over ``--seeds`` seeds (mean and standard error):

- merging: all-MiniLM-L6-v2 fine-tuned separately (own 2-class head each) on AG News classes
  {World, Sports}, AG News {Business, Sci/Tech} and SST-2; the bodies merged by Fisher-weighted
  averaging (floor 1e-6, Matena & Raffel's default) and by the plain average (BASELINE); each
  task keeps its own head on the merged body; mean held-out accuracy over the merged tasks.
- fish_mask: MiniLM on SST-2 fine-tuned with only 0.5% / 5% of the body's entries trainable (the
  head trains fully), the mask from the Fisher or the Squisher of a short full warm-up fine-tune,
  or random (BASELINE); SST-2 dev accuracy. Also the overlap of the Squisher's mask with the
  Fisher's.
- pruning: the reduced ResNet-18 trained on a CIFAR-10 subset, its conv and linear weights
  pruned 50% / 75% (global) by the score theta^2 F / 2 with the Fisher or the Squisher, or at
  random (BASELINE), then fine-tuned briefly; test accuracy before and after the fine-tune.

The paper (Li, Dangel, Tam, Raffel 2025) finds the Squisher comparable to the Fisher: better for
merging and Task2Vec, slightly worse for pruning. Results are written after every seed of every
setting, so a run cut short keeps what finished.

    python -m benchmarks.squisher_applications --device cuda --minilm-dir <MiniLM folder> \
        --data-dir <folder with ag_news/ and sst2/> --cifar-dir <folder with cifar10/>
    python -m benchmarks.squisher_applications --quick      # CPU smoke run, tiny subsets
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import math
import shlex
import statistics
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import lightning_fisher as lf
from benchmarks.common import device_name, versions
from lightning_fisher import _json as strict_json
from lightning_fisher.hf import text_batches
from lightning_fisher.masks import MaskedUpdate, random_mask
from recipes.data import CIFAR10_CLASSES, CIFAR10_TARBALL
from recipes.models import ReducedResNet18
from recipes.neuromanifold_bounds import (
    default_data_dir,
    load_minilm,
    load_texts,
    tiny_random_bert,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "squisher_applications"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

#: (setting name, dataset, classes kept (relabelled 0..k-1))
TASKS = {
    "ag_news_world_sports": ("ag_news", (0, 1)),
    "ag_news_business_scitech": ("ag_news", (2, 3)),
    "sst2": ("sst2", (0, 1)),
}
MERGES = {
    "ag_news_world_sports+ag_news_business_scitech": (
        "ag_news_world_sports",
        "ag_news_business_scitech",
    ),
    "ag_news_world_sports+ag_news_business_scitech+sst2": tuple(TASKS),
}
#: the paper's Squisher-versus-Fisher relation per application, in the verdicts' words
EXPECTED = {"merging": "beats", "fish_mask": "ties with", "pruning": "trails"}
PAPER = {
    "merging": "the Squisher better than the Fisher",
    "fish_mask": "the Squisher comparable to the Fisher",
    "pruning": "the Squisher slightly worse than the Fisher",
}


@dataclass
class Sizes:
    max_len: int = 64
    batch: int = 32
    train_n: int = 3500  # training rows per text task
    eval_n: int = 1000  # held-out rows per text task (SST-2 dev has 872)
    fisher_n: int = 1000  # inputs of the exact Fisher
    ft_steps: int = 250  # full fine-tune per task (merging)
    lr: float = 1e-4
    warm_steps: int = 100  # full warm-up before the FISH masks
    mask_steps: int = 300
    mask_lr: float = 5e-4
    keeps: tuple[float, ...] = (0.005, 0.05)
    epsilon: float = 1e-6
    cifar_train_per_class: int = 2000
    cifar_test_per_class: int = 200
    cifar_batch: int = 256
    cifar_steps: int = 1500
    cifar_lr: float = 1e-3
    cifar_fisher_n: int = 1000
    prune_amounts: tuple[float, ...] = (0.5, 0.75)
    prune_ft_steps: int = 200
    prune_lr: float = 5e-4


QUICK = Sizes(
    max_len=32,
    batch=8,
    train_n=48,
    eval_n=32,
    fisher_n=16,
    ft_steps=4,
    warm_steps=3,
    mask_steps=4,
    cifar_train_per_class=24,
    cifar_test_per_class=8,
    cifar_batch=48,
    cifar_steps=12,
    cifar_fisher_n=48,
    prune_ft_steps=4,
)


# Data -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _texts(dataset: str, split: str, data_dir: Path, seed: int) -> tuple[list[str], list[int]]:
    return load_texts(dataset, split, data_dir, None, seed)


def text_task(
    task: str, split: str, n: int, data_dir: Path, seed: int
) -> tuple[list[str], list[int]]:
    """Rows of one text task, labels relabelled to 0..k-1 (``split``: train or eval)."""
    dataset, classes = TASKS[task]
    texts, labels = _texts(dataset, split, data_dir, seed)
    keep = [(t, classes.index(y)) for t, y in zip(texts, labels) if y in classes][:n]
    return [t for t, _ in keep], [y for _, y in keep]


def load_cifar_subset(
    data_dir: Path, train_per_class: int, test_per_class: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """The first images of each class (by file number) of the CIFAR-10 JPEG tarball, decoded in
    one pass (only the kept files), normalised per channel: split -> (x, y)."""
    from PIL import Image

    path = data_dir / CIFAR10_TARBALL
    if not path.exists():
        raise SystemExit(
            f"{path} does not exist; point --cifar-dir (or --data-dir) at the folder with cifar10/."
        )
    quota = {"train": train_per_class, "test": test_per_class}
    rows: dict[str, list[tuple[str, int, np.ndarray]]] = {"train": [], "test": []}
    index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or not member.name.endswith(".jpg") or len(parts) < 3:
                continue
            split, cls, stem = parts[-3], parts[-2], parts[-1][:-4]
            if split not in quota or cls not in index or not stem.isdigit():
                continue
            if int(stem) >= quota[split]:
                continue
            f = tar.extractfile(member)
            assert f is not None
            img = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"), dtype=np.uint8)
            rows[split].append((member.name, index[cls], img))
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    out = {}
    for split, items in rows.items():
        items.sort(key=lambda r: r[0])
        x = torch.from_numpy(np.stack([r[2] for r in items])).permute(0, 3, 1, 2).float() / 255
        out[split] = ((x - mean) / std, torch.tensor([r[1] for r in items]))
    return out


# Training and evaluation ----------------------------------------------------------------------
def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cycle(batches: Sequence[Any], seed: int) -> Iterator[Any]:
    """The batches in a new seeded order every epoch, forever."""
    g = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(batches), generator=g).tolist():
            yield batches[i]


def loss_of(model: nn.Module, batch: Any) -> Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def train(
    model: nn.Module,
    batches: Sequence[Any],
    steps: int,
    lr: float,
    seed: int,
    device: torch.device,
    masked: MaskedUpdate | None = None,
) -> torch.optim.Optimizer:
    """``steps`` Adam steps (bf16 autocast on a GPU); with ``masked``, only its True entries
    move. Returns the optimizer (its ``exp_avg_sq`` is the Squisher)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    if masked is not None:
        masked.snapshot(model)
    model.train()
    data = cycle(batches, seed)
    for _ in range(steps):
        batch = next(data)
        with autocast(device):
            loss = loss_of(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if masked is not None:
            masked.mask_gradients(model)
        opt.step()
        if masked is not None:
            masked.after_step(model, [opt])
    return opt


@torch.no_grad()
def accuracy(model: nn.Module, batches: Sequence[Any], device: torch.device) -> float:
    """Percent correct."""
    model.eval()
    right = total = 0
    for batch in batches:
        with autocast(device):
            if isinstance(batch, dict):
                y = batch["labels"]
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            else:
                x, y = batch
                logits = model(x)
        right += int((logits.argmax(-1) == y).sum())
        total += len(y)
    return 100.0 * right / total


def exact_fisher(model: nn.Module, batches: Sequence[Any]) -> lf.FisherDiagonal:
    """The exact Fisher diagonal in float32 (no autocast)."""
    return lf.estimate_fisher(model, batches, method="exact", progress=False)


def tensor_batches(x: Tensor, y: Tensor, batch: int, device: torch.device) -> list[Any]:
    return [
        (x[i : i + batch].to(device), y[i : i + batch].to(device)) for i in range(0, len(y), batch)
    ]


# The applications -----------------------------------------------------------------------------
class Recorder:
    """Per-seed values; writes the aggregated report after every ``add_many``."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out, self.meta = out, meta
        self.raw: list[dict[str, Any]] = []

    def add_many(self, values: list[dict[str, Any]]) -> None:
        self.raw.extend(values)
        write(self.out, self.meta, self.raw)


def fresh_head(pretrained: nn.Module, seed: int) -> nn.Module:
    model = copy.deepcopy(pretrained)
    torch.manual_seed(seed)
    model.classifier.reset_parameters()
    return model


def run_merging(
    args: argparse.Namespace,
    sz: Sizes,
    pretrained: nn.Module,
    tok: Any,
    rec: Recorder,
    seeds: Sequence[int],
) -> None:
    device = torch.device(args.device)
    for seed in seeds:
        t0 = time.perf_counter()
        models, fishers, squishers, evals = {}, {}, {}, {}
        individual = {}
        for t_i, task in enumerate(TASKS):
            texts, labels = text_task(task, "train", sz.train_n + sz.fisher_n, args.data_dir, seed)
            train_b = batch_to(
                text_batches(tok, texts[: sz.train_n], labels[: sz.train_n], sz.batch, sz.max_len),
                device,
            )
            fisher_b = batch_to(
                text_batches(tok, texts[sz.train_n :], labels[sz.train_n :], sz.batch, sz.max_len),
                device,
            )
            et, el = text_task(task, "eval", sz.eval_n, args.data_dir, 0)
            evals[task] = batch_to(text_batches(tok, et, el, 64, sz.max_len), device)
            model = fresh_head(pretrained, 1000 * seed + t_i)
            opt = train(model, train_b, sz.ft_steps, sz.lr, seed, device)
            squishers[task] = lf.fisher_from_optimizer(opt, model, sz.batch)
            del opt
            fishers[task] = exact_fisher(model, fisher_b)
            individual[task] = accuracy(model, evals[task], device)
            models[task] = model
        body = [n for n, _ in pretrained.named_parameters() if not n.startswith("classifier.")]
        values = []
        for setting, tasks in MERGES.items():
            ms = [models[t] for t in tasks]
            ones = [{n: torch.ones_like(p) for n, p in m.named_parameters()} for m in ms]
            for method, fs in (
                ("FISHER", [fishers[t] for t in tasks]),
                ("SQUISHER", [squishers[t] for t in tasks]),
                ("BASELINE", ones),
            ):
                merged = copy.deepcopy(ms[0])
                lf.fisher_merge(ms, fs, names=body, into=merged, epsilon=sz.epsilon)
                accs = []
                for t, m in zip(tasks, ms):
                    merged.classifier.load_state_dict(m.classifier.state_dict())
                    accs.append(accuracy(merged, evals[t], device))
                values.append(
                    _row("merging", setting, method, "mean_acc", seed, statistics.fmean(accs))
                )
                del merged
            values.append(
                _row(
                    "merging",
                    setting,
                    "REFERENCE",
                    "unmerged_mean_acc",
                    seed,
                    statistics.fmean(individual[t] for t in tasks),
                )
            )
        rec.add_many(values)
        print(f"merging seed {seed}: {time.perf_counter() - t0:.1f}s", flush=True)
        del models, fishers, squishers


def run_fish_mask(
    args: argparse.Namespace,
    sz: Sizes,
    pretrained: nn.Module,
    tok: Any,
    rec: Recorder,
    seeds: Sequence[int],
) -> None:
    device = torch.device(args.device)
    for seed in seeds:
        t0 = time.perf_counter()
        texts, labels = text_task("sst2", "train", sz.train_n + sz.fisher_n, args.data_dir, seed)
        train_b = batch_to(
            text_batches(tok, texts[: sz.train_n], labels[: sz.train_n], sz.batch, sz.max_len),
            device,
        )
        fisher_b = batch_to(
            text_batches(tok, texts[sz.train_n :], labels[sz.train_n :], sz.batch, sz.max_len),
            device,
        )
        et, el = text_task("sst2", "eval", sz.eval_n, args.data_dir, 0)
        eval_b = batch_to(text_batches(tok, et, el, 64, sz.max_len), device)
        start = fresh_head(pretrained, 2000 + seed)
        warm = copy.deepcopy(start)
        opt = train(warm, train_b, sz.warm_steps, sz.lr, seed, device)
        body = [n for n, _ in warm.named_parameters() if not n.startswith("classifier.")]
        squisher = lf.fisher_from_optimizer(opt, warm, sz.batch)
        del opt
        fisher = exact_fisher(warm, fisher_b)
        del warm
        shapes = {n: p for n, p in start.named_parameters() if n in body}
        values = []
        for keep in sz.keeps:
            setting = f"sst2_keep_{keep * 100:g}%"
            masks = {
                "FISHER": lf.fish_mask(fisher, keep, names=body),
                "SQUISHER": lf.fish_mask(squisher, keep, names=body),
                "BASELINE": random_mask(
                    shapes, keep, generator=torch.Generator().manual_seed(seed)
                ),
            }
            for method, mask in masks.items():
                model = copy.deepcopy(start)
                train(model, train_b, sz.mask_steps, sz.mask_lr, seed, device, MaskedUpdate(mask))
                values.append(
                    _row(
                        "fish_mask",
                        setting,
                        method,
                        "accuracy",
                        seed,
                        accuracy(model, eval_b, device),
                    )
                )
                del model
            inter = sum(int((masks["FISHER"][n] & masks["SQUISHER"][n]).sum()) for n in body)
            kept = sum(int(masks["FISHER"][n].sum()) for n in body)
            values.append(
                _row(
                    "fish_mask",
                    setting,
                    "SQUISHER",
                    "overlap_with_fisher_mask",
                    seed,
                    inter / max(kept, 1),
                )
            )
        rec.add_many(values)
        print(f"fish_mask seed {seed}: {time.perf_counter() - t0:.1f}s", flush=True)


def run_pruning(
    args: argparse.Namespace,
    sz: Sizes,
    data: dict[str, tuple[Tensor, Tensor]],
    rec: Recorder,
    seeds: Sequence[int],
) -> None:
    device = torch.device(args.device)
    x_train, y_train = data["train"]
    test_b = tensor_batches(*data["test"], 500, device)
    for seed in seeds:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(y_train), generator=g)
        n_fisher = min(sz.cifar_fisher_n, len(order) // 4)
        fit_idx, fisher_idx = order[n_fisher:], order[:n_fisher]
        train_b = tensor_batches(x_train[fit_idx], y_train[fit_idx], sz.cifar_batch, device)
        fisher_b = tensor_batches(x_train[fisher_idx], y_train[fisher_idx], 250, device)
        torch.manual_seed(seed)
        model = ReducedResNet18().to(device)
        opt = train(model, train_b, sz.cifar_steps, sz.cifar_lr, seed, device)
        squisher = lf.fisher_from_optimizer(opt, model, sz.cifar_batch)
        del opt
        fisher = exact_fisher(model, fisher_b)
        dense = accuracy(model, test_b, device)
        names = [n for n, p in model.named_parameters() if p.ndim >= 2]
        scores = {
            "FISHER": lf.fisher_pruning_scores(model, fisher, names),
            "SQUISHER": lf.fisher_pruning_scores(model, squisher, names),
            "BASELINE": {
                n: torch.rand(p.shape, generator=g).to(device)
                for n, p in model.named_parameters()
                if n in names
            },
        }
        values = [_row("pruning", "cifar10_dense", "REFERENCE", "accuracy", seed, dense)]
        for amount in sz.prune_amounts:
            setting = f"cifar10_prune_{amount * 100:g}%"
            for method, s in scores.items():
                pruned = copy.deepcopy(model)
                lf.fisher_prune(pruned, s, amount)
                values.append(
                    _row(
                        "pruning",
                        setting,
                        method,
                        "acc_pruned",
                        seed,
                        accuracy(pruned, test_b, device),
                    )
                )
                train(pruned, train_b, sz.prune_ft_steps, sz.prune_lr, seed, device)
                values.append(
                    _row(
                        "pruning",
                        setting,
                        method,
                        "acc_finetuned",
                        seed,
                        accuracy(pruned, test_b, device),
                    )
                )
                del pruned
        rec.add_many(values)
        print(f"pruning seed {seed}: {time.perf_counter() - t0:.1f}s", flush=True)


def batch_to(batches: list[dict[str, Tensor]], device: torch.device) -> list[dict[str, Tensor]]:
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def _row(
    app: str, setting: str, method: str, metric: str, seed: int, value: float
) -> dict[str, Any]:
    return {
        "application": app,
        "setting": setting,
        "method": method,
        "metric": metric,
        "seed": seed,
        "value": float(value),
    }


# Report ---------------------------------------------------------------------------------------
def aggregate(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard error over seeds per (application, setting, method, metric)."""
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    for r in raw:
        key = (r["application"], r["setting"], r["method"], r["metric"])
        groups.setdefault(key, []).append(r["value"])
    rows = []
    for (app, setting, method, metric), vals in groups.items():
        sem = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
        rows.append(
            {
                "application": app,
                "setting": setting,
                "method": method,
                "metric": metric,
                "value": statistics.fmean(vals),
                "sem": sem,
                "n_seeds": len(vals),
            }
        )
    return rows


def verdicts(rows: list[dict[str, Any]]) -> dict[str, str]:
    """One sentence per application: our ordering of Squisher, Fisher and baseline next to the
    paper's, setting by setting (a difference within the combined standard error is a tie)."""
    main_metric = {"merging": "mean_acc", "fish_mask": "accuracy", "pruning": "acc_finetuned"}
    out = {}
    for app, metric in main_metric.items():
        cells = {}
        for r in rows:
            if r["application"] == app and r["metric"] == metric:
                cells.setdefault(r["setting"], {})[r["method"]] = r
        parts = []
        for setting, by in cells.items():
            if not all(m in by for m in ("FISHER", "SQUISHER", "BASELINE")):
                continue
            f, s, b = by["FISHER"], by["SQUISHER"], by["BASELINE"]
            noise = math.hypot(f["sem"] or 0.0, s["sem"] or 0.0)
            diff = s["value"] - f["value"]
            rel = "ties with" if abs(diff) <= noise else ("beats" if diff > 0 else "trails")
            if min(f["value"], s["value"]) > b["value"]:
                base = f"both above the baseline {b['value']:.2f}"
            elif max(f["value"], s["value"]) < b["value"]:
                base = f"the baseline {b['value']:.2f} above both (the paper has both above it)"
            else:
                base = f"the baseline {b['value']:.2f} between them"
            want = EXPECTED[app]
            if rel == want:
                verdict = "the paper's ordering"
            elif rel == "ties with" or want == "ties with":
                verdict = f"comparable, where the paper has it {PAPER[app].split(' ', 2)[2]}"
            else:
                verdict = f"the opposite of the paper ({PAPER[app]})"
            parts.append(
                f"{setting}: Squisher {s['value']:.2f} {rel} Fisher {f['value']:.2f} "
                f"({diff:+.2f}, noise {noise:.2f}), {base}: {verdict}"
            )
        if parts:
            out[app] = f"Paper: {PAPER[app]}. Here: " + "; ".join(parts) + "."
    return out


def write(out: Path, meta: dict[str, Any], raw: list[dict[str, Any]]) -> None:
    rows = aggregate(raw)
    summary = verdicts(rows)
    payload = {**meta, "rows": rows, "per_seed": raw, "agreement": summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(strict_json.dumps(payload, indent=2) + "\n")
    lines = [
        "# The Squisher beside the Fisher: merging, FISH masks, pruning",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Device: {meta['device']}. Sizes: "
        + ", ".join(f"{k}={v}" for k, v in meta["sizes"].items())
        + ".",
        "",
        "| application | setting | method | metric | value | sem | n_seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sem = "n/a" if r["sem"] is None else f"{r['sem']:.2f}"
        lines.append(
            f"| {r['application']} | {r['setting']} | {r['method']} | {r['metric']} | "
            f"{r['value']:.2f} | {sem} | {r['n_seeds']} |"
        )
    lines += [
        "",
        "FISHER: the exact Fisher diagonal on held-out training inputs. SQUISHER: B x "
        "Adam's bias-corrected exp_avg_sq of the fine-tune that made the model (for FISH "
        "masks: of the warm-up). BASELINE: plain averaging, a random mask, random pruning. "
        "REFERENCE rows: the unmerged fine-tunes and the dense network.",
        "",
    ]
    for app, sentence in summary.items():
        lines += [f"- **{app}**: {sentence}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: tiny subsets, few steps, a random 2-layer BERT unless --minilm-dir",
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="folder with ag_news/ sst2/ cifar10/"
    )
    p.add_argument(
        "--cifar-dir",
        type=Path,
        default=None,
        help="folder with cifar10/cifar10-jpg.tar.gz (default: --data-dir)",
    )
    p.add_argument(
        "--minilm-dir", default=None, help="all-MiniLM-L6-v2 folder (default: the wheel)"
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=["merging", "fish_mask", "pruning"],
        choices=["merging", "fish_mask", "pruning"],
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=420.0,
        help="no new seed starts unless it would end (at the last seed's pace) within these "
        "seconds of the start; the results so far are kept",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the other applications' rows already in the output (a run split over calls)",
    )
    p.add_argument("--out", type=Path, default=None, help="output path without suffix")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    sz = QUICK if args.quick else Sizes()
    out = args.out or (
        DEFAULT_OUT.with_name(DEFAULT_OUT.name + "_quick") if args.quick else DEFAULT_OUT
    )
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    meta = {
        "command": "python -m benchmarks.squisher_applications "
        + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "device": device_name(device),
        "versions": versions("transformers"),
        "sizes": {k: v for k, v in asdict(sz).items()},
        "seeds": args.seeds,
    }
    rec = Recorder(out, meta)
    if args.append and out.with_suffix(".json").is_file():
        # keep the rows of the applications this run does not redo (a run split over calls)
        old = json.loads(out.with_suffix(".json").read_text())
        rec.raw = [r for r in old.get("per_seed", []) if r["application"] not in args.only]
        meta["command"] = f"{old.get('command')} ; {meta['command']}"
    t0 = time.perf_counter()
    pretrained: nn.Module | None = None
    tok: Any = None
    if {"merging", "fish_mask"} & set(args.only):
        if args.quick and args.minilm_dir is None:
            # the smoke run's plumbing is the same on a 2-layer random BERT; MiniLM on two
            # shared CPU cores takes seconds per step
            texts = [
                t for task in TASKS for t in text_task(task, "train", 200, args.data_dir, 0)[0]
            ]
            pretrained, tok = tiny_random_bert(2, texts, sz.max_len, 0)
        else:
            pretrained, tok = load_minilm(2, args.minilm_dir, 0)
        pretrained.to(device)
    cifar = None
    if "pruning" in args.only:
        cifar = load_cifar_subset(
            args.cifar_dir or args.data_dir, sz.cifar_train_per_class, sz.cifar_test_per_class
        )
    print(f"data and model loaded: {time.perf_counter() - t0:.1f}s", flush=True)
    # Seeds outermost: a run cut short keeps every application at the seeds that finished.
    last = 0.0
    for seed in range(args.seeds):
        start = time.perf_counter()
        if seed > 0 and start - t0 + last > args.time_budget:
            print(
                f"another seed ({last:.0f}s) would pass the {args.time_budget:.0f}s budget: "
                f"stopping after {seed} seeds",
                flush=True,
            )
            break
        if pretrained is not None and "merging" in args.only:
            run_merging(args, sz, pretrained, tok, rec, [seed])
        if pretrained is not None and "fish_mask" in args.only:
            run_fish_mask(args, sz, pretrained, tok, rec, [seed])
        if cifar is not None:
            run_pruning(args, sz, cifar, rec, [seed])
        last = time.perf_counter() - start
    print(f"total {time.perf_counter() - t0:.1f}s; wrote {out}.json and .md", flush=True)
    return aggregate(rec.raw)


if __name__ == "__main__":
    main()
