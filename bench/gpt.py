"""A small GPT-style decoder for the end-to-end benchmark and the training examples.

Built here rather than downloaded so that the e2e suite and ``examples/`` run anywhere, offline,
from a seed. The structure is the one sparsity is applied to in practice: pre-norm blocks of causal
self-attention and a two-layer MLP whose ``nn.Linear`` layers (``blocks.{i}.mlp.fc`` and
``blocks.{i}.mlp.proj``) are what ``sparsekernels.sparsify_`` swaps for ``SparseLinear``::

    model = GPT(GPTConfig(vocab_size=256, d_model=512, n_layers=4, n_heads=8, max_seq_len=256))
    sparsify_(model, BlockSparse(32, 0.1), filter_fn=mlp_only)

Widths are multiples of 128 and the MLP ratio is 4, so every block size (16 to 128) and every
supported N:M pattern fits the MLP layers.

Decoding uses a KV cache (:class:`KVCache`): :meth:`GPT.prefill` runs the prompt once and keeps
every layer's keys and values, then each :meth:`GPT.decode_step` feeds one token per sequence, so
the linears see ``batch`` rows per step: the small-M regime that decode kernels are built for.
The training forward never touches the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPT", "GPTConfig", "KVCache", "mlp_only"]


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

    def forward(self, x: Tensor, cache: Optional[tuple[Tensor, Tensor]] = None, start: int = 0) -> Tensor:
        """Causal attention over ``x``; with ``cache`` (this layer's key and value buffers), ``x`` holds
        positions ``start..start+seq-1``: their keys and values are stored there and the queries
        attend to every cached position up to their own."""
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # [batch, seq, width] -> [batch, heads, seq, head_dim]
        q, k, v = (t.view(batch, seq, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        if cache is None or start == 0:
            mask, causal = None, True
        elif seq == 1:  # one new token sees every cached position
            mask, causal = None, False
        else:
            # SDPA's is_causal aligns the query and key ranges at their start, which is wrong once
            # the keys run ahead of the queries: query i (position start + i) sees keys 0..start + i.
            mask = torch.ones(seq, start + seq, dtype=torch.bool, device=x.device).tril(diagonal=start)
            causal = False
        if cache is not None:
            keys, values = cache
            keys[:, :, start : start + seq] = k
            values[:, :, start : start + seq] = v
            k, v = keys[:, :, : start + seq], values[:, :, : start + seq]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
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

    def forward(self, x: Tensor, cache: Optional[tuple[Tensor, Tensor]] = None, start: int = 0) -> Tensor:
        x = x + self.attn(self.norm1(x), cache, start)
        return x + self.mlp(self.norm2(x))


class KVCache:
    """Every layer's attention keys and values for ``batch`` sequences, preallocated for
    ``max_seq_len`` positions; ``length`` positions are filled."""

    def __init__(self, config: GPTConfig, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        head_dim = config.d_model // config.n_heads
        # [layer, key or value, batch, heads, position, head_dim]
        self.buffers = torch.empty(config.n_layers, 2, batch, config.n_heads, config.max_seq_len, head_dim,
                                   device=device, dtype=dtype)
        self.length = 0

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        return self.buffers[index, 0], self.buffers[index, 1]


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
    def prefill(self, tokens: Tensor) -> tuple[Tensor, KVCache]:
        """Run the prompt ``tokens`` ``[batch, seq]`` once: the logits of its last position
        ``[batch, vocab]`` and a cache holding its keys and values."""
        cache = KVCache(self.config, tokens.shape[0], tokens.device, self.token_embedding.weight.dtype)
        return self._cached_logits(tokens, cache), cache

    @torch.no_grad()
    def decode_step(self, token: Tensor, cache: KVCache) -> Tensor:
        """Feed one token per sequence (``[batch, 1]``) after the cached ones: its logits ``[batch, vocab]``."""
        return self._cached_logits(token, cache)

    def _cached_logits(self, tokens: Tensor, cache: KVCache) -> Tensor:
        start, seq = cache.length, tokens.shape[1]
        if start + seq > self.config.max_seq_len:
            raise ValueError(f"the cache holds max_seq_len={self.config.max_seq_len} positions: {start} cached "
                             f"+ {seq} new do not fit")
        positions = torch.arange(start, start + seq, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for index, block in enumerate(self.blocks):
            x = block(x, cache.layer(index), start)
        cache.length = start + seq
        return self.norm(x[:, -1]) @ self.token_embedding.weight.T

    @torch.no_grad()
    def generate(self, tokens: Tensor, new_tokens: int, use_cache: bool = True) -> Tensor:
        """Greedy decoding of ``new_tokens`` tokens. With ``use_cache`` the prompt is prefilled once
        and each further token is one decode step; once the sequence fills ``max_seq_len``, or
        without the cache, every token runs the model over the last ``max_seq_len`` tokens (a
        sliding window renumbers the positions, which invalidates cached keys)."""
        cache = None
        for _ in range(new_tokens):
            if use_cache and cache is None and tokens.shape[1] <= self.config.max_seq_len:
                logits, cache = self.prefill(tokens)
            elif cache is not None and cache.length < self.config.max_seq_len:
                logits = self.decode_step(tokens[:, -1:], cache)
            else:
                logits = self(tokens[:, -self.config.max_seq_len :])[:, -1]
            tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
        return tokens


def mlp_only(module: nn.Module, fqn: str) -> bool:
    """``filter_fn`` for ``sparsify_`` that picks the MLP linears (``...mlp.fc``, ``...mlp.proj``)."""
    return isinstance(module, nn.Linear) and ".mlp." in f".{fqn}"
