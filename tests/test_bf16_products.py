"""Per-input products in a bfloat16 model's own dtype, squares and sums in float32.

A bfloat16 model's per-input gradients (the matrix products of Linear, Conv1D and Conv, the
embedding lookups' gradients, the output gradients) stay in bfloat16; each is cast to float32
before it is squared, and every sum over inputs or columns is in float32. Float32 and float64
models are unchanged. Checked: the Fisher of a bf16 tiny GPT-2 and a bf16 MLP against the float32
model on the same (bf16-rounded) weights and inputs, against the same bf16 model with float32
products, the engine's self-check at its bf16 tolerance, the dtype of the buffers and the memory
cap counted with the element sizes really allocated."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from models import random_gpt2
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher import hf
from lightning_fisher.estimators import layer_rules, per_input

#: bf16 model against the float32 model on the same weights: the bf16 forward and backward
#: (activations, logits, output gradients rounded to 8 bits) dominate
MODEL_RTOL = 4e-2
#: bf16 products against float32 products on the same bf16 model: each per-input gradient
#: rounded once to bf16 (relative 2^-9), its square to about 2^-8
PRODUCT_RTOL = 2.0**-7


def tiny_gpt2() -> tuple[nn.Module, list[Any], dict[str, Any]]:
    pytest.importorskip("transformers")
    model = random_gpt2(40, width=16, layers=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (6, 8), generator=gen)
    mask = (torch.arange(8) < torch.tensor([8, 5, 8, 8, 3, 8])[:, None]).long()
    data = [
        hf.with_lm_labels({"input_ids": ids[i : i + 3], "attention_mask": mask[i : i + 3]})
        for i in (0, 3)
    ]
    return model, data, hf.lm_fisher_kwargs(model)


def mlp() -> tuple[nn.Module, list[Any], dict[str, Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 7)).eval()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 10, generator=gen), torch.randint(0, 7, (20,), generator=gen)
    return model, [(x[:10], y[:10]), (x[10:], y[10:])], {}


CASES: dict[str, Callable[[], tuple[nn.Module, list[Any], dict[str, Any]]]] = {
    "gpt2": tiny_gpt2,
    "mlp": mlp,
}


def bf16(data: list[Any], dtype: torch.dtype = torch.bfloat16) -> list[Any]:
    """The batches with their floating tensors in ``dtype``."""

    def cast(v: Any) -> Any:
        return v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v

    return [
        {k: cast(v) for k, v in b.items()} if isinstance(b, dict) else tuple(map(cast, b))
        for b in data
    ]


def float32_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines built from now on compute their products in float32 (the choice made explicit)."""
    init = per_input.PerInputEngine.__init__

    def f32(self: per_input.PerInputEngine, *a: Any, **k: Any) -> None:
        init(self, *a, **{**k, "product_dtype": torch.float32})

    monkeypatch.setattr(per_input.PerInputEngine, "__init__", f32)


def rel_errors(got: lf.FisherDiagonal, want: lf.FisherDiagonal) -> tuple[float, float, str]:
    """Largest per-parameter errors: ||got - want|| / ||want|| and max|got - want| / max|want|."""
    worst_norm, worst_max, where = 0.0, 0.0, ""
    for name, w in want.items():
        w, g = w.double(), got[name].double()
        if not w.abs().max() > 0:
            assert not g.abs().max() > 0, name
            continue
        e_norm = float((g - w).norm() / w.norm())
        e_max = float((g - w).abs().max() / w.abs().max())
        if e_max > worst_max:
            where = name
        worst_norm, worst_max = max(worst_norm, e_norm), max(worst_max, e_max)
    return worst_norm, worst_max, where


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_fisher_matches_float32_within_bf16_precision(
    name: str, engines: list[per_input.PerInputEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """exact, empirical and sample of the bf16 model: within MODEL_RTOL of the float32 model on
    the same weights, within PRODUCT_RTOL of the bf16 model with float32 products; the self-check
    passes at its bf16 tolerance with no route replaced."""
    model, data, kw = CASES[name]()
    model16 = model.to(torch.bfloat16)
    model32 = copy.deepcopy(model16).float()  # the bf16-rounded weights, exactly
    data16 = bf16(data)
    methods = ("exact", "empirical", "sample")
    got = {}
    for method in methods:
        per_input.forget_verified(model16)
        got[method] = lf.estimate_fisher(model16, data16, method=method, seed=3, **kw)
        # the same bf16-rounded inputs, in float32
        want = lf.estimate_fisher(model32, bf16(data16, torch.float32), method=method, seed=3, **kw)
        assert all(t.dtype == torch.float32 for t in got[method].values())
        err_norm, err_max, where = rel_errors(got[method], want)
        assert err_norm <= MODEL_RTOL / 2 and err_max <= MODEL_RTOL, (method, err_max, where)
    bf16_engines = [e for e in engines if e.model is model16]
    assert len(bf16_engines) == len(methods)
    for e in bf16_engines:
        assert e.product_dtype == torch.bfloat16
        assert e.model_route == set()
        assert not [line for line in e.log if "->" in line or ": model" in line], e.log
        assert e._verified  # the check ran (the proofs were forgotten) and passed
    float32_products(monkeypatch)
    for method in methods:
        ref = lf.estimate_fisher(model16, data16, method=method, seed=3, **kw)
        _, err_max, where = rel_errors(got[method], ref)
        assert err_max <= PRODUCT_RTOL, (method, err_max, where)
    assert engines[-1].product_dtype == torch.float32


def test_per_input_gradients_are_bf16_and_squared_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the bf16 GPT-2, the per-input gradients the matrix rules build are bf16, and what is
    squared comes out float32."""
    model, data, kw = tiny_gpt2()
    model = model.to(torch.bfloat16)
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    for fn in ("_square_in_place", "_squared"):
        original = getattr(layer_rules, fn)

        def spy(t: Tensor, dtype: torch.dtype, _o: Any = original) -> Tensor:
            out = _o(t, dtype)
            seen.append((t.dtype, out.dtype))
            return out

        monkeypatch.setattr(layer_rules, fn, spy)
    lf.estimate_fisher(model, bf16(data), method="empirical", **kw)
    assert seen
    assert {o for _, o in seen} == {torch.float32}
    assert (torch.bfloat16, torch.float32) in seen  # bf16 per-input gradients squared in fp32


def test_product_dtype_defaults_and_element_sizes() -> None:
    lin = nn.Linear(3, 2)
    for dtype, product in [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),  # float16's range could overflow a product
    ]:
        m = copy.deepcopy(lin).to(dtype)
        e = per_input.PerInputEngine(m, dict(m.named_parameters()))
        assert e.product_dtype == product, dtype
    m = copy.deepcopy(lin).bfloat16()
    forced = per_input.PerInputEngine(m, dict(m.named_parameters()), product_dtype=torch.float32)
    assert forced.product_dtype == torch.float32
    # bytes per entry while squaring: the product, and its square in the accumulation dtype
    assert layer_rules._square_bytes(torch.bfloat16, torch.float32) == 2 + 4
    assert layer_rules._square_bytes(torch.float32, torch.float32) == 4 + 4
    assert layer_rules._square_bytes(torch.float64, torch.float64) == 8 + 8


def test_bf16_engine_buffers_stay_under_the_cap() -> None:
    """A bf16 token-level `sample` pass (one backward column per sequence) whose unchunked
    per-input buffers are larger than the cap: every call of the engine stays under it, counting
    the bf16 products and their float32 squares, and chunking changes nothing beyond float32
    round-off."""
    from test_lm_granularity import CausalLM, _peak_bytes

    torch.manual_seed(0)
    vocab, width, B, L = 400, 48, 8, 24
    model = CausalLM(vocab, width).bfloat16().eval()
    ids = torch.randint(0, vocab, (B, L))
    # the head's per-sequence gradients: 2 bytes each and their float32 squares, 8 x 115 KiB
    cap = 1.0  # MiB
    peaks: list[int] = []
    rule_peaks: list[tuple[int, float]] = []
    original = per_input.PerInputEngine.accumulate
    rule = layer_rules._RULES["linear"]
    rule_sum_squares = rule.sum_squares

    def measured(
        self: per_input.PerInputEngine, logits: Tensor, cot: Tensor, *a: Any, **k: Any
    ) -> None:
        assert self.product_dtype == torch.bfloat16
        peaks.append(cot.nbytes + _peak_bytes(lambda: original(self, logits, cot, *a, **k)))

    def rule_measured(ctx: Any, *a: Any, **k: Any) -> None:
        peak = _peak_bytes(lambda: rule_sum_squares(ctx, *a, **k))
        rule_peaks.append((peak, ctx.engine.rule_bytes))

    mp = pytest.MonkeyPatch()
    mp.setattr(per_input.PerInputEngine, "accumulate", measured)
    mp.setattr(rule, "sum_squares", rule_measured)
    try:
        capped = lf.estimate_fisher(model, [(ids, ids)], method="sample", max_memory_mib=cap)
    finally:
        mp.undo()
    free = lf.estimate_fisher(model, [(ids, ids)], method="sample", max_memory_mib=1024)
    torch.testing.assert_close(capped.flatten(), free.flatten(), rtol=1e-5, atol=0)
    assert peaks and max(peaks) <= cap * 2**20, f"peak {max(peaks) / 2**20:.2f} MiB"
    assert max(peaks) > cap * 2**20 / 4, f"peak {max(peaks) / 2**20:.2f} MiB"
    # the layers' own buffers (per-input products and their float32 squares) within their share
    assert rule_peaks and all(peak <= share for peak, share in rule_peaks), rule_peaks
    assert max(peak / share for peak, share in rule_peaks) > 0.25, rule_peaks


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_bf16_norm_rules_match_autograd_per_input_gradients(norm: type[nn.Module]) -> None:
    """The norms' rules (float32 per-input gradients from the bf16 inputs) against per-input
    autograd gradients of the bf16 model, one input at a time, with the self-check off; small
    inputs, so that an eps other than the model's own would show."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), norm(8), nn.Linear(8, 3)).bfloat16().eval()
    gen = torch.Generator().manual_seed(1)
    x = (0.02 * torch.randn(10, 6, generator=gen)).bfloat16()
    y = torch.randint(0, 3, (10,), generator=gen)
    got = lf.estimate_fisher(model, [(x, y)], method="empirical", verify=False)
    want = {n: torch.zeros(p.shape) for n, p in model.named_parameters()}
    for i in range(len(y)):
        logp = torch.log_softmax(model(x[i : i + 1]).float(), -1)[0, y[i]]
        for (n, _), g in zip(
            model.named_parameters(), torch.autograd.grad(logp, list(model.parameters()))
        ):
            want[n] += g.float().pow(2) / len(y)
    for n, w in want.items():
        err = float((got[n] - w).norm() / w.norm())
        assert err <= 1e-2, (n, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_default_eps_is_the_one_this_torch_adds(dtype: torch.dtype) -> None:
    """torch 2.6 adds finfo(bf16).eps = 2^-7 under eps=None, later releases float32's: the rule
    takes whichever this torch adds (with the other, tiny inputs normalise 10-100x apart)."""
    from lightning_fisher.estimators.layer_rules import rms_norm_default_eps

    x = torch.full((2, 8), 0.003, dtype=dtype)
    eps = rms_norm_default_eps(dtype)
    assert eps in (torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    got = torch.rms_norm(x, [8], None, None).double()
    assert torch.allclose(got, want, rtol=1e-2), (eps, got[0, 0], want[0, 0])
