"""``latent-diffusion``: image-conditioned latent diffusion in the Marigold layout, run to the final latent.

Marigold (Ke et al., *Repurposing Diffusion-Based Image Generators for Monocular
Depth Estimation*, CVPR 2024) encodes the RGB image with a VAE, concatenates that
latent with a noisy latent of the target modality along the channels and lets a
UNet denoise the target half:

    c   = E(rgb) · s                              (conditioning latent, s = VAE scaling factor)
    z_T ~ N(0, I)
    z_{t'} = scheduler.step(UNet([c ; z_t], t), t, z_t)   for t in the few inference timesteps
    latent = z_0                                  (written to the sidecar; **never decoded** here)

diffusers' own ``MarigoldDepthPipeline`` always decodes ``z_0`` to a depth map;
stage one wants the latent itself, so this generator drives the UNet and the
scheduler directly. It loads two kinds of diffusers-format folders:

* a real Marigold checkpoint (``model_index.json`` ``_class_name`` is
  ``MarigoldDepthPipeline``, ``MarigoldNormalsPipeline`` or
  ``MarigoldIntrinsicsPipeline``): ``vae`` (AutoencoderKL, RGB in [-1, 1], latent
  = posterior mode × scaling factor), ``unet`` (UNet2DConditionModel, 8 input
  channels) conditioned on the empty-prompt embedding of ``text_encoder`` +
  ``tokenizer``, and ``scheduler`` (DDIM or LCM);
* a folder written by ``synesthesia bootstrap`` (``_class_name``
  ``SynesthesiaLatentDiffusion``): ``unet`` (UNet2DModel, in_channels = cond C +
  target C, no text), ``scheduler`` (DDIM or FlowMatchEulerDiscrete) and a VAE that
  is either the project's TAEF2 (``"vae": "tae"``) or the folder's own ``vae/``.
  When the target latent's h×w differs from the RGB latent's (a 32×256 range
  image → 4×32), the RGB latent is bilinearly resized to the target's h×w before
  the concatenation (``"cond_resize": "bilinear"``).

``samples_per_input`` S > 1 draws S independent samples per input (the
augmentation stage two draws from); the noise of every sample comes from a
generator seeded by ``key_seed(key, seed)``, so a key's latents do not depend on
the batch it was in.

``ensemble`` N > 1 is Marigold's test-time ensembling carried to the latent that
stage one writes: each of the S outputs is the mean of N independently seeded
samples, ``ẑ = (1/N) Σₙ z₀⁽ⁿ⁾``. One sample of a conditional generator has the
spread of the posterior p(z | rgb), so its expected squared error to the true
latent is about twice the posterior variance; the N-mean converges to the
posterior mean, the MSE-optimal estimate, with error ≈ (1 + 1/N) × the variance.
Marigold ensembles decoded affine-invariant depth maps after a scale/shift
alignment; latents have no such gauge freedom (the bootstrap targets are metric),
so the plain mean is the estimator here. The draws of one key come from its one
generator in order (output s uses draws s·N … s·N + N − 1), so N = 1 reproduces
exactly the non-ensembled latents. The default is the folder's ``ensemble``
(bootstrap models; 1 when absent and for Marigold folders). ``decode()`` (the VAE decoder, plus the inverse modality
mapping for bootstrap models) exists only for the decode-encode ablation.

This module is the registered generator. It draws on
:mod:`~synesthesia.generators.diffusers_folder` (finding, reading and hashing
the folder), :mod:`~synesthesia.generators.latent_codecs` (the frozen VAEs
behind ``E``) and :mod:`~synesthesia.generators.diffusion_sampling` (the
scheduler and the sampling loop).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synesthesia import UserError
from synesthesia.generators.base import GENERATORS, Generator, LatentSpec, check_common, key_generators
from synesthesia.generators.diffusers_folder import MODEL_INDEX, _read_json, folder_sha256, resolve_folder
from synesthesia.generators.diffusion_sampling import draw_latents, load_scheduler
from synesthesia.generators.latent_codecs import (
    LatentCodec,  # noqa: F401  (synesthesia.bootstrap reads it here)
    TAECodec,
    load_diffusers_vae,
)

logger = logging.getLogger(__name__)

BOOTSTRAP_CLASS = "SynesthesiaLatentDiffusion"
# Marigold pipeline class -> the modality it predicts.
MARIGOLD_CLASSES = {
    "MarigoldDepthPipeline": "depth",
    "MarigoldNormalsPipeline": "normals",
    "MarigoldIntrinsicsPipeline": "intrinsics",
}


# ----------------------------------------------------------------------------- the generator


def _image_size(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise UserError(f"{where}: image_size must be a positive int or [height, width], got {value!r}")
    return int(value[0]), int(value[1])


@GENERATORS.register("latent-diffusion")
class LatentDiffusionGenerator(Generator):
    """Image-conditioned latent diffusion (Marigold layout) → the final latent, no decode.

    Options: ``inference_steps`` (default: the folder's ``inference_steps`` /
    Marigold's ``default_denoising_steps``), ``image_size`` (int or [h, w]; RGB is
    resized to it; default: the folder's ``rgb_size`` / Marigold's
    ``default_processing_resolution``), ``vae_weights`` (TAEF2 weights folder for
    ``"vae": "tae"`` models; default: ``$SYNESTHESIA_TAEF2`` or ../shared),
    ``ensemble`` (N seeded samples averaged into each written latent; default: the
    folder's ``ensemble``, else 1).
    """

    name = "latent-diffusion"
    mode = "generate"
    has_decoder = True

    def __init__(
        self,
        modality: str,
        weights: str | None = None,
        samples_per_input: int = 1,
        seed: int = 0,
        inference_steps: int | None = None,
        image_size: int | list[int] | None = None,
        vae_weights: str | None = None,
        ensemble: int | None = None,
    ):
        super().__init__()
        check_common(self.name, samples_per_input=samples_per_input, seed=seed)
        for option, value in (("inference_steps", inference_steps), ("ensemble", ensemble)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UserError(f"latent-diffusion: {option} must be a positive integer, got {value!r}")
        self.folder = resolve_folder(weights)
        self.weights = str(weights)
        self.modality = modality
        self.samples_per_input = samples_per_input
        self.seed = int(seed)
        self.index = _read_json(self.folder / MODEL_INDEX)
        self.kind = self.index.get("_class_name")
        self.scheduler = load_scheduler(self.folder / "scheduler")
        if self.kind == BOOTSTRAP_CLASS:
            self._load_bootstrap(vae_weights)
            default_steps = self.index.get("inference_steps")
            default_size = self.index.get("rgb_size")
        elif self.kind in MARIGOLD_CLASSES:
            self._load_marigold()
            default_steps = self.index.get("default_denoising_steps")
            default_size = self.index.get("default_processing_resolution")
        else:
            valid = ", ".join([BOOTSTRAP_CLASS, *MARIGOLD_CLASSES])
            raise UserError(f"{self.folder}: model class {self.kind!r} is not supported; valid: {valid}")
        self.inference_steps = int(inference_steps or default_steps or 1)
        default_ensemble = self.index.get("ensemble") if self.kind == BOOTSTRAP_CLASS else None
        self.ensemble = int(ensemble or default_ensemble or 1)
        self.image_size = _image_size(
            image_size if image_size is not None else default_size, "latent-diffusion"
        )
        if self.image_size is None:
            raise UserError(f"latent-diffusion: {self.folder} names no input size; pass options.image_size")
        down = self.codec.downscale
        if self.image_size[0] % down or self.image_size[1] % down:
            raise UserError(
                f"latent-diffusion: image_size {list(self.image_size)} is not a multiple of {down}"
            )
        cond_hw = (self.image_size[0] // down, self.image_size[1] // down)
        self.cond_hw = cond_hw
        self.target_shape = tuple(self.index.get("target_shape") or (self.codec.latent_channels, *cond_hw))
        self.requires_grad_(False).eval()

    # -- loading

    def _load_bootstrap(self, vae_weights: str | None) -> None:
        from diffusers import UNet2DModel

        if self.index.get("modality") != self.modality:
            raise UserError(
                f"{self.folder} generates {self.index.get('modality')!r}, but modality {self.modality!r} was asked for"
            )
        self.unet = UNet2DModel.from_pretrained(self.folder / "unet", use_safetensors=True)
        vae = self.index.get("vae", "tae")
        if vae == "tae":
            self.codec = TAECodec(vae_weights)
        elif vae == "vae":
            self.codec = load_diffusers_vae(self.folder / "vae")
        else:
            raise UserError(f"{self.folder}: vae {vae!r} is not supported; valid: tae, vae")
        self.mapping = dict(self.index.get("mapping") or {})
        self.cond_resize = self.index.get("cond_resize")
        self.register_buffer("text_embedding", None, persistent=False)

    def _load_marigold(self) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        expected = MARIGOLD_CLASSES[self.kind]
        if self.modality != expected:
            raise UserError(
                f"{self.folder} is a {self.kind}: modality must be {expected!r}, not {self.modality!r}"
            )
        self.unet = UNet2DConditionModel.from_pretrained(self.folder / "unet", use_safetensors=True)
        self.codec = load_diffusers_vae(self.folder / "vae")
        tokenizer = CLIPTokenizer.from_pretrained(self.folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(self.folder / "text_encoder", use_safetensors=True)
        ids = tokenizer(
            "",
            padding="do_not_pad",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            embedding = text_encoder(ids)[0]  # 1×T×D, the empty prompt (Marigold never uses text)
        self.register_buffer("text_embedding", embedding, persistent=False)
        self.mapping = {}
        self.cond_resize = None

    # -- the interface

    def latent_spec(self) -> LatentSpec:
        return LatentSpec(
            kind="spatial",
            shape=tuple(int(v) for v in self.target_shape),
            scaling_factor=self.codec.scaling_factor,
            shift_factor=self.codec.shift_factor,
            scaling_applied=True,
            stored_as="sample",
            seed=self.seed,
            samples_per_input=self.samples_per_input,
            extra={
                "model_class": self.kind,
                "scheduler": type(self.scheduler).__name__,
                "inference_steps": self.inference_steps,
                "ensemble": self.ensemble,
                "image_size": list(self.image_size),
                **self.codec.describe(),
            },
        )

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": self.class_path(),
            "model_class": self.kind,
            "weights": self.weights,
            "sha256": folder_sha256(self.folder),
            "config": {
                "modality": self.modality,
                "samples_per_input": self.samples_per_input,
                "seed": self.seed,
                "inference_steps": self.inference_steps,
                "ensemble": self.ensemble,
                "image_size": list(self.image_size),
            },
        }

    def preprocess(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        from PIL import Image

        from synesthesia.shards.schema import image_field
        from synesthesia.sources.signals import decode_image

        rgb = decode_image(sample[image_field(sample)])
        h, w = self.image_size
        if rgb.shape[:2] != (h, w):
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
        return {"rgb": np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0}

    def condition(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] (B×3×H×W) → the conditioning latent at the target's h×w."""
        dtype = next(self.unet.parameters()).dtype
        cond = self.codec.encode(rgb.to(dtype=next(self.codec.parameters()).dtype)).to(dtype)
        if tuple(cond.shape[-2:]) != tuple(self.target_shape[-2:]):
            cond = F.interpolate(
                cond, size=tuple(self.target_shape[-2:]), mode="bilinear", align_corners=False
            )
        return cond

    def denoise(self, cond: torch.Tensor, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet on [cond ; z_t] (plus the empty-text embedding for Marigold)."""
        x = torch.cat([cond, latent.to(cond.dtype)], dim=1)
        if self.text_embedding is None:
            return self.unet(x, t).sample
        text = self.text_embedding.to(cond.dtype).expand(x.shape[0], -1, -1)
        return self.unet(x, t, encoder_hidden_states=text).sample

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        rgb = batch["rgb"]
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"latent-diffusion expects rgb B×3×H×W, got {tuple(rgb.shape)}")
        if len(keys) != rgb.shape[0]:
            raise ValueError(f"{len(keys)} keys for a batch of {rgb.shape[0]}")
        device = next(self.unet.parameters()).device
        cond = self.condition(rgb.to(device))
        S = self.samples_per_input
        latent = draw_latents(
            self.denoise,
            self.scheduler,
            cond,
            key_generators(keys, self.seed),
            tuple(self.target_shape),
            self.inference_steps,
            draws=S * self.ensemble,
        ).float()
        latent = latent.reshape(rgb.shape[0], S, self.ensemble, *latent.shape[1:]).mean(dim=2)
        return latent if S > 1 else latent[:, 0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B×C×h×w or B×S×C×h×w) → signals: the VAE decoder, then the inverse mapping.

        Bootstrap models map back to the raw signal with
        ``mappings.from_three_channels`` (metres, log-mel, range image). Marigold
        depth follows its pipeline: channel mean, clip to [-1, 1], to [0, 1]
        (affine-invariant depth); other Marigold outputs stay 3-channel in [0, 1].
        """
        lead = latents.shape[: latents.ndim - 3]
        flat = latents.reshape(-1, *latents.shape[-3:])
        dtype = next(self.codec.parameters()).dtype
        image = self.codec.decode(flat.to(dtype)).float()
        if self.kind == BOOTSTRAP_CLASS:
            from synesthesia.generators.mappings import from_three_channels

            signals = [
                torch.as_tensor(
                    np.asarray(from_three_channels(self.modality, im.cpu().numpy(), **self.mapping))
                )
                for im in image
            ]
            out = torch.stack(signals)
        elif self.kind == "MarigoldDepthPipeline":
            out = image.mean(dim=1)
        else:
            out = image
        return out.reshape(*lead, *out.shape[1:])
