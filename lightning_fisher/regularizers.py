"""Differentiable Fisher regularisers in plain torch (no Lightning needed).

``fisher_trace_penalty`` is the Hutchinson estimate of the trace of the batch Fisher (Sun 2026):

    R = (1/P) sum_{k<=P} ||v_k||^2 / |B|,   v_k = J^T L(p) xi_k = sum_x J_x^T L(p_x) xi_{k,x},

with L(p) = diag(sqrt p) - p sqrt(p)^T (L L^T = I(p)), J = dz/dtheta and xi zero-mean,
unit-variance probes. Cross terms between inputs vanish in expectation, so
E[R] = (1/|B|) sum_x tr(J_x^T I(p_x) J_x) = tr(F_B). ``R`` is differentiable through both J and p:
v is ``autograd.grad`` of the logits with ``grad_outputs = L(p) xi`` (not detached) and
``create_graph=True``, so ``R.backward()`` costs one double-backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .estimators.base import trainable_parameters
from .estimators.hutchinson import draw_probes
from .options import PROBE_DISTRIBUTIONS, check, check_choice, check_param_filter
from .outputs import ClassSelector, OutputFn, model_outputs


def fisher_trace_penalty(
    model: nn.Module,
    batch: Any,
    probes: int = 1,
    *,
    output_fn: OutputFn | None = None,
    classes: ClassSelector | None = None,
    shift_labels: bool = False,
    probe_distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    param_filter: Callable[[str], bool] | None = None,
) -> Tensor:
    """Unbiased, differentiable estimate of tr(F) on ``batch``: (1/P) sum_k ||J^T L(p) xi_k||^2 / |B|.

    Add ``alpha * fisher_trace_penalty(model, batch)`` to a loss to penalise Fisher curvature
    (flatter solutions). Runs the model on ``batch`` in its current mode; one forward, then one
    backward with ``create_graph`` per probe; differentiating the result costs a double-backward.

    Args:
        model: the classifier; the trace runs over its trainable parameters.
        batch: one batch (already on the model's device), as for ``lf.estimate_fisher``.
        probes: number P of probe vectors averaged.
        output_fn: ``output_fn(model, batch) -> logits`` when calling the model is not how the
            logits are obtained.
        classes: active classes of a multi-head model (sequence or ``classes(batch)``).
        shift_labels: causal LMs: logits at position t predict the token at t + 1.
        probe_distribution: ``rademacher`` (each entry +-1) or ``gaussian``.
        generator: random generator for the probes (on the model's device); pass one seeded the
            same way to get the same probes again.
        param_filter: keep only parameters whose name passes this predicate.

    Returns:
        A scalar tensor (float32 or float64) with a graph back to the parameters; zero if the
        batch has no counted inputs.
    """
    check(
        "fisher_trace_penalty",
        model=("module", model),
        probes=("positive_int", probes),
        output_fn=("callable_or_none", output_fn),
        classes=("classes", classes),
        shift_labels=("flag", shift_labels),
        param_filter=("callable_or_none", param_filter),
    )
    check_choice(
        "fisher_trace_penalty", "probe_distribution", probe_distribution, PROBE_DISTRIBUTIONS
    )
    check_param_filter("fisher_trace_penalty", model, param_filter)
    params = list(trainable_parameters(model, param_filter).values())
    out = model_outputs(model, batch, output_fn, classes, shift_labels)
    logits = out.logits
    n = out.n_inputs
    if n == 0:
        return logits.float().sum() * 0.0
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # sqrt(p) via exp(log_softmax / 2): kernel.softmax_fisher_sqrt_apply's L xi, but smooth where
    # p underflows to 0 (d sqrt(p)/dp is infinite there and would give NaN second derivatives).
    sqrt_p = torch.exp(0.5 * torch.log_softmax(z, -1))
    p = sqrt_p * sqrt_p
    mask = out.mask.unsqueeze(-1).to(z.dtype)
    total = z.new_zeros(())
    for _ in range(probes):
        # generator=None draws from torch's global RNG
        xi = draw_probes(tuple(z.shape), probe_distribution, generator, z.device, z.dtype)  # type: ignore[arg-type]
        u = (sqrt_p * xi - p * (sqrt_p * xi).sum(-1, keepdim=True)) * mask
        vs = torch.autograd.grad(
            logits,
            params,
            grad_outputs=u.to(logits.dtype),
            create_graph=True,
            allow_unused=True,
            retain_graph=True,
        )
        total = total + sum((v.to(z.dtype) ** 2).sum() for v in vs if v is not None)
    return total / (probes * n)


def fisher_trace_penalty_grads(
    model: nn.Module,
    batches: Sequence[Any],
    params: Sequence[Tensor],
    alpha: float,
    probes: int = 1,
    *,
    output_fn: OutputFn | None = None,
    classes: ClassSelector | None = None,
    probe_distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    param_filter: Callable[[str], bool] | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> tuple[list[Tensor], Tensor]:
    """The gradient of ``alpha * mean_b R_b`` over ``params``, and ``mean_b R_b``, where R_b is
    :func:`fisher_trace_penalty` on micro-batch b (averaged like a loss over the micro-batches of
    one optimizer step).

    Each micro-batch costs a forward, a backward with ``create_graph`` per probe and a
    double-backward; one graph at a time is alive. BatchNorm running statistics are restored
    afterwards (the forwards run in the model's current mode).

    Args:
        model: the classifier.
        batches: the micro-batches of the step (on the model's device).
        params: the parameters to differentiate; a parameter R does not reach gets zeros.
        alpha: strength of the penalty.
        probes: as for :func:`fisher_trace_penalty`.
        output_fn: as for :func:`fisher_trace_penalty`.
        classes: as for :func:`fisher_trace_penalty`.
        probe_distribution: as for :func:`fisher_trace_penalty`.
        generator: as for :func:`fisher_trace_penalty` (one generator draws the probes of all
            micro-batches).
        param_filter: as for :func:`fisher_trace_penalty`.
        forward_context: a context manager factory for each forward (e.g. an autocast).

    Returns:
        ``(grads, trace)``: one tensor per parameter (its dtype) and the float64 scalar mean of R.
    """
    device = params[0].device if params else torch.device("cpu")
    grads = [torch.zeros_like(p) for p in params]
    trace = torch.zeros((), dtype=torch.float64, device=device)
    if not batches:
        return grads, trace
    with frozen_norm_statistics(model):
        for batch in batches:
            with forward_context():
                r = fisher_trace_penalty(
                    model,
                    batch,
                    probes,
                    output_fn=output_fn,
                    classes=classes,
                    probe_distribution=probe_distribution,
                    generator=generator,
                    param_filter=param_filter,
                )
            parts = torch.autograd.grad(r * (alpha / len(batches)), params, allow_unused=True)
            for acc, part in zip(grads, parts):
                if part is not None:
                    acc += part
            trace += r.detach().double() / len(batches)
    return grads, trace


@contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm running statistic afterwards, so that an extra forward in train
    mode (a regulariser's recomputation) does not update them a second time."""
    saved = [
        (buf, buf.clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in m.buffers(recurse=False)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


__all__ = ["fisher_trace_penalty", "fisher_trace_penalty_grads", "frozen_norm_statistics"]
