"""A Perceiver-style resampler: any number of tokens → a fixed budget of K tokens.

DLA (PAPERS.md): "learned queries cross-attending to the tokens, feed-forward
×2", to 100 tokens per modality. Here: LayerNorm on the input tokens, then
timm's :class:`~timm.layers.AttentionPoolLatent` with ``latent_len=K`` (K learned
queries, multi-head cross-attention through fused SDPA, a LayerNorm and a
feed-forward of hidden width ``mlp_ratio``·D, default 2 — our reading of "×2";
the exact meaning is open), optionally followed by ``depth`` timm transformer
blocks over the K latents (Perceiver's latent self-attention; 0 by default).
"""

from __future__ import annotations

import torch
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import Block
from torch import nn


class Resampler(nn.Module):
    """(B, N, D) → (B, num_queries, D)."""

    def __init__(self, dim: int, num_queries: int, num_heads: int, mlp_ratio: float = 2.0, depth: int = 0):
        super().__init__()
        self.num_queries = num_queries
        self.norm_in = nn.LayerNorm(dim)
        self.cross = AttentionPoolLatent(
            dim,
            out_features=dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            latent_len=num_queries,
            pool_type="",
            norm_layer=nn.LayerNorm,
        )
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)]
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.cross(self.norm_in(tokens)))
