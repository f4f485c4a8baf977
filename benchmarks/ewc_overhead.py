"""EWC overhead per training step, and the EWC-update-equals-explicit-loss check.

Writes ``results/ewc_overhead.{json,md}`` (one row per setting with ``device``,
``model``, ``precision`` and ``ratio`` = step time with EWC / step time without). Rows of earlier
runs on other devices or settings are kept, so the CPU and GPU runs share one report::

    python -m benchmarks.ewc_overhead --device cpu                                   # MLP, 32-true
    python -m benchmarks.ewc_overhead --device cuda --precisions 16-mixed bf16-mixed # BERT, 22.7M

CPU: van de Ven's MLP 784-400-400-10, batch 128. GPU: a BERT classifier with MiniLM-L6's sizes
(6 layers, width 384, 22.7M parameters, random weights, Hugging Face ``transformers``), batch 32 of
128 tokens, AdamW. ``--cpu-kernel`` times ``EWC(cpu_kernel=True)`` (the one-pass C kernel;
its own row). ``--tiny`` shrinks either setting to toy sizes (a smoke test of the script).

Timing: a Lightning ``Trainer`` runs ``--steps`` optimizer steps; a callback times each step from
``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, EWC's gradient hook, the
optimizer step, logging; CUDA synchronised at both ends). EWC's gradient hook runs on odd steps
only, so steps with and without it alternate in one run under the same machine conditions (the
shared CPU this was written on is very noisy). The first ``--warmup`` steps are dropped; ``ratio``
is the median over ``--rounds`` runs of (median odd-step time / median even-step time), with
``ratio_min``/``ratio_max`` their range; ``ms_hook`` is the median time of EWC's hook itself, and
``ratio_control`` the same ratio from interleaved runs with ``lam=0`` (the hook returns at once):
the protocol's noise floor. EWC holds one consolidated task (a
random positive Fisher, so no estimation is timed), adds ``lam F (theta - theta*)`` to the
gradients and logs ``ewc/penalty`` every ``log_every_n_steps`` (50) steps.

Check (``checks`` in the report): from the same start, ``--check-steps`` AdamW steps with
``EWC(apply="grad")`` and with ``loss + ewc.penalty(module)`` (``apply="loss"``) must give the
same parameters. Both routes compute the same gradient up to float32 rounding (the order of two
additions), and under AMP a one-ulp difference in a weight can flip its 16-bit rounding in the
next forward, so their largest difference is compared with two baselines: a rerun of the gradient
route (run-to-run noise of the device) and a gradient-route run with lambda larger by one part in
a million (how far rounding-sized differences drift); ``equal`` means no further apart than those
(or 1e-6), while a run without EWC is at least 10x further. On CUDA it runs under ``16-mixed``
(GradScaler) with AdamW and with fused AdamW (which unscales inside ``step``), with deterministic
algorithms on.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the check

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import lightning_fisher as lf
from benchmarks.bench_models import MINILM, mlp
from benchmarks.common import device_name, versions
from lightning_fisher import _json as strict_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NAME = "ewc_overhead"


# Model, data, module -------------------------------------------------------------------------
def build_model(kind: str, tiny: bool) -> tuple[nn.Module, str]:
    if kind == "mlp":
        widths = (784, 32, 10) if tiny else (784, 400, 400, 10)
        return mlp(widths), "mlp-" + "-".join(map(str, widths))
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    sizes = dict(MINILM)
    if tiny:
        sizes.update(
            vocab_size=500,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    model = BertForSequenceClassification(BertConfig(num_labels=4, **sizes))
    return model, "bert-tiny" if tiny else "bert-minilm-l6"


class Batches(Dataset):
    """Pre-built batches (already on the device), one per index."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        return self.batches[i]


def make_batches(
    kind: str, n: int, batch_size: int, seq_len: int, vocab: int, device: torch.device
) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    batches: list[Any] = []
    for _ in range(n):
        if kind == "mlp":
            x = torch.randn(batch_size, 784, generator=gen)
            batches.append(
                (x.to(device), torch.randint(0, 10, (batch_size,), generator=gen).to(device))
            )
        else:
            ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
            batches.append(
                {
                    "input_ids": ids.to(device),
                    "attention_mask": torch.ones_like(ids).to(device),
                    "labels": torch.randint(0, 4, (batch_size,), generator=gen).to(device),
                }
            )
    return DataLoader(Batches(batches), batch_size=None, shuffle=False)


class Module(pl.LightningModule):
    """Cross-entropy training of ``model``; ``penalty`` (an ``EWC``) is added to the loss if set."""

    def __init__(self, model: nn.Module, optimizer: str, lr: float) -> None:
        super().__init__()
        self.model = model
        self.optimizer_name = optimizer
        self.lr = lr
        self.penalty: lf.EWC | None = None

    def forward(self, batch: Any) -> Tensor:
        if isinstance(batch, dict):
            return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return self.model(batch)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        labels = batch["labels"] if isinstance(batch, dict) else batch[1]
        loss = nn.functional.cross_entropy(
            self(batch if isinstance(batch, dict) else batch[0]), labels
        )
        if self.penalty is not None:
            loss = loss + self.penalty.penalty(self)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        fused = self.optimizer_name == "adamw-fused"
        return torch.optim.AdamW(
            self.parameters(), lr=self.lr, **({"fused": True} if fused else {})
        )


class StepTimer(pl.Callback):
    """Seconds of every training step (forward, backward, optimizer step, logging), by step."""

    def __init__(self) -> None:
        self.times: list[tuple[int, float]] = []
        self._start = 0.0

    @staticmethod
    def _sync(module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._sync(pl_module)
        # global_step was incremented by this batch's optimizer step
        self.times.append((trainer.global_step - 1, time.perf_counter() - self._start))


class OddSteps(pl.Callback):
    """Runs EWC's gradient hook on odd optimizer steps only, so that steps with and without EWC
    alternate within one run and share the machine's conditions (a shared CPU is noisy); also
    times the hook itself."""

    def __init__(self, ewc: lf.EWC) -> None:
        self.ewc = ewc
        self.hook_times: list[float] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ewc.on_fit_start(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.global_step % 2 == 1:
            StepTimer._sync(pl_module)
            start = time.perf_counter()
            self.ewc.on_before_optimizer_step(trainer, pl_module, optimizer)
            StepTimer._sync(pl_module)
            self.hook_times.append(time.perf_counter() - start)


def consolidated_ewc(
    module: Module, lam: float, apply: str = "grad", cpu_kernel: bool = False
) -> lf.EWC:
    """An EWC holding one task: a random positive Fisher anchored at the current parameters."""
    gen = torch.Generator().manual_seed(1)
    fisher = lf.FisherDiagonal(
        {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in module.named_parameters()}
    )
    ewc = lf.EWC(lam=lam, apply=apply, consolidate_on_fit_end=False, cpu_kernel=cpu_kernel)
    ewc.consolidate(module, fisher=fisher)
    return ewc


def fit(
    module: Module,
    data: DataLoader,
    callbacks: list[pl.Callback],
    args: argparse.Namespace,
    precision: str,
    steps: int,
) -> None:
    cpu_fp16 = args.device == "cpu" and precision == "16-mixed"
    # Lightning maps "16-mixed" to bf16 on CPU; the explicit plugin keeps fp16 with a GradScaler.
    amp = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        **(amp if cpu_fp16 else {"precision": precision}),
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    ).fit(module, data)


# Measurements --------------------------------------------------------------------------------
def overhead_row(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    model, name = build_model(args.model, args.tiny)
    device = torch.device(args.device)
    base = Module(model.to(device), "adamw", 1e-4)
    vocab = model.config.vocab_size if hasattr(model, "config") else 0
    data = make_batches(args.model, args.steps, args.batch_size, args.seq_len, vocab, device)
    times: dict[bool, list[float]] = {False: [], True: []}
    ratios, controls, hooks = [], [], []
    for _ in range(args.rounds):
        # lam = 0 makes the hook return at once: the same protocol without EWC's work, whose
        # odd/even ratio is the method's noise floor
        for lam in (args.lam, 0.0):
            module = copy.deepcopy(base)
            timer, odd = (
                StepTimer(),
                OddSteps(consolidated_ewc(module, lam, "grad", args.cpu_kernel)),
            )
            fit(module, data, [odd, timer], args, precision, args.steps)
            split: dict[bool, list[float]] = {False: [], True: []}
            for step, seconds in timer.times[args.warmup :]:
                split[step % 2 == 1].append(seconds)
            ratio = statistics.median(split[True]) / statistics.median(split[False])
            if lam == 0.0:
                controls.append(ratio)
                continue
            for k in split:
                times[k] += split[k]
            ratios.append(ratio)
            hooks += odd.hook_times[args.warmup // 2 :]
    return {
        "device": args.device,
        "model": name,
        "precision": precision,
        "ewc_update": "C kernel" if args.cpu_kernel else "torch ops",
        # the median of the per-run ratios: robust to load that changes between runs
        "ratio": round(statistics.median(ratios), 4),
        "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4),
        "ms_without": round(1e3 * statistics.median(times[False]), 3),
        "ms_with": round(1e3 * statistics.median(times[True]), 3),
        "ms_hook": round(1e3 * statistics.median(hooks), 3),
        "ratio_control": round(statistics.median(controls), 4),
        "params": sum(p.numel() for p in model.parameters()),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        # 1-minute load average at the end: context for timings on a shared machine
        "load_average": round(os.getloadavg()[0], 1),
    }


def route_check(args: argparse.Namespace, precision: str, optimizer: str) -> dict[str, Any]:
    """Parameters after ``--check-steps`` steps: gradient route vs explicit loss vs rerun vs no EWC."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    model, name = build_model(args.model, args.tiny)
    device = torch.device(args.device)
    base = Module(model.to(device), optimizer, 1e-3)
    vocab = model.config.vocab_size if hasattr(model, "config") else 0
    data = make_batches(args.model, args.check_steps, args.batch_size, args.seq_len, vocab, device)
    start = {n: p.detach().clone() for n, p in base.named_parameters()}

    def run(route: str) -> dict[str, Tensor]:
        torch.manual_seed(0)
        module = copy.deepcopy(base)
        cbs: list[pl.Callback] = []
        if route == "grad":
            cbs.append(consolidated_ewc(module, args.check_lam, "grad"))
        elif route == "perturbed":  # lambda off by 1e-6 (relative): rounding-sized differences
            cbs.append(consolidated_ewc(module, args.check_lam * (1 + 1e-6), "grad"))
        elif route == "loss":
            ewc = consolidated_ewc(module, args.check_lam, "loss")
            module.penalty = ewc
            cbs.append(ewc)
        fit(module, data, cbs, args, precision, args.check_steps)
        return {n: p.detach().float().clone() for n, p in module.named_parameters()}

    grad, loss, rerun, plain = run("grad"), run("loss"), run("grad"), run("none")
    perturbed = run("perturbed")

    def diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
        return max(float((a[k] - b[k].to(a[k].device)).abs().max()) for k in a)

    routes, noise, effect = diff(grad, loss), diff(grad, rerun), diff(grad, plain)
    rounding = diff(grad, perturbed)
    torch.use_deterministic_algorithms(False)
    return {
        "device": args.device,
        "model": name,
        "precision": precision,
        "optimizer": optimizer,
        "steps": args.check_steps,
        "lam": args.check_lam,
        "max_abs_diff_routes": routes,
        "max_abs_diff_rerun": noise,
        "max_abs_diff_lam_1e-6": rounding,
        "max_abs_diff_no_ewc": effect,
        "max_abs_update": diff(grad, {k: v.float() for k, v in start.items()}),
        # equal: no further apart than two identical runs, or than a run whose lambda differs by
        # one part in a million (how far rounding-sized gradient differences drift under AMP),
        # while EWC itself moves the parameters by far more
        "equal": bool(routes <= max(4 * noise, 4 * rounding, 1e-6) and effect > 10 * routes),
    }


# Report --------------------------------------------------------------------------------------
def merge(
    old: list[dict[str, Any]], new: list[dict[str, Any]], keys: tuple[str, ...]
) -> list[dict[str, Any]]:
    def key(r: dict[str, Any]) -> tuple[Any, ...]:  # rows from before `ewc_update`: torch ops
        return tuple(r.get(k, "torch ops" if k == "ewc_update" else None) for k in keys)

    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def write_markdown(path: str, report: dict[str, Any]) -> None:
    lines = [
        f"# {report['name']}",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in report["commands"]) + ".",
        "",
        "Devices: " + "; ".join(f"{k}: {v}" for k, v in report["devices"].items()) + ".",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + ".",
        "",
        "`ratio`: median time of steps with EWC's gradient hook (one consolidated task) over the "
        "median of steps without it, alternating step by step within each run; the median over "
        "runs, and their range. `EWC update`: PyTorch's ops (the default) or the one-pass C kernel "
        "(`EWC(cpu_kernel=True)`, `--cpu-kernel`). `ms in EWC hook`: median time of the hook itself. "
        "`control`: the same "
        "ratio in interleaved runs with lam = 0 (the hook returns at once), the protocol's noise "
        "floor. `load`: the "
        "machine's 1-minute load average at the end of the run.",
        "",
        "| device | model | params | precision | EWC update | ms without | ms with | ms in EWC hook | ratio | range | control | load |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['device']} | {r['model']} | {r['params'] / 1e6:.1f}M | {r['precision']} | "
            f"{r.get('ewc_update', 'torch ops')} | {r['ms_without']:.2f} | {r['ms_with']:.2f} | {r.get('ms_hook', float('nan')):.3f} | "
            f"{r['ratio']:.3f} | "
            f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {r.get('ratio_control', float('nan')):.3f} | "
            f"{r.get('load_average', '-')} |"
        )
    lines += [
        "",
        "EWC update (gradient route) against the explicit loss `loss + ewc.penalty(module)`: "
        "largest parameter difference, next to a rerun of the gradient route (noise floor), a run "
        "with lambda (1 + 1e-6) (rounding-sized drift) and a run without EWC (the penalty's "
        "effect).",
        "",
        "| device | model | precision | optimizer | steps | routes | rerun | lambda(1+1e-6) | no EWC | equal |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in report["checks"]:
        lines.append(
            f"| {c['device']} | {c['model']} | {c['precision']} | {c['optimizer']} | {c['steps']} | "
            f"{c['max_abs_diff_routes']:.2e} | {c['max_abs_diff_rerun']:.2e} | "
            f"{c['max_abs_diff_lam_1e-6']:.2e} | "
            f"{c['max_abs_diff_no_ewc']:.2e} | {c['equal']} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument(
        "--model", default=None, choices=("mlp", "bert"), help="default: mlp on CPU, bert on CUDA"
    )
    ap.add_argument(
        "--precisions",
        nargs="*",
        default=None,
        help="default: 32-true on CPU, 16-mixed bf16-mixed on CUDA",
    )
    ap.add_argument(
        "--check-precisions",
        nargs="*",
        default=None,
        help="default: bf16-mixed and 16-mixed on CPU, 16-mixed on CUDA",
    )
    ap.add_argument("--batch-size", type=int, default=None, help="default: 128 (mlp), 32 (bert)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lam", type=float, default=100.0)
    ap.add_argument("--check-steps", type=int, default=20)
    ap.add_argument("--check-lam", type=float, default=10.0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: steadier timings on a shared machine)",
    )
    ap.add_argument(
        "--cpu-kernel",
        action="store_true",
        help="EWC(cpu_kernel=True): the one-pass C kernel (CPU, one thread)",
    )
    ap.add_argument("--tiny", action="store_true", help="toy sizes (smoke test)")
    ap.add_argument(
        "--out", default=os.path.join(RESULTS, NAME), help="report path without extension"
    )
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    args.model = args.model or ("bert" if cuda else "mlp")
    if args.precisions is None:
        args.precisions = ["16-mixed", "bf16-mixed"] if cuda else ["32-true"]
    if args.check_precisions is None:
        args.check_precisions = ["16-mixed"] if cuda else ["bf16-mixed", "16-mixed"]
    args.batch_size = args.batch_size or (128 if args.model == "mlp" else 32)
    if args.tiny:
        args.seq_len = min(args.seq_len, 16)
    command = "python " + " ".join(
        [os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])]
    )
    rows = []
    for precision in args.precisions:
        rows.append(overhead_row(args, precision))
        print(strict_json.dumps(rows[-1]), flush=True)
    checks = []
    for precision in args.check_precisions:
        # fused AdamW unscales inside step(): EWC must add its gradient at the loss scale
        for optimizer in ("adamw", "adamw-fused") if precision == "16-mixed" else ("adamw",):
            checks.append(route_check(args, precision, optimizer))
            print(strict_json.dumps(checks[-1]), flush=True)
    path = args.out + ".json"
    old: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    report = {
        "name": NAME,
        "command": command,
        "commands": list(dict.fromkeys([*old.get("commands", []), command])),
        "device": device_name(torch.device(args.device)),
        "devices": {**old.get("devices", {}), args.device: device_name(torch.device(args.device))},
        "versions": versions(),
        "rows": merge(old.get("rows", []), rows, ("device", "model", "precision", "ewc_update")),
        "checks": merge(
            old.get("checks", []), checks, ("device", "model", "precision", "optimizer")
        ),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        strict_json.dump(report, f, indent=2)
    write_markdown(args.out + ".md", report)
    return report


if __name__ == "__main__":
    main()
