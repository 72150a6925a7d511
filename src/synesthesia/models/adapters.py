"""Adapters: one privileged modality's input → a (B, T, D) token sequence for the teacher.

One adapter per latent kind (DESIGN.md "Models and methods"; PAPERS.md, DLA):

- ``spatial`` — a C×h×w VAE-style latent, cut into p×p patches (a patch
  embedding), each flattened patch through the continuous-token MLP;
- ``tokens`` — a T×C token latent, each token through the continuous-token MLP
  ``LayerNorm → Linear → GELU → Linear → Dropout(0.1)`` (the paper's adapter);
- ``codes`` — K×T integer codec codes: one embedding table per codebook, the K
  embeddings of a time step summed, then ``LayerNorm → Linear`` (the paper's);
- ``decoded`` — a raw 2-D signal (depth map in metres, log-mel spectrogram,
  range image; H×W or C×H×W) through a small stride-2 conv encoder. This is the
  decode-encode loop that DLA is measured against.

Every adapter maps ``(B, *shape)`` to ``(B, num_tokens, dim)``; ``num_tokens``
is known at construction, so the teacher can give each modality a learned
positional embedding before its resampler.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from synesthesia import UserError

KINDS = ("spatial", "tokens", "codes", "decoded")


class TokenMLP(nn.Module):
    """The continuous-token adapter: LayerNorm, Linear, GELU, Linear, Dropout."""

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, dim),
            nn.GELU(),
            nn.Linear(dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpatialAdapter(nn.Module):
    """C×h×w latent → (h/p)·(w/p) tokens: non-overlapping p×p patches, flattened, through :class:`TokenMLP`."""

    def __init__(self, shape: list[int], dim: int, patch_size: int = 1, dropout: float = 0.1):
        super().__init__()
        if len(shape) != 3:
            raise UserError(f"a spatial latent has shape C×h×w, got {list(shape)}")
        channels, height, width = shape
        if height % patch_size or width % patch_size:
            raise UserError(
                f"spatial latent {height}×{width} is not divisible by teacher.latent_patch_size={patch_size}"
            )
        self.shape = tuple(shape)
        self.patch_size = patch_size
        self.num_tokens = (height // patch_size) * (width // patch_size)
        self.unfold = nn.Unfold(kernel_size=patch_size, stride=patch_size)
        self.mlp = TokenMLP(channels * patch_size * patch_size, dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.unfold(x.float()).transpose(1, 2)  # (B, L, C·p·p)
        return self.mlp(patches)


class TokensAdapter(nn.Module):
    """T×C token latent → T tokens through :class:`TokenMLP` (the paper's continuous-token adapter)."""

    def __init__(self, shape: list[int], dim: int, dropout: float = 0.1):
        super().__init__()
        if len(shape) != 2:
            raise UserError(f"a tokens latent has shape T×C, got {list(shape)}")
        self.shape = tuple(shape)
        self.num_tokens = shape[0]
        self.mlp = TokenMLP(shape[1], dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.float())


class CodesAdapter(nn.Module):
    """K×T codes → T tokens: Σ_k Embedding_k(codes[k, t]), then LayerNorm and Linear (the paper's)."""

    def __init__(self, shape: list[int], dim: int, vocab: int):
        super().__init__()
        if len(shape) != 2:
            raise UserError(f"a codes latent has shape K×T (codebooks × steps), got {list(shape)}")
        if vocab is None or vocab < 1:
            raise UserError("a codes modality needs its codebook size as 'vocab'")
        self.shape = tuple(shape)
        self.vocab = int(vocab)
        self.num_tokens = shape[1]
        self.tables = nn.ModuleList(nn.Embedding(self.vocab, dim) for _ in range(shape[0]))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.long()
        summed = sum(table(codes[:, k]) for k, table in enumerate(self.tables))
        return self.proj(self.norm(summed))


class DecodedAdapter(nn.Module):
    """A raw 2-D signal (H×W or C×H×W) → tokens through a small conv encoder.

    The input is standardised by a non-affine BatchNorm (raw signals come in
    metres or decibels, far from unit scale), then stride-2 3×3 convolutions
    with GroupNorm and GELU halve the resolution until at most ``max_tokens``
    positions remain; a 1×1 convolution maps to ``dim``, and the positions are
    the tokens.
    """

    def __init__(self, shape: list[int], dim: int, max_tokens: int = 256, dropout: float = 0.1):
        super().__init__()
        if len(shape) not in (2, 3):
            raise UserError(f"a decoded signal has shape H×W or C×H×W, got {list(shape)}")
        self.shape = tuple(shape)
        channels, height, width = (1, *shape) if len(shape) == 2 else shape
        layers: list[nn.Module] = [nn.BatchNorm2d(channels, affine=False)]
        width_ch = 32
        in_ch = channels
        while height * width > max_tokens and min(height, width) > 1:
            layers += [
                nn.Conv2d(in_ch, width_ch, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(min(8, width_ch), width_ch),
                nn.GELU(),
            ]
            in_ch, width_ch = width_ch, min(width_ch * 2, max(dim, 32))
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        if height * width > max_tokens:
            raise UserError(f"decoded signal {list(shape)} cannot be reduced to {max_tokens} tokens")
        layers += [nn.Conv2d(in_ch, dim, kernel_size=1)]
        self.encoder = nn.Sequential(*layers)
        self.num_tokens = height * width
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if len(self.shape) == 2:
            x = x.unsqueeze(1)
        x = self.encoder(x).flatten(2).transpose(1, 2)  # (B, h·w, dim)
        return self.drop(self.norm(x))


def build_adapter(
    name: str, spec: dict, dim: int, *, patch_size: int, dropout: float, max_tokens: int
) -> nn.Module:
    """The adapter for modality ``name`` described by ``spec`` = {"kind", "shape", "vocab" (codes)}."""
    if not isinstance(spec, dict) or "kind" not in spec or "shape" not in spec:
        raise UserError(f"modality {name!r}: expected a mapping with 'kind' and 'shape', got {spec!r}")
    kind = spec["kind"]
    shape = [int(s) for s in spec["shape"]]
    if kind == "spatial":
        return SpatialAdapter(shape, dim, patch_size, dropout)
    if kind == "tokens":
        return TokensAdapter(shape, dim, dropout)
    if kind == "codes":
        return CodesAdapter(shape, dim, spec.get("vocab"))
    if kind == "decoded":
        return DecodedAdapter(shape, dim, max_tokens, dropout)
    raise UserError(f"modality {name!r}: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
