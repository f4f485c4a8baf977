"""DDP scaling of the Fisher pass, and agreement across ranks, for 1, 2 and 4 GPUs of one host.

For every GPU count W the script starts W processes (NCCL; gloo on CPU) and, on each rank:

1. estimates the EXACT Fisher diagonal of an MLP (3072-2048-2048-100 by default) on that rank's
   shard of a fixed data set (global batch b goes to rank b mod W) with ``lf.estimate_fisher``,
   whose all-reduce gives every rank the Fisher of the union; timed over several passes after a
   warm-up, between barriers: throughput = inputs of the whole data set / seconds of a pass;
2. runs two tasks of ``lf.EWC`` under Lightning's DDP strategy: task A consolidates at the end of
   its fit (Fisher on the DDP-sharded training loader), task B trains with the EWC penalty
   gradient; the consolidated Fisher and the parameters after task B are gathered.

The driver then checks: the Fisher is bitwise identical on all ranks and equal (to float32
rounding of the different summation order) to the Fisher the driver computes itself, in one
process without a process group, on the same data; the EWC
Fisher and the weights after EWC updates are bitwise identical across ranks; and it reports the
throughput and the speedup over one GPU (goals: 1.8x on 2 GPUs, 3.4x on 4).

GPU (one command, a 4-GPU host)::

    NCCL_NVLS_ENABLE=0 python -m benchmarks.ddp_scaling

CPU smoke run (gloo, 2 processes, tiny sizes; what CI runs)::

    python -m benchmarks.ddp_scaling --cpu --gpus 1 2 --tiny --out /tmp/ddp_scaling.json

Sharded models (FSDP2) are checked by ``benchmarks/fsdp_check.py``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import join_process_group, max_rel_diff, rank_environment

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Config:
    dims: tuple[int, ...] = (3072, 2048, 2048, 100)
    n_inputs: int = 131072  # inputs of the Fisher pass (divisible by batch * 4)
    batch: int = 512
    repeats: int = 5  # timed passes (median)
    warmup_batches: int = 4
    ewc_inputs: int = 4096  # per task, for the EWC check
    ewc_batch: int = 128  # global batch (divisible by 4)
    ewc_steps: int = 8  # optimizer steps of task B
    cpu: bool = False
    seed: int = 0


TINY = {
    "dims": (32, 24, 24, 10),
    "n_inputs": 512,
    "batch": 32,
    "repeats": 2,
    "warmup_batches": 1,
    "ewc_inputs": 128,
    "ewc_batch": 16,
    "ewc_steps": 3,
}


def build_mlp(dims: tuple[int, ...], seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def make_data(n: int, dims: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same inputs and labels in every process (CPU generator, then moved)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dims[0], generator=gen)
    y = torch.randint(0, dims[-1], (n,), generator=gen)
    return x, y


def _worker(rank: int, world: int, port: int, cfg: Config, out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    rank_environment(rank, world, port)
    import lightning.pytorch as pl

    import lightning_fisher as lf

    device = join_process_group(rank, world, cfg.cpu)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    # 1. Throughput and agreement of the Fisher pass.
    model = build_mlp(cfg.dims, cfg.seed).to(device)
    x, y = make_data(cfg.n_inputs, cfg.dims, cfg.seed)
    x, y = x.to(device), y.to(device)
    batches = [
        (x[i : i + cfg.batch], y[i : i + cfg.batch]) for i in range(0, cfg.n_inputs, cfg.batch)
    ]
    shard = batches[rank::world]
    options: dict[str, Any] = {"method": "exact", "progress": False, "max_memory_mib": 8192}
    lf.estimate_fisher(model, shard[: cfg.warmup_batches], **options)  # warm-up (kernels, plans)
    seconds = []
    fisher = None
    for _ in range(cfg.repeats):
        sync()
        start = time.perf_counter()
        fisher = lf.estimate_fisher(model, shard, **options)
        sync()
        seconds.append(time.perf_counter() - start)
    assert fisher is not None and fisher.n_samples == cfg.n_inputs

    # 2. EWC under Lightning's DDP strategy: consolidation on task A, penalty updates on task B.
    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_mlp(cfg.dims, cfg.seed + 1)

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return self.net(inp)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inp, target = batch
            return torch.nn.functional.cross_entropy(self(inp), target)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    def task_loader(task: int) -> torch.utils.data.DataLoader:
        tx, ty = make_data(cfg.ewc_inputs, cfg.dims, cfg.seed + 10 + task)
        data = torch.utils.data.TensorDataset(tx, ty)
        # The same global batch for every W: DistributedSampler's permutation does not depend on
        # the number of replicas, and W ranks of ewc_batch / W inputs make one global batch.
        return torch.utils.data.DataLoader(data, batch_size=cfg.ewc_batch // world, shuffle=True)

    def fit(callbacks: list[pl.Callback], task: int, **kw: Any) -> None:
        pl.Trainer(
            accelerator="cpu" if cfg.cpu else "gpu",
            devices=world,
            strategy="ddp",
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **kw,
        ).fit(net, task_loader(task))

    net = Net()
    ewc = lf.EWC(lam=1e3, method="exact", fisher_kwargs={"progress": False})
    fit([ewc], 0, max_epochs=1)
    fit([ewc], 1, max_steps=cfg.ewc_steps)
    torch.save(
        {
            "seconds": seconds,
            "fisher": {k: v.cpu() for k, v in fisher.items()},
            "ewc_fisher": {k: v.cpu() for k, v in ewc.fishers[0].items()},
            "ewc_task_count": ewc.task_count,
            "params": {k: v.detach().cpu() for k, v in net.named_parameters()},
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_world(world: int, cfg: Config) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        # CPU runs fork (the workers inherit the driver's imports); CUDA needs fresh processes.
        method = "fork" if cfg.cpu else "spawn"
        args = (world, _free_port(), cfg, tmp)
        mp.start_processes(_worker, args=args, nprocs=world, join=True, start_method=method)
        return [
            torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4], help="GPU counts")
    parser.add_argument("--cpu", action="store_true", help="gloo processes on the CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "ddp_scaling.json")
    parser.add_argument("--n-inputs", type=int, default=None, help="inputs of the Fisher pass")
    parser.add_argument("--batch", type=int, default=None, help="batch size per rank")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes (median)")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cfg = Config(cpu=args.cpu, **(TINY if args.tiny else {}))  # type: ignore[arg-type]
    for name in ("n_inputs", "batch", "repeats"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.n_inputs % (cfg.batch * max(args.gpus)):
        sys.exit("--n-inputs must be a multiple of --batch times the largest GPU count.")
    if not cfg.cpu and torch.cuda.device_count() < max(args.gpus):
        sys.exit(f"needs {max(args.gpus)} GPUs; found {torch.cuda.device_count()}.")

    import lightning
    import lightning.pytorch  # before the workers start: forked ones inherit it

    import lightning_fisher as lf
    import lightning_fisher.callbacks.ewc
    from lightning_fisher import _json as strict_json

    runs = {w: run_world(w, cfg) for w in sorted(args.gpus)}
    # The reference: one process (this one, no process group) on all the data.
    device = torch.device("cpu" if cfg.cpu else "cuda:0")
    x, y = make_data(cfg.n_inputs, cfg.dims, cfg.seed)
    model = build_mlp(cfg.dims, cfg.seed).to(device)
    loader = [
        (x[i : i + cfg.batch].to(device), y[i : i + cfg.batch].to(device))
        for i in range(0, cfg.n_inputs, cfg.batch)
    ]
    fisher = lf.estimate_fisher(model, loader, method="exact", progress=False)
    reference = {k: v.cpu() for k, v in fisher.items()}
    one = runs.get(1)  # speedups and EWC comparisons need a 1-GPU run

    def seconds_per_pass(ranks: list[dict[str, Any]]) -> float:
        return statistics.median(max(s) for s in zip(*(r["seconds"] for r in ranks)))

    rows = []
    for world, ranks in runs.items():
        throughput = cfg.n_inputs / seconds_per_pass(ranks)
        base = cfg.n_inputs / seconds_per_pass(one) if one else None
        first = ranks[0]
        rows.append(
            {
                "gpus": world,
                "samples_per_second": round(throughput, 1),
                "speedup": round(throughput / base, 3) if base else None,
                "fisher_equal_across_ranks": all(
                    tensors_equal(r["fisher"], first["fisher"]) for r in ranks
                ),
                "fisher_max_rel_diff_vs_one_process": max_rel_diff(first["fisher"], reference),
                "ewc_fisher_equal_across_ranks": all(
                    tensors_equal(r["ewc_fisher"], first["ewc_fisher"]) for r in ranks
                ),
                "ewc_fisher_max_rel_diff_vs_1": (
                    max_rel_diff(first["ewc_fisher"], one[0]["ewc_fisher"]) if one else None
                ),
                "ewc_params_equal_across_ranks": all(
                    tensors_equal(r["params"], first["params"]) for r in ranks
                ),
                "ewc_task_count": first["ewc_task_count"],
                "seconds_per_pass": round(seconds_per_pass(ranks), 4),
            }
        )
    gpu = "cpu (gloo)" if cfg.cpu else torch.cuda.get_device_name(0)
    command = ("" if cfg.cpu else "NCCL_NVLS_ENABLE=0 ") + "python -m benchmarks.ddp_scaling "
    command += " ".join(sys.argv[1:])
    report = {
        "command": command.strip(),
        "device": f"{max(args.gpus)} x {gpu}" if not cfg.cpu else f"cpu ({platform.machine()})",
        "versions": {
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "lightning_fisher": lf.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if not cfg.cpu else None,
        },
        "setup": {**asdict(cfg), "method": "exact", "goal_speedup": {"2": 1.8, "4": 3.4}},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(strict_json.dumps(report, indent=2) + "\n")
    lines = [
        "# DDP scaling of the Fisher pass (EXACT, MLP " + "-".join(map(str, cfg.dims)) + ")",
        "",
        f"`{report['command']}` on {report['device']}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}; {cfg.n_inputs} inputs, batch {cfg.batch} per rank.",
        "",
        "| GPUs | samples/s | speedup | Fisher equal across ranks | max rel diff vs one process "
        "| EWC Fisher equal across ranks | EWC weights equal across ranks |",
        "|---:|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['gpus']} | {r['samples_per_second']:.0f} | {r['speedup'] or float('nan'):.2f} | "
            f"{r['fisher_equal_across_ranks']} | {r['fisher_max_rel_diff_vs_one_process']:.1e} | "
            f"{r['ewc_fisher_equal_across_ranks']} | {r['ewc_params_equal_across_ranks']} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
