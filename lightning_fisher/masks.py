"""FISH masks (Sung et al., 2021) and Fisher pruning scores, in plain torch.

FISH mask: keep the k = round(keep x n) entries with the largest Fisher F_i, over all n entries
(global) or within each parameter (per layer, k_p = round(keep x n_p)); fine-tuning then updates
those entries only. Ties at the threshold go to the lower flat index (parameters in the mapping's
order, then row-major), so a mask is the same on every run and device.

Pruning score (Optimal Brain Damage with a diagonal Fisher as the Hessian): the loss increase
from zeroing entry i is about s_i = theta_i^2 F_i / 2. :func:`fisher_prune` removes the entries
with the smallest scores, globally across parameters, through ``torch.nn.utils.prune`` (the
module gets ``<name>_orig`` and ``<name>_mask``; ``prune.remove`` makes it permanent).

The Squisher (``lf.fisher_from_optimizer``: B x Adam's ``exp_avg_sq``) works as F in both: the
mask and the ranking depend on the order of the entries only, so its scale does not matter.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from .options import check
from .outputs import FisherInputError


def _check_fraction(value: float, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or not 0.0 <= float(value) <= 1.0
    ):
        raise FisherInputError(f"{what} must be a fraction in [0, 1]; got {value!r}.")
    return float(value)


def _select(values: Mapping[str, Tensor], names: Iterable[str] | None) -> dict[str, Tensor]:
    check("", names=("names_or_none", names))
    keys = list(values) if names is None else list(dict.fromkeys(names))
    missing = [k for k in keys if k not in values]
    if missing:
        raise FisherInputError(
            f"No entries for {missing[:5]}{' ...' if len(missing) > 5 else ''}; the mapping has "
            f"{list(values)[:5]}{' ...' if len(values) > 5 else ''}."
        )
    if not keys:
        raise FisherInputError("No parameters to mask: the mapping (or `names`) is empty.")
    out = {}
    for k in keys:
        t = values[k].detach()
        if not t.is_floating_point():
            raise FisherInputError(f"{k!r} holds {t.dtype} values; expected floating point.")
        if bool(torch.isnan(t).any()):
            raise FisherInputError(f"{k!r} holds NaN; expected finite scores (a Fisher is >= 0).")
        out[k] = t
    return out


def top_k_mask(values: Tensor, k: int) -> Tensor:
    """A bool mask of ``values``' shape with exactly ``k`` True entries: the largest values, ties
    at the threshold broken toward the lower flat index."""
    flat = values.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise FisherInputError(f"Cannot keep {k} of {n} entries.")
    if k == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k == n:
        return torch.ones_like(values, dtype=torch.bool)
    work = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
    threshold = torch.kthvalue(work, n - k + 1).values  # the k-th largest
    mask = work > threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = torch.nonzero(work == threshold).reshape(-1)[:need]
        mask[ties] = True
    return mask.reshape(values.shape)


def _split(mask: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for k, t in like.items():
        out[k] = mask[start : start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out


def fish_mask(
    fisher: Mapping[str, Tensor],
    keep: float,
    *,
    per_layer: bool = False,
    names: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """The FISH mask: True on the top ``keep`` fraction of Fisher entries.

    Global: exactly round(keep x n) entries over all selected parameters (n entries in all).
    Per layer: exactly round(keep x n_p) entries of each parameter p. Ties go to the lower index.

    Args:
        fisher: name -> Fisher diagonal (any ``FisherDiagonal``, the Squisher's included).
        keep: the fraction of entries to keep trainable, in [0, 1].
        per_layer: rank within each parameter instead of across all.
        names: the parameters to mask (default: all in ``fisher``).

    Returns:
        name -> bool tensor shaped like the parameter (True = trainable).
    """
    keep = _check_fraction(keep, "keep")
    check("fish_mask", per_layer=("flag", per_layer))
    values = _select(fisher, names)
    if per_layer:
        return {k: top_k_mask(v, round(keep * v.numel())) for k, v in values.items()}
    flat = torch.cat([v.reshape(-1).float() for v in values.values()])
    return _split(top_k_mask(flat, round(keep * flat.numel())), values)


def random_mask(
    shapes: Mapping[str, Tensor | torch.Size],
    keep: float,
    *,
    per_layer: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """A uniformly random mask with exactly the entry counts of :func:`fish_mask` (the baseline
    that sparse fine-tuning and pruning compare against). ``shapes`` maps names to tensors or
    sizes; the mask lives on the CPU."""
    keep = _check_fraction(keep, "keep")
    check("fish_mask", per_layer=("flag", per_layer))
    sizes = {k: (v.shape if isinstance(v, Tensor) else torch.Size(v)) for k, v in shapes.items()}
    like = {k: torch.empty(s) for k, s in sizes.items()}
    scores = {k: torch.rand(s, generator=generator) for k, s in sizes.items()}
    if per_layer:
        return {k: top_k_mask(v, round(keep * v.numel())) for k, v in scores.items()}
    flat = torch.cat([v.reshape(-1) for v in scores.values()])
    return _split(top_k_mask(flat, round(keep * flat.numel())), like)


def fisher_pruning_scores(
    params: nn.Module | Mapping[str, Tensor],
    fisher: Mapping[str, Tensor],
    names: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """s_i = theta_i^2 F_i / 2 per entry: the second-order estimate of the loss increase when
    entry i is set to zero (diagonal Fisher as the Hessian).

    Args:
        params: a module (its named parameters) or a mapping name -> tensor.
        fisher: name -> Fisher diagonal.
        names: the parameters to score (default: all in ``fisher``).
    """
    values = dict(params.named_parameters()) if isinstance(params, nn.Module) else dict(params)
    fish = _select(fisher, names)
    out = {}
    for k, f in fish.items():
        if k not in values:
            raise FisherInputError(f"The Fisher has {k!r} but the model has no such parameter.")
        theta = values[k].detach()
        if tuple(theta.shape) != tuple(f.shape):
            raise FisherInputError(
                f"Fisher of {k!r} has shape {tuple(f.shape)}; expected the parameter's "
                f"{tuple(theta.shape)}."
            )
        if bool((f < 0).any()):
            raise FisherInputError(f"Fisher of {k!r} has negative entries; expected >= 0.")
        out[k] = 0.5 * theta.float().square() * f.to(theta.device).float()
    return out


def fisher_prune(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    amount: float,
    *,
    per_layer: bool = False,
) -> dict[str, Tensor]:
    """Prune the ``amount`` fraction of entries with the smallest ``scores`` (global top-k across
    the scored parameters, or within each with ``per_layer``), through ``torch.nn.utils.prune``.

    Each scored parameter ``<module>.<name>`` becomes ``<name>_orig`` with a ``<name>_mask``
    buffer (``prune.custom_from_mask``, so further ``prune`` calls combine with it and
    ``prune.remove`` makes it permanent). Scores may come from :func:`fisher_pruning_scores`
    (Fisher or Squisher), magnitudes, or random numbers for a baseline.

    Returns:
        name -> the bool keep-mask applied (True = kept), exactly round((1 - amount) x n) True.
    """
    amount = _check_fraction(amount, "amount")
    values = _select(scores, None)
    keep = fish_mask(values, 1.0 - amount, per_layer=per_layer)
    for name, mask in keep.items():
        module_name, _, param_name = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError as err:
            raise FisherInputError(
                f"The model has no module {module_name!r} (from {name!r})."
            ) from err
        param = getattr(module, param_name, None)
        if not isinstance(param, Tensor) or tuple(param.shape) != tuple(mask.shape):
            raise FisherInputError(
                f"{name!r} is not a parameter shaped {tuple(mask.shape)} of the model."
            )
        prune.custom_from_mask(module, param_name, mask.to(param.device))
    return keep


class MaskedUpdate:
    """Keep a module's masked-out entries exactly where they are during training (plain torch).

    ``masks`` maps parameter names to bool tensors (True = trainable); parameters without a mask
    train freely. Call :meth:`snapshot` once before training, :meth:`mask_gradients` after the
    backward passes (before clipping and the step), and :meth:`after_step` after every optimizer
    step: it writes the frozen entries back (so weight decay and moments from earlier steps cannot
    move them, bitwise) and zeroes every optimizer state tensor shaped like the parameter
    (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's momentum) at the frozen entries.
    """

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        bad = [k for k, m in masks.items() if m.dtype != torch.bool]
        if bad:
            raise FisherInputError(
                f"Masks must be bool tensors (True = trainable); {bad[:5]} are not."
            )
        self.masks: dict[str, Tensor] = {k: m.detach() for k, m in masks.items()}
        self._frozen: dict[str, Tensor] = {}

    def check(self, module: nn.Module) -> None:
        """Raise ``FisherInputError`` if a mask names no parameter of ``module`` or has another
        shape."""
        params = dict(module.named_parameters())
        missing = [k for k in self.masks if k not in params]
        if missing:
            raise FisherInputError(
                f"The mask names {missing[:5]}{' ...' if len(missing) > 5 else ''}, which are not "
                "parameters of the module; expected names from `named_parameters()`."
            )
        wrong = [k for k, m in self.masks.items() if tuple(m.shape) != tuple(params[k].shape)]
        if wrong:
            k = wrong[0]
            raise FisherInputError(
                f"The mask of {k!r} has shape {tuple(self.masks[k].shape)}; expected the "
                f"parameter's {tuple(params[k].shape)}."
            )

    def snapshot(self, module: nn.Module) -> None:
        """Check the masks against ``module``, move them to its parameters' devices and remember
        the values of the frozen entries (a copy of each masked parameter)."""
        self.check(module)
        params = dict(module.named_parameters())
        self._frozen = {}
        for k in self.masks:
            p = params[k]
            self.masks[k] = self.masks[k].to(p.device)
            self._frozen[k] = p.detach().clone()

    def mask_gradients(self, module: nn.Module) -> None:
        """grad <- grad * mask for every masked parameter that has a gradient."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for k, m in self.masks.items():
                g = params[k].grad
                if g is not None:
                    g.mul_(m)

    def after_step(self, module: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Restore the frozen entries and zero the optimizer's state at them."""
        params = dict(module.named_parameters())
        if not self._frozen:
            raise FisherInputError("MaskedUpdate.after_step before snapshot(): nothing to restore.")
        states = [o.state for o in optimizers]
        with torch.no_grad():
            for k, m in self.masks.items():
                p = params[k]
                p.copy_(torch.where(m, p, self._frozen[k]))
                for state in states:
                    for key, value in state.get(p, {}).items():
                        if key != "step" and isinstance(value, Tensor) and value.shape == p.shape:
                            value.mul_(m)

    def fraction(self) -> float:
        """The trainable fraction of the masked entries."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)


__all__ = [
    "MaskedUpdate",
    "fish_mask",
    "fisher_prune",
    "fisher_pruning_scores",
    "random_mask",
    "top_k_mask",
]
