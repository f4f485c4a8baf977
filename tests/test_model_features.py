"""Model features users really have, against the brute-force dense Fisher (``dense_reference``).

Train-mode models (BatchNorm, Dropout), frozen parameters and adapters, tied weights, activation
checkpointing, packed sequences, bags with offsets, ``channels_last``, attention with padding
masks, structured outputs, per-pixel logits, batches whose first dimension is not the batch, and
16-bit models. Each either matches the reference (one input at a time, float64) or is refused with
a ``FisherInputError`` that says why.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dense_reference import dense_reference, max_relative_error
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence
from torch.utils.checkpoint import checkpoint

import lightning_fisher as lf

RTOL = 1e-6
SEED, MC = 3, 2


def _double(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64 with weights moved off their initial values."""
    torch.manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _rows(shape: Sequence[int], n_classes: int = 3, sizes: Sequence[int] = (3, 2)) -> list[Any]:
    gen = torch.Generator().manual_seed(11)
    return [
        (
            torch.randn(b, *shape, generator=gen, dtype=torch.float64),
            torch.randint(0, n_classes, (b,), generator=gen),
        )
        for b in sizes
    ]


def _estimate(model: nn.Module, batches: Any, method: str, **kw: Any) -> lf.FisherDiagonal:
    if method == "sample":
        kw = {"seed": SEED, "mc_samples": MC, "token_route": "position", **kw}
    return lf.estimate_fisher(model, batches, method, progress=False, **kw)


def _want(ref: Any, method: str) -> dict[str, Tensor]:
    return ref.sample(MC, SEED) if method == "sample" else getattr(ref, method)()


def assert_matches_reference(
    model: nn.Module,
    batches: list[Any],
    methods: Sequence[str] = ("exact", "empirical", "batched"),
    *,
    ref_model: nn.Module | None = None,
    ref_batches: list[Any] | None = None,
    batch_dim: int = 0,
    rtol: float = RTOL,
    **kw: Any,
) -> None:
    ref = dense_reference(
        ref_model if ref_model is not None else model,
        ref_batches if ref_batches is not None else batches,
        batch_dim,
        kw.get("shift_labels", False),
    )
    for method in methods:
        fd = _estimate(model, batches, method, **kw)
        assert fd.n_samples == ref.n_inputs, f"{method}: {fd.n_samples} != {ref.n_inputs}"
        err, where = max_relative_error(dict(fd.items()), _want(ref, method))
        assert err <= rtol, f"{method}: relative error {err:.2e} on {where}"


# ------------------------------------------------------------------ train mode


def test_train_mode_batchnorm_and_dropout_give_the_eval_fisher_and_keep_the_model() -> None:
    model = _double(
        nn.Sequential(
            nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3)
        )
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    model[1].num_batches_tracked.fill_(7)
    buffers = [b.clone() for b in model.buffers()]
    batches = _rows((4,))
    # the reference runs the model in eval mode: running statistics, no dropout
    assert_matches_reference(model, batches, ("exact", "empirical", "batched", "sample"))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_called_under_no_grad_or_inference_mode(context: Callable[[], Any]) -> None:
    """A validation hook runs under inference mode, its batches are inference tensors: the pass
    turns autograd back on for itself."""
    model = _double(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    batches = _rows((4,))
    ref = dense_reference(model, batches)
    with context():
        ours = [(x.clone(), y.clone()) for x, y in batches]
        fds = lf.estimate_fishers(model, ours, ["exact", "empirical", "batched"], progress=False)
        assert not torch.is_grad_enabled()
    for fd in fds:
        err, where = max_relative_error(dict(fd.items()), getattr(ref, fd.method)())
        assert err <= RTOL, f"{fd.method}: relative error {err:.2e} on {where}"


def _batch_statistics_model() -> nn.Module:
    """A float64 MLP whose BatchNorm keeps no running statistics (batch statistics in eval mode)."""
    return _double(
        nn.Sequential(
            nn.Linear(4, 5),
            nn.BatchNorm1d(5, track_running_stats=False),
            nn.Tanh(),
            nn.Linear(5, 3),
        )
    )


@pytest.mark.parametrize("method", ["exact", "empirical", "hutchinson"])
def test_batch_statistics_in_eval_mode_are_refused(method: str) -> None:
    """BatchNorm without running statistics normalises by the batch's own statistics even in eval
    mode: an input's logits depend on the other inputs, so no per-input Fisher exists."""
    model = _batch_statistics_model()
    with pytest.raises(lf.FisherInputError, match=r"batch statistics.*'1'.*track_running_stats"):
        _estimate(model, _rows((4,)), method)
    assert all(m.training for m in model.modules())


def test_batch_statistics_are_fine_for_the_batch_gradient() -> None:
    """``batched`` squares the gradient of each batch's mean log-likelihood: defined whatever
    couples the batch's inputs, and equal to that gradient computed by hand."""
    model = _batch_statistics_model()
    batches = _rows((4,))
    err, where = max_relative_error(
        dict(_estimate(model, batches, "batched").items()), _batched_by_hand(model, batches)
    )
    assert err <= RTOL, f"relative error {err:.2e} on {where}"


def _batched_by_hand(model: nn.Module, batches: list[Any]) -> dict[str, Tensor]:
    """(1/M) sum_m (grad of batch m's mean log p(y|x))^2 by plain autograd, in eval mode, for
    ``(inputs, y)`` batches with (B, C) logits."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    want = {k: torch.zeros_like(p) for k, p in params.items()}
    was = model.training
    model.eval()
    for x, y in batches:
        loglik = torch.log_softmax(model(x), -1).gather(1, y[:, None]).mean()
        for k, g in zip(params, torch.autograd.grad(loglik, list(params.values()))):
            want[k] += g.pow(2) / len(batches)
    model.train(was)
    return want


def _check_methods(
    model: nn.Module, batches: list[Any], wants: dict[str, dict[str, Tensor]], n: int
) -> None:
    """Each method's Fisher over ``batches`` counts ``n`` inputs and matches its reference."""
    for method, want in wants.items():
        fd = _estimate(model, batches, method)
        assert fd.n_samples == n
        err, where = max_relative_error(dict(fd.items()), want)
        assert err <= RTOL, f"{method}: relative error {err:.2e} on {where}"


class _FunctionalDropout(nn.Module):
    """``F.dropout(h, 0.5)``: the functional form defaults to training=True, eval mode or not."""

    def __init__(self, sdpa: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.sdpa = nn.Linear(4, 4), nn.Linear(4, 3), sdpa

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.sdpa:
            q = h.view(h.shape[0], 1, 2, 2)
            h = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5).flatten(1)
        else:
            h = F.dropout(h, 0.5)
        return self.b(h)


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("method", ["exact", "batched"])
def test_dropout_that_eval_mode_cannot_switch_off_warns(sdpa: bool, method: str) -> None:
    model = _double(_FunctionalDropout(sdpa))
    with pytest.warns(UserWarning, match="dropout.*eval mode"):
        _estimate(model, _rows((4,)), method)


# ------------------------------------------------------------------ which parameters


def test_lazy_modules_not_initialised_yet_are_refused() -> None:
    model = nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.Linear(5, 3))
    batches = [(torch.randn(3, 4), torch.randint(0, 3, (3,)))]
    with pytest.raises(lf.FisherInputError, match=r"0\.weight, 0\.bias are not initialised"):
        _estimate(model, batches, "exact")
    with torch.no_grad():
        model(batches[0][0])
    assert _estimate(model, batches, "exact")["0.weight"].shape == (5, 4)


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: W x + b + s B A dropout(x)."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 2.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.drop, self.scale = nn.Dropout(0.1), scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.drop(x)))


def test_frozen_backbone_and_lora_adapters() -> None:
    backbone = nn.Sequential(nn.Linear(4, 5), nn.Tanh()).requires_grad_(False)
    model = _double(
        nn.Sequential(backbone, LoRALinear(nn.Linear(5, 5)), nn.Tanh(), nn.Linear(5, 3))
    ).train()
    model[3].bias.requires_grad_(False)
    fd = _estimate(model, _rows((4,)), "exact")
    assert set(fd) == {"1.lora_A.weight", "1.lora_B.weight", "3.weight"}
    assert_matches_reference(model, _rows((4,)), ("exact", "empirical", "batched", "sample"))


class TiedLM(nn.Module):
    """A token-level LM whose output head shares the input embedding's tensor."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        h = h + torch.tanh(self.mix(h)).cumsum(1) / 2  # each position sees its prefix
        return self.head(h)


def _token_batches(vocab: int = 7, length: int = 8) -> list[Any]:
    """Token batches of 3 and 2 sequences; 8 positions, so that ``causal=True`` cuts them into
    prefix blocks."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for b in (3, 2):
        ids = torch.randint(0, vocab, (b, length), generator=gen)
        labels = torch.randint(0, vocab, (b, length), generator=gen)
        labels[0, 1] = -100
        out.append((ids, labels))
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_tied_embedding_and_head_count_the_shared_tensor_once(causal: bool) -> None:
    model = _double(TiedLM())
    batches = _token_batches()
    fd = _estimate(model, batches, "exact", causal=causal)
    assert set(fd) == {"emb.weight", "mix.weight", "mix.bias"}
    assert_matches_reference(model, batches, ("exact", "empirical", "sample"), causal=causal)


def test_tied_lm_sample_one_backward_per_sequence_converges_to_exact() -> None:
    """``sample``'s sequence route (labels drawn at every position, one gradient per sequence)
    through the tied head: unbiased for the token-level F. Seeded; at 800 draws the largest
    relative error is 0.03-0.09 (seeds 1-4), and the two uses squared apart (untied) give 0.89."""
    model = _double(TiedLM())
    batches = _token_batches()
    ref = dense_reference(model, batches)
    fd = _estimate(model, batches, "sample", token_route="sequence", mc_samples=800, seed=1)
    assert fd.n_samples == ref.n_inputs
    err, where = max_relative_error(dict(fd.items()), ref.exact())
    assert err <= 0.15, f"relative error {err:.2e} on {where}"


# ------------------------------------------------------------------ activation checkpointing


class _Checkpointed(nn.Module):
    """A checkpointed segment after a first layer, or (``first``) on the raw inputs, which do not
    require grad (a reentrant segment then gives its parameters no gradient in training)."""

    def __init__(self, reentrant: bool, first: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.block = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh())
        self.out = nn.Linear(5, 3)
        self.reentrant, self.first = reentrant, first

    def forward(self, x: Tensor, plain: bool = False) -> Tensor:
        def segment(v: Tensor) -> Tensor:
            return self.block(torch.tanh(self.inp(v)) if self.first else v)

        h = x if self.first else torch.tanh(self.inp(x))
        h = segment(h) if plain else checkpoint(segment, h, use_reentrant=self.reentrant)
        return self.out(h)


def _graph_names(t: Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [f for f, _ in fn.next_functions]
    return {type(fn).__name__ for fn in seen}


@pytest.mark.parametrize(("reentrant", "first"), [(False, False), (True, False), (True, True)])
def test_torch_checkpoint_in_a_custom_forward(reentrant: bool, first: bool) -> None:
    """The Fisher of the function the segment computes (the reference runs it without
    checkpointing); outside the pass the model checkpoints as before."""
    model = _double(_Checkpointed(reentrant, first)).train()
    reference = copy.deepcopy(model)
    reference.forward = functools.partial(type(model).forward, reference, plain=True)  # type: ignore[method-assign]
    assert_matches_reference(model, _rows((4,)), ref_model=reference)
    if reentrant:
        x = _rows((4,))[0][0].requires_grad_()
        assert "CheckpointFunctionBackward" in _graph_names(model(x))


def test_hugging_face_gradient_checkpointing() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=16,
        n_embd=8,
        n_layer=2,
        n_head=2,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    reference = copy.deepcopy(model)
    # transformers 5 names it activation checkpointing (the old name is deprecated)
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    model.train()
    gen = torch.Generator().manual_seed(2)
    batches = []
    for b in (2, 1):
        ids = torch.randint(1, 16, (b, 4), generator=gen)
        mask = torch.ones(b, 4, dtype=torch.long)
        mask[0, 3] = 0
        batches.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    assert_matches_reference(
        model, batches, ("exact", "batched"), ref_model=reference, shift_labels=True
    )
    on = getattr(model, "is_activation_checkpointing", None)
    assert (on if on is not None else model.is_gradient_checkpointing) and model.training


# ------------------------------------------------------------------ sequences, bags, layouts


class _Indexed(nn.Module):
    """The reference's view of inputs that are not rows of a tensor: ``forward(i)`` runs the model
    on input ``i`` alone."""

    def __init__(self, model: nn.Module, inputs: list[Any]) -> None:
        super().__init__()
        self.m, self.inputs = model, inputs

    def forward(self, i: Tensor) -> Tensor:
        return self.m(self.inputs[int(i[0])])


def _indexed_reference(
    model: nn.Module, inputs: list[Any], labels: Tensor
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Exact and empirical diagonals of ``model`` on single inputs (names without the wrapper)."""
    batches = [(torch.tensor([i]), labels[i : i + 1]) for i in range(len(inputs))]
    ref = dense_reference(_Indexed(model, inputs), batches)
    strip: Callable[[dict[str, Tensor]], dict[str, Tensor]] = lambda d: {  # noqa: E731
        k.removeprefix("m."): v for k, v in d.items()
    }
    return strip(ref.exact()), strip(ref.empirical())


class _PackedRNN(nn.Module):
    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = kind(4, 3, batch_first=True)
        self.out = nn.Linear(3, 3)

    def forward(self, packed: PackedSequence) -> Tensor:
        _, h = self.rnn(packed)
        return self.out((h[0] if isinstance(h, tuple) else h)[-1])


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_packed_sequence_batches(kind: type[nn.Module]) -> None:
    model = _double(_PackedRNN(kind))
    gen = torch.Generator().manual_seed(4)
    batches, singles, labels = [], [], []
    for b, lengths in ((3, (2, 4, 1)), (2, (3, 3))):
        seqs = [torch.randn(n, 4, generator=gen, dtype=torch.float64) for n in lengths]
        y = torch.randint(0, 3, (b,), generator=gen)
        batches.append((pack_sequence(seqs, enforce_sorted=False), y))
        singles += [pack_sequence([s]) for s in seqs]
        labels.append(y)
    exact, empirical = _indexed_reference(model, singles, torch.cat(labels))
    batched = _batched_by_hand(model, batches)
    _check_methods(model, batches, {"exact": exact, "empirical": empirical, "batched": batched}, 5)
    # EXACT(n) over a list of batches cuts the last one at a whole sequence
    fd = _estimate(model, batches, "exact", max_samples=4)
    want, _ = _indexed_reference(model, singles[:4], torch.cat(labels)[:4])
    assert fd.n_samples == 4
    assert max_relative_error(dict(fd.items()), want)[0] <= RTOL


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 4, mode="mean")
        self.out = nn.Linear(4, 3)

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        ids, offsets = inputs
        return self.out(torch.tanh(self.bag(ids, offsets)))


def test_embedding_bag_with_offsets() -> None:
    model = _double(_Bag())
    gen = torch.Generator().manual_seed(6)
    batches, singles, labels = [], [], []
    for lengths in ((2, 3, 1), (3, 2)):
        ids = torch.randint(0, 9, (sum(lengths),), generator=gen)
        offsets = torch.tensor((0, *lengths[:-1])).cumsum(0)
        y = torch.randint(0, 3, (len(lengths),), generator=gen)
        batches.append(((ids, offsets), y))
        singles += [(part, torch.tensor([0])) for part in ids.split(list(lengths))]
        labels.append(y)
    exact, empirical = _indexed_reference(model, singles, torch.cat(labels))
    batched = _batched_by_hand(model, batches)
    _check_methods(model, batches, {"exact": exact, "empirical": empirical, "batched": batched}, 5)
    # the first n inputs of flat ids with offsets are not ids[:n]: refused, not cut wrongly
    with pytest.raises(
        lf.FisherInputError, match=r"batch of 3.*shape \(6,\).*no dimension of size 3"
    ):
        _estimate(model, batches[::-1], "exact", max_samples=4)


class _SparseEmbedding(nn.Module):
    def __init__(self, bag: bool) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(9, 4, sparse=True) if bag else nn.Embedding(9, 4, sparse=True)
        self.out, self.bag = nn.Linear(4, 3), bag

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids) if self.bag else self.emb(ids).mean(1)
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("bag", [False, True])
def test_sparse_embedding_gradients(bag: bool) -> None:
    """``sparse=True`` tables (recommenders): dense gradients during the pass, sparse after."""
    model = _double(_SparseEmbedding(bag))
    gen = torch.Generator().manual_seed(7)
    batches = [
        (torch.randint(0, 9, (b, 3), generator=gen), torch.randint(0, 3, (b,), generator=gen))
        for b in (3, 2)
    ]
    assert_matches_reference(model, batches)
    assert model.emb.sparse


class _SeqFirstLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.lstm(x)[0].mean(0))


def test_sequence_first_batches_count_and_cut_inputs_not_steps() -> None:
    """x of shape (T, B, D), the default layout of nn.LSTM: the labels say which dimension is the
    batch, so EXACT(n) takes n sequences (not n time steps)."""
    model = _double(_SeqFirstLSTM())
    gen = torch.Generator().manual_seed(8)
    batches = [
        (
            torch.randn(5, b, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (b,), generator=gen),
        )
        for b in (3, 2)
    ]
    assert_matches_reference(model, batches, batch_dim=1)
    first4 = [batches[0], (batches[1][0][:, :1], batches[1][1][:1])]
    assert_matches_reference(
        model, batches, ("exact",), ref_batches=first4, batch_dim=1, max_samples=4
    )


def test_channels_last_convolutions() -> None:
    model = (
        _double(
            nn.Sequential(
                nn.Conv2d(2, 3, 3, padding=1),
                nn.BatchNorm2d(3),
                nn.ReLU(),
                nn.Conv2d(3, 3, 2, stride=2),
                nn.Flatten(),
                nn.Linear(12, 3),
            )
        )
        .eval()
        .to(memory_format=torch.channels_last)
    )
    batches = [(x.to(memory_format=torch.channels_last), y) for x, y in _rows((2, 4, 4))]
    assert_matches_reference(model, batches)


class _Attention(nn.Module):
    """Token ids and a padding mask in a keyword batch; either nn.MultiheadAttention (weights not
    returned) or a TransformerEncoder that may take its nested-tensor fast path."""

    def __init__(self, kind: str, tokens: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.kind, self.tokens = kind, tokens
        if kind == "mha":
            self.body: nn.Module = nn.MultiheadAttention(4, 2, batch_first=True)
        else:
            layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.1, batch_first=True)
            self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.out = nn.Linear(4, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h, pad = self.emb(input_ids), attention_mask == 0
        if self.kind == "mha":
            h = self.body(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        else:
            h = self.body(h, src_key_padding_mask=pad)
        if self.tokens:
            return self.out(h)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.out((h * m).sum(1) / m.sum(1))


def _masked_batches(tokens: bool) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(9)
    out = []
    for b in (3, 2):
        ids = torch.randint(0, 9, (b, 4), generator=gen)
        mask = torch.ones(b, 4, dtype=torch.long)
        mask[0, 2:] = 0
        y = torch.randint(0, 3, (b, 4) if tokens else (b,), generator=gen)
        if tokens:
            y[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": y})
    return out


@pytest.mark.parametrize(
    ("kind", "tokens", "frozen"),
    [
        ("mha", False, False),
        ("encoder", False, False),
        ("encoder", True, False),
        ("encoder", True, True),
    ],
)
def test_attention_with_padding_masks(
    kind: str, tokens: bool, frozen: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen encoder takes the nested-tensor fast path even with autograd on (none of its
    tensors requires grad): padded positions come out as zeros, and only the head is estimated."""
    model = _double(_Attention(kind, tokens)).train()
    if frozen:
        model.emb.requires_grad_(False)
        model.body.requires_grad_(False)
    fast_path = []
    layer_fwd = torch._transformer_encoder_layer_fwd

    def spy(*args: Any, **kwargs: Any) -> Any:
        fast_path.append(True)
        return layer_fwd(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nested tensors: a fast-path advice
        assert_matches_reference(model, _masked_batches(tokens) * 2)
        fast_path.clear()
        _estimate(model, _masked_batches(tokens) * 2, "exact")
    assert bool(fast_path) == frozen  # taken by the pass itself


class _CausalSDPA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.qkv, self.out = nn.Embedding(9, 4), nn.Linear(4, 12), nn.Linear(4, 9)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        B, T, _ = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, 2, 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h + a.transpose(1, 2).reshape(B, T, 4))


@pytest.mark.parametrize("causal", [False, True])
def test_scaled_dot_product_attention_is_causal(causal: bool) -> None:
    batches = [(ids, torch.roll(ids, -1, 1)) for ids, _ in _token_batches(9)]
    assert_matches_reference(
        _double(_CausalSDPA()), batches, ("exact", "empirical", "sample"), causal=causal
    )


# ------------------------------------------------------------------ outputs


class _Returns(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.lin = kind, nn.Linear(4, 3)

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Any:
        z = self.lin(x) * (1.0 if scale is None else scale)
        if self.kind == "dict":
            return {"logits": z, "hidden": x}
        if self.kind == "tuple":
            return z, x
        if self.kind == "model_output":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=z)
        return z


@pytest.mark.parametrize("kind", ["dict", "tuple", "model_output", "keywords"])
def test_structured_outputs_and_keyword_batches(kind: str) -> None:
    if kind == "model_output":
        pytest.importorskip("transformers")
    model = _double(_Returns(kind))
    batches: list[Any] = _rows((4,))
    if kind == "keywords":
        batches = [{"x": x, "scale": 2.0, "labels": y} for x, y in batches]
    reference = _double(_Returns("tensor"))
    reference.load_state_dict(model.state_dict())
    ref_batches = batches if kind == "keywords" else None
    assert_matches_reference(model, batches, ref_model=reference, ref_batches=ref_batches)


class _LossFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.lin(x)
        return z.pow(2).mean(), z


def test_a_tuple_whose_first_item_is_not_the_logits_is_refused_naming_output_fn() -> None:
    with pytest.raises(lf.FisherInputError, match=r"first item.*shape \(\).*output_fn"):
        _estimate(_double(_LossFirst()), _rows((4,)), "exact")


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.a(x1) + self.b(x2)


def test_a_model_of_several_arguments_fed_tuple_batches_is_told_how() -> None:
    model = _double(_TwoInputs())
    gen = torch.Generator().manual_seed(14)
    x1 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    x2 = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=gen)
    with pytest.raises(lf.FisherInputError, match=r"takes 2 positional arguments.*output_fn"):
        _estimate(model, [(x1, x2, y)], "exact")
    with pytest.raises(lf.FisherInputError, match=r"takes 2 positional arguments.*m\(\*b\[0\]\)"):
        _estimate(model, [((x1, x2), y)], "exact")
    fd = _estimate(model, [((x1, x2), y)], "empirical", output_fn=lambda m, b: m(*b[0]))
    ours = _estimate(model, [{"x1": x1, "x2": x2, "labels": y}], "empirical")
    assert all(torch.equal(fd[k], ours[k]) for k in fd)


class _Segmenter(nn.Module):
    """Per-pixel classes laid out as PyTorch's losses take them: logits (B, C, *S)."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.a, self.b = conv(2, 4, 3, padding=1), conv(4, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def _classes_last(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose logits have the classes moved last (the reference's layout)."""
    ref = copy.deepcopy(model)
    forward = type(model).forward
    ref.forward = lambda x: forward(ref, x).movedim(1, -1)  # type: ignore[method-assign]
    return ref


@pytest.mark.parametrize("dims", [1, 2])
def test_per_pixel_logits_with_classes_on_dimension_1(dims: int) -> None:
    """Logits (B, C, H, W) with labels (B, H, W): every labelled pixel is one C-class input."""
    model = _double(_Segmenter(dims))
    spatial = (4, 5) if dims == 2 else (6,)
    gen = torch.Generator().manual_seed(10)
    batches = []
    for b in (2, 1):
        y = torch.randint(0, 3, (b, *spatial), generator=gen)
        y[0, 1] = -100
        batches.append((torch.randn(b, 2, *spatial, generator=gen, dtype=torch.float64), y))
    assert_matches_reference(
        model,
        batches,
        ("exact", "empirical", "batched", "sample"),
        ref_model=_classes_last(model),
    )


def test_per_pixel_logits_without_labels_are_refused() -> None:
    model = _double(_Segmenter(2))
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    with pytest.raises(lf.FisherInputError, match=r"\(2, 3, 4, 5\).*movedim\(1, -1\)"):
        _estimate(model, [x], "exact")
    # with output_fn the caller states the layout: classes last
    fd = _estimate(model, [x], "exact", output_fn=lambda m, b: m(b).movedim(1, -1))
    assert fd.n_samples == 2 * 4 * 5


# ------------------------------------------------------------------ batches


def test_named_tuple_batches() -> None:
    Batch = namedtuple("Batch", ["x", "y"])
    batches = _rows((4,))
    model = _double(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    named = [Batch(x, y) for x, y in batches]
    assert_matches_reference(model, named, ref_batches=batches)
    # a causal LM's batches are cut to prefixes (causal=True) and keep their type
    lm = _double(TiedLM())
    tokens = _token_batches()
    assert_matches_reference(
        lm, [Batch(*b) for b in tokens], ("exact",), ref_batches=tokens, causal=True
    )
    # EXACT(n) cuts the last batch and keeps its type
    assert_matches_reference(
        model,
        named,
        ("exact",),
        ref_batches=[batches[0], Batch(*(t[:1] for t in batches[1]))],
        max_samples=4,
    )


# ------------------------------------------------------------------ 16-bit models


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_models_match_the_float64_reference(dtype: torch.dtype, rtol: float) -> None:
    """The float64 reference of the same (rounded) weights; the gap is the 16-bit forward's
    rounding (2^-11, 2^-8 per operation), the sums are float32."""
    model = _double(
        nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5))
    ).to(dtype)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(16, 6, generator=gen).to(dtype)
    batches = [(x, torch.randint(0, 5, (16,), generator=gen))]
    ref = dense_reference(copy.deepcopy(model).double(), [(x.double(), y) for x, y in batches])
    for method in ("exact", "empirical", "batched"):
        fd = _estimate(model, batches, method)
        assert all(v.dtype == torch.float32 for v in fd.values())
        err, where = max_relative_error(dict(fd.items()), getattr(ref, method)())
        assert err <= rtol, f"{dtype} {method}: relative error {err:.2e} on {where}"


class _Autocast(nn.Module):
    """A float32 model whose forward runs its layers under bfloat16 autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor, autocast: bool = True) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = self.b(torch.tanh(self.a(x)))
        return z.float() if autocast else z


def test_autocast_inside_the_forward_is_checked_at_its_own_precision() -> None:
    """The per-input check allows the rounding of the lowest precision the layers ran in (it
    refused bfloat16 layers at float32's tolerance); the float64 reference runs without
    autocast."""
    model = _double(_Autocast())
    reference = copy.deepcopy(model)
    reference.forward = functools.partial(_Autocast.forward, reference, autocast=False)  # type: ignore[method-assign]
    model.float()
    gen = torch.Generator().manual_seed(13)
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    ref = dense_reference(reference, [(x.double(), y)])
    for method in ("exact", "empirical", "batched"):
        fd = _estimate(model, [(x, y)], method)
        err, where = max_relative_error(dict(fd.items()), getattr(ref, method)())
        assert err <= 3e-2, f"{method}: relative error {err:.2e} on {where}"
