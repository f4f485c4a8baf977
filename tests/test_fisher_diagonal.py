"""FisherDiagonal: summaries, arithmetic for online EWC, and safetensors round trips."""

from __future__ import annotations

import pytest
import torch
from conftest import make_case

import lightning_fisher as lf


def test_traces_and_layer_grouping() -> None:
    fd = lf.FisherDiagonal(
        {"a.weight": torch.ones(2, 3), "a.bias": torch.full((2,), 2.0), "b": torch.tensor([0.5])},
        7,
        "exact",
    )
    assert fd.trace() == pytest.approx(6 + 4 + 0.5)
    assert fd.traces() == {"a.weight": 6.0, "a.bias": 4.0, "b": 0.5}
    assert fd.layer_traces() == {"a": 10.0, "b": 0.5}
    assert fd.numel() == 9 and len(fd) == 3 and fd.n_samples == 7


def test_online_ewc_arithmetic() -> None:
    old = lf.FisherDiagonal({"w": torch.tensor([1.0, 2.0])}, 10, "exact")
    new = lf.FisherDiagonal(
        {"w": torch.tensor([0.5, 0.5]), "head": torch.tensor([3.0])}, 5, "exact"
    )
    merged = old.scale(0.5) + new  # F <- gamma F + F_new
    assert torch.equal(merged["w"], torch.tensor([1.0, 1.5]))
    assert torch.equal(merged["head"], torch.tensor([3.0]))  # a new head counts as zero before
    assert merged.n_samples == 15 and merged.method == "exact"
    assert torch.equal((2 * old)["w"], torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match="shapes"):
        _ = old + lf.FisherDiagonal({"w": torch.ones(3)})


def test_save_load_round_trip_is_bitwise(tmp_path) -> None:  # type: ignore[no-untyped-def]
    case = make_case("cnn", dtype=torch.float32)
    fd = lf.estimate_fisher(case.model, case.loader, method="sample", mc_samples=2, seed=3)
    fd.save(tmp_path / "f.safetensors")
    back = lf.FisherDiagonal.load(tmp_path / "f.safetensors")
    assert list(back) == list(fd)
    assert all(torch.equal(back[k], fd[k]) for k in fd)
    assert (back.method, back.n_samples, back.options) == (fd.method, fd.n_samples, fd.options)
    back.check_matches(case.model)


def test_check_matches_names_the_mismatch() -> None:
    case = make_case("mlp")
    fd = lf.FisherDiagonal({"0.weight": torch.zeros(3, 3), "nope": torch.zeros(1)})
    with pytest.raises(
        ValueError, match=r"not parameters of the model: \['nope'\].*0\.weight \(3, 3\) vs \(8, 6\)"
    ):
        fd.check_matches(case.model)


def test_to_keeps_the_dtype_it_casts_to() -> None:
    fd = lf.FisherDiagonal({"w": torch.rand(3, 2)}, n_samples=4, method="exact")
    half = fd.to(torch.bfloat16)
    assert half["w"].dtype == torch.bfloat16 and torch.equal(half["w"], fd["w"].bfloat16())
    assert (half.n_samples, half.method) == (4, "exact")
    assert fd.to(dtype=torch.float64)["w"].dtype == torch.float64
