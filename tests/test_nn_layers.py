"""Every parameter-owning layer of ``torch.nn`` against a brute-force dense Fisher.

The zoo (``layer_zoo.py``) wraps each layer, in each way people use it (sequence-first and
batch-first, packed sequences, parameters reused outside their module, custom autograd
Functions, parametrizations, tiny Hugging Face models), in a small float64 classifier. The
reference (``dense_reference.py``) takes one input at a time and one autograd gradient per logit,
so no batching rule of any layer can make it wrong. ``exact``, ``empirical``, ``batched`` and
``sample`` (with the same label draws) must match it to 1e-6 relative error, and count the inputs
right; the ``hutchinson`` family must be unbiased for its target.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import pkgutil
import re
from typing import Any

import pytest
import torch
from dense_reference import DenseReference, dense_reference, max_relative_error
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from layer_zoo import ZOO, Batches, Built, Fn, SelfAttention, build, entries
from torch import Tensor, nn

import lightning_fisher as lf

RTOL = 1e-6
SEED, MC = 5, 2  # ``sample``: seed and draws per input


@functools.cache
def case(name: str) -> tuple[Built, DenseReference]:
    if "hf" in ZOO[name].tags:
        pytest.importorskip("transformers")
    built = build(name)
    d = built.data
    return built, dense_reference(built.model, d.batches, d.batch_dim, d.shift_labels)


def estimate(built: Built, method: str, **kw: Any) -> lf.FisherDiagonal:
    return lf.estimate_fisher(
        built.model,
        built.data.batches,
        method=method,
        shift_labels=built.data.shift_labels,
        progress=False,
        **kw,
    )


# ------------------------------------------------------------------ the zoo covers torch.nn

#: Parameter-owning classes of torch.nn that get no zoo entry, and why.
EXCLUDED = {
    "RNNBase": "the shared base of RNN, GRU and LSTM (all in the zoo); not a layer users build",
    "RNNCellBase": "the shared base of RNNCell, GRUCell and LSTMCell (all in the zoo)",
    "LinearCrossEntropyLoss": "a loss: its forward returns the cross-entropy, never logits, so "
    "there is no model output to take a Fisher of; its projection is an nn.Linear",
}


def _init_source(cls: type) -> str:
    parts = []
    for k in cls.__mro__:
        if (
            k is nn.Module
            or not k.__module__.startswith("torch.nn.modules")
            or "__init__" not in vars(k)
        ):
            continue
        parts.append(inspect.getsource(vars(k)["__init__"]))
    return "\n".join(parts)


def parameter_owning_torch_layers() -> dict[str, type]:
    """Public classes of ``torch.nn.modules`` whose constructor creates a Parameter, or builds
    another such class (a transformer layer builds Linear, LayerNorm and attention)."""
    classes: dict[str, type] = {}
    for info in pkgutil.iter_modules(torch.nn.modules.__path__):
        mod = importlib.import_module(f"torch.nn.modules.{info.name}")
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, nn.Module)
                and obj.__module__ == mod.__name__
                and not name.startswith("_")
            ):
                classes[name] = obj
    sources = {name: _init_source(cls) for name, cls in classes.items()}
    owners = {name for name, src in sources.items() if "Parameter(" in src}
    grown = True
    while grown:
        grown = False
        for name, src in sources.items():
            if name not in owners and any(re.search(rf"\b{o}\(", src) for o in owners):
                owners.add(name)
                grown = True
    return {name: classes[name] for name in owners}


def test_every_parameter_owning_torch_layer_is_in_the_zoo_or_excluded_with_a_reason() -> None:
    owners = parameter_owning_torch_layers()
    # the enumeration itself must see the layers everyone knows
    for known in ("Linear", "Conv2d", "LSTM", "MultiheadAttention", "LayerNorm", "PReLU"):
        assert known in owners
    covered: set[type] = set()
    for name in entries(without=("hf",)):
        covered |= build(name).classes
    missing = sorted(n for n, cls in owners.items() if cls not in covered and n not in EXCLUDED)
    assert not missing, f"torch.nn layers with parameters and no zoo entry: {missing}"
    # an exclusion absent from this torch version (a layer added later) is not stale
    present = {n for n in EXCLUDED if hasattr(torch.nn, n)}
    stale = sorted(n for n in present if n not in owners or owners[n] in covered)
    assert not stale, (
        f"exclusions that are no torch.nn layer with parameters, or are covered: {stale}"
    )


# ------------------------------------------------------------------ per-input methods


def _reference(ref: DenseReference, method: str) -> dict[str, Tensor]:
    if method == "sample":
        return ref.sample(MC, SEED)
    return getattr(ref, method)()


def _state(model: nn.Module) -> list[Tensor]:
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


@pytest.mark.parametrize("method", ["exact", "empirical", "batched", "sample"])
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if "slow" in ZOO[n].tags else n for n in ZOO],
)
def test_matches_the_dense_reference(name: str, method: str) -> None:
    built, ref = case(name)
    before = _state(built.model)
    modes = [m.training for m in built.model.modules()]
    # the dense reference squares every position's gradient on its own (token_route="position")
    route = {"token_route": "position"} if method == "sample" else {}
    fd = estimate(built, method, seed=SEED, mc_samples=MC, **route)
    assert fd.n_samples == ref.n_inputs, (
        f"n_samples={fd.n_samples}, but the batches hold {ref.n_inputs} inputs"
    )
    err, where = max_relative_error({k: fd[k] for k in fd}, _reference(ref, method))
    assert err <= RTOL, f"{method} on {name}: relative error {err:.2e} on {where}"
    # the pass leaves the model as it found it
    after = _state(built.model)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert modes == [m.training for m in built.model.modules()]


# ------------------------------------------------------------------ hutchinson family

HUTCHINSON_ENTRIES = [
    "gru_seq_first_hn",
    "mha_seq_first",
    "transformer_encoder_layer_seq_first_tokens",
    "functional_weight_use",
    "prelu_per_channel",
    "lstm_packed_seq_first",
    "legacy_autograd_function",
    "conv_transpose2d_groups_dilation",
]
N_PROBES = 240
#: |z| above this for any single entry is a bias: Bonferroni over a few hundred entries at
#: family-wise 1e-4, with room for the skew of squared Rademacher sums at this many probes. The
#: right targets give |z| <= 3.1 on these entries; a wrong one (F for the upper bound, the upper
#: bound for F, or F for the rank-1 lower bound) gives |z| >= 11.
Z_ENTRY, Z_TRACE = 6.0, 4.0
#: Rademacher probes give each entry a coefficient of variation <= sqrt(2); the sample standard
#: deviation over N_PROBES estimates carries about 10% noise.
CV_TOLERANCE = 1.3


@pytest.mark.slow
@pytest.mark.parametrize("name", HUTCHINSON_ENTRIES)
def test_hutchinson_family_is_unbiased_with_bounded_variance(name: str) -> None:
    built, ref = case(name)
    targets = {
        "hutchinson": ref.exact(),
        "hutchinson_upper": ref.upper(),
        "hutchinson_lower": ref.lower(rank=1),
    }
    specs = [{"method": m, "seed": s} for m in targets for s in range(N_PROBES)]
    results = lf.estimate_fishers(
        built.model,
        built.data.batches,
        specs,
        shift_labels=built.data.shift_labels,
        progress=False,
    )
    for i, (method, target) in enumerate(targets.items()):
        runs = results[i * N_PROBES : (i + 1) * N_PROBES]
        assert all(r.n_samples == ref.n_inputs for r in runs)
        want = torch.cat([target[k].reshape(-1) for k in target])
        draws = torch.stack([torch.cat([r[k].double().reshape(-1) for k in target]) for r in runs])
        mean, std = draws.mean(0), draws.std(0)
        scale = float(want.abs().max())
        noisy = std > 1e-9 * scale
        # entries without noise (a zero Fisher, or one probe sign only) must be exact
        flat_err = float((mean - want)[~noisy].abs().max()) if (~noisy).any() else 0.0
        assert flat_err <= 1e-8 * scale, f"{method}: noiseless entries off by {flat_err:.2e}"
        z = (mean - want)[noisy] / (std[noisy] / math.sqrt(N_PROBES))
        worst = int(z.abs().argmax())
        assert float(z.abs().max()) < Z_ENTRY, (
            f"{method} on {name}: entry z = {float(z[worst]):.1f} "
            f"(mean {float(mean[noisy][worst]):.3e}, target {float(want[noisy][worst]):.3e})"
        )
        traces = draws.sum(1)
        z_trace = (traces.mean() - want.sum()) / (traces.std() / math.sqrt(N_PROBES))
        assert abs(float(z_trace)) < Z_TRACE, f"{method} on {name}: trace z = {float(z_trace):.1f}"
        big = want > 1e-3 * scale
        cv = float((std[big] / want[big]).max())
        assert cv <= math.sqrt(2) * CV_TOLERANCE, f"{method} on {name}: max CV {cv:.2f}"


# ------------------------------------------------------------------ random stacks of layers

W = 4  # hidden width (even: bidirectional GRUs give W // 2 per direction)


def _block(kind: str) -> nn.Module:
    """A (B, T, W) -> (B, T, W) block; sequence-first layers are fed (T, B, W) inside."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(W, W), nn.Tanh())
    if kind == "layer_norm":
        return nn.LayerNorm(W)
    if kind == "prelu":
        return nn.PReLU()
    if kind == "conv1d":
        conv = nn.Conv1d(W, W, 3, padding=1)
        return Fn(lambda h: torch.tanh(conv(h.transpose(1, 2)).transpose(1, 2)), conv=conv)
    if kind in ("gru_batch_first", "gru_seq_first", "lstm_seq_first"):
        bf = kind.endswith("batch_first")
        rnn = (nn.LSTM if kind.startswith("lstm") else nn.GRU)(
            W, W // 2, bidirectional=True, batch_first=bf
        )
        if bf:
            return Fn(lambda h: rnn(h)[0], rnn=rnn)
        return Fn(lambda h: rnn(h.transpose(0, 1))[0].transpose(0, 1), rnn=rnn)
    if kind in ("mha_batch_first", "mha_seq_first"):
        bf = kind.endswith("batch_first")
        att = SelfAttention(bf)
        if bf:
            return Fn(lambda h: h + att(h), att=att)
        return Fn(lambda h: h + att(h.transpose(0, 1)).transpose(0, 1), att=att)
    raise ValueError(kind)


BLOCKS = [
    "linear",
    "layer_norm",
    "prelu",
    "conv1d",
    "gru_batch_first",
    "gru_seq_first",
    "lstm_seq_first",
    "mha_batch_first",
    "mha_seq_first",
]


def _stack(blocks: list[str], tokens_in: bool, token_logits: bool, seed: int) -> Built:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        first: nn.Module = nn.Embedding(7, W) if tokens_in else nn.Linear(3, W)
        layers = [first, *(_block(b) for b in blocks)]
        if not token_logits:
            layers.append(_mean_over_time())
        layers += [nn.Linear(W, 3), Fn(lambda z: torch.log_softmax(3 * z, -1))]
        model = nn.Sequential(*layers).eval()
        batches = []
        for b in (3, 2):
            x = (
                torch.randint(0, 7, (b, 3), generator=gen)
                if tokens_in
                else torch.randn(b, 3, 3, generator=gen)
            )
            y = torch.randint(0, 3, (b, 3) if token_logits else (b,), generator=gen)
            if token_logits:
                y[0, 2] = -100
            batches.append((x, y))
    finally:
        torch.set_default_dtype(before)
    return Built("stack", model, Batches(batches), set())


def _mean_over_time() -> nn.Module:
    return Fn(lambda h: h.mean(1))


@pytest.mark.slow
# No shrinking: a failing stack is reported as drawn, and a broken engine stays cheap to test.
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=2, max_size=4),
    tokens_in=st.booleans(),
    token_logits=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_layer_stacks_match_the_dense_reference(
    blocks: list[str], tokens_in: bool, token_logits: bool, seed: int
) -> None:
    built = _stack(blocks, tokens_in, token_logits, seed)
    ref = dense_reference(built.model, built.data.batches)
    for method in ("exact", "empirical"):
        fd = estimate(built, method)
        assert fd.n_samples == ref.n_inputs
        err, where = max_relative_error({k: fd[k] for k in fd}, _reference(ref, method))
        assert err <= RTOL, f"{method} on {blocks}: relative error {err:.2e} on {where}"
