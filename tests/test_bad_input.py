"""Bad input gives a clear error (or the right result), never a silently wrong Fisher."""

from __future__ import annotations

import pytest
import torch
from conftest import make_case
from torch import nn

import lightning_fisher as lf


def loader_of(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_nan_or_inf_inputs(bad: float, method: str) -> None:
    case = make_case("mlp")
    x, y = next(iter(case.loader))
    x = x.clone()
    x[1, 0] = bad
    # NaN reaches the logits; +Inf is squashed by tanh into finite logits but NaN gradients.
    with pytest.raises(lf.FisherInputError, match="NaN/Inf"):
        lf.estimate_fisher(case.model, loader_of(x, y), method=method)


def test_nan_weights() -> None:
    case = make_case("cnn")
    with torch.no_grad():
        case.model.head.weight[0, 0] = float("nan")
    with pytest.raises(lf.FisherInputError, match="NaN/Inf logits"):
        lf.estimate_fisher(case.model, case.loader)


def test_empty_loader() -> None:
    case = make_case("mlp")
    with pytest.raises(lf.FisherInputError, match="no batches"):
        lf.estimate_fisher(case.model, [], method="exact")


def test_outputs_that_are_not_logits() -> None:
    case = make_case("mlp")
    probs = nn.Sequential(case.model, nn.Softmax(-1))
    with pytest.raises(lf.FisherInputError, match="probabilities"):
        lf.estimate_fisher(probs, case.loader)
    with pytest.raises(lf.FisherInputError, match="Could not find logits"):
        lf.estimate_fisher(case.model, case.loader, output_fn=lambda m, b: {"hidden": m(b[0])})
    with pytest.raises(lf.FisherInputError, match="floating point"):
        lf.estimate_fisher(
            case.model, case.loader, output_fn=lambda m, b: m(b[0]).argmax(-1, keepdim=True)
        )
    # A custom output_fn that does return logits works.
    ok = lf.estimate_fisher(case.model, case.loader, output_fn=lambda m, b: {"logits": m(b[0])})
    torch.testing.assert_close(ok.flatten(), lf.estimate_fisher(case.model, case.loader).flatten())


def test_model_without_trainable_parameters() -> None:
    case = make_case("mlp")
    case.model.requires_grad_(False)
    with pytest.raises(lf.FisherInputError, match="no trainable parameters"):
        lf.estimate_fisher(case.model, case.loader)


def test_unknown_method_lists_the_choices() -> None:
    case = make_case("mlp")
    with pytest.raises(ValueError, match="hutchinson_lower"):
        lf.estimate_fisher(case.model, case.loader, method="diag")


def test_empirical_without_labels() -> None:
    case = make_case("mlp")
    xs = [x for x, _ in case.loader]
    with pytest.raises(lf.FisherInputError, match="needs labels"):
        lf.estimate_fisher(case.model, xs, method="empirical")
    lf.estimate_fisher(case.model, xs, method="exact")  # exact needs no labels


def test_everything_masked() -> None:
    case = make_case("transformer_tokens")
    batches = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in case.loader]
    with pytest.raises(lf.FisherInputError, match="masked out"):
        lf.estimate_fisher(case.model, batches)


def test_exact_refuses_huge_class_counts() -> None:
    model = nn.Linear(3, 5000)
    with pytest.raises(lf.FisherInputError, match="hutchinson"):
        lf.estimate_fisher(model, [(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))])


def test_fp16_overflow_is_reported_not_returned() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)).half()
    with torch.no_grad():
        model[0].weight.fill_(200.0)
        model[1].weight.fill_(200.0)
    x = torch.full((2, 4), 2.0).half()
    with pytest.raises(lf.FisherInputError, match="NaN/Inf"):
        lf.estimate_fisher(model, [(x, torch.zeros(2, dtype=torch.long))], method="hutchinson")
