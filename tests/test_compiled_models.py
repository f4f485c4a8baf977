"""Models compiled by ``torch.compile`` (the whole model, or a submodule) give the Fisher of the
same function: the pass runs compiled code eagerly, where hooks, several backwards of one graph
and ``vmap`` over cotangents are allowed. Checked against the dense reference."""

from __future__ import annotations

import pytest
import torch
from reference import fisher_diagonal, per_input_jacobians, per_label_grads, unflatten
from torch import Tensor, nn

import lightning_fisher as lf

pytestmark = pytest.mark.skipif(
    not hasattr(torch.compiler, "set_stance"), reason="needs torch.compiler.set_stance"
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 4)).double()


class WithCompiledPart(nn.Module):
    """A model whose body is compiled and whose head is not."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.compile(mlp(), backend="aot_eager")
        self.head = nn.Linear(4, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("which", ["whole", "part"])
def test_compiled_models_match_the_dense_reference(which: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    eager = mlp() if which == "whole" else WithCompiledPart()
    n_classes = 4 if which == "whole" else 3
    y = torch.randint(0, n_classes, (12,), generator=gen)
    model = torch.compile(eager, backend="aot_eager") if which == "whole" else eager
    model.eval()
    js, zs, ys = per_input_jacobians(eager, lambda f, r: f(r["x"]), [{"x": x, "y": y}])
    prefix = "_orig_mod." if which == "whole" else ""
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    for method, flat in (
        ("exact", fisher_diagonal(js, zs)),
        ("empirical", per_label_grads(js, zs, ys).pow(2).mean(0)),  # type: ignore[arg-type]
    ):
        fd = lf.estimate_fisher(model, batches, method=method)
        want = {prefix + n: w for n, w in unflatten(eager, flat).items()}
        assert set(fd) == set(want) == {n for n, _ in model.named_parameters()}
        for name, w in want.items():
            err = (fd[name].double() - w).abs().max() / w.abs().max().clamp_min(1e-12)
            assert err < 1e-6, f"{method} {name}: {err:.1e}"
    # outside the pass the compiled code runs compiled again, to the same outputs
    torch.testing.assert_close(model(x), eager(x))
