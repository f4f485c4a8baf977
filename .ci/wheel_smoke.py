"""Smoke test of an installed wheel: run in a clean venv, from a folder outside the checkout.

It checks that the package imported is the installed one (not the source tree), that the public API
works with only the wheel's declared dependencies, and that EWC runs in a real, tiny ``fit``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fisher as lf

location = Path(lf.__file__).resolve()
assert "site-packages" in location.parts, f"imported the source tree, not the wheel: {location}"
assert (location.parent / "py.typed").is_file(), "py.typed is missing from the wheel"

torch.manual_seed(0)
x = torch.randn(64, 4)
y = (x[:, 0] > 0).long()
loader = DataLoader(TensorDataset(x, y), batch_size=16)
net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

fd = lf.estimate_fisher(net, loader, method="exact")
hu = lf.estimate_fisher(net, loader, method="hutchinson", probes=64)
assert fd.n_samples == 64 and fd["0.weight"].shape == (8, 4)
assert abs(hu.trace() / fd.trace() - 1) < 0.3, (hu.trace(), fd.trace())


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


ewc = lf.EWC(lam=1e3, method="exact")
trainer = L.Trainer(
    max_steps=4,
    callbacks=[ewc],
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(Module(), loader)
assert ewc.task_count == 1 and ewc.fishers[0].trace() > 0

print(
    f"wheel smoke test passed: lightning_fisher {lf.__version__} from {location.parent}, "
    f"tr F = {fd.trace():.4g}, Hutchinson/exact = {hu.trace() / fd.trace():.3f}, "
    f"EWC consolidated {ewc.task_count} task; python {sys.version.split()[0]}, torch {torch.__version__}"
)
