"""Example ``FisherDiagnostics`` figures for the docs, from a short real run.

    python -m benchmarks.diagnostics_figures      # -> docs/assets/diagnostics_*.png

Trains the MLP 784-400-400-10 on all ten MNIST digits (Adam lr 1e-3, batch 128, ``--steps``
steps) with ``FisherDiagnostics(every_n_steps=...)`` and a ``CSVLogger``, saves the final Fisher
diagonal, and renders both figures with the ``lightning-fisher render`` command, as a user would.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fisher as lf
from benchmarks.bench_models import mlp
from benchmarks.common import read_idx
from benchmarks.diagnostics_overhead import DEFAULT_DATA
from lightning_fisher.cli import main as cli

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "assets")


def mnist(root: str, split: str) -> TensorDataset:
    prefix = "train" if split == "train" else "t10k"
    x = torch.from_numpy(read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")).copy())
    y = torch.from_numpy(read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")).copy())
    return TensorDataset(x.reshape(-1, 784).float() / 255.0, y.long())


class MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp([784, 400, 400, 10])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--out", default=ASSETS)
    args = parser.parse_args()
    torch.manual_seed(0)
    train, test = mnist(args.data, "train"), mnist(args.data, "test")
    held_out = DataLoader(test, batch_size=256)
    diagnostics = lf.FisherDiagnostics(
        every_n_epochs=None, every_n_steps=args.every, dataloader=held_out, max_batches=2, probes=4
    )
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = CSVLogger(logdir)
        trainer = L.Trainer(
            max_steps=args.steps,
            logger=logger,
            callbacks=[diagnostics],
            accelerator="cpu",
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(MLP(), DataLoader(train, batch_size=128, shuffle=True))
        assert diagnostics.last is not None
        fisher = os.path.join(logdir, "mnist_mlp_fisher.safetensors")
        diagnostics.last.density_fisher.save(fisher)
        rendered = os.path.join(logdir, "rendered")
        status = cli(
            [
                "render",
                fisher,
                "--out",
                rendered,
                "--history",
                os.path.join(logger.log_dir, "metrics.csv"),
            ]
        )
        if status:
            raise SystemExit(status)
        os.makedirs(args.out, exist_ok=True)
        shutil.copy(
            os.path.join(rendered, "mnist_mlp_fisher_layer_density.png"),
            os.path.join(args.out, "diagnostics_layer_density.png"),
        )
        shutil.copy(
            os.path.join(rendered, "bounds.png"), os.path.join(args.out, "diagnostics_bounds.png")
        )
    print(f"wrote {args.out}/diagnostics_layer_density.png and diagnostics_bounds.png")


if __name__ == "__main__":
    main()
