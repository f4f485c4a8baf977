"""``FishMask``: fine-tune under a sparse mask of trainable entries (FISH masks, Sung et al. 2021).

Only the entries where the mask is True change; every other entry of a masked parameter stays
bitwise where it was at the start of the fit: its gradient is zeroed before the optimizer step
(so gradient clipping sees the masked gradient), and after each step its value is written back
and the optimizer's state there (Adam's moments, SGD's momentum) is zeroed, so neither weight
decay nor moments from earlier steps move it. Parameters the mask does not name train freely.
The mask is part of the checkpoint, so a resumed fit trains the same entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from ..masks import MaskedUpdate, fish_mask
from ..options import check
from ..outputs import FisherInputError


class FishMask(Callback):
    """Train only the entries of a mask: given directly, or the FISH mask of a Fisher.

    With ``fisher`` the mask keeps the top ``keep`` fraction of its entries (global, or within
    each parameter with ``per_layer``): exactly round(keep x n) entries, ties to the lower index.
    Any ``FisherDiagonal`` works; the Squisher of a short warm-up fine-tune
    (``lf.fisher_from_optimizer``) is free.

    Args:
        mask: name -> bool tensor shaped like the parameter (True = trainable).
        fisher: a Fisher diagonal to build the FISH mask from (instead of ``mask``).
        keep: the trainable fraction for ``fisher``.
        per_layer: rank within each parameter instead of across all.
        names: the parameters ``fisher``'s mask covers (default: all of the Fisher's); others
            train freely.
    """

    def __init__(
        self,
        mask: Mapping[str, Tensor] | None = None,
        *,
        fisher: Mapping[str, Tensor] | None = None,
        keep: float | None = None,
        per_layer: bool = False,
        names: Iterable[str] | None = None,
    ) -> None:
        if (mask is None) == (fisher is None):
            raise FisherInputError(
                "FishMask needs exactly one of `mask=` (name -> bool tensor) or `fisher=` (with "
                f"`keep=`); got mask={'given' if mask is not None else None}, "
                f"fisher={'given' if fisher is not None else None}."
            )
        for given, value in (("mask", mask), ("fisher", fisher)):
            if value is not None and not isinstance(value, Mapping):
                raise FisherInputError(
                    f"FishMask: {given} must be a mapping of parameter names to tensors; got "
                    f"{type(value).__name__}."
                )
        check("FishMask", per_layer=("flag", per_layer))
        if mask is not None:
            unused = [
                f"{option}={value!r}"
                for option, value, default in (
                    ("keep", keep, None),
                    ("per_layer", per_layer, False),
                    ("names", names, None),
                )
                if value is not default
            ]
            if unused:
                raise FisherInputError(
                    f"FishMask: {', '.join(unused)} are used only to build a mask from `fisher=`; a "
                    "`mask=` is used as given. Pass `fisher=` with them, or drop them."
                )
        if isinstance(names, (str, bytes)):
            raise FisherInputError(
                f"FishMask: names must be an iterable of parameter names; got the string "
                f"{names!r} (wrap it in a list)."
            )
        if fisher is not None:
            if keep is None:
                raise FisherInputError("FishMask(fisher=...) needs `keep=`, a fraction in [0, 1].")
            check("FishMask", keep=("fraction", keep))
            mask = fish_mask(fisher, keep, per_layer=per_layer, names=names)
        assert mask is not None
        self.core = MaskedUpdate(mask)

    @property
    def masks(self) -> dict[str, Tensor]:
        """name -> bool mask (True = trainable)."""
        return self.core.masks

    @property
    def trainable_fraction(self) -> float:
        """The fraction of the masked parameters' entries that train."""
        return self.core.fraction()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the module holds the checkpoint's weights: their frozen entries are the
        # original ones, so the snapshot is the same as in the first fit.
        self.core.snapshot(pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.core.mask_gradients(pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.core.after_step(pl_module, trainer.optimizers)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: m.detach().cpu().clone() for k, m in self.core.masks.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        masks = state_dict.get("masks")
        if not isinstance(masks, Mapping):
            raise FisherInputError(
                "FishMask: the checkpoint's state has no `masks` mapping; expected the state a "
                "FishMask callback wrote."
            )
        self.core = MaskedUpdate(masks)
