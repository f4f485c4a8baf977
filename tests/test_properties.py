"""Property-based tests (hypothesis) of the estimators and the EWC callback.

Every generated case must give the right value (the dense reference of ``tests/reference.py``, or
an invariant: batching, data duplication, logit shift, masking equivalence, Hutchinson mean vs
exact) or raise a clear ``FisherInputError``; a finite but wrong Fisher fails the test. Shapes,
dtypes (float16, bfloat16, float32, float64 models), class counts (C = 1, 2, large), masks (all,
none, some), labels -100 and NaN/Inf in inputs or weights are drawn. Examples are derandomized so
CI is deterministic; run with ``--hypothesis-show-statistics`` to see how many cases ran.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from models import seeded
from reference import dense_fisher, per_input_jacobians, per_label_grads, unflatten
from torch import nn

import lightning_fisher as lf
from lightning_fisher import FisherInputError

# The Fisher is returned in float32: 1e-6 of the largest entry is its rounding, for float64 models.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)
SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
METHODS = (
    "exact",
    "sample",
    "empirical",
    "batched",
    "hutchinson",
    "hutchinson_upper",
    "hutchinson_lower",
)


def mlp(d_in: int, hidden: int, n_classes: int, seed: int, dtype: torch.dtype) -> nn.Module:
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))
    return seeded(model, seed, dtype)


def data(
    n: int, d_in: int, n_classes: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen, dtype=dtype), torch.randint(
        0, n_classes, (n,), generator=gen
    )


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, Any, list[int]]:
    js, zs, ys = per_input_jacobians(model, lambda f, r: f(r["x"]), [{"x": x, "y": y}])
    return js, zs, [int(v) for v in ys]  # type: ignore[arg-type]


def rel_err(fd: lf.FisherDiagonal, ref: dict[str, torch.Tensor]) -> float:
    """max |a - b| over all entries / max |b| (one scale for the whole model)."""
    scale = max(float(t.abs().max()) for t in ref.values())
    diff = max(float((fd[k].double() - ref[k].double()).abs().max()) for k in ref)
    return diff / max(scale, 1e-300)


shapes = st.fixed_dictionaries(
    {
        "n": st.integers(1, 6),
        "d_in": st.integers(1, 4),
        "hidden": st.integers(1, 5),
        "batch": st.integers(1, 6),
        "seed": st.integers(0, 2**16),
    }
)


@settings(SETTINGS, max_examples=30)
@given(shape=shapes, n_classes=st.sampled_from([2, 3, 7, 64]))
def test_exact_and_empirical_equal_the_dense_reference(
    shape: dict[str, int], n_classes: int
) -> None:
    model = mlp(shape["d_in"], shape["hidden"], n_classes, shape["seed"], torch.float64)
    x, y = data(shape["n"], shape["d_in"], n_classes, shape["seed"])
    js, zs, ys = reference(model, x, y)
    exact = lf.estimate_fisher(model, batches(x, y, shape["batch"]), method="exact")
    assert exact.n_samples == shape["n"]
    assert rel_err(exact, unflatten(model, dense_fisher(js, zs).diagonal())) < 1e-6
    empirical = lf.estimate_fisher(model, batches(x, y, shape["batch"]), method="empirical")
    ref = unflatten(model, per_label_grads(js, zs, ys).pow(2).mean(0))
    assert rel_err(empirical, ref) < 1e-6


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    method=st.sampled_from(["exact", "empirical", "batched"]),
)
def test_low_precision_models_give_a_float32_fisher_close_to_float64(
    shape: dict[str, int], dtype: torch.dtype, method: str
) -> None:
    model = mlp(shape["d_in"], shape["hidden"], 3, shape["seed"], dtype)
    x, y = data(shape["n"], shape["d_in"], 3, shape["seed"], dtype)
    # The float64 reference runs on the very same (rounded) weights and inputs.
    wide = copy.deepcopy(model).double()
    want = lf.estimate_fisher(wide, batches(x.double(), y, shape["batch"]), method=method)
    try:
        got = lf.estimate_fisher(model, batches(x, y, shape["batch"]), method=method)
    except FisherInputError as err:  # fp16 overflow is reported, never returned
        assert dtype == torch.float16 and "NaN/Inf" in str(err)
        return
    assert all(t.dtype == torch.float32 for t in got.values())
    tolerance = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-4}[dtype]
    assert rel_err(got, dict(want)) < tolerance


@SETTINGS
@given(shape=shapes, n_classes=st.sampled_from([2, 5]), shift=st.floats(-30, 30))
def test_exact_fisher_invariances(shape: dict[str, int], n_classes: int, shift: float) -> None:
    """Input-averaged scale: batching, duplicating the data and shifting all logits by a
    constant leave the exact Fisher unchanged."""
    model = mlp(shape["d_in"], shape["hidden"], n_classes, shape["seed"], torch.float64)
    x, y = data(shape["n"], shape["d_in"], n_classes, shape["seed"])
    base = lf.estimate_fisher(model, batches(x, y, 1))
    for other in (
        lf.estimate_fisher(model, batches(x, y, shape["batch"])),
        lf.estimate_fisher(model, batches(torch.cat([x, x]), torch.cat([y, y]), shape["batch"])),
        lf.estimate_fisher(
            model, batches(x, y, shape["batch"]), output_fn=lambda m, b: m(b[0]) + shift
        ),
    ):
        assert rel_err(other, dict(base)) < 1e-6


@settings(max_examples=8, deadline=None, derandomize=True, phases=PHASES)
@given(shape=shapes, n_classes=st.sampled_from([2, 4]))
def test_hutchinson_mean_converges_to_exact(shape: dict[str, int], n_classes: int) -> None:
    model = mlp(shape["d_in"], shape["hidden"], n_classes, shape["seed"], torch.float64)
    x, y = data(shape["n"], shape["d_in"], n_classes, shape["seed"])
    loader = batches(x, y, shape["batch"])
    exact = lf.estimate_fisher(model, loader)
    probes = 400
    mean = lf.estimate_fisher(model, loader, method="hutchinson", probes=probes, seed=shape["seed"])
    # The trace estimate sums many entries, each with CV <= sqrt(2) per probe: 5 sigma of the
    # mean of 400 probes is 5 * sqrt(2 / 400) = 0.35 for a single entry, far less for the sum.
    assert abs(mean.trace() - exact.trace()) <= 0.35 * exact.trace()


@settings(SETTINGS, max_examples=40)
@given(shape=shapes)
def test_two_classes_one_input_per_batch_lower_bound_is_exact(shape: dict[str, int]) -> None:
    """C = 2: I(p) has rank 1, so the rank-1 Hutchinson estimate with a Rademacher probe
    (xi^2 = 1) and one input per backward is the exact Fisher, for every draw."""
    model = mlp(shape["d_in"], shape["hidden"], 2, shape["seed"], torch.float64)
    x, y = data(shape["n"], shape["d_in"], 2, shape["seed"])
    exact = lf.estimate_fisher(model, batches(x, y, 1))
    lower = lf.estimate_fisher(
        model, batches(x, y, 1), method="hutchinson_lower", seed=shape["seed"]
    )
    assert rel_err(lower, dict(exact)) < 1e-6


@settings(SETTINGS, max_examples=40)
@given(shape=shapes, method=st.sampled_from(METHODS))
def test_one_class_is_a_clear_error_and_the_sigmoid_trick_is_bernoulli(
    shape: dict[str, int], method: str
) -> None:
    model = mlp(shape["d_in"], shape["hidden"], 1, shape["seed"], torch.float64)
    x, y = data(shape["n"], shape["d_in"], 1, shape["seed"])
    try:
        lf.estimate_fisher(model, batches(x, y, shape["batch"]), method=method)
    except FisherInputError as err:
        assert "single class" in str(err)
    else:
        raise AssertionError("one class gave a Fisher (identically zero) without an error")
    # A single sigmoid logit z as the two logits [0, z]: F = mean sigma(1 - sigma) (dz/dtheta)^2.
    js, zs, _ = reference(model, x, y)
    want = sum(
        torch.sigmoid(z[0]) * (1 - torch.sigmoid(z[0])) * j[0].pow(2) for j, z in zip(js, zs)
    )
    got = lf.estimate_fisher(
        model,
        batches(x, y, shape["batch"]),
        output_fn=lambda m, b: (lambda z: torch.cat([torch.zeros_like(z), z], -1))(m(b[0])),
    )
    assert rel_err(got, unflatten(model, want / len(js))) < 1e-6


class TokenMLP(nn.Module):
    """Per-token classifier on (B, T, d) inputs: tokens are independent, so a masked token's
    Fisher can be compared with the Fisher of the unmasked tokens laid out as rows."""

    def __init__(self, d_in: int, hidden: int, n_classes: int, seed: int) -> None:
        super().__init__()
        self.net = mlp(d_in, hidden, n_classes, seed, torch.float64)

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.net(inputs_embeds)


@settings(SETTINGS, max_examples=60)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 4),
    d_in=st.integers(1, 3),
    n_classes=st.sampled_from([2, 5]),
    seed=st.integers(0, 2**16),
    mask_kind=st.sampled_from(["none", "some", "all"]),
    method=st.sampled_from(METHODS),
)
def test_masked_tokens_contribute_nothing(
    b: int, t: int, d_in: int, n_classes: int, seed: int, mask_kind: str, method: str
) -> None:
    model = TokenMLP(d_in, 4, n_classes, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d_in, generator=gen, dtype=torch.float64)
    y = torch.randint(0, n_classes, (b, t), generator=gen)
    keep = {"none": torch.ones(b, t), "all": torch.zeros(b, t)}.get(mask_kind)
    if keep is None:
        keep = (torch.rand(b, t, generator=gen) < 0.6).double()
    keep = keep.long()
    # Half of the dropped tokens are padding (attention mask 0), half have the label -100.
    attention = keep.clone()
    labels = y.clone()
    drop = (keep == 0).nonzero()
    for i, (r, c) in enumerate(drop.tolist()):
        if i % 2:
            labels[r, c] = -100
        else:
            attention[r, c] = 0
    batch = {"inputs_embeds": x, "attention_mask": attention, "labels": labels}
    if keep.sum() == 0:
        try:
            lf.estimate_fisher(model, [batch], method=method)
        except FisherInputError as err:
            assert "masked out" in str(err)
            return
        raise AssertionError("an all-masked batch gave a Fisher")
    fd = lf.estimate_fisher(model, [batch], method=method, seed=seed)
    assert fd.n_samples == int(keep.sum())
    # Garbage (finite) at the masked positions changes nothing, for every method.
    noisy = x.clone()
    noisy[keep == 0] = 1e3 * torch.randn(int((keep == 0).sum()), d_in, generator=gen).double()
    again = lf.estimate_fisher(model, [{**batch, "inputs_embeds": noisy}], method=method, seed=seed)
    assert rel_err(again, dict(fd)) < 1e-12
    if method in ("exact", "empirical", "batched"):  # deterministic: equal to the rows
        rows = (x[keep == 1], y[keep == 1])
        want = lf.estimate_fisher(model.net, [rows], method=method)
        assert rel_err(fd, {f"net.{k}": v for k, v in want.items()}) < 1e-6


@settings(SETTINGS, max_examples=60)
@given(
    shape=shapes,
    where=st.sampled_from(["input", "weight", "bias"]),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    method=st.sampled_from(METHODS),
    data_=st.data(),
)
def test_nan_or_inf_in_inputs_or_weights_is_a_clear_error(
    shape: dict[str, int], where: str, bad: float, method: str, data_: st.DataObject
) -> None:
    model = mlp(shape["d_in"], shape["hidden"], 3, shape["seed"], torch.float64)
    x, y = data(shape["n"], shape["d_in"], 3, shape["seed"])
    if where == "input":
        x[
            data_.draw(st.integers(0, shape["n"] - 1)),
            data_.draw(st.integers(0, shape["d_in"] - 1)),
        ] = bad
    else:
        layer = model[data_.draw(st.sampled_from([0, 2]))]
        tensor = layer.weight if where == "weight" else layer.bias
        flat = tensor.data.view(-1)
        flat[data_.draw(st.integers(0, flat.numel() - 1))] = bad
    try:
        fd = lf.estimate_fisher(model, batches(x, y, shape["batch"]), method=method)
    except FisherInputError as err:
        assert "NaN/Inf" in str(err)
    else:
        raise AssertionError(f"NaN/Inf in the {where} gave a Fisher: trace {fd.trace()}")


@SETTINGS
@given(
    n_tasks=st.integers(1, 3),
    mode=st.sampled_from(["online", "separate"]),
    gamma=st.floats(0, 2),
    lam=st.floats(1e-3, 1e6),
    seed=st.integers(0, 2**16),
)
def test_ewc_penalty_gradient_and_checkpoint_state(
    n_tasks: int, mode: str, gamma: float, lam: float, seed: int
) -> None:
    """Whatever the tasks, mode and gamma: the penalty and its gradient follow docs/math.md, and a
    state round trip is bitwise."""
    model = mlp(3, 4, 3, seed, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    ewc = lf.EWC(lam=lam, mode=mode, gamma=gamma)
    fishers, anchors = [], []
    for _ in range(n_tasks):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        f = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
        ewc.consolidate(model, fisher=lf.FisherDiagonal(f))
        fishers.append(f)
        anchors.append({n: p.detach().clone() for n, p in model.named_parameters()})
    if mode == "online":  # F = sum_t gamma^(T-t) F_t, anchored at the last task
        total = {
            n: sum(gamma ** (n_tasks - 1 - i) * f[n].double() for i, f in enumerate(fishers))
            for n in fishers[0]
        }
        terms = [(total, anchors[-1])]
    else:
        terms = [({n: v.double() for n, v in f.items()}, a) for f, a in zip(fishers, anchors)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    value = ewc.penalty(model)
    value.backward()
    want = (
        0.5
        * lam
        * sum(
            (f[n] * (p.detach() - a[n]).pow(2)).sum()
            for f, a in terms
            for n, p in model.named_parameters()
        )
    )
    torch.testing.assert_close(
        value.double(), torch.as_tensor(want, dtype=torch.float64), rtol=1e-5, atol=0
    )
    for n, p in model.named_parameters():
        grad = lam * sum(f[n] * (p.detach() - a[n]) for f, a in terms)
        torch.testing.assert_close(p.grad, grad, rtol=1e-5, atol=1e-12 * lam)
    copy_ = lf.EWC(lam=lam, mode=mode, gamma=gamma)
    copy_.load_state_dict(copy.deepcopy(ewc.state_dict()))
    assert copy_.task_count == n_tasks
    for a, b in zip(copy_.fishers + copy_.anchors, ewc.fishers + ewc.anchors):  # type: ignore[operator]
        assert all(torch.equal(a[k], b[k]) for k in b)
