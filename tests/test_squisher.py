"""The Squisher equals B * exp_avg_sq (optionally bias-corrected) after real Adam steps."""

from __future__ import annotations

import pytest
import torch
from conftest import make_case

import lightning_fisher as lf


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_squisher_after_adam_steps(opt_cls: type[torch.optim.Optimizer]) -> None:
    case = make_case("mlp", dtype=torch.float32)
    model = case.model
    model[0].bias.requires_grad_(False)
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.99))
    # Re-derive the second moment by hand: v_t = beta2 v_{t-1} + (1 - beta2) g_t^2.
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    steps = 0
    for _ in range(2):
        for x, y in case.loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            for n, p in model.named_parameters():
                if p.requires_grad:
                    v[n] = 0.99 * v[n] + 0.01 * p.grad**2
            opt.step()
            steps += 1
    raw = lf.fisher_from_optimizer(opt, model, batch_size=4, bias_correction=False)
    corrected = lf.fisher_from_optimizer(opt, model, batch_size=4)
    assert set(raw) == set(v) and "0.bias" not in raw
    for n in v:
        torch.testing.assert_close(raw[n], 4 * v[n])
        torch.testing.assert_close(corrected[n], 4 * v[n] / (1 - 0.99**steps))
    assert raw.method == "squisher" and corrected.options["bias_correction"] is True


def test_squisher_refuses_an_optimizer_without_adam_state() -> None:
    case = make_case("mlp", dtype=torch.float32)
    fresh = torch.optim.Adam(case.model.parameters())
    with pytest.raises(ValueError, match="step it"):
        lf.fisher_from_optimizer(fresh, case.model, batch_size=8)
    sgd = torch.optim.SGD(case.model.parameters(), lr=0.1, momentum=0.9)
    x, y = next(iter(case.loader))
    torch.nn.functional.cross_entropy(case.model(x), y).backward()
    sgd.step()
    with pytest.raises(ValueError, match="exp_avg_sq"):
        lf.fisher_from_optimizer(sgd, case.model, batch_size=8)
