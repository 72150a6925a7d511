"""``diffusers-vae``: any diffusers autoencoder, by local folder or hub id, as a frozen encoder.

Image autoencoders (``AutoencoderKL``, ``AutoencoderTiny``, and others whose
``encode`` returns a ``latent_dist`` or ``latents``) encode a modality mapped to a
3-channel image by ``generators.mappings`` (Marigold-style), rescaled to the
[-1, 1] range diffusers autoencoders expect. The waveform autoencoder
``AutoencoderOobleck`` encodes the audio waveform itself (resampled to the
model's ``sampling_rate``, mono replicated to its ``audio_channels``, cropped or
zero-padded to ``seconds``); its C×T latent is stored transposed, as **tokens
T×C**.

The latent follows the diffusers pipelines' convention: ``z = (z - shift_factor)
· scaling_factor`` (or ``(z - latents_mean) · scaling_factor / latents_std``
where the config has per-channel statistics) when ``apply_scaling`` (default).
``stored_as``:

- ``mode``: the posterior mode ``latent_dist.mode()`` (the mean);
- ``moments``: mean and log-variance concatenated on the channel axis (2C
  channels; the log-variance is that of the scaled latent, ``+ 2·log scale``);
- ``sample``: ``mean + std·ε`` with ε drawn from a generator seeded by
  ``key_seed(key, seed)``, so a key's draws do not depend on its batch;
  ``samples_per_input`` S > 1 stores S draws (S×C×h×w).

A deterministic autoencoder (``AutoencoderTiny``) supports only ``mode``.
Nothing is downloaded when ``HF_HUB_OFFLINE`` is set; a missing model raises
one line saying what to provide.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synesthesia import UserError
from synesthesia.generators import mappings
from synesthesia.generators.base import (
    GENERATORS,
    STORED_AS,
    Generator,
    LatentSpec,
    check_common,
    jsonable,
    key_seed,
)

logger = logging.getLogger(__name__)

EXAMPLES = "e.g. stabilityai/sd-vae-ft-mse, madebyollin/taesd, or stabilityai/stable-audio-open-1.0 with subfolder=vae"


def load_diffusers_model(
    weights: str | None,
    subfolder: str | None = None,
    revision: str | None = None,
    what: str = "diffusers-vae",
):
    """Load a diffusers model (class read from its config) from a local folder or a hub id.

    Local folders are read as they are; hub ids go through the Hugging Face cache
    (no download when ``HF_HUB_OFFLINE`` is set). Failures are one-line UserErrors.
    """
    from diffusers import AutoModel

    if not weights:
        raise UserError(
            f"{what} needs weights: a local folder saved with save_pretrained or a hub id ({EXAMPLES})"
        )
    local = Path(weights).expanduser()
    looks_local = local.exists() or str(weights).startswith((".", "/", "~")) or str(weights).count("/") > 1
    if looks_local and not (local / (subfolder or "") / "config.json").is_file():
        raise UserError(
            f"{what}: no diffusers model at {local / (subfolder or '')} (a folder with config.json and weights)"
        )
    try:
        model = AutoModel.from_pretrained(
            str(local) if looks_local else weights, subfolder=subfolder, revision=revision
        )
    except Exception as exc:  # OSError, EntryNotFound, offline errors, bad configs …
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(
            f"{what}: cannot load {weights!r}{f' (subfolder {subfolder})' if subfolder else ''}: {first[:200]}. "
            f"Give a local folder or a hub id ({EXAMPLES}); offline, download it first with "
            f"`huggingface-cli download {weights}`"
        ) from None
    return model.eval().requires_grad_(False)


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, dtypes and bytes, in key order): the identity
    of the weights however they were loaded (local folder, hub cache, any file format)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@GENERATORS.register("diffusers-vae")
class DiffusersVAEGenerator(Generator):
    """A frozen diffusers autoencoder (image VAEs on mapped signals; Oobleck on waveforms).

    Options: ``subfolder``, ``revision``, ``stored_as`` (mode | moments | sample),
    ``apply_scaling`` (default true), ``dtype`` (float16 | float32 storage),
    ``seconds`` (Oobleck input length, default 1.0), and for image VAEs ``size``
    plus any mapping parameter of ``mappings.DEFAULTS[modality]``; for Oobleck the
    audio mapping parameters only shape the log-mel of :meth:`decode`.
    """

    name = "diffusers-vae"
    mode = "encode"
    has_decoder = True
    DEFAULT_SIZE = {"rgb": [64, 64], "depth": [64, 64], "lidar": [32, 256]}

    def __init__(
        self,
        modality: str = "depth",
        weights: str | None = None,
        samples_per_input: int = 1,
        seed: int = 0,
        subfolder: str | None = None,
        revision: str | None = None,
        stored_as: str = "mode",
        apply_scaling: bool = True,
        dtype: str = "float16",
        seconds: float = 1.0,
        **options: Any,
    ):
        super().__init__()
        check_common(self.name, samples_per_input=samples_per_input, seed=seed)
        if stored_as not in STORED_AS:
            raise UserError(
                f"{self.name}: stored_as must be one of {', '.join(STORED_AS)}, got {stored_as!r}"
            )
        if samples_per_input > 1 and stored_as != "sample":
            raise UserError(
                f"{self.name}: samples_per_input > 1 needs stored_as=sample (mode/moments are deterministic)"
            )
        if dtype not in ("float16", "float32"):
            raise UserError(f"{self.name}: dtype must be float16 or float32, got {dtype!r}")
        if modality not in mappings.MODALITIES:
            raise UserError(
                f"{self.name}: unknown modality {modality!r}; valid: {', '.join(mappings.MODALITIES)}"
            )
        self.vae = load_diffusers_model(weights, subfolder, revision, self.name)
        self.vae_class = type(self.vae).__name__
        cfg = self.vae.config
        self.waveform = self.vae_class == "AutoencoderOobleck"
        self.modality, self.seed, self.dtype = modality, seed, dtype
        self.samples_per_input, self.stored_as, self.apply_scaling = (
            samples_per_input,
            stored_as,
            bool(apply_scaling),
        )
        self.weights_source = {"weights": str(weights), "subfolder": subfolder, "revision": revision}
        if self.waveform:
            if modality != "audio":
                raise UserError(f"{self.name}: {self.vae_class} encodes audio waveforms, not {modality}")
            self.sampling_rate = int(cfg.sampling_rate)
            self.audio_channels = int(cfg.audio_channels)
            self.hop = int(math.prod(cfg.downsampling_ratios))
            n = max(1, round(float(seconds) * self.sampling_rate / self.hop)) * self.hop
            self.num_samples = n
            self.params = mappings.mapping_params("audio", **options)
        else:
            if modality != "audio":
                options.setdefault("size", self.DEFAULT_SIZE[modality])
            self.params = mappings.mapping_params(modality, **options)
            self.image_hw = mappings.image_shape(modality, **self.params)
            self.in_channels = int(getattr(cfg, "in_channels", 3))
            if self.in_channels not in (1, 3):
                raise UserError(
                    f"{self.name}: {self.vae_class} takes {self.in_channels} channels; only 1 or 3 are supported"
                )
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        lm, ls = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        self.register_buffer(
            "latents_mean", torch.tensor(lm, dtype=torch.float32) if lm else None, persistent=False
        )
        self.register_buffer(
            "latents_std", torch.tensor(ls, dtype=torch.float32) if ls else None, persistent=False
        )
        self.weights_sha256 = state_dict_sha256(self.vae)
        self._shape = self._probe_shape()
        if not self._gaussian and stored_as != "mode":
            raise UserError(
                f"{self.name}: {self.vae_class} is deterministic; only stored_as=mode is possible"
            )

    # -- shapes ---------------------------------------------------------------------------

    def _input_shape(self) -> tuple[int, ...]:
        if self.waveform:
            return (self.audio_channels, self.num_samples)
        return (self.in_channels, *self.image_hw)

    @torch.no_grad()
    def _probe_shape(self) -> tuple[int, ...]:
        out = self.vae.encode(torch.zeros(1, *self._input_shape()))
        self._gaussian = hasattr(out, "latent_dist")
        z = out.latent_dist.mean if self._gaussian else out.latents
        return tuple(z.shape[1:])

    def latent_spec(self) -> LatentSpec:
        c, *rest = self._shape
        if self.stored_as == "moments":
            c = 2 * c
        if self.waveform:
            kind, shape = "tokens", (rest[0], c)  # T×C
        else:
            kind, shape = "spatial", (c, *rest)
        extra: dict[str, Any] = {"class": self.vae_class, "input_shape": list(self._input_shape())}
        if self.waveform:
            extra.update(layout="T×C (the C×T latent transposed)", sampling_rate=self.sampling_rate)
        else:
            extra.update(image_range=[-1.0, 1.0], mapping=self.params)
        if self.latents_mean is not None:
            extra["latents_mean_std"] = True
        return LatentSpec(
            kind=kind,
            shape=shape,
            dtype=self.dtype,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
            scaling_applied=self.apply_scaling,
            stored_as=self.stored_as,
            seed=self.seed if self.stored_as == "sample" else None,
            samples_per_input=self.samples_per_input,
            extra=extra,
        )

    def identity(self) -> dict[str, Any]:
        config = {
            "modality": self.modality,
            "stored_as": self.stored_as,
            "apply_scaling": self.apply_scaling,
            "samples_per_input": self.samples_per_input,
            "seed": self.seed if self.stored_as == "sample" else None,
            "dtype": self.dtype,
            "mapping": self.params,
        }
        if self.waveform:
            config["num_samples"] = self.num_samples
        return {
            "name": self.name,
            "class": self.class_path(),
            "model_class": self.vae_class,
            "weights": self.weights_source,
            "sha256": self.weights_sha256,
            "model_config": jsonable(
                {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
            ),
            "config": config,
            "preprocessing": (
                {
                    "signal": "audio waveform",
                    "sampling_rate": self.sampling_rate,
                    "channels": self.audio_channels,
                    "num_samples": self.num_samples,
                    "pad": "zeros at the end, or crop",
                }
                if self.waveform
                else {
                    "signal": self.modality,
                    "mapping": f"synesthesia.generators.mappings.to_three_channels({self.modality!r})",
                    "params": self.params,
                    "image_range": [-1.0, 1.0],
                    "channels": self.in_channels,
                }
            ),
        }

    # -- data -----------------------------------------------------------------------------

    def preprocess(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.waveform:
            wave = mappings.signal_from_sample("audio", sample, sample_rate=self.sampling_rate)
            wave = wave[: self.num_samples]
            wave = np.pad(wave, (0, self.num_samples - wave.size)).astype(np.float32)
            return {"audio": np.repeat(wave[None], self.audio_channels, axis=0)}
        signal = mappings.signal_from_sample(
            self.modality, sample, sample_rate=self.params.get("sample_rate")
        )
        image = mappings.to_three_channels(self.modality, signal, **self.params)
        if self.in_channels == 1:
            image = image.mean(axis=0, keepdims=True)
        return {"image": image * 2.0 - 1.0}

    def _scale(self, z: torch.Tensor) -> torch.Tensor:
        if not self.apply_scaling:
            return z
        if self.latents_mean is not None and self.latents_std is not None:
            view = (1, -1) + (1,) * (z.ndim - 2)
            return (z - self.latents_mean.view(view)) * self.scaling_factor / self.latents_std.view(view)
        return (z - self.shift_factor) * self.scaling_factor

    def _unscale(self, z: torch.Tensor) -> torch.Tensor:
        if not self.apply_scaling:
            return z
        if self.latents_mean is not None and self.latents_std is not None:
            view = (1, -1) + (1,) * (z.ndim - 2)
            return z * self.latents_std.view(view) / self.scaling_factor + self.latents_mean.view(view)
        return z / self.scaling_factor + self.shift_factor

    def _log_scale(self) -> torch.Tensor | float:
        if not self.apply_scaling:
            return 0.0
        if self.latents_std is not None:
            return 2 * torch.log(self.scaling_factor / self.latents_std).view(
                1, -1, *([1] * (len(self._shape) - 1))
            )
        return 2 * math.log(self.scaling_factor)

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        x = batch["audio" if self.waveform else "image"].to(self.device, torch.float32)
        if self.device.type == "cuda" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.vae.encode(x)
        if not self._gaussian:
            z = self._scale(out.latents.float())
        else:
            dist = out.latent_dist
            mean, std = dist.mean.float(), dist.std.float()
            if self.stored_as == "mode":
                z = self._scale(mean)
            elif self.stored_as == "moments":
                z = torch.cat([self._scale(mean), dist.logvar.float() + self._log_scale()], dim=1)
            else:
                draws = []
                for i, key in enumerate(keys):
                    g = torch.Generator().manual_seed(key_seed(key, self.seed))
                    eps = torch.randn((self.samples_per_input, *mean.shape[1:]), generator=g).to(mean.device)
                    draws.append(self._scale(mean[i : i + 1] + std[i : i + 1] * eps))
                z = torch.stack(draws)  # B×S×…
                if self.samples_per_input == 1:
                    z = z[:, 0]
        if self.waveform:
            z = z.transpose(-1, -2)  # …×C×T → …×T×C
        return z.contiguous()

    # -- ablation -------------------------------------------------------------------------

    @torch.no_grad()
    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Stored latents (B, [S,] …) → the model's decoder output: images in [0, 1]
        (B, [S,] C, H, W) or waveforms (B, [S,] channels, N). Moments decode their mean."""
        z = latents.to(self.device, torch.float32)
        lead = z.shape[: z.ndim - len(self.latent_spec().shape)]
        z = z.reshape(-1, *z.shape[len(lead) :])
        if self.waveform:
            z = z.transpose(-1, -2)
        if self.stored_as == "moments":
            z = z[:, : z.shape[1] // 2]
        out = self.vae.decode(self._unscale(z)).sample.float()
        if not self.waveform:
            out = ((out + 1) / 2).clamp(0, 1)
        return out.reshape(*lead, *out.shape[1:])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → the 2-D signal (B, [S,] H, W) float32: depth metres, log-mel dB, range metres.

        Oobleck waveforms become the log-mel spectrogram of ``mappings`` (mono,
        resampled to its ``sample_rate``); no raw waveform is stored.
        """
        raw = self.decode_raw(latents).cpu()
        lead = raw.shape[:-3] if not self.waveform else raw.shape[:-2]
        flat = raw.reshape(-1, *raw.shape[len(lead) :]).numpy()
        out = []
        for item in flat:
            if self.waveform:
                wave = mappings.resample(item.mean(axis=0), self.sampling_rate, self.params["sample_rate"])
                out.append(mappings.to_2d("audio", wave, **self.params))
            else:
                image3 = np.repeat(item, 3, axis=0) if item.shape[0] == 1 else item
                out.append(mappings.from_three_channels(self.modality, image3, **self.params))
        arr = np.stack(out).astype(np.float32)
        return torch.from_numpy(arr.reshape(*lead, *arr.shape[1:]))
