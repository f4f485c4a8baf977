"""What eval mode cannot fix in a model's forward, found while the first batch runs.

A Fisher pass runs the model in eval mode, so that BatchNorm uses its running statistics and
Dropout modules pass their inputs through. Two things survive eval mode:

* normalisation by the batch's own statistics (``BatchNorm`` with ``track_running_stats=False``,
  or ``F.batch_norm(..., training=True)`` called by hand): each input's logits then depend on the
  other inputs of its batch, so there is no per-input likelihood p(y|x) whose Fisher
  F = (1/N) sum_x J_x^T I(p_x) J_x could be estimated. The estimators built on per-input
  gradients (and the Hutchinson family, which estimates the same F) refuse it; ``batched``, the
  square of each batch's mean log-likelihood gradient, is defined whatever couples the batch;
* dropout that ignores the module's mode (``F.dropout(x, p)``, whose ``training`` defaults to
  True; ``F.scaled_dot_product_attention(..., dropout_p=p)``): every forward draws a new mask, so
  the estimate is that of a randomly thinned network and changes from pass to pass. A warning
  says so (Monte Carlo dropout keeps it on deliberately).

Both are seen as torch functions called with their arguments (a ``TorchFunctionMode``), so they
are found wherever the model calls them, and named by the innermost module running.

``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True`` give sparse gradients, which the
per-input rules and the squared sums cannot take; during the pass they give dense ones (the same
values: the Fisher of a table is a dense table anyway).

``torch.utils.checkpoint`` with ``use_reentrant=True`` runs its segment without autograd and
replays it inside ``backward()``, which ``torch.autograd.grad`` (every estimator's backward)
refuses. In eval mode nothing is to be saved by recomputation that the pass does not keep
anyway, so during the pass such a segment runs as a plain call of its function: the same
values, and the gradients of the function it computes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..outputs import FisherInputError

#: functions that normalise by batch statistics when their ``training`` argument is true:
#: function -> (position of ``training``, its default)
_BATCH_STATS: dict[Callable[..., Any], tuple[int, bool]] = {
    F.batch_norm: (5, False),
    torch.batch_norm: (5, False),
}
#: functions that drop entries at random: function -> (position of p, name of p, position of
#: the training flag or None, its name, its default)
_DROPOUT: dict[Callable[..., Any], tuple[int, str, int | None, str, bool]] = {
    F.dropout: (1, "p", 2, "training", True),
    F.dropout1d: (1, "p", 2, "training", True),
    F.dropout2d: (1, "p", 2, "training", True),
    F.dropout3d: (1, "p", 2, "training", True),
    F.alpha_dropout: (1, "p", 2, "training", False),
    F.feature_alpha_dropout: (1, "p", 2, "training", False),
    torch.dropout: (1, "p", 2, "train", False),
    torch.alpha_dropout: (1, "p", 2, "train", False),
    torch.feature_dropout: (1, "p", 2, "train", False),
    torch.feature_alpha_dropout: (1, "p", 2, "train", False),
    F.scaled_dot_product_attention: (4, "dropout_p", None, "", True),
}


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else default


class _Watch(TorchFunctionMode):
    """Notes the modules that call batch-statistics normalisation or active dropout."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.batch_stats: list[str] = []
        self.dropout: list[str] = []

    def _where(self) -> str:
        return repr(self.stack[-1]) if self.stack else "the model's forward"

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        stats = _BATCH_STATS.get(func)
        if stats is not None and bool(_arg(args, kwargs, stats[0], "training", stats[1])):
            self.batch_stats.append(self._where())
        drop = _DROPOUT.get(func)
        if drop is not None:
            p = _arg(args, kwargs, drop[0], drop[1], 0.0)
            on = True if drop[2] is None else _arg(args, kwargs, drop[2], drop[3], drop[4])
            if on and float(p) > 0:
                self.dropout.append(self._where())
        return func(*args, **kwargs)


@contextmanager
def watch_forward(model: nn.Module, per_input_fisher: bool) -> Iterator[None]:
    """Watch the forwards run in the block (one batch): refuse batch statistics when
    ``per_input_fisher`` (the estimate needs a likelihood per input), warn of active dropout."""
    paths = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
    stack: list[str] = []

    def pre(m: nn.Module, _args: Any) -> None:
        if id(m) in paths:
            stack.append(paths[id(m)])

    def post(m: nn.Module, _args: Any, _out: Any) -> None:
        if id(m) in paths and stack and stack[-1] == paths[id(m)]:
            stack.pop()

    hooks = [
        nn.modules.module.register_module_forward_pre_hook(pre),
        nn.modules.module.register_module_forward_hook(post, always_call=True),
    ]
    watch = _Watch(stack)
    try:
        with watch:
            yield
    except Exception as err:
        if per_input_fisher and watch.batch_stats:
            raise _coupled(watch.batch_stats) from err
        raise
    finally:
        for h in hooks:
            h.remove()
    if per_input_fisher and watch.batch_stats:
        raise _coupled(watch.batch_stats)
    if watch.dropout:
        where = ", ".join(sorted(set(watch.dropout)))
        warnings.warn(
            f"A dropout stays active in eval mode at {where} (F.dropout's `training` defaults to "
            "True; scaled_dot_product_attention drops with any dropout_p > 0): every forward "
            "draws a new mask, so this Fisher is that of a randomly thinned network and differs "
            "between passes. Pass `training=self.training` (or `dropout_p=p if self.training "
            "else 0.0`) unless the dropout is meant to stay on.",
            UserWarning,
            stacklevel=6,
        )


def _coupled(where: list[str]) -> FisherInputError:
    return FisherInputError(
        f"The model normalises by batch statistics in eval mode at {', '.join(sorted(set(where)))} "
        "(a BatchNorm with track_running_stats=False, or F.batch_norm(..., training=True)): each "
        "input's logits depend on the other inputs of its batch, so there is no per-input "
        "likelihood to take a Fisher of. Give the layer running statistics "
        "(track_running_stats=True, estimated in training), or use method='batched' (the "
        "squared gradient of each batch's mean log-likelihood, defined for any batch)."
    )


def _plain_call(function: Any, _preserve_rng_state: bool, *args: Any) -> Any:
    return function(*args)


@contextmanager
def plain_reentrant_checkpoints() -> Iterator[None]:
    """Reentrant ``torch.utils.checkpoint`` segments run as plain calls of their function while
    the block runs (their backward works only through ``backward()``, never ``autograd.grad``)."""
    import torch.utils.checkpoint as ckpt

    fn = getattr(ckpt, "CheckpointFunction", None)
    if fn is None:
        yield
        return
    saved = fn.__dict__.get("apply")
    fn.apply = staticmethod(_plain_call)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        if saved is None:
            del fn.apply
        else:
            fn.apply = saved  # type: ignore[method-assign]


@contextmanager
def dense_embedding_gradients(model: nn.Module) -> Iterator[None]:
    """``nn.Embedding``/``nn.EmbeddingBag`` modules built with ``sparse=True`` give dense
    gradients while the block runs (restored afterwards, also on error)."""
    sparse = [
        m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
    ]
    for m in sparse:
        m.sparse = False
    try:
        yield
    finally:
        for m in sparse:
            m.sparse = True
