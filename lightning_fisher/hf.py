"""Hugging Face conveniences: causal-LM labels, adapter (LoRA) filters, transformer blocks, text batches.

Every estimator and callback already takes Hugging Face models as they are: a ``ModelOutput``'s
``.logits`` are the logits, dict batches are passed as keyword arguments (without ``labels``), and
token-level logits ``(B, T, C)`` count each position whose attention mask is 1 and whose label is
not -100 as one input. An encoder-decoder model (T5, BART) runs as it trains: its decoder inputs
come from the batch's ``labels`` and its ``decoder_attention_mask`` masks its (decoder) logits
(``lightning_fisher.outputs``). This module adds what is specific to language models and to
``transformers``:

* a causal LM predicts token t + 1 from position t, so its Fisher over next-token predictions is
  F = (1/N) sum_{b, t < T-1, mask[b, t+1]} J_{b,t}^T I(p_{b,t}) J_{b,t} with C = vocabulary size;
  ``lm_fisher_kwargs`` / ``with_lm_labels`` set that up (``shift_labels=True``, labels = input ids
  with -100 on padding; ``causal=True``: the per-position route runs each block of positions
  through its prefix only);
* ``adapter_filter``: a ``param_filter`` keeping only adapter (LoRA) parameters; without one only
  parameters with ``requires_grad=True`` count, so a PEFT model's frozen base is skipped anyway;
* ``block_of`` / ``block_values``: group parameters by transformer block (embeddings, layer i,
  pooler, head), the order of the per-layer figures of Sun (2026);
* ``text_batches``: tokenised, dynamically padded dict batches from a list of texts.

Nothing here imports ``transformers`` at module import time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .outputs import IGNORE_INDEX, base_model

#: Class-name endings of Hugging Face causal (next-token) language models.
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
#: Name fragments of adapter parameters: PEFT's LoRA (``lora_A``/``lora_B``/``lora_embedding_*``),
#: IA3 and prompt embeddings.
ADAPTER_PATTERNS = ("lora_", "ia3_", "prompt_encoder", "modules_to_save")

_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")
_HEAD = ("classifier", "score", "lm_head", "qa_outputs", "cls.", "head")
_EMBED = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal (next-token) language model.

    True for classes named ``*ForCausalLM`` / ``*LMHeadModel`` (also behind a PEFT wrapper, found
    through ``get_base_model``), and for models whose config says ``is_decoder`` without being an
    encoder-decoder.
    """
    base = base_model(model)
    if type(base).__name__.endswith(CAUSAL_LM_SUFFIXES):
        return True
    config = getattr(base, "config", None)
    return bool(getattr(config, "is_decoder", False)) and not getattr(
        config, "is_encoder_decoder", False
    )


def with_lm_labels(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a causal-LM batch with ``labels`` = ``input_ids``, -100 where the mask is 0.

    Hugging Face's convention (``DataCollatorForLanguageModeling(mlm=False)``): the model shifts
    internally, so labels are the input ids themselves. Existing ``labels`` are kept.
    """
    if "input_ids" not in batch:
        raise KeyError(
            "A causal-LM batch needs `input_ids` to derive labels from; got keys "
            f"{sorted(batch)}. Pass `labels` yourself (or `inputs_embeds` with `labels`)."
        )
    out = dict(batch)
    if "labels" in out:
        return out
    ids: Tensor = batch["input_ids"]
    mask = batch.get("attention_mask")
    out["labels"] = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    return out


def lm_fisher_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments for ``lf.estimate_fisher`` (and the callbacks) that fit ``model``.

    A causal LM gets ``shift_labels=True`` (logits at t predict token t + 1, each unmasked next
    token is one input, C = vocabulary size) and ``causal=True`` (the per-position route runs
    each block of positions through its prefix only); a classifier gets nothing.
    """
    return {"shift_labels": True, "causal": True} if is_causal_lm(model) else {}


def adapter_filter(patterns: Sequence[str] = ADAPTER_PATTERNS) -> Callable[[str], bool]:
    """A ``param_filter`` keeping parameters whose name contains one of ``patterns``.

    Only trainable parameters ever count, so a PEFT model whose base is frozen needs no filter;
    this one drops a trainable head or other non-adapter parameters as well.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not patterns:
        raise ValueError("adapter_filter needs at least one name pattern.")
    pats = tuple(patterns)
    return lambda name: any(p in name for p in pats)


def block_of(name: str) -> str:
    """The transformer block of a parameter: ``embeddings``, ``layer <i>``, ``head`` or the rest.

    Parameters under ``...layer.<i>.`` / ``...h.<i>.`` / ``...layers.<i>.`` / ``...block.<i>.`` are
    ``layer <i>``; embeddings (``embeddings``, ``wte``, ``wpe``, ``embed_tokens``) are
    ``embeddings``; classifiers and LM heads are ``head``; anything else (pooler, final norm) is
    named by the module after the model prefix, e.g. ``pooler`` or ``ln_f``.
    """
    m = _BLOCK.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    if any(e in name for e in _EMBED):
        return "embeddings"
    if any(name.startswith(h) or f".{h}" in name for h in _HEAD):
        return "head"
    parts = name.split(".")
    # Drop the backbone prefix (bert., transformer., model.) and the parameter's own name.
    parts = parts[1:-1] if len(parts) > 2 else parts[:-1] or parts
    return parts[0]


def block_order(blocks: Sequence[str]) -> list[str]:
    """Sort block names from input to output: embeddings, layer 0, 1, ..., others, head."""

    def key(b: str) -> tuple[int, int, str]:
        if b == "embeddings":
            return (0, 0, b)
        if b.startswith("layer "):
            return (1, int(b.split()[1]), b)
        if b == "head":
            return (3, 0, b)
        return (2, 0, b)

    return sorted(dict.fromkeys(blocks), key=key)


def block_values(fd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every block's diagonal entries as one flat float32 CPU vector, embeddings to head."""
    parts: dict[str, list[Tensor]] = {}
    for name, t in fd.items():
        parts.setdefault(block_of(name), []).append(t.detach().reshape(-1).float().cpu())
    return {b: torch.cat(parts[b]) for b in block_order(list(parts))}


def text_batches(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int = 64,
) -> list[dict[str, Tensor]]:
    """Tokenised dict batches (``input_ids``, ``attention_mask``, ..., ``labels``), each padded to
    its own longest sequence (at most ``max_length`` tokens), in the order of ``texts``."""
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}.")
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        batch = {k: v for k, v in enc.items() if isinstance(v, Tensor)}
        if labels is not None:
            batch["labels"] = torch.as_tensor(list(labels[i : i + batch_size]), dtype=torch.long)
        out.append(batch)
    return out


__all__ = [
    "ADAPTER_PATTERNS",
    "adapter_filter",
    "block_of",
    "block_order",
    "block_values",
    "is_causal_lm",
    "lm_fisher_kwargs",
    "text_batches",
    "with_lm_labels",
]
