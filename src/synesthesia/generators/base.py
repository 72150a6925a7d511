"""The one interface every stage-one generator implements, and their registry.

A generator is a frozen model that maps a batch of source samples to latents of
one modality. ``mode`` says how: ``encode`` (the paired signal exists and is
encoded by a VAE/codec/tokenizer) or ``generate`` (the latent is synthesised from
RGB, e.g. by image-conditioned latent diffusion). It never decodes on the DLA
path; ``decode()`` exists only for the decode-encode ablation.

Work is split in two so stage one can overlap I/O and compute:
``preprocess(sample)`` runs in DataLoader workers (bytes → arrays, numpy only),
``forward(batch, keys)`` runs batched in the main process on the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from synesthesia.registry import Registry

GENERATORS: Registry[type[Generator]] = Registry("generator")

LATENT_KINDS = ("spatial", "tokens", "codes")
STORED_AS = ("mode", "moments", "sample")


@dataclass(frozen=True)
class LatentSpec:
    """What a generator writes per input.

    ``shape`` excludes the batch dimension and the leading S (samples per input)
    dimension, which is present only when ``samples_per_input`` > 1.
    """

    kind: str  # spatial (C×h×w) | tokens (T×C) | codes (K×T integers)
    shape: tuple[int, ...]
    dtype: str = "float16"
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    scaling_applied: bool = True
    stored_as: str = "mode"  # mode | moments | sample
    seed: int | None = None
    samples_per_input: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in LATENT_KINDS:
            raise ValueError(f"latent kind {self.kind!r} not in {LATENT_KINDS}")
        if self.stored_as not in STORED_AS:
            raise ValueError(f"stored_as {self.stored_as!r} not in {STORED_AS}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


class Generator(nn.Module):
    """Base class: subclasses set ``modality``/``mode`` and implement the three methods."""

    name: str = "generator"
    modality: str = ""
    mode: str = "encode"  # encode | generate

    def latent_spec(self) -> LatentSpec:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """Class, weights source and sha256, and constructor config: what the cache key hashes."""
        raise NotImplementedError

    def preprocess(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        """Raw source sample (``field -> bytes``) → named numpy arrays; runs in DataLoader workers.

        Raises ``synesthesia.shards.SchemaError`` for a bad sample (skipped and counted).
        """
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        """Collated preprocessed arrays → latents (B, [S,] *spec.shape); ``keys`` seed any sampling."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → raw signal (ablation only: never called on the DLA path)."""
        raise NotImplementedError(f"{self.name} has no decoder")


def key_seed(key: str, seed: int) -> int:
    """A per-sample seed from the sample key and the run seed (stable across processes)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
