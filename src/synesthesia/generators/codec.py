"""``codes``: a neural audio codec (EnCodec, Défossez et al. 2022) producing K×T integer codes.

The waveform of ``audio.flac`` is resampled to the codec's ``sampling_rate``,
replicated to its ``audio_channels``, cropped or zero-padded to ``seconds`` (so
every sample has the same T), prepared by the model's feature extractor and
encoded with residual vector quantisation at ``bandwidth`` kbps: K codebooks
(K grows with the bandwidth) of ``codebook_size`` entries, one code per
codebook and frame. Models that encode in chunks (``chunk_length_s``, e.g.
``facebook/encodec_48khz``) have their chunks concatenated along T.

Loads ``transformers.EncodecModel`` from a local folder saved with
``save_pretrained`` or a hub id (``facebook/encodec_24khz``); the feature
extractor comes from the same folder, or from the model config when the folder
has none. :meth:`decode` runs the codec's decoder and returns the log-mel
spectrogram of ``generators.mappings`` (the decoded audio of the ablation is a
2-D spectrogram); :meth:`decode_waveform` returns the waveform. Per-chunk
loudness scales of ``normalize=True`` models are not stored, so such models
decode at unit scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from synesthesia import UserError
from synesthesia.generators import mappings
from synesthesia.generators.base import GENERATORS, Generator, LatentSpec, check_common, jsonable
from synesthesia.generators.diffusers_vae import state_dict_sha256

EXAMPLES = "e.g. facebook/encodec_24khz"


def load_encodec(weights: str | None, revision: str | None = None):
    """(EncodecModel, EncodecFeatureExtractor) from a local folder or hub id; one-line errors."""
    from transformers import EncodecFeatureExtractor, EncodecModel

    if not weights:
        raise UserError(
            f"codes needs weights: a folder saved with EncodecModel.save_pretrained or a hub id ({EXAMPLES})"
        )
    local = Path(weights).expanduser()
    looks_local = local.exists() or str(weights).startswith((".", "/", "~")) or str(weights).count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        raise UserError(f"codes: no EnCodec model at {local} (a folder with config.json and weights)")
    source = str(local) if looks_local else weights
    try:
        model = EncodecModel.from_pretrained(source, revision=revision)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(
            f"codes: cannot load {weights!r}: {first[:200]} Give a local folder or a hub id ({EXAMPLES}); "
            f"offline, download it first with `huggingface-cli download {weights}`"
        ) from None
    cfg = model.config
    try:
        extractor = EncodecFeatureExtractor.from_pretrained(source, revision=revision)
    except Exception:  # no preprocessor_config.json: the model config says all it needs
        extractor = EncodecFeatureExtractor(
            feature_size=cfg.audio_channels,
            sampling_rate=cfg.sampling_rate,
            chunk_length_s=cfg.chunk_length_s,
            overlap=cfg.overlap,
        )
    return model.eval().requires_grad_(False), extractor


@GENERATORS.register("codes")
class EncodecGenerator(Generator):
    """Audio → EnCodec codes (kind ``codes``, K×T integers).

    Options: ``bandwidth`` (kbps, one of the model's ``target_bandwidths``; default
    the smallest), ``seconds`` (fixed input length, default 1.0), ``dtype``
    (int16 | int32 storage), ``revision``, and audio mapping parameters (they
    only shape the log-mel spectrogram that :meth:`decode` returns).
    """

    name = "codes"
    mode = "encode"
    has_decoder = True

    def __init__(
        self,
        modality: str = "audio",
        weights: str | None = None,
        samples_per_input: int = 1,
        seed: int = 0,
        bandwidth: float | None = None,
        seconds: float = 1.0,
        dtype: str = "int16",
        revision: str | None = None,
        **options: Any,
    ):
        super().__init__()
        check_common(self.name, samples_per_input=samples_per_input, seed=seed, max_samples=1)
        if modality != "audio":
            raise UserError(f"codes encodes audio, not {modality!r}")
        if dtype not in ("int16", "int32"):
            raise UserError(f"codes: dtype must be int16 or int32, got {dtype!r}")
        self.model, self.extractor = load_encodec(weights, revision)
        cfg = self.model.config
        bandwidths = [float(b) for b in cfg.target_bandwidths]
        self.bandwidth = float(bandwidth) if bandwidth is not None else bandwidths[0]
        if self.bandwidth not in bandwidths:
            raise UserError(f"codes: bandwidth {bandwidth} not offered by this model; valid: {bandwidths}")
        quantizer = self.model.quantizer
        if not 1 <= quantizer.get_num_quantizers_for_bandwidth(self.bandwidth) <= len(quantizer.layers):
            raise UserError(
                f"codes: this model has no codebooks for {self.bandwidth} kbps (its config is inconsistent)"
            )
        if dtype == "int16" and cfg.codebook_size > np.iinfo(np.int16).max + 1:
            raise UserError(f"codes: codebook_size {cfg.codebook_size} does not fit int16; use dtype=int32")
        if seconds <= 0:
            raise UserError(f"codes: seconds must be positive, got {seconds}")
        self.modality, self.seed, self.dtype = modality, seed, dtype
        self.sampling_rate = int(cfg.sampling_rate)
        self.audio_channels = int(cfg.audio_channels)
        self.num_samples = max(1, round(float(seconds) * self.sampling_rate))
        self.params = mappings.mapping_params("audio", **options)
        self.weights_source = {"weights": str(weights), "revision": revision}
        self.weights_sha256 = state_dict_sha256(self.model)
        self._chunks, self._shape = self._probe()

    @torch.no_grad()
    def _probe(self) -> tuple[int, tuple[int, int]]:
        batch = self.collate([self._features(np.zeros(self.num_samples, dtype=np.float32))])
        codes = self.model.encode(
            batch["input_values"], batch["padding_mask"], bandwidth=self.bandwidth
        ).audio_codes
        chunks, _, k, t = codes.shape
        return chunks, (k, chunks * t)

    def _features(self, wave: np.ndarray) -> dict[str, np.ndarray]:
        wave = np.pad(wave[: self.num_samples], (0, max(0, self.num_samples - wave.size))).astype(np.float32)
        raw = wave if self.audio_channels == 1 else np.stack([wave] * self.audio_channels, axis=-1)
        feats = self.extractor(raw_audio=raw, sampling_rate=self.sampling_rate, return_tensors="np")
        return {
            "input_values": feats["input_values"][0].astype(np.float32),
            "padding_mask": feats["padding_mask"][0],
        }

    def latent_spec(self) -> LatentSpec:
        return LatentSpec(
            kind="codes",
            shape=self._shape,
            dtype=self.dtype,
            scaling_factor=1.0,
            shift_factor=0.0,
            scaling_applied=False,
            stored_as="mode",
            samples_per_input=1,
            extra={
                "codebook_size": int(self.model.config.codebook_size),
                "num_codebooks": self._shape[0],
                "bandwidth": self.bandwidth,
                "sampling_rate": self.sampling_rate,
                "frame_rate": self._shape[1] / (self.num_samples / self.sampling_rate),
            },
        )

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": self.class_path(),
            "model_class": type(self.model).__name__,
            "weights": self.weights_source,
            "sha256": self.weights_sha256,
            "model_config": jsonable(
                {
                    k: v
                    for k, v in self.model.config.to_dict().items()
                    if not k.startswith("_") and k != "transformers_version"
                }
            ),
            "config": {
                "modality": self.modality,
                "bandwidth": self.bandwidth,
                "num_samples": self.num_samples,
                "dtype": self.dtype,
                "mapping": self.params,
            },
            "preprocessing": {
                "signal": "audio waveform",
                "sampling_rate": self.sampling_rate,
                "channels": self.audio_channels,
                "num_samples": self.num_samples,
                "pad": "zeros at the end, or crop",
                "feature_extractor": type(self.extractor).__name__,
            },
        }

    def preprocess(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        return self._features(mappings.signal_from_sample("audio", sample, sample_rate=self.sampling_rate))

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        x = batch["input_values"].to(self.device, torch.float32)
        mask = batch["padding_mask"].to(self.device)
        codes = self.model.encode(x, mask, bandwidth=self.bandwidth).audio_codes  # chunks×B×K×t
        return codes.permute(1, 2, 0, 3).reshape(codes.shape[1], codes.shape[2], -1).long()

    @torch.no_grad()
    def decode_waveform(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes B×K×T → mono waveforms B×N at the codec's sampling rate."""
        codes = codes.to(self.device).long()
        b, k, t = codes.shape
        chunked = codes.reshape(b, k, self._chunks, t // self._chunks).permute(2, 0, 1, 3)
        audio = self.model.decode(chunked, [None] * self._chunks).audio_values
        return audio.float().mean(dim=1)[:, : self.num_samples]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Codes B×K×T → log-mel spectrograms B×n_mels×frames in dB (see mappings)."""
        waves = self.decode_waveform(latents).cpu().numpy()
        out = [
            mappings.to_2d(
                "audio", mappings.resample(w, self.sampling_rate, self.params["sample_rate"]), **self.params
            )
            for w in waves
        ]
        return torch.from_numpy(np.stack(out).astype(np.float32))
