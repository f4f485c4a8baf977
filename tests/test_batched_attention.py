"""Models whose attention runs through ``F.scaled_dot_product_attention`` (transformers'
``attn_implementation="sdpa"``, ``nn.TransformerEncoder``): the pass batches their backward.

The Fisher equals the brute-force dense reference (one input at a time, one backward per logit,
under the model's own attention kernel); the batched backwards run without a vmap fallback (no
operation looped over the cotangents); the model's attention backend outside the pass, and its
forward, are as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from dense_reference import DenseReference, dense_reference, max_relative_error
from models import random_gpt2
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import lightning_fisher as lf
from lightning_fisher import hf
from lightning_fisher.estimators.batched_backward import batched_grad

transformers = pytest.importorskip("transformers")

VOCAB, T = 12, 6
RTOL = 1e-6  # the diagonal is stored in float32
FALLBACK = "performance drop"  # vmap's warning when it loops over an operation's batch


@pytest.fixture
def fallback_warnings() -> Iterator[None]:
    """vmap's fallback warnings on (the legacy prototype's are off by default)."""
    before = torch._C._debug_only_are_vmap_fallback_warnings_enabled()
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    yield
    torch._C._debug_only_display_vmap_fallback_warnings(before)


def _ids(n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=gen)
    lengths = torch.tensor([T, 4, T, 3, 5][:n])
    mask = (torch.arange(T) < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def gpt2_case() -> tuple[nn.Module, list[Any], dict[str, Any]]:
    model = random_gpt2(VOCAB, attn_implementation="sdpa")
    ids, mask = _ids(5, 3)
    batches = [
        hf.with_lm_labels({"input_ids": ids[i:j], "attention_mask": mask[i:j]})
        for i, j in ((0, 3), (3, 5))
    ]
    return model, batches, hf.lm_fisher_kwargs(model)


def bert_case() -> tuple[nn.Module, list[Any], dict[str, Any]]:
    """A masked LM: labels on some positions (-100 on the rest) and right padding."""
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=16,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).double().eval()
    ids, mask = _ids(5, 4)
    gen = torch.Generator().manual_seed(5)
    keep = (torch.rand(ids.shape, generator=gen) < 0.6) & (mask == 1)
    keep[:, 0] = True
    labels = ids.masked_fill(~keep, -100)
    batches = [
        {"input_ids": ids[i:j], "attention_mask": mask[i:j], "labels": labels[i:j]}
        for i, j in ((0, 3), (3, 5))
    ]
    return model, batches, {}


class EncoderLM(nn.Module):
    """Token embedding, one ``nn.TransformerEncoder`` layer (PyTorch defaults), a token head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=8, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 5)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)  # (B, T, D)
        if self.batch_first:
            return self.head(self.encoder(h))
        return self.head(self.encoder(h.transpose(0, 1)).transpose(0, 1))


def encoder_case(batch_first: bool) -> tuple[nn.Module, list[Any], dict[str, Any]]:
    torch.manual_seed(0)
    model = EncoderLM(batch_first).double().eval()
    ids, _ = _ids(5, 6)
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(7))
    return model, [(ids[:3], labels[:3]), (ids[3:], labels[3:])], {}


CASES = {
    "gpt2": gpt2_case,
    "bert": bert_case,
    "encoder": lambda: encoder_case(batch_first=False),
    "encoder_batch_first": lambda: encoder_case(batch_first=True),
}
_BUILT: dict[str, Any] = {}


def case(name: str) -> tuple[nn.Module, list[Any], dict[str, Any], DenseReference]:
    if name not in _BUILT:
        model, batches, kw = CASES[name]()
        ref = dense_reference(model, batches, shift_labels=kw.get("shift_labels", False))
        _BUILT[name] = (model, batches, kw, ref)
    return _BUILT[name]


def sequence_empirical(ref: DenseReference) -> dict[str, Tensor]:
    """(1/N_seq) sum_s (sum_t g_{y_t})^2 with the true labels, from the dense Jacobians."""
    total, n_seq, j = torch.zeros(ref.jacobians[0].shape[1], dtype=torch.float64), 0, 0
    for mask in ref.batch_masks:
        for row in mask:
            g = torch.zeros_like(total)
            for _ in range(int(row.sum())):
                e = torch.zeros_like(ref.probs[j])
                e[ref.labels[j]] = 1  # type: ignore[index]
                g += ref.jacobians[j].T @ (e - ref.probs[j])
                j += 1
            if row.any():
                total += g.pow(2)
                n_seq += 1
    return ref.unflatten(total / n_seq)


def _no_fallback(caught: list[warnings.WarningMessage]) -> None:
    loops = sorted({str(w.message)[:140] for w in caught if FALLBACK in str(w.message)})
    assert not loops, "vmap looped over the cotangents: " + " | ".join(loops)


@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_models_match_the_dense_reference_without_vmap_fallback(
    name: str, fallback_warnings: None
) -> None:
    model, batches, kw, ref = case(name)
    runs = {
        "exact": (dict(method="exact"), ref.exact()),
        "empirical": (dict(method="empirical"), ref.empirical()),
    }
    if name != "gpt2":  # GPT-2's exact over its 12 tokens is the same route; keep the file fast
        runs["sequence empirical"] = (
            dict(method="empirical", granularity="sequence"),
            sequence_empirical(ref),
        )
    for what, (args, want) in runs.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fd = lf.estimate_fisher(model, batches, progress=False, **kw, **args)  # type: ignore[arg-type]
        _no_fallback(caught)
        err, where = max_relative_error(dict(fd.items()), want)
        assert err <= RTOL, f"{what} on {name}: {err:.2e} on {where}"


def test_several_probes_batch_their_backward_through_sdpa(fallback_warnings: None) -> None:
    model, batches, kw, _ = case("gpt2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        many = lf.estimate_fisher(model, batches, method="hutchinson", probes=3, seed=2, **kw)
    _no_fallback(caught)
    # the same probes one at a time give the same sums (a Hutchinson estimate is a mean)
    single = lf.estimate_fisher(
        model, batches, method="hutchinson", probes=3, seed=2, max_memory_mib=1e-6, **kw
    )
    for name in many:
        torch.testing.assert_close(many[name], single[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["hutchinson", "batched"])
def test_one_cotangent_passes_keep_the_fused_kernels_and_the_same_estimate(method: str) -> None:
    """A pass whose only backward is one plain backward keeps the model's fused attention; its
    estimate is the one under MATH up to rounding."""
    model, batches, kw, _ = case("gpt2")
    fused = lf.estimate_fisher(model, batches, method=method, probes=1, seed=4, **kw)
    with sdpa_kernel(SDPBackend.MATH):
        math = lf.estimate_fisher(model, batches, method=method, probes=1, seed=4, **kw)
    for name in fused:
        torch.testing.assert_close(fused[name], math[name], rtol=1e-4, atol=1e-9)


def test_fused_attention_backward_would_loop_under_vmap(fallback_warnings: None) -> None:
    """The check above can fail: outside the pass (the fused CPU kernel, the model's default),
    a batched backward through the same model loops over the attention backward."""
    model, batches, _, _ = case("gpt2")
    logits = model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits
    params = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batched_grad(logits, params, torch.randn(2, *logits.shape, dtype=logits.dtype))
    assert any("scaled_dot_product" in str(w.message) for w in caught), (
        "the fused attention backward no longer loops under vmap: "
        f"{[str(w.message)[:100] for w in caught]}"
    )


class _BackendSpy(nn.Module):
    """Records, at each forward, whether the flash attention backend is enabled."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.flash: list[bool] = []

    def forward(self, ids: Tensor) -> Tensor:
        self.flash.append(torch.backends.cuda.flash_sdp_enabled())
        return self.model(ids)


@pytest.mark.parametrize(
    "args, math",
    [
        (dict(method="empirical"), True),
        (dict(method="exact", max_memory_mib=1e-6), True),  # the engine, one column at a time
        (dict(method="hutchinson", probes=2), True),
        (dict(method="hutchinson", probes=1), False),  # one plain backward: the fused kernels
        (dict(method="batched"), False),
    ],
)
def test_backend_only_changes_inside_the_pass(args: dict[str, Any], math: bool) -> None:
    model, batches, _, _ = case("encoder_batch_first")
    spy = _BackendSpy(model)
    x = batches[0][0]
    flags = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    assert flags[0], "the flash backend is enabled by default"
    before = model(x).detach()
    lf.estimate_fisher(spy, batches, progress=False, **args)  # type: ignore[arg-type]
    assert spy.flash and all(flash is not math for flash in spy.flash)
    after = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    assert after == flags
    assert torch.equal(model(x).detach(), before)


@pytest.mark.parametrize("k", [1, 3])
def test_batched_grad_equals_one_backward_per_cotangent(k: int) -> None:
    """Entry i stacks the K products of inputs[i] (None for an input the outputs do not reach),
    by vmap for K > 1 and by one plain backward for K = 1."""
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(4, 3, generator=gen, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    x = torch.randn(5, 4, generator=gen, requires_grad=True)
    out = torch.tanh(x @ w).softmax(-1)
    cot = torch.randn(k, *out.shape, generator=gen)
    got = batched_grad(out, [w, unused, x], cot)
    assert got[1] is None
    for i, inp in [(0, w), (2, x)]:
        want = torch.stack(
            [torch.autograd.grad(out, inp, c, retain_graph=True)[0] for c in cot.unbind(0)]
        )
        g = got[i]
        assert g is not None and g.shape == (k, *inp.shape)
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-7)
