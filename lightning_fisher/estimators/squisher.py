"""The Squisher (Li, Dangel, Tam, Raffel 2025): Adam's second moment as a free Fisher diagonal.

F_i = B * v_hat_i, with v_hat = exp_avg_sq, optionally bias-corrected by 1 / (1 - beta2^t), and B the
training batch size: exp_avg_sq averages squared mini-batch-mean gradients, about (1/B) times the
empirical Fisher. No data pass. For EWC use lambda_squisher ~ N * lambda_fisher; beta2 = 0.999.
"""

from __future__ import annotations

import torch
from torch import nn

from ..fisher_diagonal import FisherDiagonal
from ..options import check
from ..outputs import FisherInputError


def fisher_from_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    batch_size: int,
    bias_correction: bool = True,
) -> FisherDiagonal:
    """The Squisher: ``batch_size * exp_avg_sq`` (bias-corrected if asked) of an Adam/AdamW optimizer.

    Parameters that the optimizer has not stepped yet get zeros. Raises a clear error for an
    optimizer without ``exp_avg_sq`` state.
    """
    check(
        "fisher_from_optimizer",
        model=("module", model),
        batch_size=("positive_int", batch_size),
        bias_correction=("flag", bias_correction),
    )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise FisherInputError(
            "fisher_from_optimizer: optimizer must be a torch.optim.Optimizer (Adam or AdamW); "
            f"got {type(optimizer).__name__}."
        )
    betas = {
        id(p): g.get("betas", (0.9, 0.999))[1] for g in optimizer.param_groups for p in g["params"]
    }
    tensors = {}
    seen = 0
    steps: list[float] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in betas:
            tensors[name] = torch.zeros_like(p, dtype=torch.float32)
            continue
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            if state:
                raise FisherInputError(
                    f"The optimizer ({type(optimizer).__name__}) keeps no `exp_avg_sq`; the Squisher "
                    "needs Adam or AdamW."
                )
            tensors[name] = torch.zeros_like(p, dtype=torch.float32)
            continue
        seen += 1
        v = state["exp_avg_sq"].detach().float()
        t = float(state["step"])
        steps.append(t)
        if bias_correction:
            v = v / (1.0 - betas[id(p)] ** t)
        tensors[name] = batch_size * v
    if seen == 0:
        raise FisherInputError(
            "The optimizer has no Adam state for any of the model's trainable parameters: step it "
            "at least once (and check it is Adam/AdamW and was built on this model's parameters)."
        )
    return FisherDiagonal(
        tensors,
        n_samples=int(max(steps) * batch_size) if steps else 0,
        method="squisher",
        options={"batch_size": batch_size, "bias_correction": bias_correction},
    )


class SquisherEstimator:
    """The registered ``squisher`` method: no data pass, its inputs come from context."""

    name = "squisher"

    @staticmethod
    def from_context(
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None,
        batch_size: int | None,
        bias_correction: bool = True,
    ) -> FisherDiagonal:
        """``fisher_from_optimizer(optimizer, model, batch_size, bias_correction)``, refusing a
        missing optimizer or batch size with a clear error."""
        if optimizer is None or batch_size is None:
            raise FisherInputError(
                "method='squisher' reads Adam's exp_avg_sq instead of data: pass "
                "`optimizer=` (the Adam/AdamW optimizer of the training) and `batch_size=` "
                f"(the training batch size B); got optimizer={type(optimizer).__name__}, "
                f"batch_size={batch_size!r}."
            )
        return fisher_from_optimizer(optimizer, model, batch_size, bias_correction)
