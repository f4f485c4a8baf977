"""The per-input engine's closed forms (norm layers, sequence Linear, Conv1d, Embedding with
padding) and its chunking equal the brute-force dense Fisher of tests/reference.py."""

from __future__ import annotations

import pytest
import torch
from reference import dense_fisher, per_input_jacobians, per_label_grads
from test_estimators import assert_matches
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher.estimators.base import trainable_parameters
from lightning_fisher.estimators.per_input import PerInputEngine


class NormNet(nn.Module):
    """Conv2d -> BatchNorm2d -> GroupNorm -> Conv1d -> LayerNorm over (channels, length) -> head.

    Not an nn.Sequential: the forward reuses tensors and flattens by hand.
    """

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.conv1d = nn.Conv1d(4, 3, 2, stride=2, padding=1, dilation=1)
        self.ln = nn.LayerNorm([3, 9])
        self.bn1 = nn.BatchNorm1d(5)
        self.fc = nn.Linear(27, 5)
        self.head = nn.Linear(5, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.gn(self.bn(self.conv(x))))  # (B, 4, 4, 4)
        h = self.conv1d(h.flatten(2))  # (B, 3, 9)
        h = torch.tanh(self.ln(h)).flatten(1)
        return self.head(torch.tanh(self.bn1(self.fc(h))))


class SeqNet(nn.Module):
    """Embedding with padding_idx, Linear and LayerNorm on (B, T, D), mean pooling."""

    def __init__(self, vocab: int = 9, dim: int = 4, n_classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.lin = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.ln(torch.tanh(self.lin(self.emb(ids))))
        return self.head(h.mean(1))


def _seed(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


def _check(model: nn.Module, x: Tensor, y: Tensor, batch: int, **kw: object) -> None:
    js, zs, ys = per_input_jacobians(model, lambda f, r: f(r["x"]), [{"x": x, "y": y}])
    loader = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]
    fd = lf.estimate_fisher(model, loader, method="exact", **kw)
    assert_matches(fd, model, dense_fisher(js, zs).diagonal())
    emp = lf.estimate_fisher(model, loader, method="empirical", **kw)
    assert_matches(emp, model, per_label_grads(js, zs, ys).pow(2).mean(0))  # type: ignore[arg-type]


def _rules(model: nn.Module, x: Tensor) -> dict[str, str]:
    engine = PerInputEngine(model, trainable_parameters(model))
    engine.plan(lambda: model(x))
    assert engine.handlers is not None
    return {h.path: h.rule for h in engine.handlers}


@pytest.mark.parametrize("n_classes", [3, 12])
def test_norm_layers_conv1d_and_a_custom_forward(n_classes: int) -> None:
    """12 classes: 11 columns > 9 output positions of the Conv1d, so it takes the Gram route."""
    model = _seed(NormNet(n_classes))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, n_classes, (7,), generator=gen)
    rules = _rules(model, x)
    assert rules == {
        "conv": "conv",
        "bn": "norm",
        "gn": "norm",
        "conv1d": "conv",
        "ln": "norm",
        "bn1": "norm",
        "fc": "linear",
        "head": "linear",
    }
    _check(model, x, y, batch=3)


@pytest.mark.parametrize("n_classes", [3, 8])
def test_sequence_linear_layernorm_and_embedding_with_padding(n_classes: int) -> None:
    """8 classes: 7 columns > 5 positions, so the sequence Linear takes the Gram route."""
    model = _seed(SeqNet(n_classes=n_classes))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 9, (6, 5), generator=gen)
    ids[0, :2] = 0  # padding rows of the embedding get no gradient
    ids[3, 4] = 0
    y = torch.randint(0, n_classes, (6,), generator=gen)
    assert _rules(model, ids) == {
        "emb": "embedding",
        "lin": "linear",
        "ln": "norm",
        "head": "linear",
    }
    _check(model, ids, y, batch=4)


@pytest.mark.parametrize("name", ["norm", "seq"])
def test_chunking_under_a_tiny_memory_cap(name: str) -> None:
    gen = torch.Generator().manual_seed(2)
    if name == "norm":
        model = _seed(NormNet())
        x = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    else:
        model = _seed(SeqNet())
        x = torch.randint(0, 9, (5, 5), generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)
    _check(model, x, y, batch=5, max_memory_mib=1e-4)


def test_batchnorm_in_training_mode_is_not_a_closed_form() -> None:
    """Batch statistics couple the inputs: the closed form needs running statistics."""
    model = _seed(NormNet()).train()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    rules = _rules(model, x)
    assert rules["bn"] == "vjp" and rules["gn"] == "norm" and rules["ln"] == "norm"


def test_convolution_with_one_output_pixel_folds_the_columns() -> None:
    """A 4x4 kernel on a 4x4 input has L = 1 output pixel: the columns fold as for a Linear."""
    model = _seed(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 5, 4),
            nn.Flatten(),
            nn.Tanh(),
            nn.Linear(5, 4),
        )
    )
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    _check(model, x, y, batch=4)


def test_planning_falls_back_to_the_whole_batch() -> None:
    """Planning runs the model on one row; a model that cannot take one row is planned on all."""

    class NeedsPairs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x: Tensor) -> Tensor:
            if x.shape[0] < 2:
                raise ValueError("needs at least two rows")
            return self.fc(x)

    model, plain = _seed(NeedsPairs()), _seed(nn.Sequential(nn.Linear(3, 4)))  # same weights
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=gen)
    got = lf.estimate_fisher(model, [(x, y)], method="exact")
    want = lf.estimate_fisher(plain, [(x, y)], method="exact")
    torch.testing.assert_close(got.flatten(), want.flatten())


@pytest.mark.parametrize("C", [2, 3, 10])
def test_reduced_factor_has_c_minus_1_columns(C: int) -> None:
    from lightning_fisher.estimators.exact import reduced_fisher_sqrt
    from lightning_fisher.kernel import softmax_fisher

    logits = torch.randn(4, 3, C, generator=torch.Generator().manual_seed(C), dtype=torch.float64)
    one_hot = torch.eye(C, dtype=torch.float64)[torch.arange(3) % C]  # incl. the last class, C <= 3
    p = torch.cat([torch.softmax(3 * logits, -1), one_hot[None]])
    M = reduced_fisher_sqrt(p)
    assert M.shape == (*p.shape, C - 1)
    torch.testing.assert_close(M @ M.transpose(-1, -2), softmax_fisher(p), atol=1e-12, rtol=0)
