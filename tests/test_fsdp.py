"""Sharded models (FSDP2, ``fully_shard``) on 2 CPU processes (gloo), through
``benchmarks/fsdp_check.py``: Fisher estimates sharded like the parameters and equal to unsharded
runs, EWC updates equal to DDP's, and checkpoints (``torch.distributed.checkpoint``, and Lightning's
``ModelParallelStrategy`` sharded and full) round-tripping bitwise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lit_helpers import Classifier

import lightning_fisher as lf

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp2_fisher_and_ewc_equal_unsharded_runs(tmp_path: Path) -> None:
    """Every method on a sharded MLP (uneven shards, ranks with different amounts of data)
    against the unsharded Fisher of the same data; EWC updates (gradient and loss routes, and
    lf.EWC under Lightning's ModelParallelStrategy) against DDP's."""
    out = tmp_path / "fsdp.json"
    cmd = [sys.executable, "-m", "benchmarks.fsdp_check", "--world", str(WORLD), "--out", str(out)]
    cmd.append("--no-diagnostics")  # tests/test_fsdp_diagnostics.py runs those
    cmd += ["--strategies", "fsdp2"]  # tests/test_fsdp1.py runs FSDP1
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"command", "device", "versions", "rows"} <= report.keys()
    methods = {row["method"] for row in report["rows"] if row["strategy"].startswith("fsdp2")}
    assert {"exact", "empirical", "batched", "hutchinson", "sample", "squisher"} <= methods
    assert any(row["strategy"].startswith("lightning") for row in report["rows"])
    # Fisher-only rows: bf16 compute (MixedPrecisionPolicy; squares summed in float32, like the
    # bf16 reference), and a model with one parameter fully_shard leaves whole.
    fisher_only = [row for row in report["rows"] if row["ewc_update_max_rel_diff_vs_ddp"] is None]
    assert {
        (row["strategy"].split(",")[1].split("(")[0].strip(), row["method"]) for row in fisher_only
    } == {
        (kind, method)
        for kind in ("bf16 compute", "one parameter left whole")
        for method in ("batched", "hutchinson")
    }
    for row in report["rows"]:
        assert row["world_size"] == WORLD
        assert row["fisher_placed_like_params"] is True, row
        assert row["fisher_max_rel_diff_vs_unsharded"] <= 1e-6, row
        if row in fisher_only:
            continue
        assert row["ewc_update_max_rel_diff_vs_ddp"] <= 1e-6, row
        assert (
            row["ewc_penalty_rel_diff_vs_ddp"] is None or row["ewc_penalty_rel_diff_vs_ddp"] <= 1e-6
        )
        assert row["checkpoint_sharded_bitwise"] is True, row
        assert row["checkpoint_full_bitwise"] is True, row


def test_deepspeed_is_refused_with_what_is_missing() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    callbacks = (
        lambda: lf.EWC(lam=1.0),
        lambda: lf.FisherMonitor(),
        lambda: lf.FisherDiagnostics(),
        lambda: lf.FisherTraceRegularizer(alpha=0.1),
    )
    missing = r"ZeRO \(stages 1-3\).*no hook to square gradients.*not implemented"
    for make in callbacks:
        fake = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
        with pytest.raises(lf.FisherInputError, match=missing):
            make().setup(fake, Classifier(), "fit")  # type: ignore[arg-type]


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _data() -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    x, y = 4 * torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=5)


@pytest.mark.ddp
def test_sharded_fisher_on_one_rank_and_its_refusals(one_rank_group: Any, tmp_path: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    plain = _mlp()
    sharded = _mlp()
    fully_shard(sharded[0])
    fully_shard(sharded)
    for method in ("exact", "hutchinson"):
        ref = lf.estimate_fisher(plain, _data(), method=method, seed=1)
        fd = lf.estimate_fisher(sharded, _data(), method=method, seed=1)
        assert all(isinstance(t, DTensor) for t in fd.values())
        full = lf.sharded.full_tensors(fd)
        for k, v in ref.items():
            assert float((full[k] - v).abs().max()) <= 1e-6 * float(v.abs().max()), (method, k)
        assert abs(fd.trace() - ref.trace()) <= 1e-6 * ref.trace()
    with pytest.raises(lf.FisherInputError, match="sync_distributed=False"):
        lf.estimate_fisher(sharded, _data(), sync_distributed=False)
    with pytest.raises(lf.FisherInputError, match="sharded"):
        fd.save(tmp_path / "f.safetensors")
    # The gathered copy saves and loads like any Fisher.
    whole = lf.FisherDiagonal(full, fd.n_samples, fd.method)
    whole.save(tmp_path / "f.safetensors")
    assert lf.FisherDiagonal.load(tmp_path / "f.safetensors").keys() == fd.keys()


@pytest.mark.ddp
def test_unsupported_sharding_is_refused_with_what_is_missing(one_rank_group: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    hsdp = _mlp()
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard")))
    with pytest.raises(lf.FisherInputError, match=r"1-D mesh.*shape \(1, 1\)"):
        lf.estimate_fisher(hsdp, _data())
    # FSDP1 with use_orig_params=False (its default): flat parameters without named pieces
    fsdp1 = FullyShardedDataParallel(_mlp(), device_id=torch.device("cpu"))
    with pytest.raises(lf.FisherInputError, match=r"FSDP1.*use_orig_params=False.*=True"):
        lf.estimate_fisher(fsdp1, _data())
    with pytest.raises(lf.FisherInputError, match="use_orig_params=True"):
        zeros = {n: torch.zeros_like(p) for n, p in fsdp1.named_parameters()}
        lf.ElasticWeightConsolidation(fsdp1, lam=1.0).consolidate(
            lf.FisherDiagonal(zeros, n_samples=1, method="exact")
        )


def test_parameter_groups_of_each_torch_layout() -> None:
    """torch >= 2.12 keeps a list of FSDP2 parameter groups per module, earlier versions at most
    one: the squared-gradient reduction finds the groups either way (it raised AttributeError on
    torch 2.11 before)."""
    from lightning_fisher.sharded import _param_groups

    a, b = object(), object()

    def module(state: Any) -> Any:
        return SimpleNamespace(_get_fsdp_state=lambda: state)

    assert _param_groups(module(SimpleNamespace(_fsdp_param_groups=[a, b]))) == [a, b]
    assert _param_groups(module(SimpleNamespace(_fsdp_param_group=a))) == [a]
    assert _param_groups(module(SimpleNamespace(_fsdp_param_group=None))) == []
    # torch >= 2.12 also has the singular name, as a property over the list: the list wins
    both = SimpleNamespace(_fsdp_param_groups=[a, b], _fsdp_param_group=a)
    assert _param_groups(module(both)) == [a, b]


@pytest.mark.ddp
def test_an_fsdp2_without_a_replaceable_reduce_scatter_is_refused(one_rank_group: Any) -> None:
    """torch 2.6's FSDP2 has no `_reduce_scatter_comm` to replace (its pass then raised an
    AttributeError mid-pass): the Fisher pass and the callbacks' fit start say what to change."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from lightning_fisher.callbacks._utils import prepare_sharded_strategy
    from lightning_fisher.sharded import _param_groups

    sharded = _mlp()
    fully_shard(sharded)
    lf.estimate_fisher(sharded, _data(), method="empirical")  # this torch can
    for m in sharded.modules():
        if isinstance(m, FSDPModule):
            for group in _param_groups(m):
                del group._reduce_scatter_comm  # as in torch 2.6
    with pytest.raises(lf.FisherInputError, match=r"reduce-scatter.*newer torch"):
        lf.estimate_fisher(sharded, _data(), method="empirical")
    trainer = SimpleNamespace(lightning_module=sharded, strategy=None)
    with pytest.raises(lf.FisherInputError, match="A Fisher callback on an FSDP2"):
        prepare_sharded_strategy(trainer)  # type: ignore[arg-type]
