"""Frozen generative models behind one interface (encode | generate), found by name.

Importing this package registers the built-in generators in ``GENERATORS``:
``tae`` (TAEF2), ``diffusers-vae``, ``codes`` (EnCodec), ``tokens`` (LiDAR
point-group tokenizer) and ``latent-diffusion``. Build one from a config with
:func:`create_generator`.
"""

from __future__ import annotations

from typing import Any

from synesthesia.generators import codec, diffusers_vae, latent_diffusion, tae, tokens  # noqa: F401  (registers)
from synesthesia.generators.base import (
    GENERATORS,
    Generator,
    LatentSpec,
    autocast_context,
    key_generators,
    key_seed,
)


def create_generator(cfg: Any) -> Generator:
    """``GENERATORS.get(cfg.name)(modality, weights, samples_per_input, seed, **options)``.

    ``cfg`` is a ``config.GeneratorConfig`` (or anything with those attributes).
    """
    cls = GENERATORS.get(cfg.name)
    return cls(
        modality=cfg.modality,
        weights=cfg.weights,
        samples_per_input=cfg.samples_per_input,
        seed=cfg.seed,
        **dict(cfg.options),
    )


__all__ = [
    "GENERATORS",
    "Generator",
    "LatentSpec",
    "autocast_context",
    "create_generator",
    "key_generators",
    "key_seed",
]
