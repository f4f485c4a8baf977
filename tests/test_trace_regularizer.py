"""Fisher-trace regulariser: unbiased, exact gradient (finite differences, through J and p), and
the callback's update equals the explicit-loss route (also with accumulation)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from lit_helpers import Classifier, loader, max_diff, params, trainer
from models import SmallCNN, mlp, seeded
from torch import nn

import lightning_fisher as lf
from lightning_fisher.regularizers import fisher_trace_penalty, frozen_norm_statistics


def tiny_batch() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model = seeded(mlp(d_in=3, hidden=4, n_classes=3), 0)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    return model, (x, torch.randint(0, 3, (5,), generator=gen))


def penalty(model: nn.Module, batch: Any, seed: int = 7, probes: int = 2) -> torch.Tensor:
    return fisher_trace_penalty(model, batch, probes, generator=torch.Generator().manual_seed(seed))


def test_gradient_matches_central_finite_differences() -> None:
    model, batch = tiny_batch()
    value = penalty(model, batch)
    value.backward()
    eps = 1e-6
    for p in model.parameters():
        flat, grad = p.data.view(-1), p.grad.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            up = penalty(model, batch).item()
            flat[i] = old - eps
            down = penalty(model, batch).item()
            flat[i] = old
            assert grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_gradient_flows_through_p() -> None:
    """Detaching L(p) xi (a common shortcut) gives a different, wrong gradient."""
    model, batch = tiny_batch()
    penalty(model, batch).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    z = model(batch[0])
    p = torch.softmax(z, -1).detach()
    gen = torch.Generator().manual_seed(7)
    total = 0
    for _ in range(2):
        xi = torch.randint(0, 2, z.shape, generator=gen).double() * 2 - 1
        u = p.sqrt() * xi - p * (p.sqrt() * xi).sum(-1, keepdim=True)
        vs = torch.autograd.grad(z, list(model.parameters()), u, create_graph=True)
        total = total + sum((v**2).sum() for v in vs)
    detached = [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(
            model.parameters(),
            torch.autograd.grad(total / 10, list(model.parameters()), allow_unused=True),
        )
    ]
    # Same value with the same probes, different gradient.
    assert float(total / 10) == pytest.approx(float(penalty(model, batch)), rel=1e-12)
    assert max(float((a - b).abs().max()) for a, b in zip(full, detached)) > 1e-6


def test_estimate_is_unbiased_for_the_batch_fisher_trace() -> None:
    model, batch = tiny_batch()
    exact = lf.estimate_fisher(model, [batch], method="exact").trace()
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [fisher_trace_penalty(model, batch, generator=gen).detach() for _ in range(400)]
    )
    sem = float(draws.std() / draws.numel() ** 0.5)
    assert 0 < sem < 0.1 * exact
    assert abs(float(draws.mean()) - exact) < 4 * sem


def test_token_masks_and_empty_batches() -> None:
    model, (x, y) = tiny_batch()
    seq = nn.Sequential(model)
    # A (B, T, C) model: positions whose label is -100 do not count, an all-masked batch gives 0.
    tokens = torch.stack([x, x.flip(0)], 1)  # (5, 2, 3)
    labels = torch.stack([y, torch.full_like(y, -100)], 1)
    masked = fisher_trace_penalty(seq, (tokens, labels), generator=torch.Generator().manual_seed(1))
    plain = fisher_trace_penalty(model, (x, y), generator=torch.Generator().manual_seed(1))
    assert float(masked) > 0 and float(plain) > 0
    empty = fisher_trace_penalty(seq, (tokens, torch.full_like(labels, -100)))
    assert float(empty) == 0.0 and empty.requires_grad


def test_norm_statistics_untouched() -> None:
    model = seeded(SmallCNN(), 0).train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    with frozen_norm_statistics(model):
        fisher_trace_penalty(model, (x, torch.zeros(4).long()))
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())


@pytest.mark.parametrize(
    ("accumulate", "precision", "manual"),
    [
        (1, "64-true", False),
        (2, "64-true", False),
        (4, "64-true", False),  # 6 batches: windows of 4 and 2
        (2, "bf16-mixed", False),
        (1, "64-true", True),
    ],
)
def test_callback_update_equals_explicit_loss(
    accumulate: int, precision: str, manual: bool
) -> None:
    alpha = 0.5
    cb = lf.FisherTraceRegularizer(alpha=alpha, probes=2)
    dtype = torch.float64 if precision == "64-true" else torch.float32
    base = Classifier(lr=0.2, dtype=dtype, manual=manual)
    routed, explicit, plain = (copy.deepcopy(base) for _ in range(3))
    generators: dict[int, torch.Generator] = {}

    def explicit_penalty(module: Classifier, batch: Any) -> torch.Tensor:
        step = module.trainer.global_step  # one generator per optimizer step, like the callback
        gen = generators.setdefault(step, cb.probe_generator(step, 0, module.device))
        return alpha * fisher_trace_penalty(module, batch, 2, generator=gen)

    explicit.penalty_fn = explicit_penalty
    kw = {"accumulate_grad_batches": accumulate, "precision": precision}
    data = loader(0, dtype=dtype)
    trainer([cb], **kw).fit(routed, data)
    trainer([], **kw).fit(explicit, data)
    trainer([], **kw).fit(plain, data)
    assert cb.applied_steps == -(-6 // accumulate)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert max_diff(params(routed), params(explicit)) <= tol
    assert max_diff(params(routed), params(plain)) > 100 * tol
    assert cb.last_trace is not None and cb.last_trace > 0


def test_every_n_steps_and_state() -> None:
    cb = lf.FisherTraceRegularizer(alpha=0.1, every_n_steps=4)
    trainer([cb]).fit(Classifier(), loader(0))  # 6 steps: steps 0 and 4 are regularised
    assert cb.applied_steps == 2
    other = lf.FisherTraceRegularizer(alpha=0.1)
    other.load_state_dict(cb.state_dict())
    assert (other.applied_steps, other.last_trace) == (cb.applied_steps, cb.last_trace)


def test_bad_arguments_are_rejected() -> None:
    for kw, match in (
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": 1.0, "probes": 0}, "probes"),
        ({"alpha": 1.0, "every_n_steps": 0}, "every_n_steps"),
        ({"alpha": 1.0, "probe_distribution": "uniform"}, "probe_distribution"),
    ):
        with pytest.raises(ValueError, match=match):
            lf.FisherTraceRegularizer(**kw)
