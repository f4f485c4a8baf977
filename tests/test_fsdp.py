"""Sharded models (FSDP2, ``fully_shard``) on 2 CPU processes (gloo): Fisher estimates sharded
like the parameters and equal to unsharded runs, EWC updates equal to DDP's, and checkpoints
through Lightning's ``ModelParallelStrategy`` (sharded and full) round-tripping bitwise."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from lit_helpers import Classifier, loader, max_diff, task_classes, trainer

import lightning_fisher as lf

WORLD = 2
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_check.py"


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp2_fisher_and_ewc_equal_unsharded_runs(tmp_path: Path) -> None:
    """Every method on a sharded MLP (uneven shards, ranks with different amounts of data)
    against the unsharded Fisher of the same data; EWC updates against DDP's."""
    out = tmp_path / "fsdp.json"
    cmd = [sys.executable, str(SCRIPT), "--world", str(WORLD), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"command", "device", "versions", "rows"} <= report.keys()
    methods = {row["method"] for row in report["rows"]}
    assert {"exact", "empirical", "batched", "hutchinson", "sample"} <= methods
    for row in report["rows"]:
        assert row["world_size"] == WORLD
        assert row["fisher_placed_like_params"] is True, row
        assert row["fisher_max_rel_diff_vs_unsharded"] <= 1e-6, row
        assert row["ewc_update_max_rel_diff_vs_ddp"] <= 1e-6, row
        assert row["ewc_penalty_rel_diff_vs_ddp"] <= 1e-6, row
        assert row["checkpoint_roundtrip_bitwise"] is True, row


class ShardedClassifier(Classifier):
    """The test classifier, sharded with ``fully_shard`` over the data-parallel mesh."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.net, FSDPModule):  # a later Trainer on the same (sharded) model
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def _full(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in module.named_parameters()
    }


def _locals(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _locals(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_locals(v) for v in state]
    if isinstance(state, torch.Tensor):
        return (state.to_local() if hasattr(state, "to_local") else state).clone()
    return state


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


def _lightning_worker(rank: int, port: int, out_dir: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)

    def fsdp() -> ModelParallelStrategy:
        return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)

    def run(model: Classifier, ewc: lf.EWC, task: int, **kw: Any) -> Any:
        model.active = task_classes(task)
        t = trainer([ewc], accelerator="cpu", devices=WORLD, **kw)
        t.fit(model, loader(task, n=32, dtype=torch.float32))
        return t

    results: dict[str, Any] = {}
    for name, strategy in (("fsdp", fsdp), ("ddp", lambda: "ddp")):
        # Adam: Lightning cannot load a full FSDP2 checkpoint whose optimizer state is empty (SGD)
        cls = ShardedClassifier if name == "fsdp" else Classifier
        model = cls(optimizer="adam", lr=0.01, dtype=torch.float32)
        ewc = lf.EWC(lam=100.0, method="exact")
        t0 = run(model, ewc, 0, strategy=strategy())
        results[f"{name}_fisher"] = {
            k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in ewc.fishers[0].items()
        }
        if name == "fsdp":
            state = ewc.core.state_dict()
            for kind, distributed in (("sharded", True), ("full", False)):
                path = os.path.join(out_dir, f"{kind}.ckpt")
                t0.strategy._save_distributed_checkpoint = distributed
                t0.save_checkpoint(path)
                # A new callback and Trainer restore it on the sharded model (each rank its
                # slices); the restored state must equal the original bitwise.
                restored = lf.EWC(lam=100.0, method="exact")
                t1 = trainer([restored], accelerator="cpu", devices=WORLD, strategy=fsdp())
                t1.fit(
                    model, loader(0, n=32, dtype=torch.float32), ckpt_path=path
                )  # at max_epochs: restores only
                results[f"checkpoint_{kind}"] = _equal(
                    _locals(restored.core.state_dict()), _locals(state)
                )
        run(model, ewc, 1, strategy=strategy())  # task 1 with the EWC penalty gradient
        results[f"{name}_final"] = _full(model.net)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.ddp
@pytest.mark.slow
def test_ewc_callback_under_model_parallel_strategy(tmp_path: Path) -> None:
    mp.spawn(_lightning_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = torch.load(tmp_path / "results.pt", weights_only=False)
    assert res["checkpoint_sharded"] is True
    assert res["checkpoint_full"] is True
    fisher_diff = max_diff(res["fsdp_fisher"], res["ddp_fisher"])
    assert fisher_diff <= 1e-6 * max(float(v.abs().max()) for v in res["ddp_fisher"].values())
    # Task 1 trained with the EWC penalty gradient on sharded and on DDP copies of one model.
    final = max_diff(res["fsdp_final"], res["ddp_final"])
    assert final <= 1e-6 * max(float(v.abs().max()) for v in res["ddp_final"].values())


def test_fsdp1_and_deepspeed_are_refused_with_what_is_missing() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    for strategy, missing in ((FSDPStrategy, "flat parameters"), (DeepSpeedStrategy, "ZeRO")):
        fake = SimpleNamespace(strategy=strategy.__new__(strategy))
        with pytest.raises(lf.FisherInputError, match=missing):
            lf.EWC(lam=1.0).setup(fake, Classifier(), "fit")  # type: ignore[arg-type]
