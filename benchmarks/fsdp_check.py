"""Sharded (FSDP2 and FSDP1) Fisher, EWC and diagnostics against unsharded runs, on CPU
processes (gloo).

Every rank holds a ``fully_shard`` copy of a small MLP (each Linear and the root sharded, with
layer widths that do not divide the world size, so shards are uneven; the first weight sharded
along its columns) and a DDP copy of the same
weights, and its own data (ranks get different numbers of inputs, so the sharded pass pads with
zero cotangents). On each rank the script:

1. estimates the Fisher of the sharded model with every supported method; the tensors must be
   DTensors placed like the parameters; they are gathered and compared, by the driver, with the
   Fisher it computes itself in one process on the unsharded model and the same per-rank data
   (the sum over ranks of each rank's estimate times its normaliser, divided by the total: what
   a DDP pass all-reduces);
2. consolidates the ``exact`` Fisher in ``lf.ElasticWeightConsolidation`` on both copies and runs
   three SGD steps with the EWC penalty gradient added by ``add_penalty_grad``: the sharded
   update (gathered) must equal the DDP update;
3. round-trips the sharded EWC state through ``torch.distributed.checkpoint`` (sharded state
   dict) and through a full state dict (gathered with ``lf.sharded.full_state``, saved by rank 0,
   resharded with ``lf.sharded.shard_state_like``): bitwise.

A last row runs ``lf.EWC`` over two tasks under Lightning's ``ModelParallelStrategy`` and under
DDP from the same weights (Fisher after task 0, the update of task 1 with the penalty gradient)
and round-trips the callback through Lightning's sharded and full checkpoints, bitwise.

Diagnostics rows (``--no-diagnostics`` skips them): ``compute_diagnostics`` on the sharded and
an unsharded copy (deterministic bounds; Hutchinson bounds with CVs and standard errors; a
bounded histogram sample) must return the same numbers, and one ``fit`` with ``FisherMonitor``,
``FisherDiagnostics`` and ``FisherTraceRegularizer`` under ``ModelParallelStrategy`` must log
what the DDP fit logs and make its update (the regulariser's gradient on the local shards);
the monitor's sharded estimate round-trips Lightning's sharded and full checkpoints bitwise.

FSDP1 rows (``FullyShardedDataParallel`` with ``use_orig_params=True``, each Linear a unit, so
rank 0 of 2 holds a piece of the first weight and an empty piece of its bias): the Fisher
communication hook is registered before the first forward, and three SGD steps with it give
bitwise the gradients of an FSDP1 copy without it; every method's Fisher (1-D local pieces,
gathered) against the unsharded Fisher, also for the module inside a one-unit wrapper (the pass
forwards through the wrapper, as for a LightningModule under ``FSDPStrategy``) and with bf16
compute and reduction (``MixedPrecision``; squares summed in float32); EWC updates
(gradient and loss routes) against DDP's; the Squisher from sharded Adam; the full state-dict
form and back, bitwise. Then ``lf.EWC`` over two tasks under Lightning's ``FSDPStrategy`` (a
subclass: Lightning refuses the exact class on a CPU accelerator) against DDP, through
Lightning's sharded and full checkpoints into a new Trainer, bitwise. FSDP1 diagnostics rows
(``--no-diagnostics`` skips them): ``compute_diagnostics`` on FSDP1 copies (each Linear a unit,
``NO_SHARD``, the module inside a one-unit wrapper) against the unsharded copy, and one ``fit``
with ``FisherMonitor``, ``FisherDiagnostics`` and ``FisherTraceRegularizer`` under
``FSDPStrategy`` against DDP (logged numbers, histogram sample, the regularised update, the
monitor's pieces through Lightning's sharded and full checkpoints).

Differences are max |sharded - reference| / max |reference| per tensor, the largest over tensors.

    python -m benchmarks.fsdp_check            # writes benchmarks/results/fsdp_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher import _json as strict_json

from .common import max_rel_diff, rank_environment, versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("batched", "hutchinson", "exact", "empirical", "sample")
BF16_METHODS = ("batched", "hutchinson")  # same arithmetic as the bf16 reference
INNER_METHODS = ("hutchinson", "exact")  # FSDP1: a module inside the wrapper
DIMS = (6, 9, 5)
BATCH = 4
LAM = 50.0
SEED = 5


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIMS[0], DIMS[1]), nn.Tanh(), nn.Linear(DIMS[1], DIMS[2]))


def rank_loader(rank: int) -> DataLoader[tuple[Tensor, ...]]:
    n = 10 - 3 * rank  # uneven: 10, 7, 4, ... inputs (3, 2, 1 batches)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(max(n, 1), DIMS[0], generator=gen)
    y = torch.randint(0, DIMS[2], (max(n, 1),), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def train_batch(rank: int, step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + 10 * rank + step)
    return torch.randn(BATCH, DIMS[0], generator=gen), torch.randint(
        0, DIMS[2], (BATCH,), generator=gen
    )


def full_params(model: nn.Module) -> dict[str, Tensor]:
    from lightning_fisher.sharded import is_dtensor

    return {
        n: (p.full_tensor() if is_dtensor(p) else p).detach().clone()  # type: ignore[attr-defined]
        for n, p in model.named_parameters()
    }


def _locals(state: Any) -> Any:
    from lightning_fisher.sharded import local_tensor

    if isinstance(state, dict):
        return {k: _locals(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_locals(v) for v in state]
    return local_tensor(state).clone() if isinstance(state, Tensor) else state


def _bitwise(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_bitwise(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_bitwise, a, b))
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


def _zeros_like_state(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _zeros_like_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_zeros_like_state(v) for v in state]
    return torch.zeros_like(state) if isinstance(state, Tensor) else state


def shard(model: nn.Sequential, ignore_last_bias: bool = False) -> None:
    """``fully_shard`` each Linear and the root; the first weight is sharded along its columns
    (``Shard(1)``), the others along rows; ``ignore_last_bias`` leaves the last bias whole (an
    ordinary parameter, replicated on every rank)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    fully_shard(model[0], shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 else None)
    ignored = {model[2].bias} if ignore_last_bias else None
    fully_shard(model[2], ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def worker(rank: int, world: int, port: int, out_dir: str, methods: tuple[str, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _work(rank, world, out_dir, methods)
    finally:
        dist.destroy_process_group()


def _work(rank: int, world: int, out_dir: str, methods: tuple[str, ...]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import lightning_fisher as lf
    from lightning_fisher.sharded import full_state, full_tensors, shard_state_like

    base = make_model()
    sharded = copy.deepcopy(base)
    shard(sharded)
    ddp = DistributedDataParallel(copy.deepcopy(base))
    loader = rank_loader(rank)
    out: dict[str, Any] = {"fisher": {}, "placed_like_params": {}}
    params = dict(sharded.named_parameters())
    for method in methods:
        fd = lf.estimate_fisher(sharded, loader, method=method, probes=2, seed=SEED)
        out["placed_like_params"][method] = all(
            getattr(t, "placements", None) == params[n].placements
            and t.to_local().shape == params[n].to_local().shape
            for n, t in fd.items()
        )
        out["fisher"][method] = full_tensors(fd)
        out["n_samples"] = fd.n_samples

    # A parameter fully_shard leaves whole: its squares are all-reduced after the pass.
    mixed = copy.deepcopy(base)
    shard(mixed, ignore_last_bias=True)
    out["fisher_ignored"] = {}
    for method in BF16_METHODS:
        fd = lf.estimate_fisher(mixed, loader, method=method, probes=2, seed=SEED)
        assert not hasattr(fd["2.bias"], "placements") and hasattr(fd["2.weight"], "placements")
        out["fisher_ignored"][method] = full_tensors(fd)

    # Mixed precision: bf16 compute (MixedPrecisionPolicy), squares summed in float32.
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    low = copy.deepcopy(base)
    fully_shard(low[0], mp_policy=policy)
    fully_shard(low[2], mp_policy=policy)
    fully_shard(low, mp_policy=policy)
    out["fisher_bf16"] = {
        method: full_tensors(lf.estimate_fisher(low, loader, method=method, probes=2, seed=SEED))
        for method in BF16_METHODS
        if method in methods
    }

    # EWC: sharded and DDP copies, the same Fisher method, three SGD steps with the penalty.
    ewc_sh = lf.ElasticWeightConsolidation(sharded, lam=LAM)
    ewc_dp = lf.ElasticWeightConsolidation(ddp.module, lam=LAM)
    # Both consolidate the same Fisher (the DDP one, sharded like the parameters), so the
    # difference measures the EWC update alone; the Fisher itself is compared above.
    fisher_dp = lf.estimate_fisher(ddp.module, loader, method="exact")
    fisher_sh = lf.FisherDiagonal(
        shard_state_like(dict(fisher_dp), sharded), fisher_dp.n_samples, fisher_dp.method
    )
    ewc_dp.consolidate(fisher_dp)
    ewc_sh.consolidate(fisher_sh)
    updates: dict[str, dict[str, Tensor]] = {}
    penalties: dict[str, float] = {}
    start = full_params(sharded)
    loss_route = copy.deepcopy(base)  # the same weights, sharded, EWC through the loss
    shard(loss_route)
    ewc_loss = lf.ElasticWeightConsolidation(loss_route, lam=LAM)
    ewc_loss.consolidate(fisher_sh)
    variants = (
        ("sharded", sharded, ewc_sh),
        ("sharded_loss", loss_route, ewc_loss),
        ("ddp", ddp, ewc_dp),
    )
    for name, model, ewc in variants:
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        for step in range(3):
            x, y = train_batch(rank, step)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if name == "sharded_loss":
                loss = loss + ewc.penalty()
            loss.backward()
            if name != "sharded_loss":
                ewc.add_penalty_grad()
            before = full_params(model)
            opt.step()
        after = full_params(model)
        updates[name] = {k.removeprefix("module."): after[k] - before[k] for k in after}
        value = ewc.penalty().detach()
        penalties[name] = float(value.full_tensor() if hasattr(value, "full_tensor") else value)
    out["updates"] = updates
    out["penalties"] = penalties
    moved = max(float((start[k] - full_params(sharded)[k]).abs().max()) for k in start)
    out["ewc_moved_params"] = moved > 0

    # The Squisher from sharded Adam state (exp_avg_sq is a DTensor like its parameter).
    adam_sq: dict[str, dict[str, Tensor]] = {}
    for name, model in (("sharded", sharded), ("ddp", ddp.module)):
        wrapped = ddp if name == "ddp" else model
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step in range(2):
            x, y = train_batch(rank, 10 + step)
            opt.zero_grad()
            nn.functional.cross_entropy(wrapped(x), y).backward()
            opt.step()
        adam_sq[name] = full_tensors(lf.fisher_from_optimizer(opt, model, batch_size=BATCH))
    out["squisher"] = adam_sq

    # Checkpoints: sharded (distributed checkpoint) and full (gathered, saved by rank 0).
    state = ewc_sh.state_dict()
    ckpt = os.path.join(out_dir, "dcp")
    dcp.save({"ewc": state}, checkpoint_id=ckpt)
    target = {"ewc": _zeros_like_state(ewc_sh.state_dict())}
    dcp.load(target, checkpoint_id=ckpt)
    restored = lf.ElasticWeightConsolidation(sharded, lam=LAM)
    restored.load_state_dict(target["ewc"])
    sharded_ok = _bitwise(_locals(restored.state_dict()), _locals(state))
    full = full_state(state)
    path = os.path.join(out_dir, "full.pt")
    if rank == 0:
        torch.save(full, path)
    dist.barrier()
    loaded = torch.load(path, weights_only=False)
    restored_full = lf.ElasticWeightConsolidation(sharded, lam=LAM)
    restored_full.load_state_dict(shard_state_like(loaded, sharded))
    full_ok = _bitwise(_locals(restored_full.state_dict()), _locals(state))
    flags = torch.tensor([int(sharded_ok), int(full_ok)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    out["checkpoint_sharded_bitwise"] = bool(flags[0])
    out["checkpoint_full_bitwise"] = bool(flags[1])
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "rank0.pt"))


def lightning_mlp(shard: bool, fsdp1: bool = False) -> Any:
    """The MLP as a LightningModule trained with cross-entropy and momentum SGD; with ``shard``,
    ``configure_model`` applies ``fully_shard`` to each Linear and the root on the data-parallel
    mesh, with ``fsdp1`` it wraps ``net`` in FSDP1 (:func:`wrap_fsdp1`); once: a later Trainer
    finds it sharded."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self, shard: bool) -> None:
            super().__init__()
            self.net = make_model()
            self.shard = shard

        def configure_model(self) -> None:
            from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard

            if fsdp1 and not isinstance(self.net, FullyShardedDataParallel):
                self.net = wrap_fsdp1(self.net)  # type: ignore[assignment]
            if not self.shard or isinstance(self.net, FSDPModule):  # a later Trainer: done
                return
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net[2], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # momentum: Lightning cannot load a full FSDP2 checkpoint with empty optimizer state
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return Module(shard)


def task_loader(task: int) -> DataLoader[tuple[Tensor, ...]]:
    """The training data of continual task ``task`` for the Lightning runs (the same on every
    rank; the strategy's sampler splits it)."""
    gen = torch.Generator().manual_seed(200 + task)
    x = torch.randn(32, DIMS[0], generator=gen)
    y = torch.randint(0, DIMS[2], (32,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def cpu_trainer(callbacks: list[Any], strategy: Any, world: int, logger: Any = False) -> Any:
    """A one-epoch CPU ``Trainer`` over ``world`` processes, quiet, without checkpoints."""
    import lightning.pytorch as pl

    return pl.Trainer(
        callbacks=callbacks,
        strategy=strategy,
        accelerator="cpu",
        devices=world,
        max_epochs=1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def lightning_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """``lf.EWC`` over two tasks under Lightning's ``ModelParallelStrategy`` (FSDP2) and under
    ``strategy="ddp"`` from the same weights; after task 0 the sharded run writes a sharded and a
    full checkpoint and restores each into a new callback and Trainer."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    import lightning_fisher as lf

    rank_environment(rank, world, port)
    torch.set_num_threads(1)

    def fsdp() -> ModelParallelStrategy:
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)

    res: dict[str, Any] = {}
    for name in ("fsdp", "ddp"):
        model = lightning_mlp(shard=name == "fsdp")
        ewc = lf.EWC(lam=LAM, method="exact")
        t0 = cpu_trainer([ewc], world=world, strategy=fsdp() if name == "fsdp" else "ddp")
        t0.fit(model, task_loader(0))
        res[f"{name}_fisher"] = {
            k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in ewc.fishers[0].items()
        }
        if name == "fsdp":
            state = ewc.core.state_dict()
            for kind, distributed in (("sharded", True), ("full", False)):
                path = os.path.join(out_dir, f"{kind}.ckpt")
                t0.strategy._save_distributed_checkpoint = distributed  # type: ignore[attr-defined]
                t0.save_checkpoint(path)
                restored = lf.EWC(lam=LAM, method="exact")
                # at max_epochs already: the fit restores the checkpoint and trains nothing
                cpu_trainer([restored], world=world, strategy=fsdp()).fit(
                    model, task_loader(0), ckpt_path=path
                )
                same = _bitwise(_locals(restored.core.state_dict()), _locals(state))
                flag = torch.tensor([int(same)])
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                res[f"checkpoint_{kind}_bitwise"] = bool(flag)
        before = full_params(model.net)
        cpu_trainer([ewc], world=world, strategy=fsdp() if name == "fsdp" else "ddp").fit(
            model, task_loader(1)
        )  # EWC penalty
        after = full_params(model.net)
        res[f"{name}_update"] = {k: after[k] - before[k] for k in after}
    if rank == 0:
        torch.save(res, os.path.join(out_dir, "lightning.pt"))


def wrap_fsdp1(model: nn.Module, bf16: bool = False) -> nn.Module:
    """``model`` wrapped in FSDP1 with each Linear a unit of its own (``use_orig_params=True``;
    the first Linear's 63 entries give rank 0 of 2 a piece of its weight only, an empty bias);
    ``bf16``: bfloat16 compute and reduction (``MixedPrecision``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = MixedPrecision(param_dtype=torch.bfloat16) if bf16 else None
    return FullyShardedDataParallel(
        model,
        device_id=torch.device("cpu"),
        use_orig_params=True,
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        mixed_precision=policy,
    )


def fsdp1_whole(tensors: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Local pieces of an FSDP1 model's parameters (or of its Fisher) gathered whole, under the
    unwrapped names (a collective)."""
    from lightning_fisher.sharded_fsdp1 import full_state

    return full_state({k: v.detach().clone() for k, v in tensors.items()}, model)  # type: ignore[no-any-return]


def _flag(value: bool) -> bool:
    flag = torch.tensor([int(value)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def fsdp1_worker(
    rank: int, world: int, ports: tuple[int, int], out_dir: str, methods: tuple[str, ...]
) -> None:
    """FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``) in plain PyTorch, then
    ``lf.EWC`` under Lightning's ``FSDPStrategy``: one spawn for both (the plain group on a
    port of its own, destroyed before Lightning makes its group)."""
    rank_environment(rank, world, ports[1])  # Lightning's group
    torch.set_num_threads(1)
    init = f"tcp://127.0.0.1:{ports[0]}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = _fsdp1_plain(rank, methods)
    finally:
        dist.destroy_process_group()
    res.update(_fsdp1_lightning(rank, world, out_dir))
    if rank == 0:
        torch.save(res, os.path.join(out_dir, "fsdp1.pt"))


def _fsdp1_plain(rank: int, methods: tuple[str, ...]) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    import lightning_fisher as lf
    from lightning_fisher.sharded_fsdp1 import register_fisher_hook, shard_state, traces

    base = make_model()
    model = wrap_fsdp1(copy.deepcopy(base))
    register_fisher_hook(model)
    out: dict[str, Any] = {"fisher": {}, "placed_like_params": {}, "trace": {}}

    # Training with the hook gives FSDP1's own gradients, bitwise (three SGD steps).
    plain = wrap_fsdp1(copy.deepcopy(base))
    hooked = wrap_fsdp1(copy.deepcopy(base))
    register_fisher_hook(hooked)
    same = True
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (plain, hooked)]
    for step in range(3):
        x, y = train_batch(rank, step)
        grads = []
        for m, opt in zip((plain, hooked), opts):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            grads.append([p.grad for p in m.parameters()])
            opt.step()
        same = same and all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in zip(*grads)
        )
    out["hook_grads_bitwise"] = _flag(same)

    loader = rank_loader(rank)
    params = dict(model.named_parameters())
    for method in methods:
        fd = lf.estimate_fisher(model, loader, method=method, probes=2, seed=SEED)
        out["placed_like_params"][method] = all(
            t.shape == params[n].shape and t.ndim == 1 for n, t in fd.items()
        )
        out["fisher"][method] = fsdp1_whole(dict(fd), model)
        # FisherDiagonal.trace and sharded_fsdp1.traces both sum the ranks' pieces
        out["trace"][method] = (fd.trace(), sum(traces(fd, model).values()))
        try:
            fd.save(os.path.join(tempfile.gettempdir(), f"fsdp1_{rank}.safetensors"))
            out["save_refused"] = False
        except lf.FisherInputError:
            out["save_refused"] = True

    # A module inside a root that holds every parameter (one FSDP unit), as a LightningModule is
    # inside the wrapper of Lightning's FSDPStrategy: the pass forwards through the root.
    one_unit = FullyShardedDataParallel(
        copy.deepcopy(base), device_id=torch.device("cpu"), use_orig_params=True
    )
    register_fisher_hook(one_unit)
    out["fisher_inner"] = {}
    for method in INNER_METHODS:
        fd = lf.estimate_fisher(one_unit.module, loader, method=method, probes=2, seed=SEED)
        out["fisher_inner"][method] = fsdp1_whole(dict(fd), one_unit.module)

    # bf16 compute and reduction (MixedPrecision): squares formed and summed in float32.
    low = wrap_fsdp1(copy.deepcopy(base), bf16=True)
    register_fisher_hook(low)
    out["fisher_bf16"] = {}
    for method in BF16_METHODS:
        fd = lf.estimate_fisher(low, loader, method=method, probes=2, seed=SEED)
        out["fisher_bf16"][method] = fsdp1_whole(dict(fd), low)

    # EWC: the same (DDP) Fisher on both copies, three SGD steps with the penalty gradient
    # (and through the loss on a third copy); the gathered updates against DDP's.
    ddp = DistributedDataParallel(copy.deepcopy(base))
    fisher_dp = lf.estimate_fisher(ddp.module, loader, method="exact")
    loss_route = wrap_fsdp1(copy.deepcopy(base))
    register_fisher_hook(loss_route)
    updates: dict[str, dict[str, Tensor]] = {}
    penalties: dict[str, float] = {}
    states: dict[str, Any] = {}
    for name, m in (("sharded", model), ("sharded_loss", loss_route), ("ddp", ddp)):
        target = m.module if name == "ddp" else m
        fisher = dict(fisher_dp) if name == "ddp" else shard_state(dict(fisher_dp), target)
        ewc = lf.ElasticWeightConsolidation(target, lam=LAM)
        ewc.consolidate(lf.FisherDiagonal(fisher, fisher_dp.n_samples, fisher_dp.method))
        opt = torch.optim.SGD(m.parameters(), lr=0.2)
        for step in range(3):
            x, y = train_batch(rank, step)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            if name == "sharded_loss":
                loss = loss + ewc.penalty()
            loss.backward()
            if name != "sharded_loss":
                ewc.add_penalty_grad()
            before = dict(target.named_parameters())
            before = fsdp1_whole(before, target) if name != "ddp" else _clone(before)
            opt.step()
        after = dict(target.named_parameters())
        after = fsdp1_whole(after, target) if name != "ddp" else _clone(after)
        updates[name] = {k: after[k] - before[k] for k in after}
        penalties[name] = float(ewc.penalty().detach())
        states[name] = ewc
    out["updates"] = updates
    out["penalties"] = penalties

    # The Squisher from sharded Adam state (exp_avg_sq is a piece like its parameter).
    adam_sq: dict[str, dict[str, Tensor]] = {}
    for name, m in (("sharded", model), ("ddp", ddp)):
        target = m.module if name == "ddp" else m
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for step in range(2):
            x, y = train_batch(rank, 10 + step)
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        sq = dict(lf.fisher_from_optimizer(opt, target, batch_size=BATCH))
        adam_sq[name] = fsdp1_whole(sq, target) if name == "sharded" else sq
    out["squisher"] = adam_sq

    # The full state-dict form (gathered, unwrapped names) and back: bitwise.
    ewc = states["sharded"]
    state = ewc.state_dict()
    restored = lf.ElasticWeightConsolidation(model, lam=LAM)
    restored.load_state_dict(shard_state(fsdp1_whole_state(state, model), model))
    out["checkpoint_full_bitwise"] = _flag(_bitwise(restored.state_dict(), state))
    return out


def fsdp1_whole_state(state: Any, model: nn.Module) -> Any:
    from lightning_fisher.sharded_fsdp1 import full_state

    return full_state(state, model)


def _clone(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("module."): v.detach().clone() for k, v in tensors.items()}


def _full_state_dicts_without_offload() -> None:
    """Make this process's Lightning FSDPStrategy write and read full state dicts without
    ``offload_to_cpu``: on CPU parameters, FSDP1's offloaded full state dict clones storage its
    reshard has freed (a segmentation fault in ``Trainer.save_checkpoint``, with or without
    lightning_fisher's callbacks); on GPUs Lightning's own setting stays."""
    import lightning.pytorch.strategies.fsdp as lightning_fsdp
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    def context(module: nn.Module, world_size: int, rank0_only: bool = True) -> Any:
        return FSDP.state_dict_type(
            module,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        )

    lightning_fsdp._get_full_state_dict_context = context  # type: ignore[assignment]


def cpu_fsdp_strategy() -> Any:
    """Lightning's ``FSDPStrategy`` (each Linear a unit) through a subclass: Lightning refuses
    the exact type with a CPU accelerator, while FSDP1 runs on CPU processes with gloo."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    class CPUFSDPStrategy(FSDPStrategy):
        pass

    return CPUFSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))


def _fsdp1_lightning(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """``lf.EWC`` over two tasks under ``FSDPStrategy`` and under DDP from the same weights;
    after task 0 the FSDP1 run writes a sharded and a full checkpoint and restores each into a
    new callback, module and Trainer. (The module wraps its ``net`` in ``configure_model``: on
    a CPU-only machine FSDP1 needs ``device_id=torch.device("cpu")``, which Lightning's own
    wrapping of the whole module does not pass.)"""

    import lightning_fisher as lf

    _full_state_dicts_without_offload()
    fsdp = cpu_fsdp_strategy

    res: dict[str, Any] = {}
    for name in ("fsdp1", "ddp"):
        model = lightning_mlp(shard=False, fsdp1=name == "fsdp1")
        ewc = lf.EWC(lam=LAM, method="exact")
        t0 = cpu_trainer([ewc], world=world, strategy=fsdp() if name == "fsdp1" else "ddp")
        t0.fit(model, task_loader(0))
        fisher = dict(ewc.fishers[0])
        res[f"{name}_fisher"] = fsdp1_whole(fisher, model) if name == "fsdp1" else fisher
        if name == "fsdp1":
            state = fsdp1_whole_state(ewc.core.state_dict(), model)
            for kind in ("sharded", "full"):
                path = os.path.join(out_dir, f"fsdp1-{kind}.ckpt")
                t0.strategy._state_dict_type = kind  # type: ignore[attr-defined]
                t0.save_checkpoint(path)
                restored = lf.EWC(lam=LAM, method="exact")
                fresh = lightning_mlp(shard=False, fsdp1=True)
                # at max_epochs already: the fit restores the checkpoint and trains nothing
                cpu_trainer([restored], world=world, strategy=fsdp()).fit(
                    fresh, task_loader(0), ckpt_path=path
                )
                got = fsdp1_whole_state(restored.core.state_dict(), fresh)
                res[f"checkpoint_{kind}_bitwise"] = _flag(_bitwise(got, state))
        before = fsdp1_whole(dict(model.named_parameters()), model)
        cpu_trainer([ewc], world=world, strategy=fsdp() if name == "fsdp1" else "ddp").fit(
            model, task_loader(1)
        )  # EWC penalty
        after = fsdp1_whole(dict(model.named_parameters()), model)
        res[f"{name}_update"] = {k: after[k] - before[k] for k in after}
    return res


def run_fsdp1(world: int, methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows for FSDP1: every method against the unsharded Fisher (plain PyTorch), EWC updates
    against DDP's (gradient and loss routes), the full state-dict round trip; and ``lf.EWC``
    under Lightning's ``FSDPStrategy`` against DDP, through its sharded and full checkpoints."""
    with tempfile.TemporaryDirectory() as tmp:
        ports = _free_ports(2)
        mp.spawn(fsdp1_worker, args=(world, ports, tmp, methods), nprocs=world, join=True)
        res = torch.load(os.path.join(tmp, "fsdp1.pt"), weights_only=False)
    ddp_update, ddp_penalty = res["updates"]["ddp"], res["penalties"]["ddp"]
    update_diff = max(rel_diff(res["updates"][v], ddp_update) for v in ("sharded", "sharded_loss"))
    penalty_diff = max(
        abs(res["penalties"][v] - ddp_penalty) / max(abs(ddp_penalty), 1e-30)
        for v in ("sharded", "sharded_loss")
    )
    assert ddp_penalty > 0, "the EWC steps left the parameters at their anchors"
    rows = []
    for method in (*methods, "squisher"):
        if method == "squisher":
            placed = True
            diff = rel_diff(res["squisher"]["sharded"], res["squisher"]["ddp"])
        else:
            placed = res["placed_like_params"][method]
            ref = reference_fisher(method, world)
            ref_trace = sum(float(v.double().sum()) for v in ref.values())
            # the traces summed over the ranks' pieces (FisherDiagonal.trace and
            # sharded_fsdp1.traces) count too; a Fisher of local pieces must refuse save()
            diff = max(
                rel_diff(res["fisher"][method], ref),
                *(abs(tr - ref_trace) / ref_trace for tr in res["trace"][method]),
                0.0 if res["save_refused"] else math.inf,
            )
        rows.append(
            {
                "strategy": "fsdp1 (FullyShardedDataParallel, use_orig_params)",
                "world_size": world,
                "method": method,
                "fisher_max_rel_diff_vs_unsharded": diff,
                "fisher_placed_like_params": placed,
                "ewc_update_max_rel_diff_vs_ddp": update_diff,
                "ewc_penalty_rel_diff_vs_ddp": penalty_diff,
                "checkpoint_roundtrip_bitwise": res["checkpoint_full_bitwise"],
                "checkpoint_sharded_bitwise": None,
                "checkpoint_full_bitwise": res["checkpoint_full_bitwise"],
                "hook_grads_bitwise": res["hook_grads_bitwise"],
            }
        )
    fisher_only = [
        ("fsdp1, the module inside a one-unit wrapper", m, f, False)
        for m, f in res["fisher_inner"].items()
    ] + [
        ("fsdp1, bf16 compute (MixedPrecision)", m, f, True) for m, f in res["fisher_bf16"].items()
    ]
    for strategy, method, fisher, bf16 in fisher_only:
        rows.append(
            {
                "strategy": strategy,
                "world_size": world,
                "method": method,
                "fisher_max_rel_diff_vs_unsharded": rel_diff(
                    fisher, reference_fisher(method, world, bf16=bf16)
                ),
                "fisher_placed_like_params": True,
                "ewc_update_max_rel_diff_vs_ddp": None,
                "ewc_penalty_rel_diff_vs_ddp": None,
                "checkpoint_roundtrip_bitwise": None,
                "checkpoint_sharded_bitwise": None,
                "checkpoint_full_bitwise": None,
                "hook_grads_bitwise": None,
            }
        )
    rows.append(
        {
            "strategy": "lightning FSDPStrategy (FSDP1), lf.EWC",
            "world_size": world,
            "method": "exact",
            "fisher_max_rel_diff_vs_unsharded": rel_diff(res["fsdp1_fisher"], res["ddp_fisher"]),
            "fisher_placed_like_params": True,
            "ewc_update_max_rel_diff_vs_ddp": rel_diff(res["fsdp1_update"], res["ddp_update"]),
            "ewc_penalty_rel_diff_vs_ddp": None,
            "checkpoint_roundtrip_bitwise": res["checkpoint_sharded_bitwise"]
            and res["checkpoint_full_bitwise"],
            "checkpoint_sharded_bitwise": res["checkpoint_sharded_bitwise"],
            "checkpoint_full_bitwise": res["checkpoint_full_bitwise"],
            "hook_grads_bitwise": None,
        }
    )
    return rows


def _scalars_diff(got: dict[str, float], want: dict[str, float]) -> float:
    """max over the names of |got - want| / max(|want|, 1e-30) (the same names required)."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    return max(
        (abs(got[k] - want[k]) / max(abs(want[k]), 1e-30) for k in want if got[k] != want[k]),
        default=0.0,
    )


class RecordLogger(Logger):
    """Keeps every logged metric as ``name@step`` -> value."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "record"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics[f"{k}@{step}"] = float(v)


def diagnostics_worker(rank: int, world: int, ports: tuple[int, int], out_dir: str) -> None:
    """``compute_diagnostics`` on a sharded and an unsharded copy of the same weights and data
    (deterministic bounds with their certificate; Hutchinson bounds with CVs and standard
    errors; a bounded histogram sample), then ``FisherMonitor``, ``FisherDiagnostics`` and
    ``FisherTraceRegularizer`` in one ``fit`` under ``ModelParallelStrategy`` and under DDP from
    the same weights: every logged number, the sample and the regularised update."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    import lightning_fisher as lf
    from lightning_fisher.diagnostics import compute_diagnostics

    rank_environment(rank, world, ports[1])  # Lightning's group
    torch.set_num_threads(1)
    # A port of its own: a client of the next group must not reach this group's store
    init = f"tcp://127.0.0.1:{ports[0]}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    res: dict[str, Any] = {"plain": {}}
    base = make_model()
    sharded = copy.deepcopy(base)
    shard(sharded)
    batches = list(rank_loader(rank))
    for kind, bounds in (("deterministic", None), ("hutchinson", 0)):
        kw: dict[str, Any] = {"probes": 2, "max_batches": 2, "seed": SEED}
        kw["histogram_entries"] = 16  # below the weights' sizes: a sample is drawn
        if bounds is not None:
            kw["deterministic_bounds_max_classes"] = bounds
        got = compute_diagnostics(sharded, batches, **kw)
        want = compute_diagnostics(copy.deepcopy(base), batches, **kw)
        res["plain"][kind] = {
            "scalars": (got.scalars(), want.scalars()),
            "entries": (got.entries, want.entries),
            "sharded": all(hasattr(t, "placements") for t in got.density_fisher.values()),
        }
    try:
        compute_diagnostics(sharded, batches, eigenvalues=2)
        res["spectrum_refused"] = False
    except lf.FisherInputError as err:
        res["spectrum_refused"] = "Fisher-vector products" in str(err)
    dist.destroy_process_group()

    gen = torch.Generator().manual_seed(300)
    x = torch.randn(24, DIMS[0], generator=gen)
    y = torch.randint(0, DIMS[2], (24,), generator=gen)
    data = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    # "plain": DDP without the regulariser, to show its gradient moves the update
    for name in ("fsdp", "ddp", "plain"):
        model = lightning_mlp(shard=name == "fsdp")
        logger = RecordLogger()
        diagnostics = lf.FisherDiagnostics(
            every_n_epochs=1, dataloader="train", max_batches=2, histogram_entries=16
        )
        monitor = lf.FisherMonitor(
            every_n_epochs=1, method="hutchinson", probes=2, fisher_kwargs={"seed": SEED}
        )
        callbacks = [
            monitor,
            diagnostics,
            lf.FisherTraceRegularizer(alpha=0.5, probes=2),
        ][: 2 if name == "plain" else 3]

        def make_trainer(callbacks: list[Any], logger: Any = False, name: str = name) -> pl.Trainer:
            strategy: Any = (
                ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
                if name == "fsdp"
                else "ddp"
            )
            return cpu_trainer(callbacks, strategy, world, logger)

        trainer = make_trainer(callbacks, logger)
        before = full_params(copy.deepcopy(make_model()))
        trainer.fit(model, data)
        if name == "fsdp":  # the monitor's sharded estimate through both checkpoint forms
            assert monitor.fisher is not None
            state = _locals(dict(monitor.fisher))
            for kind, distributed in (("sharded", True), ("full", False)):
                path = os.path.join(out_dir, f"monitor-{kind}.ckpt")
                trainer.strategy._save_distributed_checkpoint = distributed  # type: ignore[attr-defined]
                trainer.save_checkpoint(path)
                restored = lf.FisherMonitor(every_n_epochs=1)
                # at max_epochs already: the fit restores the checkpoint and trains nothing
                make_trainer([restored]).fit(model, data, ckpt_path=path)
                same = restored.fisher is not None and _bitwise(
                    _locals(dict(restored.fisher)), state
                )
                flag = torch.tensor([int(same)])
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                res[f"monitor_checkpoint_{kind}_bitwise"] = bool(flag)
        after = full_params(model.net)
        res[f"{name}_update"] = {k: after[k] - before[k] for k in after}
        res[f"{name}_metrics"] = dict(logger.metrics)
        assert diagnostics.last is not None
        res[f"{name}_entries"] = diagnostics.last.entries
    if rank == 0:
        torch.save(res, os.path.join(out_dir, "diagnostics.pt"))


def run_diagnostics(world: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows for the diagnostics and the callbacks under FSDP2 (the Fisher column holds the
    largest relative difference of any logged number or sampled entry from the unsharded run;
    the EWC column the trace regulariser's update against DDP's), and the details."""
    with tempfile.TemporaryDirectory() as tmp:
        ports = _free_ports(2)
        mp.spawn(diagnostics_worker, args=(world, ports, tmp), nprocs=world, join=True)
        res = torch.load(os.path.join(tmp, "diagnostics.pt"), weights_only=False)
    details: dict[str, Any] = {
        "spectrum_refused": res["spectrum_refused"],
        "regularizer_effect": rel_diff(res["ddp_update"], res["plain_update"]),
        "sample_sizes": {k: v.numel() for k, v in res["fsdp_entries"].items()},
        "numel": {k: v.numel() for k, v in res["fsdp_update"].items()},
    }
    rows = []
    for kind, r in res["plain"].items():
        got, want = r["scalars"]
        diff = max(_scalars_diff(got, want), rel_diff(*r["entries"]))
        details[f"{kind}_scalars"] = sorted(want)
        rows.append(
            {
                "strategy": "fsdp2, compute_diagnostics",
                "world_size": world,
                "method": f"{kind} bounds",
                "fisher_max_rel_diff_vs_unsharded": diff,
                "fisher_placed_like_params": r["sharded"],
                "ewc_update_max_rel_diff_vs_ddp": None,
                "ewc_penalty_rel_diff_vs_ddp": None,
                "checkpoint_roundtrip_bitwise": None,
                "checkpoint_sharded_bitwise": None,
                "checkpoint_full_bitwise": None,
            }
        )
    got, want = res["fsdp_metrics"], res["ddp_metrics"]
    # seconds are timings, not results
    got = {k: v for k, v in got.items() if "seconds" not in k}
    want = {k: v for k, v in want.items() if "seconds" not in k}
    details["lightning_metrics"] = sorted(want)
    rows.append(
        {
            "strategy": "lightning ModelParallelStrategy (FSDP2), "
            "FisherMonitor + FisherDiagnostics + FisherTraceRegularizer",
            "world_size": world,
            "method": "hutchinson (monitor), deterministic bounds (diagnostics)",
            "fisher_max_rel_diff_vs_unsharded": max(
                _scalars_diff(got, want), rel_diff(res["fsdp_entries"], res["ddp_entries"])
            ),
            "fisher_placed_like_params": True,
            "ewc_update_max_rel_diff_vs_ddp": rel_diff(res["fsdp_update"], res["ddp_update"]),
            "ewc_penalty_rel_diff_vs_ddp": None,
            "checkpoint_roundtrip_bitwise": res["monitor_checkpoint_sharded_bitwise"]
            and res["monitor_checkpoint_full_bitwise"],
            "checkpoint_sharded_bitwise": res["monitor_checkpoint_sharded_bitwise"],
            "checkpoint_full_bitwise": res["monitor_checkpoint_full_bitwise"],
        }
    )
    return rows, details


def fsdp1_diagnostics_worker(rank: int, world: int, ports: tuple[int, int], out_dir: str) -> None:
    """FSDP1: ``compute_diagnostics`` on wrapped copies (each Linear a unit; NO_SHARD; the
    module inside a one-unit wrapper) against an unsharded copy, the regulariser's gradient on
    whole parameters gathered from the pieces against the unsharded one, then
    ``FisherMonitor``, ``FisherDiagnostics`` and ``FisherTraceRegularizer`` in one ``fit``
    under ``FSDPStrategy`` and under DDP from the same weights."""
    import lightning.pytorch as pl
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    import lightning_fisher as lf
    from lightning_fisher.diagnostics import compute_diagnostics
    from lightning_fisher.regularizers import fisher_trace_penalty_grads
    from lightning_fisher.sharded_fsdp1 import (
        local_pieces,
        register_fisher_hook,
        whole_parameters,
    )

    rank_environment(rank, world, ports[1])  # Lightning's group
    torch.set_num_threads(1)
    init = f"tcp://127.0.0.1:{ports[0]}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    res: dict[str, Any] = {"plain": {}}
    base = make_model()
    batches = list(rank_loader(rank))
    kw: dict[str, Any] = {"probes": 2, "max_batches": 2, "seed": SEED, "histogram_entries": 16}
    no_shard = FullyShardedDataParallel(
        copy.deepcopy(base),
        device_id=torch.device("cpu"),
        use_orig_params=True,
        sharding_strategy=ShardingStrategy.NO_SHARD,
    )
    one_unit = FullyShardedDataParallel(
        copy.deepcopy(base), device_id=torch.device("cpu"), use_orig_params=True
    )
    register_fisher_hook(one_unit)  # the inner module is not FSDP1's: register on the root
    cases = [
        ("each Linear a unit", "deterministic", wrap_fsdp1(copy.deepcopy(base))),
        ("each Linear a unit", "hutchinson", wrap_fsdp1(copy.deepcopy(base))),
        ("NO_SHARD", "deterministic", no_shard),
        ("the module inside a one-unit wrapper", "deterministic", one_unit),
    ]
    for layout, kind, wrapped in cases:
        target = wrapped.module if wrapped is one_unit else wrapped
        bounds = {} if kind == "deterministic" else {"deterministic_bounds_max_classes": 0}
        got = compute_diagnostics(target, batches, **kw, **bounds)
        want = compute_diagnostics(copy.deepcopy(base), batches, **kw, **bounds)
        res["plain"][(layout, kind)] = {
            "scalars": (got.scalars(), want.scalars()),
            "entries": (got.entries, want.entries),
            "pieces": all(t.ndim == 1 for t in got.density_fisher.values()) or layout == "NO_SHARD",
        }
    try:
        compute_diagnostics(wrap_fsdp1(copy.deepcopy(base)), batches, eigenvalues=2)
        res["spectrum_refused"] = False
    except lf.FisherInputError as err:
        res["spectrum_refused"] = "Fisher-vector products" in str(err)
    # the regulariser's gradient on whole parameters gathered from the pieces (the module
    # inside the one-unit wrapper), cut to this rank's pieces, against the unsharded gradient
    gen = torch.Generator().manual_seed(7 + rank)
    plain = copy.deepcopy(base)
    grads_want, trace_want = fisher_trace_penalty_grads(
        plain, batches[:1], list(plain.parameters()), 0.5, 2, generator=gen
    )
    inner = one_unit.module
    names = [n for n, _ in inner.named_parameters()]
    with whole_parameters(inner) as whole:
        gen = torch.Generator().manual_seed(7 + rank)
        grads_got, trace_got = fisher_trace_penalty_grads(
            inner, batches[:1], [whole[n] for n in names], 0.5, 2, generator=gen
        )
    cut_want = local_pieces(dict(zip(names, grads_want)), inner)
    got_pieces = local_pieces(dict(zip(names, grads_got)), inner)
    res["penalty_grad_diff"] = _flag_max(
        max(
            rel_diff({n: got_pieces[n]}, {n: cut_want[n]}) if cut_want[n].numel() else 0.0
            for n in names
        )
        + abs(float(trace_got - trace_want)) / float(trace_want)
    )
    # the parameters are FSDP1's again: a training step runs and matches an untouched copy
    other = FullyShardedDataParallel(
        copy.deepcopy(base), device_id=torch.device("cpu"), use_orig_params=True
    )
    x, y = train_batch(rank, 0)
    for m in (one_unit, other):
        nn.functional.cross_entropy(m(x), y).backward()
    res["training_after_bitwise"] = _flag(
        all(
            torch.equal(p.grad, q.grad)
            for p, q in zip(one_unit.parameters(), other.parameters())
            if p.grad is not None and q.grad is not None
        )
    )
    dist.destroy_process_group()

    _full_state_dicts_without_offload()
    gen = torch.Generator().manual_seed(300)
    x = torch.randn(24, DIMS[0], generator=gen)
    y = torch.randint(0, DIMS[2], (24,), generator=gen)
    data = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    for name in ("fsdp1", "ddp"):
        model = lightning_mlp(shard=False, fsdp1=name == "fsdp1")
        logger = RecordLogger()
        diagnostics = lf.FisherDiagnostics(
            every_n_epochs=1, dataloader="train", max_batches=2, histogram_entries=16
        )
        monitor = lf.FisherMonitor(
            every_n_epochs=1, method="hutchinson", probes=2, fisher_kwargs={"seed": SEED}
        )
        callbacks = [monitor, diagnostics, lf.FisherTraceRegularizer(alpha=0.5, probes=2)]

        def make_trainer(callbacks: list[Any], logger: Any = False, name: str = name) -> pl.Trainer:
            strategy = cpu_fsdp_strategy() if name == "fsdp1" else "ddp"
            return cpu_trainer(callbacks, strategy, world, logger)

        trainer = make_trainer(callbacks, logger)
        before = full_params(make_model())
        trainer.fit(model, data)
        if name == "fsdp1":  # the monitor's estimate (local pieces) through both checkpoints
            assert monitor.fisher is not None
            state, trace = _clone(dict(monitor.fisher)), monitor.fisher.trace()
            for kind in ("sharded", "full"):
                path = os.path.join(out_dir, f"fsdp1-monitor-{kind}.ckpt")
                trainer.strategy._state_dict_type = kind  # type: ignore[attr-defined]
                trainer.save_checkpoint(path)
                restored = lf.FisherMonitor(every_n_epochs=1)
                fresh = lightning_mlp(shard=False, fsdp1=True)
                # at max_epochs already: the fit restores the checkpoint and trains nothing
                make_trainer([restored]).fit(fresh, data, ckpt_path=path)
                same = (
                    restored.fisher is not None
                    and _bitwise(_clone(dict(restored.fisher)), state)
                    and restored.fisher.trace() == trace  # summed over the ranks' pieces
                )
                res[f"monitor_checkpoint_{kind}_bitwise"] = _flag(same)
            after = fsdp1_whole(dict(model.net.named_parameters()), model.net)
        else:
            after = full_params(model.net)
        res[f"{name}_update"] = {k: after[k] - before[k] for k in after}
        res[f"{name}_metrics"] = dict(logger.metrics)
        assert diagnostics.last is not None
        res[f"{name}_entries"] = diagnostics.last.entries
    if rank == 0:
        torch.save(res, os.path.join(out_dir, "fsdp1_diagnostics.pt"))


def _flag_max(value: float) -> float:
    """The largest ``value`` over the ranks."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run_fsdp1_diagnostics(world: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows for the diagnostics and the callbacks under FSDP1 (columns as in
    :func:`run_diagnostics`), and the details."""
    with tempfile.TemporaryDirectory() as tmp:
        ports = _free_ports(2)
        mp.spawn(fsdp1_diagnostics_worker, args=(world, ports, tmp), nprocs=world, join=True)
        res = torch.load(os.path.join(tmp, "fsdp1_diagnostics.pt"), weights_only=False)
    details: dict[str, Any] = {
        "spectrum_refused": res["spectrum_refused"],
        "penalty_grad_diff": res["penalty_grad_diff"],
        "training_after_bitwise": res["training_after_bitwise"],
        "sample_sizes": {k: v.numel() for k, v in res["fsdp1_entries"].items()},
        "numel": {k: v.numel() for k, v in res["ddp_update"].items()},
    }
    rows = []
    for (layout, kind), r in res["plain"].items():
        got, want = r["scalars"]
        diff = max(_scalars_diff(got, want), rel_diff(*r["entries"]))
        details[f"{layout}, {kind}_scalars"] = sorted(want)
        rows.append(
            {
                "strategy": f"fsdp1 ({layout}), compute_diagnostics",
                "world_size": world,
                "method": f"{kind} bounds",
                "fisher_max_rel_diff_vs_unsharded": diff,
                "fisher_placed_like_params": r["pieces"],
                "ewc_update_max_rel_diff_vs_ddp": None,
                "ewc_penalty_rel_diff_vs_ddp": None,
                "checkpoint_roundtrip_bitwise": None,
                "checkpoint_sharded_bitwise": None,
                "checkpoint_full_bitwise": None,
            }
        )
    got = {k: v for k, v in res["fsdp1_metrics"].items() if "seconds" not in k}
    want = {k: v for k, v in res["ddp_metrics"].items() if "seconds" not in k}
    details["lightning_metrics"] = sorted(want)
    rows.append(
        {
            "strategy": "lightning FSDPStrategy (FSDP1), "
            "FisherMonitor + FisherDiagnostics + FisherTraceRegularizer",
            "world_size": world,
            "method": "hutchinson (monitor), deterministic bounds (diagnostics)",
            "fisher_max_rel_diff_vs_unsharded": max(
                _scalars_diff(got, want), rel_diff(res["fsdp1_entries"], res["ddp_entries"])
            ),
            "fisher_placed_like_params": True,
            "ewc_update_max_rel_diff_vs_ddp": rel_diff(res["fsdp1_update"], res["ddp_update"]),
            "ewc_penalty_rel_diff_vs_ddp": None,
            "checkpoint_roundtrip_bitwise": res["monitor_checkpoint_sharded_bitwise"]
            and res["monitor_checkpoint_full_bitwise"],
            "checkpoint_sharded_bitwise": res["monitor_checkpoint_sharded_bitwise"],
            "checkpoint_full_bitwise": res["monitor_checkpoint_full_bitwise"],
        }
    )
    return rows, details


def run_lightning(world: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(lightning_worker, args=(world, _free_port(), tmp), nprocs=world, join=True)
        res = torch.load(os.path.join(tmp, "lightning.pt"), weights_only=False)
    return {
        "strategy": "lightning ModelParallelStrategy (FSDP2), lf.EWC",
        "world_size": world,
        "method": "exact",
        "fisher_max_rel_diff_vs_unsharded": rel_diff(res["fsdp_fisher"], res["ddp_fisher"]),
        "fisher_placed_like_params": True,
        "ewc_update_max_rel_diff_vs_ddp": rel_diff(res["fsdp_update"], res["ddp_update"]),
        "ewc_penalty_rel_diff_vs_ddp": None,
        "checkpoint_roundtrip_bitwise": res["checkpoint_sharded_bitwise"]
        and res["checkpoint_full_bitwise"],
        "checkpoint_sharded_bitwise": res["checkpoint_sharded_bitwise"],
        "checkpoint_full_bitwise": res["checkpoint_full_bitwise"],
    }


class _ToBF16(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.to(torch.bfloat16)


def reference_fisher(method: str, world: int, bf16: bool = False) -> dict[str, Tensor]:
    """The Fisher of the union of the ranks' data, in one process on the unsharded model: each
    rank's estimate times its normaliser (inputs, or batches for ``batched``), summed, divided
    by the total (what a DDP pass all-reduces; each rank draws probes from the same seed).
    ``bf16``: the model and its inputs in bfloat16, as FSDP2's bf16 policy computes (the squares
    are summed in float32 either way)."""
    import lightning_fisher as lf

    model: nn.Module = make_model()
    if bf16:
        model = nn.Sequential(_ToBF16(), *model.bfloat16())
    total: dict[str, Tensor] = {}
    norm = 0.0
    for r in range(world):
        loader = rank_loader(r)
        fd = lf.estimate_fisher(model, loader, method=method, probes=2, seed=SEED)
        weight = float(len(loader) if method == "batched" else fd.n_samples)
        norm += weight
        for k, v in fd.items():
            if bf16:  # "1.weight" of the cast-then-layers model is "0.weight" of the MLP
                head, _, rest = k.partition(".")
                k = f"{int(head) - 1}.{rest}"
            total[k] = total.get(k, torch.zeros_like(v)) + v.double() * weight
    return {k: (v / norm).float() for k, v in total.items()}


def rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max_rel_diff(a, b)


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(n: int) -> tuple[int, ...]:
    """``n`` different free ports (the sockets are held open together while they are drawn)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return tuple(int(s.getsockname()[1]) for s in sockets)
    finally:
        for s in sockets:
            s.close()


def run(world: int, methods: tuple[str, ...]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, _free_port(), tmp, methods), nprocs=world, join=True)
        res = torch.load(os.path.join(tmp, "rank0.pt"), weights_only=False)
    ddp_update, ddp_penalty = res["updates"]["ddp"], res["penalties"]["ddp"]
    update_diff = max(rel_diff(res["updates"][v], ddp_update) for v in ("sharded", "sharded_loss"))
    penalty_diff = max(
        abs(res["penalties"][v] - ddp_penalty) / max(abs(ddp_penalty), 1e-30)
        for v in ("sharded", "sharded_loss")
    )
    bitwise = res["checkpoint_sharded_bitwise"] and res["checkpoint_full_bitwise"]
    assert res["ewc_moved_params"], "the EWC steps left the parameters unchanged"
    rows = []
    for method in (*methods, "squisher"):
        if method == "squisher":  # against the Squisher of the DDP copy's Adam
            res["placed_like_params"][method] = True
            diff = rel_diff(res["squisher"]["sharded"], res["squisher"]["ddp"])
        else:
            diff = rel_diff(res["fisher"][method], reference_fisher(method, world))
        rows.append(
            {
                "strategy": "fsdp2 (fully_shard)",
                "world_size": world,
                "method": method,
                "fisher_max_rel_diff_vs_unsharded": diff,
                "fisher_placed_like_params": res["placed_like_params"][method],
                "ewc_update_max_rel_diff_vs_ddp": update_diff,
                "ewc_penalty_rel_diff_vs_ddp": penalty_diff,
                "checkpoint_roundtrip_bitwise": bitwise,
                "checkpoint_sharded_bitwise": res["checkpoint_sharded_bitwise"],
                "checkpoint_full_bitwise": res["checkpoint_full_bitwise"],
            }
        )
    fisher_only = [
        ("fsdp2, bf16 compute (MixedPrecisionPolicy)", method, fisher, True)
        for method, fisher in res["fisher_bf16"].items()
    ] + [
        ("fsdp2, one parameter left whole (ignored_params)", method, fisher, False)
        for method, fisher in res["fisher_ignored"].items()
    ]
    for strategy, method, fisher, bf16 in fisher_only:
        rows.append(
            {
                "strategy": strategy,
                "world_size": world,
                "method": method,
                "fisher_max_rel_diff_vs_unsharded": rel_diff(
                    fisher, reference_fisher(method, world, bf16=bf16)
                ),
                "fisher_placed_like_params": True,
                "ewc_update_max_rel_diff_vs_ddp": None,
                "ewc_penalty_rel_diff_vs_ddp": None,
                "checkpoint_roundtrip_bitwise": None,
                "checkpoint_sharded_bitwise": None,
                "checkpoint_full_bitwise": None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=("fsdp2", "fsdp1"),
        default=["fsdp2", "fsdp1"],
        help="fsdp2: fully_shard and ModelParallelStrategy; fsdp1: FullyShardedDataParallel "
        "and FSDPStrategy",
    )
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning rows")
    parser.add_argument(
        "--no-diagnostics", action="store_true", help="skip the diagnostics and callback rows"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fsdp_cpu.json")
    args = parser.parse_args(argv)
    rows = []
    for w in args.world:
        if "fsdp2" in args.strategies:
            rows += run(w, tuple(args.methods))
            if not args.no_lightning:
                rows.append(run_lightning(w))
            if not args.no_diagnostics:
                rows += run_diagnostics(w)[0]
        if "fsdp1" in args.strategies:
            fsdp1_rows = run_fsdp1(w, tuple(args.methods))
            rows += [
                r for r in fsdp1_rows if not args.no_lightning or "lightning" not in r["strategy"]
            ]
            if not args.no_diagnostics:
                rows += run_fsdp1_diagnostics(w)[0]
    report = {
        "command": " ".join(["python -m benchmarks.fsdp_check", *(argv or sys.argv[1:])]),
        "device": f"CPU ({platform.processor() or platform.machine()}), gloo, 1 thread per rank",
        "versions": versions(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(strict_json.dumps(report, indent=2) + "\n")
    cols = [
        "strategy",
        "world_size",
        "method",
        "fisher_max_rel_diff_vs_unsharded",
        "ewc_update_max_rel_diff_vs_ddp",
        "checkpoint_roundtrip_bitwise",
    ]
    lines = [
        "# FSDP2 and FSDP1 on CPU: sharded Fisher, EWC and diagnostics against unsharded runs",
        "",
        f"`{report['command']}` on {report['device']}; torch {torch.__version__}.",
        "",
        "Differences: max |sharded - reference| / max |reference| per tensor, the largest over "
        "tensors. References: the Fisher of an unsharded model on the same per-rank data (the "
        "squisher row: the Squisher of a DDP copy trained alike; bf16 rows: the unsharded model "
        "in bfloat16, squares summed in float32); EWC: a DDP copy's update "
        "(gradient and loss routes). Checkpoints: distributed (sharded) and full, bitwise. "
        "Diagnostics rows: the Fisher column is the largest relative difference of any number "
        "`compute_diagnostics` returns or the callbacks log (traces, bound ratios, fractions, "
        "gaps, certificate, kernel statistics, CVs and standard errors, and the bounded "
        "histogram sample) from the unsharded (DDP) run on the same data; the EWC column of "
        "the callbacks' row is the update of a step with FisherTraceRegularizer against DDP's, "
        "and its checkpoint column FisherMonitor's sharded estimate through Lightning's sharded "
        "and full checkpoints. FSDP1 rows: the Fisher as 1-D local pieces of each parameter, "
        "gathered (and the trace summed over the ranks' pieces); the plain rows' checkpoint column is the full state-dict form and back "
        "(their training with the Fisher hook gave bitwise FSDP1's own gradients: "
        "`hook_grads_bitwise` in the JSON); the FSDPStrategy row's is Lightning's sharded and "
        "full checkpoints resumed in a new Trainer.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in rows:
        cells = [
            f"{row[c]:.2e}" if isinstance(row[c], float) else "-" if row[c] is None else str(row[c])
            for c in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
