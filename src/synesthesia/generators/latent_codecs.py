"""Frozen image autoencoders behind one interface, for latent diffusion: images in [0, 1] ↔ latents.

:class:`LatentCodec` is the interface (``encode``, ``decode``, ``describe``,
and its ``latent_channels``, ``downscale``, ``scaling_factor`` and
``shift_factor``). Two kinds implement it: :class:`TAECodec`, the project's
pretrained TAEF2 (32 channels at 1/8 resolution, scaling factor 1), and
:class:`DiffusersVAECodec`, any diffusers autoencoder (AutoencoderKL,
AutoencoderTiny) as Stable Diffusion and Marigold use it::

    z = (mode(E(2·x − 1)) − shift) · scale,     x̂ = clamp((D(z / scale + shift) + 1) / 2, 0, 1)

:func:`load_diffusers_vae` builds the latter from a ``vae/`` folder, the class
named by its ``config.json``. Used by the ``latent-diffusion`` generator and by
``synesthesia bootstrap``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from synesthesia import UserError
from synesthesia.generators.diffusers_folder import _read_json


class LatentCodec(nn.Module):
    """A frozen image autoencoder behind one interface: images in [0, 1] ↔ (scaled) latents."""

    latent_channels: int
    downscale: int
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class TAECodec(LatentCodec):
    """The project's pretrained TAEF2: 3×H×W in [0, 1] → 32×H/8×W/8, scaling factor 1."""

    latent_channels = 32
    downscale = 8

    def __init__(self, weights: str | None = None):
        super().__init__()
        from synesthesia.generators.tae import load_taef2

        self.encoder, self.decoder = load_taef2(weights)
        self.requires_grad_(False).eval()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent).clamp(0, 1)

    def describe(self) -> dict[str, Any]:
        return {"vae": "tae"}


class DiffusersVAECodec(LatentCodec):
    """A diffusers autoencoder (AutoencoderKL, AutoencoderTiny): RGB in [-1, 1], as Stable Diffusion and Marigold.

    The latent is the posterior mode (``latent_dist.mode()``, or ``latents`` for
    AutoencoderTiny), shifted and scaled: (mode − shift) · scaling_factor.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        config = vae.config
        self.latent_channels = int(config.latent_channels)
        blocks = getattr(config, "block_out_channels", None) or getattr(
            config, "encoder_block_out_channels", ()
        )
        self.downscale = 2 ** (len(blocks) - 1)
        self.scaling_factor = float(getattr(config, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", 0.0) or 0.0)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(image * 2 - 1)
        latent = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
        return (latent - self.shift_factor) * self.scaling_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latent / self.scaling_factor + self.shift_factor).sample
        return ((image + 1) / 2).clamp(0, 1)

    def describe(self) -> dict[str, Any]:
        return {"vae": "vae", "vae_class": type(self.vae).__name__}


def load_diffusers_vae(folder: Path) -> DiffusersVAECodec:
    import diffusers

    config = _read_json(folder / "config.json")
    cls_name = config.get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.startswith("Autoencoder"):
        raise UserError(f"{folder}: {cls_name!r} is not a diffusers autoencoder")
    return DiffusersVAECodec(cls.from_pretrained(folder, use_safetensors=True))
