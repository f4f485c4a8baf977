"""Task2Vec (Achille et al., 2019): a task embedding from a Fisher diagonal, and its distance.

A fixed probe network is fitted to each task (often its head only); the embedding of the task is
the diagonal Fisher of the probe's filters, one number per filter: the mean of F over the
filter's weights (output channel or unit: every dimension but the first). Two tasks compare by
the cosine distance of their embeddings normalised by their sum, entrywise:

    d(a, b) = d_cos(a / (a + b), b / (a + b)),    d_cos(u, v) = 1 - u.v / (|u| |v|)

which is symmetric, 0 for a = b (and for a = c b), and lies in [0, 1] for a, b >= 0. The division
keeps filters of large Fisher from dominating the distance. The Squisher (B x Adam's
``exp_avg_sq`` of the probe's fine-tune) serves as F at no extra cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor

from .options import check
from .outputs import FisherInputError

Normalize = Literal["sum", "l2"] | None


def task_embedding(
    fisher: Mapping[str, Tensor],
    names: Iterable[str] | None = None,
    *,
    per_filter: bool = True,
    normalize: Normalize = "sum",
) -> Tensor:
    """The Task2Vec embedding of a task: the probe's Fisher averaged per filter, concatenated.

    e = concat_p [ mean_{j in filter f} F_p[f, j] for each filter f of parameter p ], then
    divided by sum(e) (``"sum"``) or |e| (``"l2"``) so that Fishers of different scales (N,
    estimator) compare; ``None`` keeps the scale (the reference code's default). 1-D
    parameters (biases, norms) contribute one entry per element.

    Args:
        fisher: name -> Fisher diagonal of the probe network (any ``FisherDiagonal``).
        names: the parameters to embed, in this order (default: the Fisher's order).
        per_filter: average over each filter's weights (False: every entry as it is).
        normalize: ``"sum"``, ``"l2"`` or ``None``.

    Returns:
        A float64 vector on the CPU.
    """
    check("task_embedding", names=("names_or_none", names), per_filter=("flag", per_filter))
    keys = list(fisher) if names is None else list(dict.fromkeys(names))
    missing = [k for k in keys if k not in fisher]
    if missing:
        raise FisherInputError(f"The Fisher has no entries for {missing[:5]}.")
    if not keys:
        raise FisherInputError("task_embedding needs at least one parameter; got none.")
    if normalize not in ("sum", "l2", None):
        raise FisherInputError(f"normalize must be 'sum', 'l2' or None; got {normalize!r}.")
    parts = []
    for k in keys:
        f = fisher[k].detach().double().cpu()
        if bool(torch.isnan(f).any()) or bool((f < 0).any()):
            raise FisherInputError(f"Fisher of {k!r} holds NaN or negative entries; expected >= 0.")
        if per_filter and f.ndim >= 2:
            parts.append(f.reshape(f.shape[0], -1).mean(dim=1))
        else:
            parts.append(f.reshape(-1))
    e = torch.cat(parts)
    if normalize is not None:
        c = e.sum() if normalize == "sum" else e.norm()
        if not bool(c > 0) or not bool(torch.isfinite(c)):
            raise FisherInputError(
                f"Cannot normalise the embedding: its {normalize} is {float(c)!r}; expected a "
                "positive finite number (is the Fisher all zeros?)."
            )
        e = e / c
    return e


def task2vec_distance(a: Tensor, b: Tensor) -> float:
    """d(a, b) = d_cos(a / (a + b), b / (a + b)): the cosine distance of the embeddings after
    dividing each entry by the pair's sum (entries where a + b = 0 count as 0 in both).

    Raises ``FisherInputError`` for shapes that differ or negative entries."""
    if a.shape != b.shape:
        raise FisherInputError(
            f"Task embeddings must have one shape; got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    a64, b64 = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    if bool((a64 < 0).any()) or bool((b64 < 0).any()):
        raise FisherInputError("Task embeddings hold negative entries; expected Fishers >= 0.")
    s = a64 + b64
    safe = torch.where(s > 0, s, torch.ones_like(s))
    u = torch.where(s > 0, a64 / safe, torch.zeros_like(s))
    v = torch.where(s > 0, b64 / safe, torch.zeros_like(s))
    nu, nv = u.norm(), v.norm()
    if not bool(nu > 0) or not bool(nv > 0):
        raise FisherInputError("A task embedding is all zeros; its cosine distance is undefined.")
    cos = float((u @ v) / (nu * nv))
    return max(0.0, 1.0 - cos)


__all__ = ["task2vec_distance", "task_embedding"]
