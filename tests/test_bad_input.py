"""Bad input gives a clear error (or the right result), never a silently wrong Fisher."""

from __future__ import annotations

import warnings
from typing import Any

import lit_helpers as H
import numpy as np
import pytest
import torch
from conftest import make_case
from torch import nn

import lightning_fisher as lf
from lightning_fisher import options
from lightning_fisher.diagnostics import compute_diagnostics
from lightning_fisher.regularizers import fisher_trace_penalty


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


# Wrong arguments: each refused where it is passed, with a FisherInputError naming the argument,
# the value found and what is expected.

_FD = {"net.0.weight": torch.rand(8, 5)}
_MASK = {"net.0.weight": torch.ones(8, 5, dtype=torch.bool)}


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: lf.EWC(lam=float("nan")), r"lam must be a finite number >= 0; got nan"),
        (lambda: lf.EWC(lam=1, gamma=-0.5), r"EWC: gamma must be a finite number >= 0; got -0.5"),
        (lambda: lf.EWC(lam=1, gamma=float("inf")), r"gamma must be a finite number >= 0; got inf"),
        (lambda: lf.EWC(lam=1, gamma="1"), r"gamma must be a finite number >= 0; got '1'"),
        (lambda: lf.EWC(lam="1e5"), r"lam must be .*got '1e5'"),
        (lambda: lf.EWC(lam=1, batch_size="8"), r"EWC: batch_size must be a positive integer"),
        (lambda: lf.EWC(lam=1, batch_size=2.5), r"batch_size .* got 2.5"),
        (lambda: lf.EWC(lam=1, task_attr=3), r"EWC: task_attr must be a non-empty string"),
        (lambda: lf.EWC(lam=1, cpu_kernel="yes"), r"EWC: cpu_kernel must be True or False"),
        (lambda: lf.EWC(lam=1, log_penalty=None), r"log_penalty must be True or False"),
        (lambda: lf.EWC(lam=1, fisher_kwargs=["seed"]), r"EWC: fisher_kwargs must be a mapping"),
        (lambda: lf.EWC(lam=1, fisher_kwargs={"prob": 2}), r"'prob'.*Did you mean 'probes'"),
        (lambda: lf.EWC(lam=1, method="emprical"), r"'emprical'.*Did you mean 'empirical'"),
        (lambda: lf.EWC(lam=1, dataloader=torch.zeros(3)), r"iterable of batches.*Tensor"),
        (lambda: lf.FisherTraceRegularizer(alpha="1e-3"), r"alpha must be .*got '1e-3'"),
        (lambda: lf.FisherTraceRegularizer(alpha=True), r"alpha must be .*got True"),
        (lambda: lf.FisherTraceRegularizer(alpha=1, seed=1.5), r"seed must be an integer"),
        (lambda: lf.FisherTraceRegularizer(alpha=1, classes=[-1]), r"classes must list"),
        (lambda: lf.FisherTraceRegularizer(alpha=1, output_fn=3), r"output_fn must be a callable"),
        (
            lambda: lf.FisherTraceRegularizer(alpha=1, probe_distribution="normall"),
            r"probe_distribution must be one of .*got 'normall'",
        ),
        (lambda: lf.FisherDiagnostics(every_n_epochs=True), r"every_n_epochs .*got True"),
        (lambda: lf.FisherDiagnostics(probes=True), r"probes must be a positive integer"),
        (lambda: lf.FisherDiagnostics(threshold="1e-5"), r"threshold must be .*got '1e-5'"),
        (lambda: lf.FisherDiagnostics(threshold=float("inf")), r"threshold .*got inf"),
        (lambda: lf.FisherDiagnostics(seed="0"), r"seed must be an integer; got '0'"),
        (lambda: lf.FisherDiagnostics(prefix=""), r"prefix must be a non-empty string"),
        (lambda: lf.FisherDiagnostics(prefix="fisher/"), r"prefix .*got 'fisher/'"),
        (lambda: lf.FisherDiagnostics(classes=[]), r"classes must list"),
        (lambda: lf.FisherDiagnostics(histograms="no"), r"histograms must be True or False"),
        (lambda: lf.FisherDiagnostics(dataloader="vall"), r"'vall'.*Did you mean 'val'"),
        (lambda: lf.FisherMonitor(every_n_epochs=2, every_n_steps=10), r"both set"),
        (lambda: lf.FisherMonitor(save_dir=3), r"save_dir must be the path of a folder"),
        (lambda: lf.FisherMonitor(save_dir=__file__), r"an existing file"),
        (lambda: lf.FisherMonitor(on_estimate=3), r"on_estimate must be a callable"),
        (lambda: lf.FisherMonitor(method="hutch"), r"Did you mean 'hutchinson'"),
        (lambda: lf.FishMask(fisher=_FD, keep="0.1"), r"keep must be a number in \[0, 1\]"),
        (lambda: lf.FishMask([1, 2]), r"mask must be a mapping"),
        (lambda: lf.FishMask(_MASK, keep=0.3), r"keep=0.3 are used only .* `fisher=`"),
        (lambda: lf.FishMask(_MASK, per_layer=True), r"per_layer=True are used only"),
        (lambda: lf.FishMask(fisher=_FD, keep=0.5, names="net.0.weight"), r"wrap it in a list"),
    ],
)
def test_bad_callback_arguments_are_refused_at_construction(make: Any, match: str) -> None:
    with pytest.raises(lf.FisherInputError, match=match):
        make()


def test_good_callback_arguments_are_accepted() -> None:
    """The checks refuse only what is wrong: numpy scalars, tensors of classes, gamma = 1."""
    lf.EWC(lam=np.float64(1e3), gamma=1, batch_size=np.int64(8), method="squisher")
    lf.ElasticWeightConsolidation(lam=1, gamma=0.5)
    lf.FisherTraceRegularizer(alpha=0, classes=torch.tensor([0, 1]), seed=np.int32(3))
    lf.FisherDiagnostics(every_n_epochs=None, every_n_steps=5, prefix="a/b", threshold=1e-8)
    lf.FisherMonitor(every_n_steps=4)  # every_n_epochs keeps its default
    lf.FishMask(fisher=_FD, keep=1, per_layer=True, names=["net.0.weight"])


def _stepped_adam(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters())
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    return opt


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda m, ld: lf.estimate_fisher("model", ld),
            r"model must be a torch.nn.Module; got str",
        ),
        (lambda m, ld: lf.estimate_fisher(m, 5), r"dataloader must be an iterable .*got int"),
        (lambda m, ld: lf.estimate_fisher(m, next(iter(ld))[0]), r"wrap the batch in a list"),
        (lambda m, ld: lf.estimate_fisher(m, ld, "exct"), r"Did you mean 'exact'"),
        (lambda m, ld: lf.estimate_fisher(m, ld, probs=2), r"Did you mean 'probes'"),
        (lambda m, ld: lf.estimate_fisher(m, ld, classes="01"), r"classes must be a sequence"),
        (lambda m, ld: lf.estimate_fisher(m, ld, max_memory_mib=float("inf")), r"got inf"),
        (
            lambda m, ld: lf.estimate_fisher(m, ld, param_filter=lambda n: False),
            r"param_filter excludes every one of the model's 6 trainable parameters \('0.weight'",
        ),
        (lambda m, ld: lf.estimate_fishers(m, ld, [{"metod": "exact"}]), r"a 'method' key"),
        (lambda m, ld: lf.estimate_fishers(m, ld, [3]), r"a 'method' key.*got 3"),
        (lambda m, ld: lf.fisher_from_optimizer(_stepped_adam(m), m, "8"), r"batch_size .*'8'"),
        (lambda m, ld: lf.fisher_from_optimizer(_stepped_adam(m), m, 0), r"batch_size .*got 0"),
        (lambda m, ld: lf.fisher_from_optimizer(m, m, 8), r"optimizer must be a torch.optim"),
        (lambda m, ld: compute_diagnostics(m, ld, probes=2.0), r"probes .*got 2.0"),
        (lambda m, ld: compute_diagnostics(m, ld, threshold=-1), r"threshold .*got -1"),
        (lambda m, ld: compute_diagnostics(m, ld, seed="0"), r"seed must be an integer"),
        (lambda m, ld: compute_diagnostics(m, ld, max_batches=1.5), r"max_batches .*got 1.5"),
        (lambda m, ld: compute_diagnostics(m, ld, n_classes=0), r"n_classes .*got 0"),
        (lambda m, ld: compute_diagnostics(m, 5), r"dataloader must be an iterable"),
        (lambda m, ld: compute_diagnostics(m, ld, ["hutchinsn"]), r"Did you mean 'hutchinson'"),
        (lambda m, ld: fisher_trace_penalty(m, next(iter(ld)), probes=1.5), r"probes .*got 1.5"),
        (
            lambda m, ld: fisher_trace_penalty(m, next(iter(ld)), probe_distribution="normal"),
            r"probe_distribution must be one of 'rademacher', 'gaussian'; got 'normal'",
        ),
        (lambda m, ld: fisher_trace_penalty("m", next(iter(ld))), r"model must be a torch"),
    ],
)
def test_bad_arguments_of_public_functions(call: Any, match: str) -> None:
    case = make_case("mlp")
    with pytest.raises(lf.FisherInputError, match=match):
        call(case.model, case.loader)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, ld: lf.estimate_fisher(m, ld, "exact", probes=3), r"probes=3 is ignored by"),
        (lambda m, ld: lf.estimate_fisher(m, ld, "hutchinson", rank=2), r"rank=2 is ignored"),
        (lambda m, ld: lf.estimate_fisher(m, ld, "exact", mc_samples=4), r"read only by sample"),
        (lambda m, ld: lf.estimate_fisher(m, ld, "exact", batch_size=8), r"ignores batch_size"),
        (
            lambda m, ld: lf.estimate_fisher(
                m, ld, "squisher", optimizer=_stepped_adam(m), batch_size=4
            ),
            r"no data; it ignores dataloader",
        ),
        (lambda m, ld: compute_diagnostics(m, ld, lanczos_iters=5), r"lanczos_iters=5 .*ignored"),
        (lambda m, ld: lf.EWC(lam=1, mode="separate", gamma=0.5), r"ignores gamma=0.5"),
        (lambda m, ld: lf.EWC(lam=1, gamma=1.5), r"gamma=1.5 is outside \(0, 1\].*grows"),
        (lambda m, ld: lf.ElasticWeightConsolidation(lam=1, gamma=0), r"gamma=0 .*forgets"),
        (lambda m, ld: lf.EWC(lam=1, bias_correction=False), r"ignores bias_correction=False"),
        (lambda m, ld: lf.EWC(lam=1, method="hutchinson", mc_samples=3), r"mc_samples=3 is"),
        (lambda m, ld: lf.EWC(lam=1, method="squisher", dataloader=ld), r"ignores dataloader"),
        (lambda m, ld: lf.EWC(lam=1, consolidate_on_fit_end=False, task_attr=None), r"never"),
        (lambda m, ld: lf.FisherMonitor(method="exact", probes=3), r"probes=3 is ignored"),
        (lambda m, ld: lf.FisherDiagnostics(slq_iters=10), r"slq_iters=10 .*spectral_density"),
    ],
)
def test_options_that_are_ignored_warn(
    call: Any, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(options, "_warned_ignored", set())
    case = make_case("mlp")
    with pytest.warns(UserWarning, match=match):
        call(case.model, case.loader)


def test_options_that_the_methods_read_do_not_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "_warned_ignored", set())
    case = make_case("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.estimate_fisher(case.model, case.loader, "hutchinson", probes=2)
        lf.estimate_fisher(case.model, case.loader, "lower", rank=2, eigen_method="eigh")
        lf.estimate_fishers(case.model, case.loader, ["exact", "sample"], mc_samples=2)
        lf.EWC(lam=1, method="sample", mc_samples=2, mode="separate")


def _fit(callbacks: list[Any], **kw: Any) -> Any:
    model = H.Classifier()
    trainer = H.trainer(callbacks, **kw)
    try:
        trainer.fit(model, H.loader(0, n=16))
    finally:
        assert trainer.global_step == 0 or "max_steps" in kw
    return trainer


_KEEP_NONE = lf.FisherOptions(param_filter=lambda name: False)


@pytest.mark.parametrize(
    ("make", "who"),
    [
        (lambda: lf.EWC(lam=1, fisher_options=_KEEP_NONE), "EWC"),
        (lambda: lf.FisherMonitor(fisher_options=_KEEP_NONE), "FisherMonitor"),
        (lambda: lf.FisherDiagnostics(fisher_options=_KEEP_NONE), "FisherDiagnostics"),
        (
            lambda: lf.FisherTraceRegularizer(alpha=1, param_filter=lambda name: False),
            "FisherTraceRegularizer",
        ),
    ],
)
def test_a_param_filter_that_keeps_nothing_is_refused_before_training(make: Any, who: str) -> None:
    with pytest.raises(
        lf.FisherInputError,
        match=rf"{who}: param_filter excludes every one .*'net.0.*no trainable parameters",
    ):
        _fit([make()])  # asserts no optimizer step ran


def test_diagnostics_with_one_prefix_are_refused_before_training() -> None:
    same = [lf.FisherDiagnostics(name="a"), lf.FisherDiagnostics(name="b")]
    with pytest.raises(lf.FisherInputError, match="same prefix 'fisher'"):
        _fit(same)
    apart = [
        lf.FisherDiagnostics(name="a", max_batches=1),
        lf.FisherDiagnostics(name="b", prefix="f2"),
    ]
    _fit(apart, max_steps=1, max_epochs=None)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: lf.FisherMonitor(every_n_epochs=3), r"every_n_epochs=3 > max_epochs=2"),
        (
            lambda: lf.EWC(lam=1, task_attr="task"),
            r"EWC\(task_attr='task'\): the fit has no datamodule, so no task switch is seen",
        ),
        (
            lambda: lf.FisherDiagnostics(every_n_epochs=None, every_n_steps=5),
            r"every_n_steps=5 > max_steps=2",
        ),
    ],
)
def test_a_schedule_that_never_fires_warns_at_setup(make: Any, match: str) -> None:
    with pytest.warns(UserWarning, match=match):
        _fit([make()], max_epochs=2, max_steps=2)


_WRONG_WIDTH = [(torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long))]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: lf.EWC(lam=1, dataloader=_WRONG_WIDTH),
            r"EWC: the model cannot take the first batch .*RuntimeError: mat1 and mat2",
        ),
        (
            lambda: lf.FisherMonitor(dataloader=_WRONG_WIDTH),
            r"FisherMonitor: the model cannot take the first batch",
        ),
        (
            lambda: lf.FisherDiagnostics(dataloader=_WRONG_WIDTH),
            r"FisherDiagnostics: the model cannot take the first batch",
        ),
        (
            lambda: lf.EWC(lam=1, dataloader=H.loader(0), classes=[2, 3]),
            r"EWC: on the first batch .*labels lie outside the active classes \[2, 3\]",
        ),
        (
            lambda: lf.FisherDiagnostics(dataloader=H.loader(1), classes=[0, 1]),
            r"FisherDiagnostics: on the first batch .*outside the active classes \[0, 1\]",
        ),
        (
            lambda: lf.FisherMonitor(dataloader=H.loader(0), output_fn=lambda m, b: m(b[1])),
            r"FisherMonitor: the model cannot take the first batch",
        ),
        (
            lambda: lf.EWC(lam=1, classes=[2, 3]),
            r"EWC: on the first training batch: .*outside the active classes \[2, 3\]",
        ),
        (
            lambda: lf.EWC(lam=1, method="empirical", output_fn=lambda m, b: m(b[1])),
            r"EWC: the model cannot take the first training batch",
        ),
    ],
)
def test_a_fisher_dataloader_the_model_cannot_take_is_refused_before_training(
    make: Any, match: str
) -> None:
    with pytest.raises(lf.FisherInputError, match=match):
        _fit([make()])  # asserts no optimizer step ran


def test_a_fisher_dataloader_the_model_takes_passes_the_first_batch_check() -> None:
    ewc = lf.EWC(lam=1, dataloader=H.loader(0), classes=[0, 1])
    _fit([ewc], max_steps=1, max_epochs=None)
    assert ewc.core.task_count == 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda m, ld, fd: lf.fish_mask(fd, "0.1"),
            r"keep must be a fraction in \[0, 1\]; got '0.1'",
        ),
        (lambda m, ld, fd: lf.fish_mask(fd, 0.1, per_layer="y"), r"per_layer must be True or"),
        (lambda m, ld, fd: lf.fish_mask(fd, 0.1, names="0.weight"), r"wrap it in a list"),
        (lambda m, ld, fd: lf.fisher_prune(m, fd, "x"), r"amount must be a fraction .*got 'x'"),
        (lambda m, ld, fd: lf.fisher_merge([m, m], [fd, fd], names="0.weight"), r"names must"),
        (lambda m, ld, fd: lf.task_embedding(fd, names="0.weight"), r"task_embedding: names"),
        (lambda m, ld, fd: lf.top_eigenvalues(m, ld, k=2.0), r"k must be a positive integer"),
        (lambda m, ld, fd: lf.top_eigenvalues(m, ld, k=1, rtol=-1), r"rtol must be .*got -1"),
        (lambda m, ld, fd: lf.top_eigenvalues("m", ld, k=1), r"model must be a torch.nn.Module"),
        (lambda m, ld, fd: lf.spectral_density(m, ld, sigma=0), r"sigma must be .*> 0; got 0"),
        (lambda m, ld, fd: lf.spectral_density(m, ld, points=0), r"points must be a positive"),
        (lambda m, ld, fd: lf.spectral_density(m, ld, max_batches=0), r"max_batches .*got 0"),
        (lambda m, ld, fd: fd.save("/no/such/folder/f.safetensors"), r"folder .* does not exist"),
    ],
)
def test_bad_arguments_of_the_applications_and_the_spectrum(call: Any, match: str) -> None:
    case = make_case("mlp")
    fd = lf.estimate_fisher(case.model, case.loader, "empirical")
    with pytest.raises(lf.FisherInputError, match=match):
        call(case.model, case.loader, fd)
