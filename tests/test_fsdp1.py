"""FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``; Lightning's ``FSDPStrategy``):
Fisher estimates as 1-D local pieces equal to unsharded runs, the communication hook that leaves
training's gradients bitwise unchanged, EWC updates equal to DDP's and checkpoints round-tripping
bitwise (2 CPU processes, gloo, through ``benchmarks/fsdp_check.py``); on one rank, the
``NO_SHARD`` route and the refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lit_helpers import Classifier
from torch import nn

import lightning_fisher as lf
from lightning_fisher import sharded_fsdp1

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp1_fisher_ewc_and_checkpoints_equal_unsharded_runs() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.fsdp_check import METHODS, run_fsdp1

    rows = run_fsdp1(WORLD, METHODS)
    plain = [r for r in rows if r["strategy"].startswith("fsdp1 (")]
    assert {r["method"] for r in plain} == {*METHODS, "squisher"}
    inner = [r for r in rows if "one-unit wrapper" in r["strategy"]]
    assert {r["method"] for r in inner} == {"hutchinson", "exact"}
    bf16 = [r for r in rows if "bf16" in r["strategy"]]  # squares summed in float32
    assert {r["method"] for r in bf16} == {"batched", "hutchinson"}
    (lightning,) = [r for r in rows if r["strategy"].startswith("lightning FSDPStrategy")]
    for row in rows:
        assert row["world_size"] == WORLD
        assert row["fisher_placed_like_params"] is True, row
        assert row["fisher_max_rel_diff_vs_unsharded"] <= 1e-6, row
    for row in [*plain, lightning]:
        assert row["ewc_update_max_rel_diff_vs_ddp"] <= 1e-6, row
        assert row["checkpoint_full_bitwise"] is True, row
    for row in plain:
        assert row["hook_grads_bitwise"] is True, row  # training with the hook: FSDP1's grads
        assert row["ewc_penalty_rel_diff_vs_ddp"] <= 1e-6, row
    assert lightning["checkpoint_sharded_bitwise"] is True, lightning


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _data() -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    x, y = 4 * torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=5)


def _wrap(model: nn.Module, **kwargs: Any) -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel

    kwargs.setdefault("use_orig_params", True)
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), **kwargs)


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp1_on_one_rank_equals_unsharded_and_round_trips(one_rank_group: None) -> None:
    """One rank: FSDP1 runs NO_SHARD (the hook's all-reduce route), registered on the first
    Fisher pass since no forward ran; pieces are whole flat parameters."""
    plain = _mlp()
    wrapped = _wrap(_mlp())
    for method in ("exact", "batched", "hutchinson"):
        ref = lf.estimate_fisher(plain, _data(), method=method, seed=1)
        fd = lf.estimate_fisher(wrapped, _data(), method=method, seed=1)
        full = sharded_fsdp1.full_state(dict(fd), wrapped)
        assert full.keys() == ref.keys()
        for k, v in ref.items():
            assert full[k].shape == v.shape
            assert float((full[k] - v).abs().max()) <= 1e-6 * float(v.abs().max()), (method, k)
    back = sharded_fsdp1.shard_state(full, wrapped)
    assert all(torch.equal(back[k], fd[k]) for k in fd)  # bitwise, under the wrapped names
    # training after the passes: the hook reduces like FSDP1 (no squaring left on), bitwise
    assert sharded_fsdp1._REGISTERED[wrapped].squaring is False
    other = _wrap(_mlp())
    x = torch.randn(2, 5)
    for m in (wrapped, other):
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()
    for p, q in zip(wrapped.parameters(), other.parameters()):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad)


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp1_refusals_name_what_to_change(one_rank_group: None) -> None:
    with pytest.raises(lf.FisherInputError, match=r"use_orig_params=False.*use_orig_params=True"):
        sharded_fsdp1.register_fisher_hook(_wrap(_mlp(), use_orig_params=False))
    late = _wrap(_mlp())
    late(torch.randn(2, 5))  # a forward before the hook: FSDP1 accepts no hook any more
    with pytest.raises(lf.FisherInputError, match=r"register_fisher_hook\(model\)"):
        lf.estimate_fisher(late, _data(), method="batched")
    other = _wrap(_mlp())
    other.register_comm_hook(None, lambda state, grad: None)
    with pytest.raises(lf.FisherInputError, match="already has the communication hook"):
        sharded_fsdp1.register_fisher_hook(other)
    ok = _wrap(_mlp())
    sharded_fsdp1.register_fisher_hook(ok)
    sharded_fsdp1.register_fisher_hook(ok)  # again: a no-op
    with pytest.raises(lf.FisherInputError, match=r"shape \(2, 2\) is not the parameter's"):
        sharded_fsdp1.shard_state({"0.weight": torch.zeros(2, 2)}, ok)


def test_fsdp_strategy_supports_ewc_and_refuses_what_fsdp1_cannot_serve() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    lf.EWC(lam=1.0).setup(SimpleNamespace(strategy=FSDPStrategy()), Classifier(), "fit")  # type: ignore[arg-type]
    for strategy, match in (
        (FSDPStrategy(use_orig_params=False), "use_orig_params=True"),
        (FSDPStrategy(sharding_strategy="HYBRID_SHARD", auto_wrap_policy={nn.Linear}), "HYBRID"),
    ):
        with pytest.raises(lf.FisherInputError, match=match):
            lf.EWC(lam=1.0).setup(SimpleNamespace(strategy=strategy), Classifier(), "fit")  # type: ignore[arg-type]


def test_collective_tensors_live_where_the_backend_moves_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``full_state`` all-gathers index ranges it makes itself: on CUDA under NCCL (a CPU tensor
    there failed on the first GPU run), on the CPU under gloo."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert sharded_fsdp1.collective_device(None) == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert sharded_fsdp1.collective_device(None) == torch.device("cpu")
