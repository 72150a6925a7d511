"""TAEF2: the tiny distilled autoencoder of the FLUX.2 latent space, and the ``tae`` generator.

Architecture (Ollin Boer Bohan's TAESD family, MIT; layout from
``../shared/weights/taef2/README.md``): plain ``nn.Sequential`` stacks of 3×3
convolutions (width 64) and residual blocks ``ReLU(convs(x) + x)``; the three
"mid" blocks at the lowest resolution first add a pooled branch
``x + (1×1 conv → GroupNorm(4) → ReLU → 1×1 conv)(x)``. The encoder maps an
image 3×H×W in **[0, 1]** to a latent 32×H/8×W/8 (three stride-2 convs); the
decoder soft-clamps the latent (``3·tanh(z/3)``) and upsamples back (nearest ×2,
three times). Scaling factor 1. The modules here are written to match the
released state dicts key for key; :func:`load_taef2` loads them strictly.

The ``tae`` generator encodes a modality after mapping it to a 3-channel image
in [0, 1] (``generators.mappings``: log-depth, log-mel, range/intensity/mask),
as Marigold does with the Stable Diffusion VAE.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from synesthesia import UserError
from synesthesia.generators import mappings
from synesthesia.generators.base import GENERATORS, Generator, LatentSpec, check_common
from synesthesia.utils import resolve_weights, sha256_file

logger = logging.getLogger(__name__)

ENV_VAR = "SYNESTHESIA_TAEF2"
SUBDIR = "taef2"
ENCODER_FILE = "taef2_encoder.safetensors"
DECODER_FILE = "taef2_decoder.safetensors"
# The original release (MIT): .pth state dicts with the same keys.
UPSTREAM = "https://github.com/madebyollin/taesd/raw/main/{name}.pth"
LATENT_CHANNELS = 32
DOWNSCALE = 8


def _conv(c_in: int, c_out: int, **kwargs: Any) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3): ``3·tanh(x/3)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class TAEBlock(nn.Module):
    """Residual block ``ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x)``; ``pool`` adds
    ``x ← x + pool(x)`` first (1×1 conv 64→256, GroupNorm(4, 256), ReLU, 1×1 conv 256→64)."""

    def __init__(self, channels: int = 64, pool: bool = False, pool_channels: int = 256, groups: int = 4):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
        )
        self.pool = (
            nn.Sequential(
                nn.Conv2d(channels, pool_channels, 1, bias=False),
                nn.GroupNorm(groups, pool_channels),
                nn.ReLU(),
                nn.Conv2d(pool_channels, channels, 1, bias=False),
            )
            if pool
            else None
        )
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


class TAEEncoder(nn.Sequential):
    """Image 3×H×W in [0, 1] → latent 32×H/8×W/8 (TAEF2 layout; positions are state-dict keys)."""

    def __init__(self, in_channels: int = 3, latent_channels: int = LATENT_CHANNELS, width: int = 64):
        super().__init__(
            _conv(in_channels, width),  # 0
            TAEBlock(width),  # 1
            _conv(width, width, stride=2, bias=False),  # 2
            TAEBlock(width),  # 3
            TAEBlock(width),
            TAEBlock(width),
            _conv(width, width, stride=2, bias=False),  # 6
            TAEBlock(width),  # 7
            TAEBlock(width),
            TAEBlock(width),
            _conv(width, width, stride=2, bias=False),  # 10
            TAEBlock(width, pool=True),  # 11
            TAEBlock(width, pool=True),
            TAEBlock(width, pool=True),
            _conv(width, latent_channels),  # 14
        )


class TAEDecoder(nn.Sequential):
    """Latent 32×h×w → image 3×8h×8w in about [0, 1] (TAEF2 layout)."""

    def __init__(self, out_channels: int = 3, latent_channels: int = LATENT_CHANNELS, width: int = 64):
        super().__init__(
            Clamp(),  # 0
            _conv(latent_channels, width),  # 1
            nn.ReLU(),  # 2
            TAEBlock(width, pool=True),  # 3
            TAEBlock(width, pool=True),
            TAEBlock(width, pool=True),
            nn.Upsample(scale_factor=2),  # 6
            _conv(width, width, bias=False),  # 7
            TAEBlock(width),  # 8
            TAEBlock(width),
            TAEBlock(width),
            nn.Upsample(scale_factor=2),  # 11
            _conv(width, width, bias=False),  # 12
            TAEBlock(width),  # 13
            TAEBlock(width),
            TAEBlock(width),
            nn.Upsample(scale_factor=2),  # 16
            _conv(width, width, bias=False),  # 17
            TAEBlock(width),  # 18
            _conv(width, out_channels),  # 19
        )


# ----------------------------------------------------------------------------- weights


def taef2_paths(weights: str | Path | None = None) -> tuple[Path, Path]:
    """(encoder, decoder) weight files: explicit folder or file, ``$SYNESTHESIA_TAEF2``,
    ``../shared/weights/taef2``, then the upstream .pth release where a network exists."""
    if weights is not None:
        p = Path(weights)
        folder = p.parent if p.is_file() else p
        enc, dec = folder / ENCODER_FILE, folder / DECODER_FILE
        if p.is_file() and p.suffix == ".pth":
            enc, dec = folder / "taef2_encoder.pth", folder / "taef2_decoder.pth"
        for f in (enc, dec):
            if not f.is_file():
                raise UserError(
                    f"TAEF2 weights not found: {f} (give the folder holding {ENCODER_FILE} and {DECODER_FILE})"
                )
        return enc, dec
    try:
        return (
            resolve_weights(ENCODER_FILE, env_var=ENV_VAR, subdir=SUBDIR),
            resolve_weights(DECODER_FILE, env_var=ENV_VAR, subdir=SUBDIR),
        )
    except UserError as missing:
        if os.environ.get("SYNESTHESIA_OFFLINE") or os.environ.get("HF_HUB_OFFLINE"):
            raise
        try:
            return tuple(
                resolve_weights(f"{n}.pth", subdir=SUBDIR, url=UPSTREAM.format(name=n))
                for n in ("taef2_encoder", "taef2_decoder")
            )
        except UserError:
            raise missing from None


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_taef2(weights: str | Path | None = None) -> tuple[TAEEncoder, TAEDecoder]:
    """The pretrained TAEF2 (encoder, decoder) in fp32 eval mode, loaded strictly.

    ``weights``: a folder holding ``taef2_encoder.safetensors`` and
    ``taef2_decoder.safetensors`` (or one of those files); None looks in
    ``$SYNESTHESIA_TAEF2``, then ``../shared/weights/taef2``.
    """
    return load_taef2_files(*taef2_paths(weights))


def load_taef2_files(enc_path: Path, dec_path: Path) -> tuple[TAEEncoder, TAEDecoder]:
    """Build both modules and load the two state-dict files strictly."""
    encoder, decoder = TAEEncoder(), TAEDecoder()
    for module, path in ((encoder, enc_path), (decoder, dec_path)):
        try:
            module.load_state_dict(_load_state(path), strict=True)
        except RuntimeError as exc:
            raise UserError(f"{path} is not a TAEF2 state dict ({str(exc).splitlines()[0]})") from None
        module.eval().requires_grad_(False)
    return encoder, decoder


# ----------------------------------------------------------------------------- generator


@GENERATORS.register("tae")
class TAEGenerator(Generator):
    """Encode a modality (rgb, depth, audio, lidar) with the frozen TAEF2 encoder.

    Options: ``size`` (H, W of the mapped image; per-modality default below, a
    multiple of 8; audio uses ``n_mels``×``frames`` instead), any mapping
    parameter of ``mappings.DEFAULTS[modality]`` (e.g. ``near``/``far``,
    ``n_mels``/``db_min``), ``dtype`` (float16 | float32 storage). Latent:
    spatial 32×H/8×W/8, the encoder output itself (a deterministic encoder:
    ``stored_as="mode"``, scaling factor 1, samples_per_input 1).
    """

    name = "tae"
    mode = "encode"
    has_decoder = True
    DEFAULT_SIZE = {"rgb": [64, 64], "depth": [64, 64], "lidar": [32, 256]}

    def __init__(
        self,
        modality: str = "depth",
        weights: str | None = None,
        samples_per_input: int = 1,
        seed: int = 0,
        dtype: str = "float16",
        **options: Any,
    ):
        super().__init__()
        check_common(self.name, samples_per_input=samples_per_input, seed=seed, max_samples=1)
        if modality not in mappings.MODALITIES:
            raise UserError(f"tae: unknown modality {modality!r}; valid: {', '.join(mappings.MODALITIES)}")
        if dtype not in ("float16", "float32"):
            raise UserError(f"tae: dtype must be float16 or float32, got {dtype!r}")
        if modality != "audio":
            options.setdefault("size", self.DEFAULT_SIZE[modality])
        self.modality = modality
        self.seed = seed
        self.dtype = dtype
        self.params = mappings.mapping_params(modality, **options)
        self.image_hw = mappings.image_shape(modality, **self.params)
        enc_path, dec_path = taef2_paths(weights)
        # The identity (and so the stage-one cache key) names the weights by release and file name
        # and pins them by sha256: moving the weights folder must not invalidate a sidecar set.
        self.weights_source = {"name": "taef2", "encoder": enc_path.name, "decoder": dec_path.name}
        self.weights_path = str(enc_path.parent)
        self.weights_sha256 = {"encoder": sha256_file(enc_path), "decoder": sha256_file(dec_path)}
        self.encoder, self.decoder = load_taef2_files(enc_path, dec_path)

    def latent_spec(self) -> LatentSpec:
        h, w = self.image_hw
        return LatentSpec(
            kind="spatial",
            shape=(LATENT_CHANNELS, h // DOWNSCALE, w // DOWNSCALE),
            dtype=self.dtype,
            scaling_factor=1.0,
            shift_factor=0.0,
            scaling_applied=True,
            stored_as="mode",
            seed=None,
            samples_per_input=1,
            extra={"image_range": [0.0, 1.0], "image_shape": [3, h, w], "mapping": self.params},
        )

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": self.class_path(),
            "weights": self.weights_source,
            "sha256": self.weights_sha256,
            "config": {"modality": self.modality, "dtype": self.dtype, "mapping": self.params},
            "preprocessing": {
                "signal": self.modality,
                "mapping": f"synesthesia.generators.mappings.to_three_channels({self.modality!r})",
                "params": self.params,
                "image_range": [0.0, 1.0],
            },
        }

    def preprocess(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        rate = self.params.get("sample_rate")
        signal = mappings.signal_from_sample(self.modality, sample, sample_rate=rate)
        return {"image": mappings.to_three_channels(self.modality, signal, **self.params)}

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        image = batch["image"].to(self.device, torch.float32)
        if self.device.type == "cuda":
            image = image.contiguous(memory_format=torch.channels_last)
        return self.encoder(image).float()

    @torch.no_grad()
    def decode_image(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents B×32×h×w → the 3-channel image B×3×8h×8w in [0, 1]."""
        return self.decoder(latents.to(self.device, torch.float32)).clamp(0, 1).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → the 2-D signal (B×H×W float32): depth metres, log-mel dB, range metres.

        rgb decodes to B×H×W×3 uint8 values as float32.
        """
        images = self.decode_image(latents).cpu().numpy()
        out = [mappings.from_three_channels(self.modality, im, **self.params) for im in images]
        return torch.from_numpy(np.stack(out).astype(np.float32))
