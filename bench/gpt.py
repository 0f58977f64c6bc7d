"""A small GPT-style decoder for the end-to-end benchmark and the training examples.

Built here rather than downloaded so that the e2e suite and ``examples/`` run anywhere, offline,
from a seed. The structure is the one sparsity is applied to in practice: pre-norm blocks of causal
self-attention and a two-layer MLP whose ``nn.Linear`` layers (``blocks.{i}.mlp.fc`` and
``blocks.{i}.mlp.proj``) are what ``sparsekernels.sparsify_`` swaps for ``SparseLinear``::

    model = GPT(GPTConfig(vocab_size=256, d_model=512, n_layers=4, n_heads=8, max_seq_len=256))
    sparsify_(model, BlockSparse(32, 0.1), filter_fn=mlp_only)

Widths are multiples of 128 and the MLP ratio is 4, so every block size (16 to 128) and every
supported N:M pattern fits the MLP layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPT", "GPTConfig", "mlp_only"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # byte-level by default: no tokenizer to ship
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 128
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # [batch, seq, width] -> [batch, heads, seq, head_dim]
        q, k, v = (t.view(batch, seq, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token and position embeddings, ``n_layers`` pre-norm blocks, a final norm, a tied LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: Tensor, targets: Optional[Tensor] = None):
        """``tokens`` ``[batch, seq]`` -> logits ``[batch, seq, vocab]``; with ``targets``, also the
        mean cross-entropy loss (returns ``(logits, loss)``)."""
        seq = tokens.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"tokens.shape[1] must be <= max_seq_len={self.config.max_seq_len}, got {seq}")
        positions = torch.arange(seq, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.norm(x) @ self.token_embedding.weight.T  # tied head: no extra Linear to sparsify
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, tokens: Tensor, new_tokens: int) -> Tensor:
        """Greedy decoding of ``new_tokens`` tokens (no KV cache: the cost is in the linears either way)."""
        for _ in range(new_tokens):
            context = tokens[:, -self.config.max_seq_len :]
            next_token = self(context)[:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
        return tokens


def mlp_only(module: nn.Module, fqn: str) -> bool:
    """``filter_fn`` for ``sparsify_`` that picks the MLP linears (``...mlp.fc``, ``...mlp.proj``)."""
    return isinstance(module, nn.Linear) and ".mlp." in f".{fqn}"
