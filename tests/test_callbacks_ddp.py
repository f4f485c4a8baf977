"""The callbacks under DDP: 2 CPU processes (gloo), each on its own shard of the training data."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from lit_helpers import Classifier, loader, max_diff, params, task_classes, trainer

import lightning_fisher as lf

WORLD = 2


def head_of_batch(batch: Any) -> list[int]:
    return task_classes(int(batch[1][0]) // 2)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    model = Classifier(optimizer="adam", lr=0.01)
    ewc = lf.EWC(lam=100.0, classes=head_of_batch)
    reg = lf.FisherTraceRegularizer(alpha=0.5)
    monitor = lf.FisherMonitor(method="exact", classes=head_of_batch)
    kw = {"accelerator": "cpu", "devices": WORLD, "strategy": "ddp"}
    model.active = task_classes(0)
    # Task 0 with the trace regulariser and accumulation; EWC consolidates at the end of the fit.
    trainer([ewc, reg, monitor], accumulate_grad_batches=2, **kw).fit(model, loader(0, n=64))
    after_task0 = params(model)
    model.active = task_classes(1)
    trainer([ewc], **kw).fit(model, loader(1, n=64))  # EWC penalty under DDP
    torch.save(
        {
            "fisher": dict(ewc.fishers[0]) if ewc.task_count == 2 else None,
            "state": ewc.state_dict(),
            "monitor": dict(monitor.fisher),
            "after_task0": after_task0,
            "final": params(model),
            "reg_steps": reg.applied_steps,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_fisher_equal_across_ranks_and_to_single_process(tmp_path: Any) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    # Every rank holds the same Fisher, anchors and parameters (bitwise); the trace regulariser
    # draws different probes on each rank, so equal parameters also show its gradient was averaged.
    for key in ("monitor", "after_task0", "final"):
        assert max_diff(r0[key], r1[key]) == 0, key
    task0 = r0["state"]["tasks"][0]
    for rank_state in (r0["state"], r1["state"]):
        assert rank_state["task_count"] == 2
    assert max_diff(r0["state"]["tasks"][0]["anchor"], r1["state"]["tasks"][0]["anchor"]) == 0
    assert max_diff(task0["fisher"]["tensors"], r1["state"]["tasks"][0]["fisher"]["tensors"]) == 0
    # The trace regulariser ran on every optimizer step (4 batches per rank, 2 per step).
    assert r0["reg_steps"] == r1["reg_steps"] == 2
    # The Fisher of the union of the shards equals a single-process estimate on all the data.
    model = Classifier()
    model.load_state_dict(r0["after_task0"])
    single = lf.estimate_fisher(model, loader(0, n=64), classes=head_of_batch)
    assert max_diff(r0["monitor"], dict(single)) <= 1e-6
    final = Classifier()
    final.load_state_dict(r0["final"])
    # The online Fisher after task 1 is F_0 + F_1 with both single-process estimates.
    f1 = lf.estimate_fisher(final, loader(1, n=64), classes=head_of_batch)
    combined = single + f1
    assert max_diff(r0["fisher"], dict(combined)) <= 1e-6
