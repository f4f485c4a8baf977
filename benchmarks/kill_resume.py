"""Kill and resume: a 3-task EWC run survives SIGKILL and ends bitwise equal to an uninterrupted run.

The run: a small multi-head MLP trained on 3 tasks (one ``Trainer.fit`` per task, the way
``lf.EWC`` is meant to be used: it consolidates at the end of each fit), deterministic, seeded,
``ModelCheckpoint(every_n_train_steps=N, save_last=True)``. A kill point is one of

* ``train:<task>:<step>``: before an optimizer step of a task;
* ``boundary:<task>:0``: after the task's last optimizer step, before its consolidation (and
  before the checkpoint of that step); ``boundary:<task>:1``: after the task's ``fit`` returned,
  before the next task's ``fit`` starts;
* ``fisher:<task>:<batch>``: at a batch of the Fisher pass that consolidates a task (triggered
  from inside the EWC ``output_fn``);
* ``consolidation:<task>:0``: after that Fisher pass, while the checkpoint that holds the
  consolidated state is being written (it never reaches the disk).

The killed process (SIGKILL, no clean-up) is restarted from ``last.ckpt``; the restarted run must
end with Fisher diagonals, anchors, the task counter and the weights bitwise equal to those of
the uninterrupted run.

Rules that make the resume exact (the checks below rely on them):

* checkpoints land on epoch boundaries: ``N`` is a multiple of the optimizer steps per epoch.
  Lightning resumes mid-epoch exactly only with a stateful (resumable) dataloader; with a plain
  ``DataLoader`` it restarts the epoch's data from the beginning;
* shuffling draws its order from the seed and the epoch (a sampler with ``set_epoch``, as
  ``DistributedSampler`` does), not from the global RNG, which checkpoints do not hold; the
  Fisher pass itself reads the training data in one fixed order (``lf.EWC`` replaces a shuffling
  ``RandomSampler``/``DistributedSampler`` by a seeded permutation that is the same every pass),
  so it does not depend on which epoch the sampler was last set to;
* ``lf.EWC`` consolidates before the checkpoint of the task's last step is written, so that
  checkpoint holds the consolidated state; a kill before it is on disk (at the boundary, in the
  Fisher pass, while it is written) resumes from the task's previous checkpoint, retrains the
  task's last epoch and consolidates again (the pass is seeded, so it is identical).

Usage::

    python -m benchmarks.kill_resume                 # 10 random kill points, writes the report
    python -m benchmarks.kill_resume --points 3      # fewer
    python -m benchmarks.kill_resume --worker DIR [--kill train:1:5 | --kill fisher:2:1 | ...]

Workers are children forked from a fork server (POSIX), killed with SIGKILL; ``--worker`` runs one
in the foreground.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import signal
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

TASKS = 3
CLASSES_PER_TASK = 2
D_IN, HIDDEN = 8, 16
N_PER_TASK, BATCH = 32, 8  # 4 optimizer steps per epoch
EPOCHS_PER_TASK = 2
STEPS_PER_EPOCH = N_PER_TASK // BATCH
STEPS_PER_TASK = EPOCHS_PER_TASK * STEPS_PER_EPOCH
CHECKPOINT_EVERY = STEPS_PER_EPOCH  # a multiple of the steps per epoch (see the rules above)
FISHER_BATCHES = N_PER_TASK // BATCH
SEED = 0
RESULTS = Path(__file__).resolve().parent / "results"


# The run ----------------------------------------------------------------------------------------
def task_classes(task: int) -> list[int]:
    return [CLASSES_PER_TASK * task + c for c in range(CLASSES_PER_TASK)]


def task_dataset(task: int) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(1000 + task)
    x = torch.randn(N_PER_TASK, D_IN, generator=gen)
    w = torch.randn(D_IN, generator=gen)
    y = CLASSES_PER_TASK * task + (x @ w > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def task_loader(task: int) -> torch.utils.data.DataLoader:
    # DistributedSampler (one replica) shuffles by seed and epoch (`set_epoch`), not from the
    # global RNG, so a resumed run sees the same order as an uninterrupted one.
    data = task_dataset(task)
    order = torch.utils.data.DistributedSampler(
        data, num_replicas=1, rank=0, shuffle=True, seed=SEED + task
    )
    return torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=order)


def head_of_batch(batch: Any) -> list[int]:
    return task_classes(int(batch[1][0]) // CLASSES_PER_TASK)


def run_worker(work_dir: Path, kill: str | None) -> None:
    """Train the 3 tasks (resuming from ``work_dir/ckpt/last.ckpt`` if it exists) and save the
    final EWC state and weights to ``work_dir/final.pt``. ``kill`` (``<phase>:<task>:<at>``, see
    the module's docstring) sends SIGKILL to this process at that point."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_fisher as lf

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    pl.seed_everything(SEED, verbose=False)
    kind, kill_task, kill_at = kill.split(":") if kill else ("", "-1", "-1")
    kill_task_i, kill_at_i = int(kill_task), int(kill_at)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(SEED)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(D_IN, HIDDEN),
                torch.nn.Tanh(),
                torch.nn.Linear(HIDDEN, TASKS * CLASSES_PER_TASK),
            )
            self.task = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            active = task_classes(self.task)
            local = y - active[0]
            return torch.nn.functional.cross_entropy(self(x)[:, active], local)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.02)

        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["task"] = self.task  # which fit of the task loop wrote it

    fisher_calls = {"batches": 0}

    def output_fn(module: torch.nn.Module, batch: Any) -> torch.Tensor:
        # The kill point inside a consolidation's Fisher pass (one call per batch).
        if kind == "fisher" and model.task == kill_task_i:
            if fisher_calls["batches"] == kill_at_i:
                os.kill(os.getpid(), signal.SIGKILL)
            fisher_calls["batches"] += 1
        return module(batch[0])

    class KillAtStep(pl.Callback):
        # Lightning runs ModelCheckpoint after the other callbacks, so the batch-end kill comes
        # before the checkpoint of the step, and the save kill after EWC's on_save_checkpoint.
        def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
            if kind == "train" and model.task == kill_task_i and trainer.global_step == kill_at_i:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
            last_step = trainer.global_step == STEPS_PER_TASK
            if kind == "boundary" and kill_at_i == 0 and model.task == kill_task_i and last_step:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_save_checkpoint(self, trainer: pl.Trainer, *_: Any) -> None:
            consolidated = ewc.task_count == kill_task_i + 1
            if kind == "consolidation" and model.task == kill_task_i and consolidated:
                os.kill(os.getpid(), signal.SIGKILL)

    model = Net()
    # `sample` draws labels: its generator is seeded per pass, so a re-run pass is identical.
    ewc = lf.EWC(lam=50.0, method="sample", classes=head_of_batch, output_fn=output_fn)
    ckpt_dir = work_dir / "ckpt"
    last = ckpt_dir / "last.ckpt"
    start, resume_from = 0, None
    if last.exists():
        start = int(torch.load(last, map_location="cpu", weights_only=False)["task"])
        resume_from = str(last)
    for task in range(start, TASKS):
        model.task = task
        checkpoint = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename=f"task{task}-{{step}}",
            every_n_train_steps=CHECKPOINT_EVERY,
            save_top_k=-1,
            save_last=True,
            enable_version_counter=False,  # one last.ckpt across the task loop's fits
        )
        trainer = pl.Trainer(
            max_epochs=EPOCHS_PER_TASK,
            callbacks=[ewc, checkpoint, KillAtStep()],
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
        )
        trainer.fit(model, task_loader(task), ckpt_path=resume_from if task == start else None)
        if kind == "boundary" and kill_at_i == 1 and task == kill_task_i:
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save(
        {"ewc": ewc.state_dict(), "model": model.state_dict(), "task_count": ewc.task_count},
        work_dir / "final.pt",
    )


# The driver -------------------------------------------------------------------------------------
def _child(work_dir: Path, kill: str | None) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    log = open(work_dir / "worker.log", "a")  # noqa: SIM115  (the child's stdout/stderr)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    warnings.simplefilter("ignore")
    code = 0
    try:
        run_worker(work_dir, kill)
    except BaseException:
        traceback.print_exc(file=log)
        code = 1
    log.flush()
    # Leave without any exit machinery a fork inherits (a test runner's, for one).
    os._exit(code)


#: what the fork server imports once, so that every worker forked from it starts at once
_PRELOAD = ["benchmarks.kill_resume", "lightning.pytorch", "lightning_fisher.callbacks.ewc"]


def run(work_dir: Path, kill: str | None = None, timeout: float = 600) -> int:
    """Run a worker in a child forked from a fork server (a clean process that has imported
    ``_PRELOAD``, so the child starts at once without inheriting the caller's threads, locks or
    process groups, which a fork of the caller itself would); returns its exit code (``-9`` when
    it was SIGKILLed)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    child = ctx.Process(target=_child, args=(work_dir, kill))
    child.start()
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        raise TimeoutError(f"worker {kill or 'reference'} ran longer than {timeout} s")
    if child.exitcode not in (0, -signal.SIGKILL):
        log = (work_dir / "worker.log").read_text()[-4000:]
        raise RuntimeError(f"worker {kill or 'reference'} failed ({child.exitcode}):\n{log}")
    return int(child.exitcode)


def bitwise_equal(a: Any, b: Any) -> bool:
    """Nested dicts/lists of tensors and plain values, tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(bitwise_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(bitwise_equal(x, y) for x, y in zip(a, b))
        )
    return bool(a == b)


def load_final(work_dir: Path) -> dict[str, Any]:
    return torch.load(work_dir / "final.pt", map_location="cpu", weights_only=False)


def kill_and_resume(work_dir: Path, kill: str) -> dict[str, Any]:
    """Kill a run at ``kill``, resume it from its last checkpoint; returns what happened."""
    first = run(work_dir, kill)
    killed = first == -signal.SIGKILL
    resumed_from = None
    last = work_dir / "ckpt" / "last.ckpt"
    if last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        resumed_from = {"task": int(ckpt["task"]), "step": int(ckpt["global_step"])}
    run(work_dir, None)
    return {"killed": killed, "resumed_from": resumed_from, "final": load_final(work_dir)}


def kill_points(n: int, seed: int) -> list[str]:
    """``n`` random kill points (half at random training steps, half in Fisher passes: a random
    batch of each task's consolidation in turn), then every task boundary (after the last step,
    between fits) and every consolidation's checkpoint write."""
    rng = random.Random(seed)
    train = [f"train:{t}:{s}" for t in range(TASKS) for s in range(STEPS_PER_TASK)]
    n_fisher = n // 2
    order = [rng.sample(range(FISHER_BATCHES), FISHER_BATCHES) for _ in range(TASKS)]
    fisher = [f"fisher:{i % TASKS}:{order[i % TASKS][i // TASKS]}" for i in range(n_fisher)]
    boundaries = [f"boundary:{t}:{at}" for t in range(TASKS) for at in (0, 1)]
    consolidations = [f"consolidation:{t}:0" for t in range(TASKS)]
    return rng.sample(train, n - n_fisher) + fisher + boundaries + consolidations


def _where(phase: str, at: int) -> str:
    return {
        "train": "before the step",
        "boundary": "after the fit, before the next" if at else "after the last step",
        "fisher": "in the Fisher pass",
        "consolidation": "writing the consolidated checkpoint",
    }[phase]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", type=Path, help="run one (possibly killed) worker in this dir")
    parser.add_argument(
        "--kill", default=None, help="<phase>:<task>:<at>: train, boundary, fisher or consolidation"
    )
    parser.add_argument("--points", type=int, default=10, help="number of random kill points")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    parser.add_argument("--jobs", type=int, default=1, help="kill/resume chains run in parallel")
    args = parser.parse_args()
    if args.worker is not None:
        run_worker(args.worker, args.kill)
        return
    import lightning

    start = time.perf_counter()
    points = kill_points(args.points, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run(root / "reference")
        reference = load_final(root / "reference")

        def one(i_point: tuple[int, str]) -> dict[str, Any]:
            i, point = i_point
            outcome = kill_and_resume(root / f"kill{i}", point)
            phase, task, at = point.split(":")
            step = int(task) * STEPS_PER_TASK + (int(at) if phase == "train" else STEPS_PER_TASK)
            # the order of the kill points within a step: boundary (0), fisher, consolidation,
            # boundary between fits (1)
            within = {"train": 0, "boundary": 3 * int(at), "fisher": 1, "consolidation": 2}[phase]
            return {
                "step": step,
                "phase": phase,
                "bitwise_equal": outcome["killed"] and bitwise_equal(outcome["final"], reference),
                "task": int(task),
                "fisher_batch": int(at) if phase == "fisher" else None,
                "where": _where(phase, int(at)),
                "_order": (step, within, int(at)),
                "killed": outcome["killed"],
                "resumed_from_task": (outcome["resumed_from"] or {}).get("task"),
                "resumed_from_task_step": (outcome["resumed_from"] or {}).get("step"),
            }

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            rows = sorted(pool.map(one, enumerate(points)), key=lambda r: r.pop("_order"))
    report = {
        "command": f"python -m benchmarks.kill_resume --points {args.points} --seed {args.seed}",
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__},
        "setup": {
            "tasks": TASKS,
            "steps_per_task": STEPS_PER_TASK,
            "checkpoint_every_n_train_steps": CHECKPOINT_EVERY,
            "fisher_method": "sample",
            "phases": {
                "train": "before an optimizer step",
                "boundary": "after a task's last step, before its consolidation (at 0); "
                "after its fit returned, before the next fit (at 1)",
                "fisher": "at a batch of the consolidation's Fisher pass",
                "consolidation": "after the Fisher pass, while the checkpoint holding it is written",
            },
            "fisher_batches": FISHER_BATCHES,
            "step": "optimizer steps since the start of the run (fisher: the step the pass ends)",
        },
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from lightning_fisher import _json as strict_json

    def resumed(r: dict[str, Any]) -> str:
        if r["resumed_from_task"] is None:
            return "no checkpoint yet: restart"
        return f"task {r['resumed_from_task']}, step {r['resumed_from_task_step']}"

    (RESULTS / "kill_resume.json").write_text(strict_json.dumps(report, indent=2) + "\n")
    lines = [
        "# Kill and resume (3-task EWC run, SIGKILL, resume from last.ckpt)",
        "",
        f"`{report['command']}` ({report['device']}, torch {torch.__version__}, "
        f"lightning {lightning.__version__})",
        "",
        "| step | phase | task | Fisher batch | killed where | resumed from last.ckpt of "
        "| bitwise equal |",
        "|---:|---|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['phase']} | {r['task']} | "
            f"{'' if r['fisher_batch'] is None else r['fisher_batch']} | {r['where']} | "
            f"{resumed(r)} | "
            f"{'yes' if r['bitwise_equal'] else 'NO'} |"
        )
    (RESULTS / "kill_resume.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(r["bitwise_equal"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
