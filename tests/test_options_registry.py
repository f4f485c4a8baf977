"""FisherOptions is checked when built and carries every option; the registry is the one list of
methods (validation, docs table, CLI help); the old names of the bound estimates still work."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_case

import lightning_fisher as lf
from lightning_fisher.estimators import registry
from lightning_fisher.options import EXACT_MAX_CLASSES, MAX_MEMORY_MIB

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mc_samples": 0}, "mc_samples"),
        ({"probes": 0}, "probes"),
        ({"probes": 1.5}, "probes"),
        ({"rank": 0}, "rank"),
        ({"rank": True}, "rank"),
        ({"probe_distribution": "normal"}, "probe_distribution"),
        ({"eigen_method": "qr"}, "eigen_method"),
        ({"max_memory_mib": 0}, "max_memory_mib"),
        ({"max_memory_mib": -5.0}, "max_memory_mib"),
        ({"max_samples": 0}, "max_samples"),
        ({"max_batches": 0}, "max_batches"),
        ({"seed": "1"}, "seed"),
        ({"output_fn": 3}, "output_fn"),
        ({"classes": []}, "classes"),
        ({"classes": [-1]}, "classes"),
        ({"exact_max_classes": 0}, "exact_max_classes"),
        ({"verify": "yes"}, "verify"),
    ],
)
def test_bad_values_are_refused_at_construction_naming_the_option(
    kwargs: dict[str, Any], name: str
) -> None:
    with pytest.raises(lf.FisherInputError, match=name):
        lf.FisherOptions(**kwargs)
    opts = lf.FisherOptions()
    with pytest.raises(lf.FisherInputError, match=name):  # setting an attribute is checked too
        setattr(opts, name, next(iter(kwargs.values())))


def test_unknown_names_are_refused() -> None:
    with pytest.raises(TypeError):
        lf.FisherOptions(probs=2)  # type: ignore[call-arg]
    with pytest.raises(lf.FisherInputError, match=r"unknown Fisher estimator option.*'probs'"):
        lf.FisherOptions.build(probs=2)
    with pytest.raises(lf.FisherInputError, match="probs"):
        lf.FisherOptions().probs = 2  # type: ignore[attr-defined]
    case = make_case("mlp")
    with pytest.raises(lf.FisherInputError, match="probs"):
        lf.estimate_fisher(case.model, case.loader, "hutchinson", probs=2)


def test_defaults_are_stated_once() -> None:
    opts = lf.FisherOptions()
    assert opts.max_memory_mib == MAX_MEMORY_MIB and opts.exact_max_classes == EXACT_MAX_CLASSES
    root = Path(lf.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "options.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"max_memory_mib: float = \d", text), path
        assert "EXACT_MAX_CLASSES = " not in text, path


def test_options_object_and_keyword_overrides_give_the_same_estimate() -> None:
    case = make_case("mlp")
    opts = lf.FisherOptions(probes=3, seed=7)
    by_object = lf.estimate_fisher(case.model, case.loader, "hutchinson", options=opts)
    by_keywords = lf.estimate_fisher(case.model, case.loader, "hutchinson", probes=3, seed=7)
    torch.testing.assert_close(by_object.flatten(), by_keywords.flatten(), rtol=0, atol=0)
    overridden = lf.estimate_fisher(case.model, case.loader, "hutchinson", options=opts, seed=8)
    other_seed = lf.estimate_fisher(case.model, case.loader, "hutchinson", probes=3, seed=8)
    torch.testing.assert_close(overridden.flatten(), other_seed.flatten(), rtol=0, atol=0)
    assert not torch.equal(overridden.flatten(), by_object.flatten())
    assert opts.seed == 7  # the caller's object is not changed by an override


def test_callbacks_and_diagnostics_take_the_options_object() -> None:
    from lightning_fisher.diagnostics import compute_diagnostics

    opts = lf.FisherOptions(probes=2, max_batches=1, seed=3)
    ewc = lf.EWC(lam=1.0, method="hutchinson", fisher_options=opts, mc_samples=4)
    assert ewc.fisher_options.probes == 2 and ewc.fisher_options.mc_samples == 4
    assert ewc.fisher_options.seed == 3 and opts.mc_samples == 1
    mon = lf.FisherMonitor(fisher_options=opts, fisher_kwargs={"seed": 5})
    assert mon.fisher_options.seed == 5 and mon.fisher_options.max_batches == 1
    with pytest.raises(lf.FisherInputError, match="FisherDiagnostics: fisher_options"):
        lf.FisherDiagnostics(fisher_options={"seed": 1})  # type: ignore[arg-type]

    case = make_case("mlp")
    # A param_filter from the options reaches every estimator of the diagnostics.
    keep = lf.FisherOptions(param_filter=lambda name: name.startswith("0."))
    res = compute_diagnostics(case.model, case.loader, ("hutchinson", "empirical"), options=keep)
    for fd in res.fishers.values():
        assert set(fd) == {n for n, _ in case.model.named_parameters() if n.startswith("0.")}


def test_unknown_method_error_lists_the_registry() -> None:
    case = make_case("mlp")
    with pytest.raises(lf.FisherInputError) as info:
        lf.estimate_fisher(case.model, case.loader, method="diag")
    for name in lf.REGISTRY:
        assert name in str(info.value)


def test_registry_entries_are_complete() -> None:
    assert tuple(lf.REGISTRY) == lf.METHODS
    for name, info in lf.REGISTRY.items():
        assert info.name == name and info.cls.name == name
        assert info.cost and info.description
    assert not lf.REGISTRY["squisher"].data_pass
    assert lf.REGISTRY["empirical"].needs_labels and not lf.REGISTRY["exact"].needs_labels
    assert lf.REGISTRY["exact"].deterministic and not lf.REGISTRY["hutchinson"].deterministic


def test_docs_table_is_the_registry() -> None:
    text = (DOCS / "estimators.md").read_text(encoding="utf-8")
    table = text.split("<!-- registry-table:start -->\n", 1)[1].split(
        "\n<!-- registry-table:end -->", 1
    )[0]
    assert table == registry.markdown_table()


def test_cli_help_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_fisher.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for info in lf.REGISTRY.values():
        assert info.name in out and info.cost in out


def test_squisher_is_a_registered_estimator_with_its_optimizer_from_context() -> None:
    case = make_case("mlp", dtype=torch.float32)
    opt = torch.optim.Adam(case.model.parameters(), lr=1e-3)
    for x, y in case.loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(case.model(x), y).backward()
        opt.step()
    via_registry = lf.estimate_fisher(case.model, None, "squisher", optimizer=opt, batch_size=4)
    direct = lf.fisher_from_optimizer(opt, case.model, 4)
    torch.testing.assert_close(via_registry.flatten(), direct.flatten(), rtol=0, atol=0)
    assert via_registry.method == "squisher"
    with pytest.raises(lf.FisherInputError, match="optimizer="):
        lf.estimate_fisher(case.model, None, "squisher", batch_size=4)
    with pytest.raises(lf.FisherInputError, match="reads no data"):
        lf.estimate_fishers(case.model, case.loader, ["squisher"])


@pytest.mark.parametrize(("old", "new"), sorted(registry.ALIASES.items()))
def test_old_names_of_the_bounds_warn_once_and_give_the_same_result(
    old: str, new: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "_warned", set())
    case = make_case("mlp")
    with pytest.warns(FutureWarning, match=f"{old}.*{new}"):
        by_old = lf.estimate_fisher(case.model, case.loader, old, probes=2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        again = lf.estimate_fisher(case.model, case.loader, old, probes=2, seed=1)
        by_new = lf.estimate_fisher(case.model, case.loader, new, probes=2, seed=1)
    torch.testing.assert_close(by_old.flatten(), by_new.flatten(), rtol=0, atol=0)
    torch.testing.assert_close(again.flatten(), by_new.flatten(), rtol=0, atol=0)
    assert by_old.method == new


def test_method_options_name_the_methods_that_read_them() -> None:
    """The options that warn when the chosen method ignores them are read by exactly the
    methods listed: the estimators record the options they read (``option_names``)."""
    from lightning_fisher.estimators import ESTIMATORS
    from lightning_fisher.estimators.exact import ColumnPerClassEstimator
    from lightning_fisher.options import METHOD_OPTIONS

    for option, readers in METHOD_OPTIONS.items():
        assert option in lf.FisherOptions.names()
        if option == "exact_max_classes":  # the refusal above C classes of the C-column methods
            reading = {n for n, c in ESTIMATORS.items() if issubclass(c, ColumnPerClassEstimator)}
        else:
            reading = {n for n, c in ESTIMATORS.items() if option in c.option_names}
        assert set(readers) == reading, option


def test_bad_values_suggest_the_closest_name() -> None:
    with pytest.raises(lf.FisherInputError, match="Did you mean 'rademacher'"):
        lf.FisherOptions(probe_distribution="rademaker")
    with pytest.raises(lf.FisherInputError, match="Did you mean 'max_batches'"):
        lf.FisherOptions.build(max_batch=2)
    with pytest.raises(lf.FisherInputError, match="Did you mean 'hutchinson_lower'"):
        lf.estimate_fisher(make_case("mlp").model, [], "hutchinson_lowr")
