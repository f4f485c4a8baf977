"""Shared fixtures: seeded small models with data, and their brute-force dense Jacobians."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models import SmallCNN, TinyTransformer, mlp, seeded
from reference import per_input_jacobians

# Tiny models run fastest on one thread, and a busy 2-core machine does not oversubscribe then.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Every test module starts on one torch thread, whatever an earlier module (a recipe or
    benchmark run that sets its own count) left behind."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_rank_group() -> Any:
    """A gloo process group of one rank in this process (FSDP runs on it), torn down after."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every per-input engine the test's Fisher passes build, in order."""
    from lightning_fisher.estimators import per_input

    made: list[Any] = []
    init = per_input.PerInputEngine.__init__

    def spy(self: per_input.PerInputEngine, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(per_input.PerInputEngine, "__init__", spy)
    return made


@dataclass
class Case:
    """A model, a loader over its data, and the dense per-input Jacobians of that data."""

    name: str
    model: nn.Module
    loader: Any
    call: Any
    ref_batches: list[dict[str, Any]]
    token_level: bool = False
    _jac: Any = None

    def jacobians(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int | None]]:
        if self._jac is None:
            self._jac = per_input_jacobians(
                self.model, self.call, self.ref_batches, self.token_level
            )
        return self._jac


class DictLoader(list):
    """A list of dict batches (what a Hugging Face style collate gives)."""


def make_case(name: str, dtype: torch.dtype = torch.float64, n_classes: int | None = None) -> Case:
    gen = torch.Generator().manual_seed(1)
    if name == "mlp":
        C = n_classes or 4
        model = seeded(mlp(n_classes=C), 0, dtype)
        x = torch.randn(10, 6, generator=gen, dtype=dtype)
        y = torch.randint(0, C, (10,), generator=gen)
        loader = DataLoader(TensorDataset(x, y), batch_size=4)
        refs = [{"x": x, "y": y}]
        return Case(name, model, loader, lambda f, r: f(r["x"]), refs)
    if name == "cnn":
        model = seeded(SmallCNN(n_classes=n_classes or 3), 0, dtype)
        x = torch.randn(7, 2, 4, 4, generator=gen, dtype=dtype)
        y = torch.randint(0, n_classes or 3, (7,), generator=gen)
        loader = DataLoader(TensorDataset(x, y), batch_size=3)
        return Case(name, model, loader, lambda f, r: f(r["x"]), [{"x": x, "y": y}])
    if name in ("transformer", "transformer_tokens"):
        token = name == "transformer_tokens"
        C = n_classes or 3
        model = seeded(TinyTransformer(n_classes=C, token_level=token), 0, dtype)
        ids = torch.randint(0, 11, (6, 5), generator=gen)
        mask = torch.ones(6, 5, dtype=torch.long)
        mask[1, 3:] = 0
        mask[4, 2:] = 0
        labels = torch.randint(0, C, (6, 5) if token else (6,), generator=gen)
        if token:
            labels[0, 1] = -100
            labels[2, 4] = -100
        batches = DictLoader(
            {
                "input_ids": ids[i : i + 3],
                "attention_mask": mask[i : i + 3],
                "labels": labels[i : i + 3],
            }
            for i in (0, 3)
        )
        refs = [{"x": ids, "mask": mask, "y": labels}]
        return Case(
            name, model, batches, lambda f, r: f(r["x"], attention_mask=r["mask"]), refs, token
        )
    raise ValueError(name)


@pytest.fixture(params=["mlp", "cnn", "transformer", "transformer_tokens"])
def case(request: pytest.FixtureRequest) -> Case:
    return make_case(request.param)
