"""EWC(cpu_kernel=True): the one-pass C kernel rounds like the explicit loss's gradient, the
callback's updates equal the explicit-loss route, and without a compiler it falls back."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from lit_helpers import loader, max_diff, params, task_classes, trainer
from test_ewc import SETTINGS, after_task0, ewc

from lightning_fisher import _ewc_fused_cpu

needs_kernel = pytest.mark.skipif(_ewc_fused_cpu.load() is None, reason="no C compiler")


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel is used only with one CPU thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the kernel's calls (patched in after it is built)."""
    kernel, seen = _ewc_fused_cpu.load(), []

    def counted(*args: Any) -> None:
        seen.append(1)
        kernel(*args)  # type: ignore[misc]

    monkeypatch.setattr(_ewc_fused_cpu, "_kernel", counted)
    return seen


@needs_kernel
def test_kernel_rounds_like_separate_torch_ops() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 10_007  # not a multiple of any vector width: the scalar tail runs too
    g, f = torch.randn(n, generator=gen), torch.rand(n, generator=gen)
    p = torch.randn(n, generator=gen)
    a = p + 1e-6 * torch.randn(n, generator=gen)  # theta near theta*: no cancellation loss
    a[:100] = p[:100]
    for lam in (100.0, 0.1, 3.0 * 2.0**16):
        expected = g + (f * lam) * (p - a)  # autograd's order for the explicit loss
        out = g.clone()
        kernel = _ewc_fused_cpu.load()
        assert kernel is not None
        kernel(out.data_ptr(), f.data_ptr(), p.data_ptr(), a.data_ptr(), lam, n)
        assert torch.equal(out, expected)


def test_fits_only_dense_contiguous_float32_cpu() -> None:
    assert _ewc_fused_cpu.fits(torch.zeros(3, 4))
    assert not _ewc_fused_cpu.fits(torch.zeros(3, 4).t())
    assert not _ewc_fused_cpu.fits(torch.zeros(3, dtype=torch.float64))
    assert not _ewc_fused_cpu.fits(torch.zeros(3, dtype=torch.bfloat16))
    assert not _ewc_fused_cpu.fits(torch.zeros(3, 3).to_sparse())


def routes(setting: str, **kw: Any) -> tuple[float, float]:
    """Largest parameter difference of EWC(**kw) against the explicit loss and against no EWC."""
    model_kw, settings = SETTINGS[setting]
    model_kw = {"dtype": torch.float32, **model_kw}

    def trainer_kw() -> dict[str, Any]:
        return {k: v() if callable(v) else v for k, v in settings.items()}

    model, cb = after_task0(**model_kw)
    routed, explicit, plain = (copy.deepcopy(model) for _ in range(3))
    for m in (routed, explicit, plain):
        m.active = task_classes(1)
    fast = ewc(**kw)
    fast.load_state_dict(cb.state_dict())
    by_loss = ewc(apply="loss")
    by_loss.load_state_dict(cb.state_dict())
    explicit.penalty_fn = lambda module, batch: by_loss.penalty(module)
    data = loader(1, dtype=torch.float32)
    trainer([fast], **trainer_kw()).fit(routed, data)
    trainer([by_loss], **trainer_kw()).fit(explicit, data)
    trainer([], **trainer_kw()).fit(plain, data)
    return max_diff(params(routed), params(explicit)), max_diff(params(routed), params(plain))


@needs_kernel
@pytest.mark.parametrize(
    "setting", ["sgd", "adam", "accumulate", "fp16_fused_adam", "manual", "clip"]
)
def test_kernel_route_equals_explicit_loss(
    setting: str, one_thread: None, calls: list[int]
) -> None:
    routes_diff, effect = routes(setting, cpu_kernel=True)
    assert calls, "the kernel was not used"
    assert routes_diff <= 1e-6 < effect / 100


def test_without_compiler_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    monkeypatch.setattr(_ewc_fused_cpu, "load", lambda: None)
    with pytest.warns(UserWarning, match="no C compiler"):
        routes_diff, effect = routes("sgd", cpu_kernel=True)
    assert routes_diff <= 1e-6 < effect / 100
