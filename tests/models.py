"""Small models shared by the tests: an MLP, a CNN with BatchNorm, a tiny transformer, a tiny
random-weight GPT-2 from ``transformers``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def mlp(d_in: int = 6, hidden: int = 8, n_classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, n_classes),
    )


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm2d + Conv1d-free head; BatchNorm runs in eval mode during Fisher passes."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 2, stride=2)
        self.head = nn.Linear(2 * 2 * 2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.conv2(h)).flatten(1))


class TinyTransformer(nn.Module):
    """Embedding, multi-head attention, LayerNorm; logits per sequence or per token."""

    def __init__(
        self,
        vocab: int = 11,
        dim: int = 8,
        n_classes: int = 3,
        seq_len: int = 5,
        token_level: bool = False,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ff = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, n_classes)
        self.token_level = token_level

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.norm(self.tok(input_ids) + self.pos(pos))
        pad = None if attention_mask is None else attention_mask == 0
        a, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        h = h + torch.tanh(self.ff(a))
        if self.token_level:
            return self.head(h)
        return self.head(h.mean(1))


def seeded(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.to(dtype)


def random_gpt2(
    vocab: int,
    *,
    positions: int = 16,
    width: int = 8,
    layers: int = 1,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    **config: Any,
) -> nn.Module:
    """A random-weight ``transformers`` GPT-2 LM head model with 2 heads (eager attention unless
    ``attn_implementation`` is in ``config``), initialised under ``torch.manual_seed(seed)``, in
    ``dtype`` and eval mode. The caller skips the test when ``transformers`` is missing."""
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        n_positions=positions,
        bos_token_id=0,
        eos_token_id=0,
        **{"attn_implementation": "eager", **config},
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


#: ``transformers`` decoder families of ``random_decoder``: (config class, model class)
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
}


def random_decoder(
    family: str,
    vocab: int,
    *,
    width: int = 16,
    layers: int = 1,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    **config: Any,
) -> nn.Module:
    """A random-weight ``transformers`` decoder LM of a family in ``DECODERS`` (rotary positions,
    RMSNorm, gated MLP, grouped-query attention: 4 heads sharing 2 key/value heads; eager
    attention unless ``attn_implementation`` is in ``config``), in ``dtype`` and eval mode. Their
    RMSNorms compute in float32 whatever the model's dtype (Gemma's also scales by
    ``1 + weight.float()``, and ties its head to the embedding). The caller skips the test when
    ``transformers`` is missing."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in DECODERS[family])
    cfg = config_cls(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=width // 4,
        max_position_embeddings=64,
        **{"attn_implementation": "eager", **config},
    )
    torch.manual_seed(seed)
    return model_cls(cfg).to(dtype).eval()
