"""Tiny float64 classifiers around every parameter-owning layer of ``torch.nn``, with their data.

Each entry wraps one layer (or one way of using it) in a small classifier with 3-6 classes and
gives two batches (3 and 2 inputs) in the layout its users feed it: sequence-first models get
``x`` of shape (T, B, ...) and say so with ``batch_dim=1``. Logits are (B, C), or (B, T, C) for
token-level entries whose labels mark ignored positions with -100.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

D, T, C = 4, 3, 3
SIZES = (3, 2)  # inputs per batch


class Fn(nn.Module):
    """Glue code between layers; ``modules`` are the layers that ``f`` calls itself."""

    def __init__(self, f: Callable[..., Any], **modules: nn.Module) -> None:
        super().__init__()
        self.f = f
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, *args: Any) -> Any:
        return self.f(*args)


def head(n_classes: int = C) -> nn.Module:
    """Flatten, then a linear classifier (in-features found on the first forward) returning
    log-probabilities: scaled so that p is far from uniform, never looking like probabilities."""
    return nn.Sequential(
        nn.Flatten(), nn.LazyLinear(n_classes), Fn(lambda z: torch.log_softmax(3 * z, -1))
    )


@dataclass
class Batches:
    """Data of one entry: batches, the input dim of ``x`` that indexes inputs, label shift."""

    batches: list[Any]
    batch_dim: int = 0
    shift_labels: bool = False


@dataclass
class Entry:
    name: str
    build: Callable[[torch.Generator], tuple[nn.Module, Batches]]
    tags: set[str] = field(default_factory=set)


ZOO: dict[str, Entry] = {}


def entry(name: str, *tags: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[[torch.Generator], tuple[nn.Module, Batches]]) -> Any:
        assert name not in ZOO, name
        ZOO[name] = Entry(name, fn, set(tags))
        return fn

    return register


def _x(shape: tuple[int, ...], b: int, batch_dim: int, gen: torch.Generator) -> Tensor:
    full = list(shape)
    full.insert(batch_dim, b)
    return torch.randn(full, generator=gen)


def floats(
    shape: tuple[int, ...],
    gen: torch.Generator,
    batch_dim: int = 0,
    n_classes: int = C,
    token_len: int | None = None,
) -> Batches:
    """Gaussian inputs with labels (B,), or (B, token_len) with some -100 for token logits."""
    out = []
    for b in SIZES:
        x = _x(shape, b, batch_dim, gen)
        if token_len is None:
            y = torch.randint(0, n_classes, (b,), generator=gen)
        else:
            y = torch.randint(0, n_classes, (b, token_len), generator=gen)
            y[0, 1] = -100
        out.append((x, y))
    return Batches(out, batch_dim)


def ints(vocab: int, gen: torch.Generator, n_classes: int = C, length: int = T) -> Batches:
    out = []
    for b in SIZES:
        ids = torch.randint(0, vocab, (b, length), generator=gen)
        ids[0, 0] = 0  # a padding index is used
        out.append((ids, torch.randint(0, n_classes, (b,), generator=gen)))
    return Batches(out)


# ---------------------------------------------------------------- linear layers


@entry("linear")
def _linear(gen: torch.Generator) -> Any:
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), head()), floats((D,), gen)


@entry("linear_on_sequence")
def _linear_seq(gen: torch.Generator) -> Any:
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), Fn(lambda h: h.mean(1)), head())
    return model, floats((T, D), gen)


@entry("lazy_linear")
def _lazy_linear(gen: torch.Generator) -> Any:
    return nn.Sequential(nn.LazyLinear(5), nn.Tanh(), head()), floats((D,), gen)


@entry("bilinear")
def _bilinear(gen: torch.Generator) -> Any:
    bil = nn.Bilinear(3, 4, 5)
    model = nn.Sequential(Fn(lambda x: bil(x[:, :3], x[:, 3:]), bil=bil), nn.Tanh(), head())
    return model, floats((7,), gen)


@entry("adaptive_log_softmax")
def _asm(gen: torch.Generator) -> Any:
    asm = nn.AdaptiveLogSoftmaxWithLoss(6, 6, cutoffs=[2, 4], div_value=2.0, head_bias=True)
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), Fn(asm.log_prob, asm=asm))
    return model, floats((D,), gen, n_classes=6)


# ---------------------------------------------------------------- convolutions


def _conv(layer: nn.Module, shape: tuple[int, ...]) -> Any:
    def build(gen: torch.Generator) -> Any:
        return nn.Sequential(layer, nn.Tanh(), head()), floats(shape, gen)

    return build


CONVS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (2, 6)),
    "conv1d_groups_stride_circular": (
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, groups=2, padding_mode="circular"),
        (4, 7),
    ),
    "conv1d_dilation_same": (lambda: nn.Conv1d(2, 3, 3, dilation=2, padding="same"), (2, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 4, 4)),
    "conv2d_groups_dilation_reflect": (
        lambda: nn.Conv2d(
            4, 4, 3, stride=2, padding=2, dilation=2, groups=4, padding_mode="reflect"
        ),
        (4, 5, 5),
    ),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 3, 3, 3)),
    "conv3d_groups_stride": (
        lambda: nn.Conv3d(2, 4, 2, stride=2, padding=1, groups=2),
        (2, 3, 3, 3),
    ),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(2, 3, 3), (2, 4)),
    "conv_transpose1d_groups_stride": (
        lambda: nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
        (4, 3),
    ),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(2, 3, 2), (2, 3, 3)),
    "conv_transpose2d_groups_dilation": (
        lambda: nn.ConvTranspose2d(
            2, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2
        ),
        (2, 3, 3),
    ),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(2, 2, 2), (2, 2, 2, 2)),
    "conv_transpose3d_groups_stride": (
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, padding=1, groups=2),
        (2, 2, 2, 2),
    ),
    "lazy_conv1d": (lambda: nn.LazyConv1d(3, 3), (2, 5)),
    "lazy_conv2d": (lambda: nn.LazyConv2d(3, 2), (2, 3, 3)),
    "lazy_conv3d": (lambda: nn.LazyConv3d(2, 2), (2, 3, 3, 3)),
    "lazy_conv_transpose1d": (lambda: nn.LazyConvTranspose1d(3, 2, stride=2), (2, 3)),
    "lazy_conv_transpose2d": (lambda: nn.LazyConvTranspose2d(2, 2), (2, 2, 2)),
    "lazy_conv_transpose3d": (lambda: nn.LazyConvTranspose3d(2, 2), (2, 2, 2, 2)),
}
for _name, (_make, _shape) in CONVS.items():
    entry(_name)(lambda gen, _make=_make, _shape=_shape: _conv(_make(), _shape)(gen))


# ---------------------------------------------------------------- embeddings


def _embed(layer: nn.Module, vocab: int = 7) -> Any:
    def build(gen: torch.Generator) -> Any:
        model = nn.Sequential(layer, Fn(lambda h: h.mean(1)), nn.Tanh(), head())
        return model, ints(vocab, gen)

    return build


entry("embedding")(lambda gen: _embed(nn.Embedding(7, D))(gen))
entry("embedding_padding_idx")(lambda gen: _embed(nn.Embedding(7, D, padding_idx=0))(gen))
# max_norm renormalises the looked-up rows in place during the forward (rows start at norm ~2)
entry("embedding_max_norm", "failure")(lambda gen: _embed(nn.Embedding(7, D, max_norm=1.0))(gen))


def _bag(**kw: Any) -> Any:
    def build(gen: torch.Generator) -> Any:
        return nn.Sequential(nn.EmbeddingBag(7, D, **kw), nn.Tanh(), head()), ints(7, gen)

    return build


for _mode in ("sum", "mean", "max"):
    entry(f"embedding_bag_{_mode}")(_bag(mode=_mode))
entry("embedding_bag_padding_idx")(_bag(mode="mean", padding_idx=0))


# ---------------------------------------------------------------- recurrent layers


def _rnn(
    kind: str,
    batch_first: bool,
    source: str,
    layers: int = 2,
    bidirectional: bool = True,
    **kw: Any,
) -> Any:
    def build(gen: torch.Generator) -> Any:
        rnn = getattr(nn, kind)(
            D, 3, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **kw
        )

        def glue(out: Any) -> Tensor:
            seq, h = out
            h = h[0] if kind == "LSTM" else h
            if source == "hn":
                return h.transpose(0, 1).flatten(1)  # (layers x dirs, B, H): batch on dim 1
            if source == "hn_last":
                return h[-1]
            return seq.mean(1 if batch_first else 0)

        model = nn.Sequential(rnn, Fn(glue), head())
        return model, floats((T, D), gen, batch_dim=0 if batch_first else 1)

    return build


for _kind in ("RNN", "GRU", "LSTM"):
    for _bf in (False, True):
        for _src in ("hn", "output"):
            _tag = "failure" if _kind != "RNN" else "rnn"
            entry(f"{_kind.lower()}_{'batch' if _bf else 'seq'}_first_{_src}", _tag)(
                _rnn(_kind, _bf, _src)
            )
entry("lstm_proj_size")(_rnn("LSTM", True, "hn", proj_size=2))
# as most people write it: one layer, one direction, the default layout, logits from h_n[-1]
for _kind in ("GRU", "LSTM"):
    entry(f"{_kind.lower()}_seq_first_hn_one_layer", "failure")(
        _rnn(_kind, False, "hn_last", layers=1, bidirectional=False)
    )


def _cell(kind: str) -> Any:
    def build(gen: torch.Generator) -> Any:
        cell = getattr(nn, kind)(D, 3)

        def run(x: Tensor) -> Tensor:
            state: Any = None
            for t in range(x.shape[1]):
                state = cell(x[:, t], state)
            return state[0] if kind == "LSTMCell" else state

        model = nn.Sequential(Fn(run, cell=cell), head())
        return model, floats((T, D), gen)

    return build


for _kind in ("RNNCell", "GRUCell", "LSTMCell"):
    entry(_kind.lower().replace("cell", "_cell"))(_cell(_kind))


def _with_lengths(batches: Batches) -> Batches:
    """Append a validity channel (1 on the first L_i steps) that the model turns into lengths."""
    out = []
    seq_dim = 1 - batches.batch_dim
    for x, y in batches.batches:
        b = x.shape[batches.batch_dim]
        lengths = torch.tensor([T, 1, 2][:b])
        valid = (torch.arange(T)[:, None] < lengths[None, :]).to(x.dtype)  # (T, B)
        if batches.batch_dim == 0:
            valid = valid.T
        x = torch.cat([x * valid.unsqueeze(-1), valid.unsqueeze(-1)], -1)
        assert x.shape[seq_dim] == T
        out.append((x, y))
    return Batches(out, batches.batch_dim)


@entry("gru_packed_batch_first", "failure")
def _gru_packed(gen: torch.Generator) -> Any:
    gru = nn.GRU(D, 3, num_layers=2, bidirectional=True, batch_first=True)

    def run(x: Tensor) -> Tensor:
        lengths = x[..., -1].sum(1).long()
        packed = pack_padded_sequence(x[..., :-1], lengths, batch_first=True, enforce_sorted=False)
        _, h = gru(packed)
        return h.transpose(0, 1).flatten(1)

    model = nn.Sequential(Fn(run, gru=gru), head())
    return model, _with_lengths(floats((T, D), gen))


@entry("lstm_packed_seq_first", "failure")
def _lstm_packed(gen: torch.Generator) -> Any:
    lstm = nn.LSTM(D, 3, num_layers=2)

    def run(x: Tensor) -> Tensor:
        lengths = x[..., -1].sum(0).long()
        packed = pack_padded_sequence(x[..., :-1], lengths, enforce_sorted=False)
        out, lens = pad_packed_sequence(lstm(packed)[0])  # (T', B, H), zero past each length
        return out.sum(0) / lens.to(out.dtype)[:, None]

    model = nn.Sequential(Fn(run, lstm=lstm), head())
    return model, _with_lengths(floats((T, D), gen, batch_dim=1))


@entry("gru_batch_first_tokens")
def _gru_tokens(gen: torch.Generator) -> Any:
    model = nn.Sequential(nn.GRU(D, 3, batch_first=True), Fn(lambda o: o[0]), nn.Linear(3, C))
    return model, floats((T, D), gen, token_len=T)


# ---------------------------------------------------------------- attention and transformers


class SelfAttention(nn.Module):
    def __init__(
        self, batch_first: bool, kdim: int | None = None, vdim: int | None = None, **kw: Any
    ):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, 2, batch_first=batch_first, kdim=kdim, vdim=vdim, **kw)
        self.k = nn.Linear(D, kdim) if kdim else None
        self.v = nn.Linear(D, vdim) if vdim else None

    def forward(self, x: Tensor) -> Tensor:
        k = self.k(x) if self.k is not None else x
        v = self.v(x) if self.v is not None else x
        return self.mha(x, k, v)[0]


def _seq_model(body: nn.Module, batch_first: bool, tokens: bool = False) -> Any:
    def build(gen: torch.Generator) -> Any:
        seq_dim = 1 if batch_first else 0
        if tokens:  # per-position logits, batch first
            glue = Fn(lambda h: h if batch_first else h.transpose(0, 1))
            model = nn.Sequential(body, glue, nn.Linear(D, C))
            return model, floats((T, D), gen, batch_dim=0 if batch_first else 1, token_len=T)
        model = nn.Sequential(body, Fn(lambda h: h.mean(seq_dim)), head())
        return model, floats((T, D), gen, batch_dim=0 if batch_first else 1)

    return build


for _bf in (False, True):
    _layout = "batch_first" if _bf else "seq_first"
    entry(f"mha_{_layout}", "failure")(
        lambda gen, _bf=_bf: _seq_model(SelfAttention(_bf), _bf)(gen)
    )
    entry(f"mha_kdim_vdim_{_layout}")(
        lambda gen, _bf=_bf: _seq_model(SelfAttention(_bf, kdim=3, vdim=5), _bf)(gen)
    )
    for _nf in (False, True):
        _name = f"{_layout}{'_norm_first' if _nf else ''}"
        kw = dict(
            d_model=D, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=_bf, norm_first=_nf
        )
        entry(f"transformer_encoder_layer_{_name}", "failure" if not _bf else "transformer")(
            lambda gen, _bf=_bf, kw=kw: _seq_model(nn.TransformerEncoderLayer(**kw), _bf)(gen)
        )

        def _decoder(gen: torch.Generator, _bf: bool = _bf, kw: dict = kw) -> Any:
            layer = nn.TransformerDecoderLayer(**kw)
            memory = nn.Linear(D, D)
            causal = nn.Transformer.generate_square_subsequent_mask(T)
            body = Fn(lambda x: layer(x, memory(x), tgt_mask=causal), layer=layer, memory=memory)
            return _seq_model(body, _bf)(gen)

        entry(f"transformer_decoder_layer_{_name}")(_decoder)
entry("mha_bias_kv_zero_attn_seq_first")(
    lambda gen: _seq_model(SelfAttention(False, add_bias_kv=True, add_zero_attn=True), False)(gen)
)
entry("mha_seq_first_tokens", "failure")(
    lambda gen: _seq_model(SelfAttention(False), False, tokens=True)(gen)
)
entry("transformer_encoder_layer_seq_first_tokens")(
    lambda gen: _seq_model(
        nn.TransformerEncoderLayer(D, 2, dim_feedforward=6, dropout=0.0), False, tokens=True
    )(gen)
)


@entry("transformer_seq_first")
def _transformer(gen: torch.Generator) -> Any:
    with warnings.catch_warnings():  # nested tensors only serve batch-first inference
        warnings.simplefilter("ignore", UserWarning)
        tr = nn.Transformer(
            D, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=6, dropout=0.0
        )
    return _seq_model(Fn(lambda x: tr(x, x), tr=tr), False)(gen)


# ---------------------------------------------------------------- normalisation layers


def _norm_after(pre: nn.Module, norm: nn.Module, shape: tuple[int, ...]) -> Any:
    def build(gen: torch.Generator) -> Any:
        return nn.Sequential(pre, norm, nn.Tanh(), head()), floats(shape, gen)

    return build


NORMS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple[int, ...]]] = {
    "layer_norm": (lambda: nn.Linear(D, D), lambda: nn.LayerNorm(D), (T, D)),
    "layer_norm_2d_no_bias": (
        lambda: nn.Linear(D, D),
        lambda: nn.LayerNorm([T, D], bias=False),
        (T, D),
    ),
    "rms_norm": (lambda: nn.Linear(D, D), lambda: nn.RMSNorm(D), (T, D)),
    "group_norm": (lambda: nn.Conv1d(2, 4, 2), lambda: nn.GroupNorm(2, 4), (2, 4)),
    "batch_norm1d_eval": (lambda: nn.Linear(D, 3), lambda: nn.BatchNorm1d(3), (D,)),
    "batch_norm1d_sequence_eval": (lambda: nn.Conv1d(2, 3, 2), lambda: nn.BatchNorm1d(3), (2, 4)),
    "batch_norm2d_eval": (lambda: nn.Conv2d(2, 3, 2), lambda: nn.BatchNorm2d(3), (2, 3, 3)),
    "batch_norm3d_eval": (lambda: nn.Conv3d(2, 2, 2), lambda: nn.BatchNorm3d(2), (2, 3, 3, 3)),
    "lazy_batch_norm1d_eval": (lambda: nn.Linear(D, 3), lambda: nn.LazyBatchNorm1d(), (D,)),
    "lazy_batch_norm2d_eval": (lambda: nn.Conv2d(2, 3, 2), lambda: nn.LazyBatchNorm2d(), (2, 3, 3)),
    "lazy_batch_norm3d_eval": (
        lambda: nn.Conv3d(2, 2, 2),
        lambda: nn.LazyBatchNorm3d(),
        (2, 3, 3, 3),
    ),
    "sync_batch_norm_eval": (lambda: nn.Conv1d(2, 3, 2), lambda: nn.SyncBatchNorm(3), (2, 4)),
    "instance_norm1d_affine": (
        lambda: nn.Conv1d(2, 3, 2),
        lambda: nn.InstanceNorm1d(3, affine=True),
        (2, 5),
    ),
    "instance_norm2d_affine": (
        lambda: nn.Conv2d(2, 3, 2),
        lambda: nn.InstanceNorm2d(3, affine=True),
        (2, 3, 3),
    ),
    "instance_norm3d_affine": (
        lambda: nn.Conv3d(2, 2, 2),
        lambda: nn.InstanceNorm3d(2, affine=True),
        (2, 3, 3, 3),
    ),
    "lazy_instance_norm1d_affine": (
        lambda: nn.Conv1d(2, 3, 2),
        lambda: nn.LazyInstanceNorm1d(affine=True),
        (2, 5),
    ),
    "lazy_instance_norm2d_affine": (
        lambda: nn.Conv2d(2, 3, 2),
        lambda: nn.LazyInstanceNorm2d(affine=True),
        (2, 3, 3),
    ),
    "lazy_instance_norm3d_affine": (
        lambda: nn.Conv3d(2, 2, 2),
        lambda: nn.LazyInstanceNorm3d(affine=True),
        (2, 3, 3, 3),
    ),
    "prelu_one_parameter": (lambda: nn.Conv1d(2, 3, 2), lambda: nn.PReLU(), (2, 4)),
    "prelu_per_channel": (lambda: nn.Conv1d(2, 3, 2), lambda: nn.PReLU(3), (2, 4)),
}
for _name, (_pre, _norm, _shape) in NORMS.items():
    _tags = ("failure",) if _name.startswith("prelu") else ()
    entry(_name, *_tags)(
        lambda gen, _pre=_pre, _norm=_norm, _shape=_shape: _norm_after(_pre(), _norm(), _shape)(gen)
    )


# ---------------------------------------------------------------- parametrizations


entry("weight_norm_linear")(
    lambda gen: (
        nn.Sequential(parametrizations.weight_norm(nn.Linear(D, 5)), nn.Tanh(), head()),
        floats((D,), gen),
    )
)
entry("weight_norm_conv1d")(
    lambda gen: (
        nn.Sequential(parametrizations.weight_norm(nn.Conv1d(2, 3, 2), dim=0), nn.Tanh(), head()),
        floats((2, 4), gen),
    )
)
entry("spectral_norm_linear")(
    lambda gen: (
        nn.Sequential(parametrizations.spectral_norm(nn.Linear(D, 5)), nn.Tanh(), head()),
        floats((D,), gen),
    )
)
entry("orthogonal_linear")(
    lambda gen: (
        nn.Sequential(parametrizations.orthogonal(nn.Linear(D, D)), nn.Tanh(), head()),
        floats((D,), gen),
    )
)


# ---------------------------------------------------------------- parameters used outside their module


class FunctionalUse(nn.Module):
    """``h @ self.enc.weight``: the encoder's weight is used again by code outside ``enc``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(D, 5)
        self.out = nn.Linear(5, C)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.enc(x))
        return self.out(h) + (h @ self.enc.weight)[:, :C]


class TiedOutputEmbedding(nn.Module):
    """A hand-tied output embedding: logits = h E^T with the input embedding E."""

    def __init__(self, vocab: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, D)
        self.mix = nn.Linear(D, D)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(ids).mean(1)))
        return h @ self.emb.weight.T


class _LegacyLinearFn(torch.autograd.Function):
    """A custom Function written the pre-2.0 way (forward takes ctx; no vmap rule)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return x @ w.T + b

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Any:  # type: ignore[override]
        x, w = ctx.saved_tensors
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        return g @ w, g2.T @ x2, g2.sum(0)


class LegacyLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return _LegacyLinearFn.apply(x, self.weight, self.bias)


entry("functional_weight_use", "failure")(lambda gen: (FunctionalUse(), floats((D,), gen)))
entry("tied_output_embedding", "failure")(
    lambda gen: (TiedOutputEmbedding(), ints(6, gen, n_classes=6))
)
entry("legacy_autograd_function", "failure")(
    lambda gen: (nn.Sequential(LegacyLinear(D, 5), nn.Tanh(), head()), floats((D,), gen))
)


# ---------------------------------------------------------------- tiny Hugging Face models

HF_VOCAB, HF_T = 32, 5


def _padded_ids(gen: torch.Generator, b: int) -> tuple[Tensor, Tensor]:
    ids = torch.randint(1, HF_VOCAB, (b, HF_T), generator=gen)
    lengths = torch.tensor([HF_T, 3, 4][:b])
    mask = (torch.arange(HF_T) < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@entry("hf_bert_sequence_classification", "hf", "slow")
def _bert(gen: torch.Generator) -> Any:
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=HF_VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation="eager",
    )
    model = transformers.BertForSequenceClassification(cfg)
    batches = []
    for b in SIZES:
        ids, mask = _padded_ids(gen, b)
        y = torch.randint(0, 3, (b,), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": y})
    return model, Batches(batches)


@entry("hf_gpt2_causal_lm_tokens", "hf", "slow")
def _gpt2(gen: torch.Generator) -> Any:
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=HF_VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(cfg)
    batches = []
    for b in SIZES:
        ids, mask = _padded_ids(gen, b)
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return model, Batches(batches, shift_labels=True)


# ---------------------------------------------------------------- building


@dataclass
class Built:
    name: str
    model: nn.Module
    data: Batches
    #: module classes the entry constructs (lazy ones before they materialise)
    classes: set[type]


def build(name: str) -> Built:
    """The entry's float64 model in eval mode (lazy modules materialised, weights perturbed
    off their initial values, running statistics random) and its batches."""
    e = ZOO[name]
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(zlib.crc32(name.encode()))
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
        model, data = e.build(gen)
        classes = {type(m) for m in model.modules()}
        model.eval()

        def run_all() -> None:
            from dense_reference import forward

            with torch.no_grad():
                for batch in data.batches:
                    forward(model, batch)

        run_all()  # materialises lazy modules
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
            for m in model.modules():
                if isinstance(getattr(m, "running_mean", None), Tensor):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        run_all()  # max_norm rows reach their fixed point before any Fisher is taken
    finally:
        torch.set_default_dtype(before)
    classes |= {type(m) for m in model.modules()}
    return Built(name, model, data, classes)


def entries(*, without: tuple[str, ...] = ()) -> list[str]:
    """Entry names, without those tagged with any of ``without``."""
    return [n for n, e in ZOO.items() if not (e.tags & set(without))]
