"""Sharded (FSDP2 and FSDP1) Fisher and EWC on 1, 2 and 4 GPUs of one host, under Lightning.

For every GPU count W and strategy the script starts W processes (NCCL; gloo on CPU). Each
holds a random-weight GPT-2 decoder from a ``transformers`` config (24 layers x 2048, vocab
50257: 1.3B parameters, bf16 parameters on GPU; ``--tiny``: 2 layers x 64, vocab 500, float32),
the same weights on every rank and for every W (one seed), sharded

* ``fsdp2``: Lightning's ``ModelParallelStrategy``, ``fully_shard`` on every ``GPT2Block`` and
  the root in ``configure_model``;
* ``fsdp1``: Lightning's ``FSDPStrategy`` with ``use_orig_params=True``, every ``GPT2Block`` an
  FSDP1 unit (wrapped in ``configure_model``, so that the second task's Trainer finds the model
  wrapped; on CPU through a subclass, as Lightning refuses the exact class there).

On each rank it measures:

1. ``fisher_max_rel_diff_vs_unsharded``: in float32 (TF32 off), the same model sharded the same
   way in plain PyTorch; its Fisher (``--method``, default ``sample`` with
   ``token_route="sequence"``, one seed; labels = next tokens) on this rank's share of the data
   (global batch b goes to rank b mod W, as DDP splits it), gathered whole, against an unsharded
   DDP pass (every rank the whole model, the estimates all-reduced) on the same per-rank data:
   max |sharded - DDP| / max |DDP| per tensor, the largest. Goal <= 1e-5.
   ``fisher_max_rel_diff_vs_unsharded_run_dtype`` is the same comparison for the timed pass
   below in the run's dtype (float32 on CPU), against an unsharded copy in that dtype. In bf16
   it measures whether the two routes drew the same labels, not the sharded route's error:
   each route draws ``sample``'s labels from its own bf16 logits (``torch.multinomial(p, 1)``
   is argmax_v p_v / E_v, the same noise E in both), which round differently (other kernels:
   the sharded pass keeps the fused attention kernel, the per-input engine runs the MATH one),
   so a position draws another label where its two largest p_v / E_v lie within that rounding
   (on CPU about one in a thousand), and each such position moves a whole term of the tied
   embedding / vocabulary head from one row to another. One H200, the 1.3B model under FSDP2:
   0.21 (the first FSDP1 row ran in float32, see ``precision``).
   ``benchmarks/fsdp_bf16_gap.py`` takes it apart on CPU (2 x 64 GPT-2,
   vocab 5000, 4032 labels, world sizes 1 and 2): 1 to 5 differing labels give 0.33-0.36 (in
   ``wte``); with the same labels the sharded and unsharded bf16 Fishers differ by 0.012-0.023
   per tensor (LayerNorm parameters), 0.002 in L1, and are equally far from the float32 Fisher
   of the same weights (0.003 in L1); ``empirical`` (the data's labels): 0.018. No error of the
   sharded route; the float32 comparison is its check;
2. ``speedup``: when task A's fit starts (model sharded by the strategy, squared gradients
   accumulated in float32), the Fisher pass on this rank's share of ``--fisher-seqs`` sequences,
   timed over ``--repeats`` passes after a warm-up between barriers; throughput = global
   sequences / the slowest rank's seconds (median of the passes); speedup = throughput on W
   GPUs / throughput on 1 (same strategy, same global data). Goals: 1.8x on 2, 3.4x on 4;
3. ``fisher_mib_per_rank``: ``lf.EWC`` consolidates task A with that Fisher; the bytes of its
   Fisher and anchors held on each rank (the largest over ranks) against ``fisher_mib_whole``
   (the unsharded Fisher in float32 and anchors in the parameters' dtype):
   ``fisher_fraction_per_rank`` about 1 / W;
4. ``ewc_step_ratio``: task B's fit with ``lf.EWC`` (AdamW, ``--train-batch`` sequences per rank):
   after ``--ewc-warmup`` steps with the penalty (which compile the update on CUDA),
   ``--ewc-rounds`` rounds of one step with the penalty gradient and one without (``lam`` set to
   0 for that step; the order alternates), each step timed from its batch's start to its end;
   ratio = median with / median without. Goal <= 1.03.

``--big`` adds a row for a 7B-class decoder (32 layers x 4096) on 4 GPUs under FSDP2 with
float32 parameters, bf16 compute (``MixedPrecisionPolicy``) and float32 AdamW state: weights,
gradients, Adam state and EWC state (about 24 bytes a parameter, 161 GB) do not fit one H200.
EWC trains a few steps on it and the step ratio is measured; no unsharded comparison, no
speedup. Skipped with fewer than 4 GPUs and on CPU.

The report ``benchmarks/results/fsdp_scaling.{json,md}`` is rewritten after every row, so a run
stopped by a time limit keeps the rows that finished. Every row prints an estimate of its
seconds first; a row that would end after ``--total-cap`` seconds (default 540, for a 10-minute
call) is skipped and listed in the report's ``skipped``. Rows run FSDP2's first (then the 7B
row), FSDP1's last; ``--append`` keeps the rows of an earlier report that a run does not redo,
so a second call can finish what a first one skipped (``--strategies fsdp1 --append``).

GPU (one command on a 4-GPU host)::

    NCCL_NVLS_ENABLE=0 python -m benchmarks.fsdp_scaling --big

CPU smoke run (gloo, 2 processes, tiny sizes; what the test runs)::

    python -m benchmarks.fsdp_scaling --tiny --cpu --gpus 1 2 --out /tmp/fsdp_scaling.json

The DDP counterpart (throughput and agreement of an unsharded model) is
``benchmarks/ddp_scaling.py``; the sharded routes' correctness on every method is
``benchmarks/fsdp_check.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from benchmarks.common import (
    device_name,
    fmt,
    join_process_group,
    max_rel_diff,
    rank_environment,
    versions,
)
from benchmarks.ddp_scaling import _free_port

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("fsdp2", "fsdp1")
GOALS = {"rel_diff": 1e-5, "ewc_step_ratio": 1.03, "speedup": {"2": 1.8, "4": 3.4}}


@dataclass
class Config:
    layers: int = 24
    width: int = 2048
    heads: int = 16
    vocab: int = 50257
    seq_len: int = 512
    fisher_seqs: int = 32  # global sequences of the timed Fisher pass
    fisher_batch: int = 2  # sequences per Fisher batch
    check_seqs: int = 8  # global sequences of the float32 comparison
    repeats: int = 3  # timed Fisher passes (median)
    train_batch: int = 8  # sequences per rank and training step
    task_a_steps: int = 2
    ewc_warmup: int = 3
    ewc_rounds: int = 6
    lam: float = 1e3
    method: str = "sample"
    dtype: str = "bfloat16"  # the parameters' dtype of the timed run
    mixed: bool = False  # float32 parameters, bf16 compute (the 7B row)
    max_memory_mib: float = 16384.0
    cpu: bool = False
    seed: int = 0
    big: bool = False  # the 7B row: no float32 check, no DDP comparison


TINY = {
    "layers": 2,
    "width": 64,
    "heads": 4,
    "vocab": 500,
    "seq_len": 16,
    "fisher_seqs": 8,
    "fisher_batch": 2,
    "check_seqs": 4,
    "repeats": 2,
    "train_batch": 2,
    "task_a_steps": 1,
    "ewc_warmup": 1,
    "ewc_rounds": 2,
    "dtype": "float32",
    "max_memory_mib": 256.0,
}
BIG = {
    "layers": 32,
    "width": 4096,
    "heads": 32,
    "fisher_seqs": 4,
    "fisher_batch": 1,
    "repeats": 1,
    "train_batch": 4,
    "task_a_steps": 1,
    "ewc_warmup": 2,
    "ewc_rounds": 3,
    "dtype": "float32",
    "mixed": True,
    "big": True,
}


def build_gpt2(cfg: Config, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The random-weight GPT-2 of ``cfg`` (no dropout), the same weights for one seed."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=cfg.vocab,
        n_embd=cfg.width,
        n_layer=cfg.layers,
        n_head=cfg.heads,
        n_positions=max(1024, cfg.seq_len),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=cfg.vocab - 1,
        eos_token_id=cfg.vocab - 1,
    )
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = transformers.GPT2LMHeadModel(config)
    return model.to(dtype)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sequences(cfg: Config, n: int, seed: int) -> list[dict[str, Tensor]]:
    """``n`` random token sequences with next-token labels (the same in every process)."""
    from lightning_fisher import hf

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab, (n, cfg.seq_len), generator=gen)
    batch = hf.with_lm_labels({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def rank_batches(
    seqs: list[dict[str, Tensor]], size: int, rank: int, world: int, device: torch.device
) -> list[dict[str, Tensor]]:
    """Batches of ``size`` sequences; rank r takes batches r, r + W, ... (DDP's split)."""
    batches = [
        {k: torch.stack([s[k] for s in seqs[i : i + size]]).to(device) for k in seqs[0]}
        for i in range(0, len(seqs), size)
    ]
    return batches[rank::world]


def fisher_kwargs(cfg: Config) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "method": cfg.method,
        "seed": cfg.seed,
        "shift_labels": True,
        "progress": False,
        "max_memory_mib": cfg.max_memory_mib,
    }
    if cfg.method == "sample":
        kw["token_route"] = "sequence"
    return kw


def block_class() -> type[nn.Module]:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    return GPT2Block  # type: ignore[no-any-return]


def shard_fsdp2(model: nn.Module, mesh: Any = None, mixed: bool = False) -> None:
    """``fully_shard`` on every transformer block, then on the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": mesh}
    if mixed:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    blocks = [m for m in model.modules() if isinstance(m, block_class())]
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def wrap_fsdp1(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP1 with every transformer block a unit (``use_orig_params=True``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(
        model,
        device_id=device,
        use_orig_params=True,
        auto_wrap_policy=ModuleWrapPolicy({block_class()}),
    )


def gathered(fd: Any, model: nn.Module, strategy: str) -> dict[str, Tensor]:
    """A sharded Fisher gathered whole (a collective), keyed by the unwrapped names."""
    from lightning_fisher.sharded import full_tensors
    from lightning_fisher.sharded_fsdp1 import full_state

    if strategy == "fsdp2":
        return full_tensors(fd)
    return full_state(dict(fd), model)  # type: ignore[no-any-return]


def is_sharded(fd: Any, model: nn.Module, strategy: str) -> bool:
    """Whether every tensor of ``fd`` is held like its parameter: a DTensor with its placements
    (FSDP2), or shaped like the rank's piece of the parameter (FSDP1: 1-D when sharded; on one
    rank FSDP1 keeps whole parameters)."""
    from lightning_fisher.sharded_fsdp1 import pieces

    if strategy == "fsdp2":
        params = dict(model.named_parameters())
        return all(getattr(t, "placements", None) == params[n].placements for n, t in fd.items())
    where = pieces(model)
    return all(n in where and t.shape == where[n].local_shape for n, t in fd.items())


def ddp_reference(
    cfg: Config, device: torch.device, dtype: torch.dtype, batches: list[Any]
) -> dict[str, Tensor]:
    """The Fisher of an unsharded copy on this rank's batches, all-reduced (a DDP pass)."""
    import lightning_fisher as lf

    model = build_gpt2(cfg, device, dtype)
    fd = lf.estimate_fisher(model, batches, **fisher_kwargs(cfg))
    out = dict(fd)
    del model, fd
    return out


def rel_diff_against(got: dict[str, Tensor], want: dict[str, Tensor], prefix: str = "") -> float:
    got = {k.removeprefix(prefix): v for k, v in got.items()}
    if got.keys() != want.keys():
        raise RuntimeError(f"different parameters: {sorted(set(got) ^ set(want))[:5]}")
    return max_rel_diff(got, want)


def float32_check(cfg: Config, strategy: str, rank: int, world: int, device: torch.device) -> float:
    """max rel diff of the float32 sharded Fisher (plain PyTorch sharding) against DDP's."""
    import lightning_fisher as lf
    from lightning_fisher.sharded_fsdp1 import register_fisher_hook

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        batches = rank_batches(
            sequences(cfg, cfg.check_seqs, cfg.seed + 1), cfg.fisher_batch, rank, world, device
        )
        want = ddp_reference(cfg, device, torch.float32, batches)
        model = build_gpt2(cfg, device, torch.float32)
        if strategy == "fsdp2":
            shard_fsdp2(model)
        else:
            model = wrap_fsdp1(model, device)
            register_fisher_hook(model)
        fd = lf.estimate_fisher(model, batches, **fisher_kwargs(cfg))
        diff = rel_diff_against(gathered(fd, model, strategy), want)
        del model, fd, want
        return diff
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        free(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class SeqData(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, seqs: list[dict[str, Tensor]]) -> None:
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.seqs[i]


def _work(rank: int, world: int, strategy: str, cfg: Config, out_dir: str) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    import lightning_fisher as lf

    if cfg.cpu:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", rank)
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = getattr(torch, cfg.dtype)
    res: dict[str, Any] = {"rank": rank}
    start = time.perf_counter()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    if not cfg.big:
        res["rel_diff_float32"] = float32_check(cfg, strategy, rank, world, device)

    fisher_batches = rank_batches(
        sequences(cfg, cfg.fisher_seqs, cfg.seed + 2), cfg.fisher_batch, rank, world, device
    )

    class Decoder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_gpt2(cfg, device, dtype)

        def configure_model(self) -> None:
            from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

            if isinstance(self.model, (FSDPModule, FullyShardedDataParallel)):
                return  # the second task's Trainer: sharded already
            if strategy == "fsdp2":
                shard_fsdp2(self.model, self.device_mesh["data_parallel"], cfg.mixed)
            else:
                self.model = wrap_fsdp1(self.model, device)

        def forward(self, **batch: Tensor) -> Any:
            return self.model(**batch)

        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return self.model(**batch).loss  # type: ignore[no-any-return]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-5)

    class Measure(pl.Callback):
        """Task A: the timed Fisher pass and its comparison with DDP when training starts, then
        the consolidation with it; task B: step times with and without the penalty."""

        def __init__(self, ewc: lf.EWC) -> None:
            self.ewc = ewc
            self.fisher: Any = None
            self.schedule: list[bool] = []
            self.steps: list[tuple[bool, float]] = []
            self._t = 0.0

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if self.ewc.task_count:  # task B
                return
            kw = fisher_kwargs(cfg)
            lf.estimate_fisher(pl_module, fisher_batches[:1], **kw)  # warm-up
            seconds = []
            for _ in range(cfg.repeats):
                sync()
                t = time.perf_counter()
                self.fisher = lf.estimate_fisher(pl_module, fisher_batches, **kw)
                sync()
                seconds.append(time.perf_counter() - t)
            res["fisher_seconds"] = seconds
            res["n_samples"] = self.fisher.n_samples
            res["fisher_sharded"] = is_sharded(self.fisher, pl_module, strategy)
            if not cfg.big:
                whole = gathered(self.fisher, pl_module, strategy)
                want = ddp_reference(cfg, device, dtype, fisher_batches)
                res["rel_diff_run_dtype"] = rel_diff_against(whole, want, prefix="model.")
                del whole, want
                free(device)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if self.fisher is not None and not self.ewc.task_count:
                self.ewc.consolidate(pl_module, fisher=self.fisher)
                self.fisher = None
                size = self.ewc.state_bytes()
                res["state_bytes"] = size.fisher + size.anchor

        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
        ) -> None:
            if not self.ewc.task_count:
                return
            step = len(self.steps)
            self.ewc.lam = cfg.lam if self.schedule[step] else 0.0
            sync()
            self._t = time.perf_counter()

        def on_train_batch_end(
            self,
            trainer: pl.Trainer,
            pl_module: pl.LightningModule,
            outputs: Any,
            batch: Any,
            batch_idx: int,
        ) -> None:
            if not self.ewc.task_count:
                return
            sync()
            self.steps.append((self.schedule[len(self.steps)], time.perf_counter() - self._t))

    def make_strategy() -> Any:
        if strategy == "fsdp2":
            return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
        if cfg.cpu:  # Lightning refuses the exact class with a CPU accelerator

            class CPUFSDPStrategy(FSDPStrategy):
                pass

            return CPUFSDPStrategy(use_orig_params=True)
        return FSDPStrategy(use_orig_params=True)

    def fit(callbacks: list[Any], task: int, steps: int) -> None:
        n = steps * cfg.train_batch * world
        data = SeqData(sequences(cfg, n, cfg.seed + 10 + task))
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.train_batch)
        pl.Trainer(
            accelerator="cpu" if cfg.cpu else "gpu",
            devices=world,
            strategy=make_strategy(),
            precision=precision(strategy, cfg),
            max_steps=steps,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(net, loader)

    net = Decoder()
    res["params"] = n_params(net)
    res["whole_bytes"] = sum(p.numel() * (4 + p.element_size()) for p in net.parameters())
    ewc = lf.EWC(lam=cfg.lam, method=cfg.method, consolidate_on_fit_end=False, log_penalty=False)
    measure = Measure(ewc)
    fit([ewc, measure], 0, cfg.task_a_steps)
    assert ewc.task_count == 1, "task A was not consolidated"
    measure.schedule = [True] * cfg.ewc_warmup
    for r in range(cfg.ewc_rounds):
        measure.schedule += [True, False] if r % 2 == 0 else [False, True]
    # which steps added the penalty gradient: exactly those the schedule marks
    penalised: list[int] = []
    add_penalty_grad = ewc.core.add_penalty_grad

    def counted(*args: Any, **kwargs: Any) -> Any:
        penalised.append(len(measure.steps))
        return add_penalty_grad(*args, **kwargs)

    ewc.core.add_penalty_grad = counted  # type: ignore[method-assign]
    fit([ewc, measure], 1, len(measure.schedule))
    res["penalty_as_scheduled"] = penalised == [i for i, on in enumerate(measure.schedule) if on]
    steps = measure.steps[cfg.ewc_warmup :]
    res["step_with"] = [s for on, s in steps if on]
    res["step_without"] = [s for on, s in steps if not on]
    res["seconds"] = time.perf_counter() - start
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()


def _worker(rank: int, world: int, port: int, strategy: str, cfg: Config, out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    rank_environment(rank, world, port)
    join_process_group(rank, world, cfg.cpu)
    try:
        _work(rank, world, strategy, cfg, out_dir)
    finally:
        dist.destroy_process_group()


def run_row(world: int, strategy: str, cfg: Config) -> dict[str, Any]:
    """W processes for one strategy; their results gathered into a row (without speedup)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # CPU runs fork (the workers inherit the driver's imports); CUDA needs fresh processes.
        method = "fork" if cfg.cpu else "spawn"
        args = (world, _free_port(), strategy, cfg, tmp)
        mp.start_processes(_worker, args=args, nprocs=world, join=True, start_method=method)
        ranks = [
            torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)
        ]
    first = ranks[0]
    pass_seconds = statistics.median(max(s) for s in zip(*(r["fisher_seconds"] for r in ranks)))
    per_rank = max(r["state_bytes"] for r in ranks)
    with_ewc = statistics.median(s for r in ranks for s in r["step_with"])
    without = statistics.median(s for r in ranks for s in r["step_without"])
    return {
        "gpus": world,
        "strategy": strategy,
        "model": f"gpt2 {cfg.layers} x {cfg.width}, vocab {cfg.vocab}",
        "params": first["params"],
        "dtype": cfg.dtype + (" (bf16 compute)" if cfg.mixed else ""),
        "method": cfg.method + (" (token_route=sequence)" if cfg.method == "sample" else ""),
        "fisher_max_rel_diff_vs_unsharded": first.get("rel_diff_float32"),
        "fisher_max_rel_diff_vs_unsharded_run_dtype": first.get("rel_diff_run_dtype"),
        "fisher_sharded": all(r["fisher_sharded"] for r in ranks),
        "fisher_mib_per_rank": round(per_rank / 2**20, 3),
        "fisher_mib_whole": round(first["whole_bytes"] / 2**20, 3),
        "fisher_fraction_per_rank": round(per_rank / first["whole_bytes"], 4),
        "fisher_seconds_per_pass": round(pass_seconds, 4),
        "fisher_seqs_per_second": round(cfg.fisher_seqs / pass_seconds, 3),
        "ewc_step_seconds": round(with_ewc, 5),
        "step_seconds": round(without, 5),
        "ewc_step_ratio": round(with_ewc / without, 4),
        "ewc_penalty_as_scheduled": all(r["penalty_as_scheduled"] for r in ranks),
        "speedup": None,
        "big": cfg.big,
        "seconds": round(time.perf_counter() - start, 1),
    }


def estimate(cfg: Config, world: int, done: list[dict[str, Any]], strategy: str) -> float:
    """Seconds a row should take: a finished row of the same strategy and model scaled by its
    data per rank, else a rough figure from the model's size (H200 rates; fixed costs:
    process start, NCCL, the update's compilation)."""
    same = [r for r in done if r["strategy"] == strategy and r["params"] and not cfg.big]
    same = [r for r in same if r["model"].startswith(f"gpt2 {cfg.layers} x {cfg.width}")]
    if same:
        r = same[-1]
        return float(r["seconds"]) * (0.5 + 0.5 * r["gpus"] / world)
    params = 12 * cfg.layers * cfg.width**2 + cfg.vocab * cfg.width
    if cfg.cpu:
        return 5.0 + params * 1e-6 * (cfg.fisher_seqs + 20)
    seq = 4e-11 * params * cfg.seq_len / 512  # one sequence's forward and backward
    fisher = (cfg.repeats + 1) * cfg.fisher_seqs / world * seq * 1.5
    check = 0.0 if cfg.big else 3 * cfg.check_seqs / world * seq * 4 + 15
    steps = cfg.task_a_steps + cfg.ewc_warmup + 2 * cfg.ewc_rounds
    train = steps * cfg.train_batch * seq * (2 if cfg.mixed else 1)
    return 45.0 + params * 2e-9 + fisher + check + train + (1 if cfg.mixed else 0) * 60


def precision(strategy: str, cfg: Config) -> str:
    """Lightning's precision flag that keeps the parameters' own dtype: FSDPStrategy casts the
    module to its flag's dtype ("32-true" would make a bf16 model float32), ModelParallelStrategy
    leaves the module alone under "32-true"."""
    if strategy == "fsdp1" and cfg.dtype == "bfloat16" and not cfg.mixed:
        return "bf16-true"
    return "32-true"


def write(report: dict[str, Any], out: Path) -> None:
    from lightning_fisher import _json as strict_json

    report["rows"].sort(
        key=lambda r: (STRATEGIES.index(r["strategy"]), r.get("big", False), r["gpus"])
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_json.dumps(report, indent=2) + "\n")
    lines = [
        "# Sharded Fisher and EWC with the number of GPUs (FSDP2 and FSDP1 under Lightning)",
        "",
        f"`{report['command']}` on {report['device']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
        + ".",
        "",
        "Rel diff: max |sharded - DDP| / max |DDP| per tensor, the largest, of the gathered "
        "sharded Fisher against an unsharded DDP pass on the same per-rank data, in float32 "
        "(goal <= 1e-5) and in the run's dtype (in bf16 mostly labels that the two routes draw "
        "differently from differently rounded logits: benchmarks/fsdp_bf16_gap.py). MiB per "
        "rank: Fisher and EWC anchors held on a rank (the largest), against the whole. EWC step "
        "ratio: median step with the penalty gradient / without (goal <= 1.03). Speedup: "
        "Fisher-pass throughput over the 1-GPU run of the same strategy (goals 1.8x on 2, 3.4x "
        "on 4).",
        "",
        "| GPUs | strategy | model | params | rel diff (float32) | rel diff (run dtype) | "
        "MiB per rank | of whole | Fisher seq/s | speedup | EWC step ratio | seconds |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['gpus']} | {r['strategy']} | {r['model']} ({r['dtype']}) | "
            f"{r['params'] / 1e6:.1f}M | {fmt(r['fisher_max_rel_diff_vs_unsharded'], '.1e')} | "
            f"{fmt(r['fisher_max_rel_diff_vs_unsharded_run_dtype'], '.1e')} | "
            f"{r['fisher_mib_per_rank']:.1f} | {r['fisher_fraction_per_rank']:.3f} | "
            f"{r['fisher_seqs_per_second']:.2f} | {fmt(r['speedup'], '.2f')} | "
            f"{r['ewc_step_ratio']:.3f} | {r['seconds']:.0f} |"
        )
    for s in report["skipped"]:
        lines.append(f"\nSkipped: {s}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4], help="GPU counts")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--cpu", action="store_true", help="gloo processes on the CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--big", action="store_true", help="add the 7B-class row on 4 GPUs")
    parser.add_argument("--method", choices=("sample", "empirical"), default="sample")
    parser.add_argument("--fisher-seqs", type=int, default=None, help="sequences, Fisher pass")
    parser.add_argument("--repeats", type=int, default=None, help="timed Fisher passes")
    parser.add_argument(
        "--total-cap",
        type=float,
        default=540.0,
        help="skip a row whose estimate would end after this many seconds",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of --out that this run does not redo (a second device call)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fsdp_scaling.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cfg = Config(cpu=args.cpu, method=args.method, **(TINY if args.tiny else {}))  # type: ignore[arg-type]
    if args.fisher_seqs is not None:
        cfg.fisher_seqs = args.fisher_seqs
    if args.repeats is not None:
        cfg.repeats = args.repeats
    top = max(args.gpus)
    for n, name in ((cfg.fisher_seqs, "--fisher-seqs"), (cfg.check_seqs, "check sequences")):
        if n % (cfg.fisher_batch * top):
            sys.exit(f"{name} ({n}) must be a multiple of {cfg.fisher_batch} x {top} GPUs.")
    if args.cpu and args.out.resolve().parent == RESULTS.resolve():
        sys.exit("A CPU run writes elsewhere: pass --out (the committed report is the GPUs').")
    if not cfg.cpu and torch.cuda.device_count() < top:
        sys.exit(f"needs {top} GPUs; found {torch.cuda.device_count()}.")

    import lightning.pytorch  # noqa: F401  (before the workers start: forked ones inherit it)
    import transformers  # noqa: F401

    import lightning_fisher.callbacks.ewc  # noqa: F401

    command = ("" if cfg.cpu else "NCCL_NVLS_ENABLE=0 ") + "python -m benchmarks.fsdp_scaling "
    command += " ".join(sys.argv[1:] if argv is None else argv)
    gpu = None if cfg.cpu else device_name("cuda:0")
    report: dict[str, Any] = {
        "command": command.strip(),
        "device": device_name("cpu") + ", gloo" if cfg.cpu else f"{top} x {gpu}",
        "versions": {
            **versions("transformers"),
            "nccl": None if cfg.cpu else ".".join(map(str, torch.cuda.nccl.version())),
        },
        "setup": {**asdict(cfg), "goals": GOALS},
        "rows": [],
        "skipped": [],
    }
    # FSDP2's rows, the 7B row (FSDP2), then FSDP1's: under --total-cap the last are skipped
    plan: list[tuple[int, str, Config]] = []
    for strategy in sorted(args.strategies, key=STRATEGIES.index):
        plan += [(w, strategy, cfg) for w in sorted(args.gpus)]
        if strategy == "fsdp2" and args.big:
            plan.append((4, "fsdp2", replace(cfg, **BIG)))  # type: ignore[arg-type]
    if args.big and "fsdp2" not in args.strategies:
        plan.append((4, "fsdp2", replace(cfg, **BIG)))  # type: ignore[arg-type]
    if args.big and (cfg.cpu or top < 4):
        plan = [p for p in plan if not p[2].big]
        report["skipped"].append("7B-class row: needs 4 GPUs (not run on CPU)")
    if args.append and args.out.exists():  # keep the rows this run does not redo
        old = json.loads(args.out.read_text())
        redo = {(w, s, c.big) for w, s, c in plan}
        report["rows"] = [
            r for r in old["rows"] if (r["gpus"], r["strategy"], r.get("big", False)) not in redo
        ]
        report["command"] = f"{old['command']}; then {report['command']}"
    rows: list[dict[str, Any]] = report["rows"]
    for world, strategy, row_cfg in plan:
        guess = estimate(row_cfg, world, rows, strategy)
        elapsed = time.perf_counter() - start
        name = f"{world} GPU(s), {strategy}, gpt2 {row_cfg.layers} x {row_cfg.width}"
        if elapsed + guess > args.total_cap:
            report["skipped"].append(
                f"{name}: estimated {guess:.0f} s at {elapsed:.0f} s of {args.total_cap:.0f}"
            )
            print(f"skipping {name} (estimate {guess:.0f} s)", flush=True)
            write(report, args.out)
            continue
        print(f"{name}: estimate {guess:.0f} s (at {elapsed:.0f} s)", flush=True)
        try:
            row = run_row(world, strategy, row_cfg)
        except Exception as err:  # a failed row must not lose the others
            msg = f"{name}: failed: {type(err).__name__}: {err}"
            # a worker's traceback: its head names the row, its tail the error
            report["skipped"].append(msg if len(msg) <= 3000 else f"{msg[:500]} ... {msg[-2500:]}")
            write(report, args.out)
            print(f"{name} failed: {err}", flush=True)
            continue
        one = [
            r
            for r in rows
            if r["gpus"] == 1 and r["strategy"] == strategy and r["model"] == row["model"]
        ]
        if one:
            row["speedup"] = round(
                row["fisher_seqs_per_second"] / one[0]["fisher_seqs_per_second"], 3
            )
        elif world == 1:
            row["speedup"] = 1.0
        if row_cfg.big:
            row["fisher_max_rel_diff_vs_unsharded"] = None
            row["speedup"] = None
        rows.append(row)
        write(report, args.out)
        print(
            f"  done in {row['seconds']:.0f} s: rel diff {row['fisher_max_rel_diff_vs_unsharded']}, "
            f"MiB/rank {row['fisher_mib_per_rank']} ({row['fisher_fraction_per_rank']} of whole), "
            f"speedup {row['speedup']}, EWC step ratio {row['ewc_step_ratio']}",
            flush=True,
        )
    write(report, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
