"""Turn whatever a model returns into logits, a mask of the inputs that count, and labels.

A model may return a tensor of logits, a tuple whose first item is the logits, a Hugging Face
``ModelOutput`` (or any mapping / object) with ``logits``; a user-supplied
``output_fn(module, batch) -> logits`` covers everything else.

Logits of shape ``(B, C)`` give one input per row. Logits of shape ``(B, T, C)`` give one input per
position ``t`` whose attention mask is 1 and whose label is not ``-100``. Dense predictions with the
classes on dimension 1, ``(B, C, H, W)`` with labels ``(B, H, W)`` as PyTorch's losses take them,
have their classes moved last: one input per labelled pixel.

A Hugging Face encoder-decoder model (T5, BART, ...; ``config.is_encoder_decoder``) is run as it
trains: without ``decoder_input_ids`` in the batch, they are derived from its ``labels``
(``prepare_decoder_input_ids_from_labels``: the labels shifted right, -100 replaced by the pad
token), and its logits are the decoder's, so their positions count by ``decoder_attention_mask``,
not by the encoder's ``attention_mask``.
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

#: Batch keys that hold targets and must not be passed to the model's forward.
LABEL_KEYS = ("labels", "label", "targets", "target", "y")
#: Label value that marks an ignored position (PyTorch's and Hugging Face's convention).
IGNORE_INDEX = -100
#: Batch keys that give an encoder-decoder model its decoder inputs.
DECODER_INPUT_KEYS = ("decoder_input_ids", "decoder_inputs_embeds")

OutputFn = Callable[[nn.Module, Any], Any]
ClassSelector = Sequence[int] | Tensor | Callable[[Any], Sequence[int] | Tensor]


class FisherInputError(ValueError):
    """Raised when a model's outputs or a batch cannot give a valid Fisher estimate."""


@dataclass
class ModelOutputs:
    """Logits of one batch with the inputs that count.

    Attributes:
        logits: ``(B, *S, C)`` float logits (``S`` empty for one input per row).
        mask: ``(B, *S)`` bool, True where the position is an input that counts.
        labels: ``(B, *S)`` long labels (``-100`` where ignored), or ``None`` if the batch has none.
        label_error: set when the batch holds labels that are not class indices (one-hot rows,
            non-integer values); estimators that need labels raise it.
    """

    logits: Tensor
    mask: Tensor
    labels: Tensor | None
    #: why the batch's labels cannot be used as class indices (raised by estimators that need them)
    label_error: str | None = None
    #: how many counted inputs have a label >= C (read with the batch's other facts); None: not
    #: read yet (estimators that need labels then read it themselves)
    n_labels_too_big: int | None = None

    @property
    def n_classes(self) -> int:
        return self.logits.shape[-1]

    @cached_property
    def _counts(self) -> tuple[int, int]:
        # Both counts with one device synchronisation: a GPU pass of a small model is bound by
        # the host, and every synchronisation stops it from queueing work ahead.
        rows = self.mask.reshape(self.mask.shape[0], -1)
        n_inputs, n_sequences = torch.stack([rows.sum(), rows.any(1).sum()]).tolist()
        return int(n_inputs), int(n_sequences)

    @property
    def n_inputs(self) -> int:
        return self._counts[0]

    @property
    def n_sequences(self) -> int:
        """Rows with at least one counted input (for (B, C) logits: the counted rows)."""
        return self._counts[1]


def base_model(model: nn.Module) -> nn.Module:
    """The model behind a PEFT wrapper (its ``get_base_model()``), else ``model`` itself."""
    get_base: Any = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def hf_model_of(model: nn.Module) -> tuple[nn.Module, bool] | None:
    """The Hugging Face model whose config describes ``model``'s outputs, and whether it is
    ``model`` itself (or the base behind a PEFT wrapper) rather than a submodule of a wrapper such
    as a ``LightningModule``; ``None`` when no module has a ``transformers`` config."""
    cached = _HF_MODEL_OF.get(model, _UNSEEN)
    if cached is None:
        return None
    if cached is not _UNSEEN:
        ref, direct = cached
        found_module = ref()
        if found_module is not None:
            return found_module, direct
    base = base_model(model)
    found: tuple[nn.Module, bool] | None = None
    if _hf_config(base) is not None:
        found = (base, True)
    else:
        found = next(((m, False) for m in model.modules() if _hf_config(m) is not None), None)
    # asked at every batch: one walk of the modules per model; a weak reference, as the found
    # module is often the key itself and would otherwise keep the model alive
    _HF_MODEL_OF[model] = None if found is None else (weakref.ref(found[0]), found[1])
    return found


_UNSEEN: Any = object()
_HF_MODEL_OF: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref[nn.Module], bool] | None] = (
    weakref.WeakKeyDictionary()
)


def _hf_config(module: nn.Module) -> Any:
    config = getattr(module, "config", None)
    return config if hasattr(config, "is_encoder_decoder") else None


def encoder_decoder(model: nn.Module) -> tuple[nn.Module, bool] | None:
    """``hf_model_of(model)`` when that model is an encoder-decoder (T5, BART, ...), else None."""
    found = hf_model_of(model)
    return found if found is not None and _hf_config(found[0]).is_encoder_decoder else None


#: ``config.problem_type`` values whose likelihood is not a softmax over the logits
NOT_SOFTMAX = {
    "multi_label_classification": "independent sigmoids (binary cross-entropy per label)",
    "regression": "a Gaussian (mean squared error)",
}


def check_likelihood(model: nn.Module, output_fn: OutputFn | None = None) -> None:
    """Refuse a Hugging Face model whose ``config.problem_type`` says its outputs are not the
    logits of one softmax: every estimator here is the Fisher of a categorical distribution, and
    such a model trains another likelihood. An ``output_fn`` is the caller's mapping and passes."""
    found = hf_model_of(model) if output_fn is None else None
    if found is None:
        return
    problem = getattr(_hf_config(found[0]), "problem_type", None)
    if problem in NOT_SOFTMAX:
        raise FisherInputError(
            f"{type(found[0]).__name__} has problem_type={problem!r}: its outputs are "
            f"{NOT_SOFTMAX[problem]}, not the logits of one softmax, so a categorical Fisher "
            "would be the Fisher of a model it is not. For independent binary labels, pass "
            "output_fn=lambda m, b: (lambda z: torch.stack([torch.zeros_like(z), z], -1))"
            "(m(**{k: v for k, v in b.items() if k != 'labels'}).logits): logits (B, C, 2), each "
            "(example, label) pair one two-class input (the sum of the labels' Bernoulli "
            "Fishers, divided by B x C instead of B)."
        )


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on ``batch`` the way most training loops do.

    A mapping is passed as keyword arguments (without its label keys), a tuple or list passes its
    first item, anything else is passed as it is. An encoder-decoder model's decoder inputs come
    from the batch's ``labels`` when the batch has none, as its own forward derives them in
    training.
    """
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        found = encoder_decoder(model)
        if found is not None and not any(k in batch for k in DECODER_INPUT_KEYS):
            seq2seq, direct = found
            labels = batch.get("labels")
            if labels is None:
                raise FisherInputError(
                    f"{type(seq2seq).__name__} is an encoder-decoder model and the batch gives "
                    "it no decoder inputs: add `labels` (the target token ids, -100 where "
                    "ignored; the decoder inputs are derived from them as in training) or "
                    "`decoder_input_ids`."
                )
            prepare = getattr(seq2seq, "prepare_decoder_input_ids_from_labels", None)
            if direct and callable(prepare):
                kwargs["decoder_input_ids"] = prepare(labels=labels)
            else:  # a wrapper's forward hands them on; the model derives its decoder inputs
                kwargs["labels"] = labels
        return model(**kwargs)
    if isinstance(batch, (tuple, list)) and not isinstance(batch, PackedSequence):
        needed = _positional_arguments(model.forward)
        if needed > 1:
            raise FisherInputError(
                f"{type(model).__name__}.forward takes {needed} positional arguments, but a "
                f"{type(batch).__name__} batch passes its first item alone (the convention of "
                "(inputs, labels) batches). Yield mappings of keyword arguments (with a `labels` "
                "entry), or batches ((x1, x2, ...), labels) with "
                "`output_fn=lambda m, b: m(*b[0])`."
            )
        return model(batch[0])
    return model(batch)


def _positional_arguments(forward: Callable[..., Any]) -> int:
    """How many positional arguments without a default ``forward`` requires (0 when it takes
    ``*args`` or its signature cannot be read)."""
    return _required_positional(getattr(forward, "__func__", forward), hasattr(forward, "__self__"))


@functools.cache
def _required_positional(fn: Callable[..., Any], bound: bool) -> int:
    try:
        params = list(inspect.signature(fn).parameters.values())[int(bound) :]
    except (TypeError, ValueError):
        return 0
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 0
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is inspect.Parameter.empty for p in params)


def extract_logits(output: Any) -> Tensor:
    """Return the logits held by a model output (tensor, tuple, ``ModelOutput`` or mapping)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
        if isinstance(logits, Tensor) and logits.ndim < 2:
            raise FisherInputError(
                f"The model returned a {type(output).__name__} whose first item, taken as the "
                f"logits, has shape {tuple(logits.shape)} (a loss or a score, not logits of shape "
                "(B, C)). Return the logits first, or pass `output_fn=lambda module, batch: ...` "
                "returning them (e.g. `lambda m, b: m(b[0])[1]`)."
            )
    if not isinstance(logits, Tensor):
        raise FisherInputError(
            f"Could not find logits in a model output of type {type(output).__name__}. The model "
            "must return a tensor of logits, a tuple whose first item is the logits, or an object "
            "with a `.logits` attribute; otherwise pass `output_fn=lambda module, batch: ...` "
            "returning the logits."
        )
    return logits


def batch_labels(batch: Any) -> Tensor | None:
    """Labels of a batch: ``batch[1]`` of a tuple, or the ``labels``/``label`` entry of a mapping."""
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if key in batch and isinstance(batch[key], Tensor):
                return batch[key]
        return None
    if isinstance(batch, PackedSequence):
        return None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    return None


def batch_size_of(batch: Any) -> int:
    """Number of inputs of a batch: the first dimension of its labels when it has any (they index
    inputs whatever the layout of the inputs: sequence-first tensors, flat ids with offsets),
    else of its first tensor (the number of sequences of a ``PackedSequence``)."""
    if isinstance(batch, PackedSequence):
        return int(batch.batch_sizes[0]) if batch.batch_sizes.numel() else 0
    if isinstance(batch, Tensor):
        if batch.ndim == 0:
            raise FisherInputError(
                "The batch is a 0-dimensional tensor; it has no batch dimension."
            )
        return batch.shape[0]
    if isinstance(batch, Mapping):
        items: Sequence[Any] = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        items = batch
    else:
        raise FisherInputError(f"Cannot find the batch size of a batch of type {type(batch)}.")
    labels = batch_labels(batch)
    if labels is not None and labels.ndim > 0:
        return labels.shape[0]
    for item in items:
        if isinstance(item, PackedSequence) or (isinstance(item, Tensor) and item.ndim > 0):
            return batch_size_of(item)
    raise FisherInputError("The batch holds no tensor with a batch dimension.")


def rebuilt(batch: tuple[Any, ...] | list[Any], items: list[Any]) -> Any:
    """A tuple or list of the type of ``batch`` holding ``items`` (named tuples take fields)."""
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*items)
    return type(batch)(items)


def slice_batch(batch: Any, n: int) -> Any:
    """The first ``n`` inputs of a batch (tensor, ``PackedSequence``, tuple/list or mapping).

    Each tensor is cut at its first dimension of the batch's size (``batch_size_of``) unless its
    leading dimension is 1 (shared by the batch: kept whole, as 0-dimensional tensors are); one
    without such a dimension is refused: its first ``n`` entries need not be the first ``n``
    inputs' (flat ids with offsets, as ``nn.EmbeddingBag`` takes them)."""
    return _slice(batch, n, batch_size_of(batch))


def _slice(batch: Any, n: int, size: int) -> Any:
    if isinstance(batch, PackedSequence):
        padded, lengths = pad_packed_sequence(batch, batch_first=True)  # in the given order
        return pack_padded_sequence(padded[:n], lengths[:n], batch_first=True, enforce_sorted=False)
    if isinstance(batch, Tensor):
        if batch.ndim == 0:
            return batch
        if batch.shape[0] == size:
            return batch[:n]
        if batch.shape[0] == 1:  # shared by the batch (position ids of shape (1, T))
            return batch
        if size in batch.shape:  # sequence-first (T, B, ...)
            return batch.narrow(list(batch.shape).index(size), 0, min(n, size))
        raise FisherInputError(
            f"Cannot take the first {n} inputs of a batch of {size} (the batch size, from its "
            f"labels or first tensor): it holds a tensor of shape {tuple(batch.shape)} with no "
            f"dimension of size {size}, so its first dimension does not index inputs (flat ids "
            "with offsets, say). Give max_samples a DataLoader over a map-style data set (it "
            "then draws whole inputs), a multiple of the batch size, or use max_batches."
        )
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, n, size) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        return rebuilt(batch, [_slice(v, n, size) for v in batch])
    return batch


def move_batch(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch to ``device``. Outside inference mode, a tensor created in it
    (a batch of a validation loop) is copied to a normal one: autograd cannot save it."""
    if isinstance(batch, Tensor):
        if batch.is_inference() and not torch.is_inference_mode_enabled():
            batch = batch.clone()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, PackedSequence):
        # its ``to`` takes Tensor.to's arguments, which its annotation does not say
        return cast(Any, batch).to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_batch(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        return rebuilt(batch, [move_batch(v, device) for v in batch])
    return batch


def _resolve_classes(
    classes: ClassSelector | None, batch: Any, device: torch.device
) -> Tensor | None:
    if classes is None:
        return None
    chosen = classes(batch) if callable(classes) else classes
    return torch.as_tensor(chosen, dtype=torch.long, device=device)


def check_logits(logits: Tensor) -> None:
    """Raise a clear error for outputs that cannot be logits or that hold NaN/Inf."""
    _check_logits_shape(logits)
    facts = _logit_range(logits)
    low, high = facts.tolist() if facts is not None else (0.0, 0.0)
    _check_logit_range(logits, low, high, stacklevel=4)


def _check_logits_shape(logits: Tensor) -> None:
    """The dtype and shape checks of :func:`check_logits` (no device read)."""
    if not logits.is_floating_point():
        raise FisherInputError(
            f"The model output has dtype {logits.dtype}; logits must be floating point. Pass "
            "`output_fn` if the logits are elsewhere in the output."
        )
    if logits.ndim < 2:
        raise FisherInputError(
            f"Logits must have shape (B, C) or (B, T, C); got shape {tuple(logits.shape)}."
        )


def _logit_range(logits: Tensor) -> Tensor | None:
    """The smallest and largest logit, (2,) float64 on the logits' device (both NaN when any is
    NaN; a widening cast, so exact), None for empty logits: the three common facts of
    :func:`_check_logit_range` from two ops, read with whatever else the caller reads."""
    z = logits.detach()
    return torch.stack(torch.aminmax(z)).double() if z.numel() else None


def _check_logit_range(logits: Tensor, low: float, high: float, stacklevel: int = 3) -> None:
    """The value checks of :func:`check_logits` from the smallest and largest logit (0, 0 for
    empty logits): NaN/Inf, probabilities instead of logits; the rare probability check reads
    the device itself."""
    z = logits.detach()
    finite = math.isfinite(low) and math.isfinite(high)
    nonneg, at_most_one = low >= 0, high <= 1
    if not finite:
        bad = int((~torch.isfinite(z)).sum().item())
        raise FisherInputError(
            f"The model produced {bad} NaN/Inf logits; the Fisher would be meaningless. Check the "
            "inputs and weights for NaN/Inf (and, for fp16 models, overflow)."
        )
    C = logits.shape[-1]
    if C > 1 and z.numel() > C and nonneg:  # at least two rows
        flat = z.reshape(-1, C)
        if torch.allclose(
            flat.double().sum(-1),
            torch.ones(flat.shape[0], dtype=torch.float64, device=flat.device),
            atol=1e-4,
        ):
            raise FisherInputError(
                "The model output looks like probabilities (non-negative rows summing to 1), not "
                "logits. Return the pre-softmax logits (or log-probabilities) instead."
            )
        if at_most_one:
            import warnings

            warnings.warn(
                "Every model output of this batch lies in [0, 1]: if these are probabilities "
                "(sigmoid or softmax outputs), the Fisher treats them as logits and is wrong. "
                "Return the pre-softmax logits.",
                stacklevel=stacklevel,
            )


def _classes_last(logits: Tensor, labels: Tensor | None, output_fn: OutputFn | None) -> Tensor:
    """Logits with the classes on their last dimension.

    Dense predictions (segmentation: logits (B, C, H, W), labels (B, H, W)) put the classes on
    dimension 1, as PyTorch's losses take them; they are moved last when the labels have the shape
    of the logits without dimension 1 and not that without the last one (both: classes last).
    Logits of 4 or more dimensions whose labels do not tell are refused, unless an ``output_fn``
    gave them (it returns classes last)."""
    if logits.ndim < 3:
        return logits
    shape = tuple(logits.shape)
    if labels is not None:
        got = tuple(labels.shape)
        if got != shape[:-1] and got == shape[:1] + shape[2:]:
            return logits.movedim(1, -1)
        if got == shape[:-1]:
            return logits
    if logits.ndim >= 4 and output_fn is None:
        raise FisherInputError(
            f"The model returned logits of shape {shape} and the batch has no labels that say "
            "which dimension holds the classes: per-pixel logits put them on dimension 1 "
            "((B, C, H, W), as PyTorch's losses take them), this library on the last one. Add "
            f"labels of shape {shape[:1] + shape[2:]} (classes on dimension 1) or "
            f"{shape[:-1]} (classes last), or pass `output_fn=lambda m, b: m(b).movedim(1, -1)` "
            "(an output_fn returns the classes last)."
        )
    return logits


def model_outputs(
    model: nn.Module,
    batch: Any,
    output_fn: OutputFn | None = None,
    classes: ClassSelector | None = None,
    shift_labels: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> ModelOutputs:
    """Run the model on a batch and return its logits, the mask of counted inputs and labels.

    Args:
        model: the network.
        batch: one batch as the dataloader yields it (already on the model's device).
        output_fn: ``output_fn(model, batch) -> output``; the default calls the model on the batch.
        classes: restrict the classes that count (the active head of a task-incremental model):
            a sequence of class indices, or a callable of the batch returning one. Labels are
            re-indexed into the restricted set.
        shift_labels: causal language models: logits at position ``t`` predict the token at
            ``t + 1`` (Hugging Face's convention with ``labels = input_ids``).
        ignore_index: the label value of inputs that do not count.
    """
    check_likelihood(model, output_fn)
    raw = output_fn(model, batch) if output_fn is not None else call_model(model, batch)
    logits = extract_logits(raw)
    # Every fact of the batch that the host needs (the logits' range, the label and input counts)
    # is read from the device at once, at the end: each read waits for the device's queue, so a
    # GPU pass would otherwise stop once per fact. Where a check raises before that read, the
    # logits' own check is read first, so the errors come in the order of the checks.
    _check_logits_shape(logits)
    logit_range = _logit_range(logits)
    checked = False

    def check_range(values: list[float] | None = None) -> None:
        nonlocal checked
        if checked:
            return
        checked = True
        if values is None:
            values = logit_range.tolist() if logit_range is not None else [0.0, 0.0]
        _check_logit_range(logits, values[0], values[1], stacklevel=4)

    labels = batch_labels(batch)
    logits = _classes_last(logits, labels, output_fn)
    label_error = None
    if labels is not None and tuple(labels.shape) != tuple(logits.shape[:-1]):
        if tuple(labels.shape) == tuple(logits.shape):
            label_error = (
                f"The labels have the shape of the logits {tuple(logits.shape)} (one-hot or soft "
                "labels); expected class indices of shape "
                f"{tuple(logits.shape[:-1])} (e.g. `labels.argmax(-1)` for one-hot rows)."
            )
        labels = None  # e.g. regression targets or a label per sequence with token logits
    if labels is not None and (labels.is_floating_point() or labels.is_complex()):
        finite = torch.isfinite(labels)
        if not bool(finite.all()) or bool((labels != labels.round()).any()):
            bad = labels[~finite | (labels != labels.round())][:3].tolist()
            label_error = (
                f"The labels hold non-integer values (e.g. {bad}); expected integer class "
                f"indices in [0, C) (or {ignore_index} for inputs that do not count)."
            )
            labels = None
    # an encoder-decoder model's logits are its decoder's: the encoder's mask is not theirs
    mask_key = "attention_mask" if encoder_decoder(model) is None else "decoder_attention_mask"
    attn = batch.get(mask_key) if isinstance(batch, Mapping) else None
    if logits.ndim >= 3 and isinstance(attn, Tensor) and attn.shape == logits.shape[:-1]:
        mask = attn.to(torch.bool)
        if mask is attn:  # a bool mask of the caller's: not to be changed in place below
            mask = mask.clone()
    else:
        mask = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if shift_labels:
        if logits.ndim < 3:
            check_range()
            raise FisherInputError("`shift_labels=True` needs logits of shape (B, T, C).")
        logits = logits[:, :-1]
        mask = mask[:, 1:]
        labels = labels[:, 1:] if labels is not None else None
    negative: tuple[Tensor, Tensor] | None = None
    if labels is not None:
        labels = labels.to(logits.device).long()
        mask &= labels != ignore_index
        negative = (labels, mask & (labels < 0))
    active = _resolve_classes(classes, batch, logits.device)
    if active is not None:
        check_range()
        if labels is not None:
            top = max(int(active.max()), int(labels.max())) if labels.numel() else int(active.max())
            remap = torch.full((top + 1,), IGNORE_INDEX, dtype=torch.long, device=labels.device)
            remap[active] = torch.arange(active.numel(), device=labels.device)
            valid = labels >= 0
            new = torch.full_like(labels, IGNORE_INDEX)
            new[valid] = remap[labels[valid]]
            outside = valid & mask & (new == IGNORE_INDEX)
            if outside.any():
                raise FisherInputError(
                    f"{int(outside.sum())} labels lie outside the active classes {active.tolist()}; "
                    "the Fisher of a task must use that task's data only."
                )
            labels = new
        logits = logits.index_select(-1, active)
    if logits.shape[-1] < 2:
        check_range()
        # softmax of one logit is p = 1 whatever the weights: every Fisher would be exactly zero.
        raise FisherInputError(
            "The logits have a single class, so p = softmax(z) = 1 and the Fisher is exactly "
            "zero (EWC would protect nothing). For a binary classifier with one logit z (sigmoid), "
            "pass `output_fn=lambda m, b: (lambda z: torch.cat([torch.zeros_like(z), z], -1))"
            "(m(b[0]))`, whose softmax is the sigmoid; a task head needs at least 2 classes."
        )
    rows = mask.reshape(mask.shape[0], -1)
    facts = [rows.sum(), rows.any(1).sum()]
    if negative is not None and labels is not None:
        facts += [negative[1].sum(), ((labels >= logits.shape[-1]) & mask).sum()]
    read = torch.stack(facts).double()
    if not checked and logit_range is not None:
        read = torch.cat([logit_range, read])
    values = read.tolist()
    if not checked:
        check_range(values[:2] if logit_range is not None else None)
        values = values[2:] if logit_range is not None else values
    if negative is not None and values[2]:
        found = negative[0][negative[1]]
        label_error = (
            f"Found negative labels {sorted(set(found[:5].tolist()))} other than the "
            f"ignore index {ignore_index}; expected class indices in [0, C) or "
            f"{ignore_index} (pass `ignore_index=` if the data marks ignored inputs differently)."
        )
    too_big = int(values[3]) if negative is not None and labels is not None else None
    out = ModelOutputs(logits, mask, labels, label_error, too_big)
    out.__dict__["_counts"] = (int(values[0]), int(values[1]))  # the cached counts, read above
    return out
