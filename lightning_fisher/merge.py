"""Fisher-weighted averaging of models of one architecture (Matena & Raffel, 2022).

Per entry i of every merged parameter, over models m = 1..M with parameters theta_m, Fisher
diagonals F_m and weights w_m:

    theta_i = sum_m w_m F'_m,i theta_m,i / sum_m w_m F'_m,i,     F'_m = max(F_m / c_m, epsilon)

with c_m an optional per-model normaliser (the Fisher's L2 norm, mean entry or trace). The floor
epsilon keeps entries that no model's Fisher sees from dividing 0 by 0: where every F'_m,i is the
floor, the merge is the plain weighted average sum_m w_m theta_m,i / sum_m w_m. Any
``FisherDiagonal`` works, the Squisher's (B x Adam's ``exp_avg_sq``) included; normalising makes
Fishers of different scales (estimators, N) comparable.

The merge streams: one parameter at a time, so the extra memory is one parameter's accumulators
beside the output (``into``, or a new state dict).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .options import check
from .outputs import FisherInputError

Normalize = Literal["l2", "mean", "trace"] | None
NORMALIZATIONS = ("l2", "mean", "trace")

ModelLike = nn.Module | Mapping[str, Tensor]


def _tensors(model: ModelLike) -> dict[str, Tensor]:
    """Parameters and buffers by name (a module), or the mapping itself."""
    if isinstance(model, nn.Module):
        out: dict[str, Tensor] = dict(model.named_parameters())
        out.update(dict(model.named_buffers()))
        return out
    if isinstance(model, Mapping):
        return dict(model)
    raise FisherInputError(
        f"fisher_merge takes models as nn.Module or a mapping name -> tensor (a state dict); "
        f"got {type(model).__name__}."
    )


def fisher_normalizer(fisher: Mapping[str, Tensor], normalize: Normalize) -> float:
    """The scalar c that ``normalize`` divides a Fisher by: its L2 norm (``"l2"``, as Matena &
    Raffel's code), its mean entry (``"mean"``) or its trace (``"trace"``); 1 for ``None``.

    Raises ``FisherInputError`` for an unknown option or a Fisher whose normaliser is 0 or not
    finite."""
    if normalize is None:
        return 1.0
    if normalize not in NORMALIZATIONS:
        raise FisherInputError(
            f"normalize must be one of {NORMALIZATIONS} or None; got {normalize!r}."
        )
    total = 0.0
    count = 0
    for t in fisher.values():
        t64 = t.detach().double()
        total += float((t64 * t64).sum() if normalize == "l2" else t64.sum())
        count += t.numel()
    c = (
        math.sqrt(total)
        if normalize == "l2"
        else (total / max(count, 1) if normalize == "mean" else total)
    )
    if not math.isfinite(c) or c <= 0.0:
        raise FisherInputError(
            f"Cannot normalise a Fisher by its {normalize}: it is {c!r}; expected a positive "
            "finite number (is the Fisher all zeros, or does it hold NaN/Inf?)."
        )
    return c


def fisher_merge(
    models: Sequence[ModelLike],
    fishers: Sequence[Mapping[str, Tensor]],
    *,
    weights: Sequence[float] | None = None,
    epsilon: float = 1e-8,
    normalize: Normalize = None,
    names: Iterable[str] | None = None,
    into: nn.Module | None = None,
    average_buffers: bool = True,
) -> dict[str, Tensor]:
    """Merge ``models`` by Fisher-weighted averaging, one parameter at a time.

    theta_i = sum_m w_m F'_m,i theta_m,i / sum_m w_m F'_m,i with F'_m = max(F_m / c_m, epsilon)
    (c_m from ``normalize``, see :func:`fisher_normalizer`); where every F'_m,i is 0 (only with
    ``epsilon=0``) the entry is the plain weighted average sum_m w_m theta_m,i / sum_m w_m.

    Args:
        models: M >= 1 models of one architecture (modules or state dicts).
        fishers: one Fisher diagonal per model (a ``FisherDiagonal`` of any method, the
            Squisher's included, or a mapping name -> tensor shaped like the parameter).
        weights: per-model weights w_m >= 0 (not all 0); default all 1.
        epsilon: the floor on every (normalised) Fisher entry; >= 0.
        normalize: divide each Fisher by its ``"l2"`` norm, ``"mean"`` entry or ``"trace"``
            first; ``None`` keeps the scales (then the Fishers must be of one estimator and N).
        names: the parameters to merge by Fisher (default: every name in all Fishers). With
            ``into``, other entries keep ``into``'s values; without, they are left out.
        into: write the merged values into this module's parameters and buffers (in place);
            the memory then stays near that one module plus the models.
        average_buffers: also merge floating-point buffers (BatchNorm statistics) by the plain
            weighted average; integer buffers come from the first model.

    Returns:
        name -> merged tensor (``into``'s own tensors when given).

    Raises:
        FisherInputError: mismatched counts, names or shapes, negative or NaN Fisher entries,
            bad weights or epsilon.
    """
    m = len(models)
    if m == 0:
        raise FisherInputError("fisher_merge needs at least one model; got none.")
    check("fisher_merge", names=("names_or_none", names), average_buffers=("flag", average_buffers))
    if len(fishers) != m:
        raise FisherInputError(
            f"fisher_merge needs one Fisher per model: got {m} models and {len(fishers)} Fishers."
        )
    w = [1.0] * m if weights is None else [float(x) for x in weights]
    if len(w) != m:
        raise FisherInputError(f"Got {m} models but {len(w)} weights; expected one per model.")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise FisherInputError(f"weights must be finite, >= 0 and not all 0; got {w}.")
    if not math.isfinite(epsilon) or epsilon < 0:
        raise FisherInputError(f"epsilon must be a finite number >= 0; got {epsilon!r}.")
    states = [_tensors(model) for model in models]
    fisher_keys: list[set[str]] = [set(f.keys()) for f in fishers]
    common = set(fisher_keys[0]).intersection(*fisher_keys[1:])
    merge_names = (
        [k for k in fishers[0] if k in common] if names is None else list(dict.fromkeys(names))
    )
    if names is None and any(k != fisher_keys[0] for k in fisher_keys):
        diff = sorted(set(fisher_keys[0]).union(*fisher_keys[1:]) - common)
        raise FisherInputError(
            f"The Fishers cover different parameters ({diff[:5]}{' ...' if len(diff) > 5 else ''} "
            "are missing from some); pass `names=` to merge a common subset."
        )
    if not merge_names:
        raise FisherInputError("Nothing to merge: the Fishers (or `names`) name no parameter.")
    for name in merge_names:
        for i, (state, fisher) in enumerate(zip(states, fishers)):
            if name not in state:
                raise FisherInputError(f"Model {i} has no parameter {name!r} to merge.")
            if name not in fisher:
                raise FisherInputError(f"Fisher {i} has no entry for {name!r}.")
            if tuple(fisher[name].shape) != tuple(state[name].shape):
                raise FisherInputError(
                    f"Fisher {i} of {name!r} has shape {tuple(fisher[name].shape)}; expected the "
                    f"parameter's {tuple(state[name].shape)}."
                )
            if tuple(state[name].shape) != tuple(states[0][name].shape):
                raise FisherInputError(
                    f"{name!r} has shape {tuple(state[name].shape)} in model {i} but "
                    f"{tuple(states[0][name].shape)} in model 0; models must share one architecture."
                )
    target = _tensors(into) if into is not None else None
    if target is not None:
        for name in merge_names:
            if name not in target or tuple(target[name].shape) != tuple(states[0][name].shape):
                raise FisherInputError(
                    f"`into` has no parameter {name!r} shaped {tuple(states[0][name].shape)}."
                )
    scales = [fisher_normalizer(f, normalize) for f in fishers]

    out: dict[str, Tensor] = {}
    for name in merge_names:
        ref = states[0][name]
        num = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        den = torch.zeros_like(num)
        plain = torch.zeros_like(num)
        for i in range(m):
            theta = states[i][name].detach().to(ref.device, torch.float64)
            f = fishers[i][name].detach().to(ref.device, torch.float64)
            if bool(torch.isnan(f).any()) or bool((f < 0).any()):
                raise FisherInputError(
                    f"Fisher {i} of {name!r} holds NaN or negative entries; a Fisher diagonal is "
                    ">= 0 everywhere."
                )
            f = (f / scales[i]).clamp_min(epsilon) * w[i]
            num.add_(f * theta)
            den.add_(f)
            plain.add_(theta * w[i])
            del theta, f
        plain.div_(sum(w))
        merged = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), plain)
        out[name] = _store(merged, ref, target, name)
        del num, den, plain, merged

    if average_buffers:
        first = models[0]
        buffer_names = [n for n, _ in first.named_buffers()] if isinstance(first, nn.Module) else []
        done = set(merge_names)
        for name in (n for n in buffer_names if n not in done):
            ref = states[0][name]
            if target is not None and name not in target:
                continue
            if ref.is_floating_point():
                acc = sum(states[i][name].detach().double() * w[i] for i in range(m))
                merged = torch.as_tensor(acc) / sum(w)
            else:
                merged = ref.detach()
            out[name] = _store(merged, ref, target, name)
    if target is not None:
        return {n: target[n] for n in out}
    return out


def _store(merged: Tensor, ref: Tensor, target: dict[str, Tensor] | None, name: str) -> Tensor:
    if target is None:
        return merged.to(ref.dtype)
    with torch.no_grad():
        target[name].copy_(merged.to(target[name].device, target[name].dtype))
    return target[name]


__all__ = ["NORMALIZATIONS", "fisher_merge", "fisher_normalizer"]
