"""Documented, invertible mappings of non-RGB signals to 3-channel images in [0, 1].

An image autoencoder (TAEF2, the Stable Diffusion VAE, …) encodes 3×H×W images
in [0, 1]. Marigold (Ke et al., CVPR 2024) showed that the frozen SD VAE encodes
a depth map almost losslessly once it is normalised to the image range and
replicated to three channels; this module does the same for each modality of
the project, with *fixed* (not per-image) ranges so the mapping is invertible
and latents of different samples are comparable:

``depth`` (H×W metres, 0 = missing)
    ``d̂ = (log d − log near) / (log far − log near)`` clipped to [0, 1]
    (log scale: equal relative error at every distance), replicated ×3.
    Inverse: ``d = near · (far/near)^mean_c(x)``. Missing depth (≤ 0) maps to 0,
    i.e. to ``near`` after the round trip. Defaults near 0.5 m, far 10 m fit
    indoor NYU Depth v2 and the procedural scenes.

``audio`` (mono waveform at ``sample_rate``)
    Log-mel spectrogram (``transformers.audio_utils``: Hann window ``win_length``,
    hop ``hop_length``, ``n_fft``, ``n_mels`` Slaney mel filters, power 2, in dB),
    clipped to [``db_min``, ``db_max``] and scaled to [0, 1]. The time axis is
    cropped to (or padded with silence = ``db_min`` up to) ``frames`` frames,
    starting at the first frame. ``channels="replicate"`` puts the same image in
    all three channels; ``channels="deltas"`` puts the mel, its first and its
    second time-difference (each scaled from [−1, 1] to [0, 1]) in the three.
    Inverse: the log-mel image in dB (channel mean, or channel 0 for deltas).
    **The decoded audio signal is this 2-D spectrogram, not a waveform**: no
    vocoder is run (the ablation compares spectrograms).

``lidar`` (beams×azimuth range in metres, 0 = no return; optionally 2×B×A with
    intensity in [0, 1])
    The log range normalised over [near, far] like depth. ``fill="nearest"``
    (default) gives pixels without a return the value of the nearest return,
    so a sparse scan stays a smooth image; ``fill="zero"`` leaves them 0.
    ``channels="range"`` (default) replicates it ×3, like depth: the
    autoencoder reproduces it best, but the no-return mask and the intensity
    are not encoded, and the inverse is a dense range image (with
    ``fill="zero"``, values below 1/255 decode as "no return").
    ``channels="range-intensity-mask"`` puts the log range, the intensity (0 when
    absent) and the valid mask in the three channels (inverse: range where
    mask > 0.5, else 0): everything is kept, at a cost. Measured with TAEF2 on
    the KITTI fixture (64×256 front crop): median range error on returns 3.9 %
    (``range``) vs 27 % (``range-intensity-mask``), whose three decorrelated
    channels the natural-image autoencoder reproduces poorly.

``rgb`` (H×W×3 uint8) → ``x / 255`` channels first; inverse ×255.

Spatial sizes must be multiples of 8 (the autoencoders downsample by 8). With
``size=None`` the image is padded at the bottom and right to the next multiple
of 8 (edge values for depth and rgb, "no return" for lidar); pass
``shape=(H, W)`` to :func:`from_three_channels` to crop it back. With
``size=(h, w)`` (or one int) the 2-D signal is resized first: bilinear with
antialiasing in log-depth space for depth and for rgb, nearest for lidar (range
values are never blended across object edges or with "no return"). For audio
the height is ``n_mels`` and the width ``frames``; both must be multiples of 8.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from synesthesia import UserError
from synesthesia.shards.schema import SchemaError, decode_npy

MODALITIES = ("rgb", "depth", "audio", "lidar")

DEFAULTS: dict[str, dict[str, Any]] = {
    "rgb": {"size": None},
    "depth": {"near": 0.5, "far": 10.0, "size": None},
    "audio": {
        "sample_rate": 16000,
        "n_fft": 512,
        "win_length": 400,
        "hop_length": 160,
        "n_mels": 64,
        "fmin": 0.0,
        "fmax": None,  # None: sample_rate / 2
        "db_min": -90.0,
        "db_max": 30.0,
        "frames": 64,
        "channels": "replicate",  # replicate | deltas
    },
    "lidar": {"near": 0.5, "far": 80.0, "size": None, "fill": "nearest", "channels": "range"},
}


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise UserError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")


def _hw(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    if isinstance(size, list | tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise UserError(f"size must be an int or [height, width], got {size!r}")


def mapping_params(modality: str, **overrides: Any) -> dict[str, Any]:
    """The complete, validated mapping parameters of ``modality`` (defaults + overrides).

    This is what a generator records in its identity, so a manifest says exactly
    how a signal became an image. Unknown keys and bad values raise UserError.
    """
    _check_modality(modality)
    defaults = DEFAULTS[modality]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise UserError(
            f"unknown {modality} mapping option {unknown[0]!r}; valid: {', '.join(sorted(defaults))}"
        )
    params = {**defaults, **overrides}
    if "size" in params:
        hw = _hw(params["size"])
        if hw is not None and (hw[0] % 8 or hw[1] % 8 or min(hw) <= 0):
            raise UserError(f"{modality} size {list(hw)} must be positive multiples of 8")
        params["size"] = list(hw) if hw is not None else None
    if "near" in params:
        params["near"], params["far"] = float(params["near"]), float(params["far"])
        if not 0 < params["near"] < params["far"]:
            raise UserError(f"{modality} range needs 0 < near < far, got {params['near']}, {params['far']}")
    if modality == "lidar" and params["fill"] not in ("nearest", "zero"):
        raise UserError(f"lidar fill must be 'nearest' or 'zero', got {params['fill']!r}")
    if modality == "lidar" and params["channels"] not in ("range", "range-intensity-mask"):
        raise UserError(
            f"lidar channels must be 'range' or 'range-intensity-mask', got {params['channels']!r}"
        )
    if modality == "audio":
        for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "frames"):
            params[name] = int(params[name])
            if params[name] <= 0:
                raise UserError(f"audio {name} must be positive, got {params[name]}")
        if params["win_length"] > params["n_fft"]:
            raise UserError("audio win_length must not exceed n_fft")
        if params["n_mels"] % 8 or params["frames"] % 8:
            raise UserError(
                f"audio n_mels ({params['n_mels']}) and frames ({params['frames']}) must be multiples of 8"
            )
        params["fmin"] = float(params["fmin"])
        params["fmax"] = float(params["fmax"]) if params["fmax"] is not None else params["sample_rate"] / 2
        params["db_min"], params["db_max"] = float(params["db_min"]), float(params["db_max"])
        if params["db_min"] >= params["db_max"]:
            raise UserError("audio db_min must be below db_max")
        if params["channels"] not in ("replicate", "deltas"):
            raise UserError(f"audio channels must be 'replicate' or 'deltas', got {params['channels']!r}")
    return params


def image_shape(modality: str, **params: Any) -> tuple[int, int] | None:
    """The H×W of the mapped image when it does not depend on the input (else None)."""
    p = mapping_params(modality, **params)
    if modality == "audio":
        return p["n_mels"], p["frames"]
    return tuple(p["size"]) if p["size"] is not None else None


# ----------------------------------------------------------------------------- resizing / padding


def _resize(x: np.ndarray, hw: tuple[int, int], mode: str) -> np.ndarray:
    """Resize a C×H×W float32 array (bilinear+antialias or nearest) with torch on the CPU."""
    import torch
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    if mode == "nearest":
        out = F.interpolate(t, size=hw, mode="nearest-exact")
    else:
        out = F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out[0].numpy()


def _pad8(x: np.ndarray, mode: str) -> np.ndarray:
    """Pad C×H×W at the bottom/right to multiples of 8 (``edge`` or ``constant`` zeros)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % 8, (-w) % 8
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, ph), (0, pw)), mode=mode)


def _fit(x: np.ndarray, size: list[int] | None, resize_mode: str, pad_mode: str) -> np.ndarray:
    return _resize(x, tuple(size), resize_mode) if size is not None else _pad8(x, pad_mode)


def _log_norm(r: np.ndarray, near: float, far: float) -> np.ndarray:
    valid = r > 0
    out = np.zeros_like(r, dtype=np.float32)
    out[valid] = (np.log(np.maximum(r[valid], near)) - np.log(near)) / (np.log(far) - np.log(near))
    return np.clip(out, 0.0, 1.0)


def _log_denorm(x: np.ndarray, near: float, far: float) -> np.ndarray:
    return (near * np.exp(np.clip(x, 0.0, 1.0) * (np.log(far) - np.log(near)))).astype(np.float32)


# ----------------------------------------------------------------------------- audio


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (scipy ``resample_poly``) of a 1-D waveform from ``rate`` to ``target`` Hz."""
    if rate == target:
        return wave
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(rate), int(target))
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


def log_mel(wave: np.ndarray, **params: Any) -> np.ndarray:
    """Mono waveform (at ``sample_rate``) → n_mels×frames log-mel spectrogram in dB.

    Uses ``transformers.audio_utils`` (Hann window, power 2, Slaney mel filters,
    ``10·log10(max(mel, 1e-10))``), clipped to [db_min, db_max] and cropped or
    padded with ``db_min`` to exactly ``frames`` frames.
    """
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    p = mapping_params("audio", **params)
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0 or not np.isfinite(wave).all():
        raise SchemaError("audio is empty or holds NaN/inf")
    if wave.size < p["n_fft"]:  # reflect padding needs at least n_fft // 2 + 1 samples
        wave = np.pad(wave, (0, p["n_fft"] - wave.size))
    filters = mel_filter_bank(
        num_frequency_bins=p["n_fft"] // 2 + 1,
        num_mel_filters=p["n_mels"],
        min_frequency=p["fmin"],
        max_frequency=p["fmax"],
        sampling_rate=p["sample_rate"],
        norm="slaney",
        mel_scale="slaney",
    )
    mel = spectrogram(
        wave,
        window_function(p["win_length"], "hann", frame_length=p["n_fft"]),
        frame_length=p["n_fft"],
        hop_length=p["hop_length"],
        fft_length=p["n_fft"],
        power=2.0,
        mel_filters=filters,
        log_mel="dB",
        min_value=1e-10,
    )
    mel = np.clip(mel, p["db_min"], p["db_max"]).astype(np.float32)
    frames = p["frames"]
    if mel.shape[1] >= frames:
        return mel[:, :frames]
    return np.pad(mel, ((0, 0), (0, frames - mel.shape[1])), constant_values=p["db_min"])


# ----------------------------------------------------------------------------- public API


def to_2d(modality: str, signal: np.ndarray, **params: Any) -> np.ndarray:
    """The 2-D float32 form of a raw signal that decoded sidecars carry, at the mapped size.

    depth: metres (H×W, resized/padded like the image); audio: log-mel in dB
    (n_mels×frames); lidar: range in metres. This is what
    ``from_three_channels(to_three_channels(x))`` approximates, so the "real"
    and "decoded" sources of the ablation can be compared in the same space.
    rgb has no 2-D form (raises UserError).
    """
    p = mapping_params(modality, **params)
    if modality == "depth":
        d = _depth_array(signal)
        return _log_denorm(
            _fit(_log_norm(d, p["near"], p["far"])[None], p["size"], "bilinear", "edge")[0],
            p["near"],
            p["far"],
        )
    if modality == "audio":
        return log_mel(signal, **params)
    if modality == "lidar":
        r = _lidar_array(signal)[0]
        return _fit(r[None], p["size"], "nearest", "constant")[0].astype(np.float32)
    raise UserError("rgb has no 2-D signal form")


def to_three_channels(modality: str, signal: np.ndarray, **params: Any) -> np.ndarray:
    """Map a raw signal to a float32 3×H×W image in [0, 1] (H, W multiples of 8); see module doc."""
    p = mapping_params(modality, **params)
    if modality == "rgb":
        rgb = np.asarray(signal)
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise SchemaError(f"rgb must be H×W×3, got shape {rgb.shape}")
        x = rgb.astype(np.float32).transpose(2, 0, 1) / (255.0 if rgb.dtype == np.uint8 else 1.0)
        out = _fit(x, p["size"], "bilinear", "edge")
    elif modality == "depth":
        d = _depth_array(signal)
        x = _fit(_log_norm(d, p["near"], p["far"])[None], p["size"], "bilinear", "edge")
        out = np.repeat(x, 3, axis=0)
    elif modality == "audio":
        mel = log_mel(signal, **params)
        x = (mel - p["db_min"]) / (p["db_max"] - p["db_min"])
        if p["channels"] == "replicate":
            out = np.repeat(x[None], 3, axis=0)
        else:
            d1 = np.diff(x, axis=1, prepend=x[:, :1])
            d2 = np.diff(d1, axis=1, prepend=d1[:, :1])
            out = np.stack([x, (d1 + 1) / 2, (np.clip(d2, -1, 1) + 1) / 2])
    else:  # lidar
        arr = _lidar_array(signal)
        r = arr[0]
        inten = arr[1] if arr.shape[0] > 1 else np.zeros_like(r)
        valid = (r > 0).astype(np.float32)
        x = np.stack([_log_norm(r, p["near"], p["far"]), np.clip(inten, 0, 1) * valid, valid])
        x = _fit(x, p["size"], "nearest", "constant")  # padding reads "no return"
        valid = x[2] > 0.5
        if p["fill"] == "nearest" and 0 < valid.sum() < valid.size:
            from scipy.ndimage import distance_transform_edt

            _, (ii, jj) = distance_transform_edt(~valid, return_indices=True)
            x[:2] = x[:2, ii, jj]
        out = np.repeat(x[:1], 3, axis=0) if p["channels"] == "range" else x
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def from_three_channels(
    modality: str,
    image3: np.ndarray,
    *,
    shape: tuple[int, int] | None = None,
    keep_intensity: bool = False,
    **params: Any,
) -> np.ndarray:
    """Invert :func:`to_three_channels` (channels are averaged where they were replicated).

    Returns depth H×W metres, audio n_mels×frames log-mel **dB** (no waveform),
    lidar H×W range in metres (2×H×W range+intensity with ``keep_intensity``),
    rgb H×W×3 uint8. ``shape`` crops the padding that ``size=None`` added.
    """
    p = mapping_params(modality, **params)
    x = np.asarray(image3, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a 3×H×W image, got shape {x.shape}")
    x = np.clip(x, 0.0, 1.0)
    if shape is not None:
        x = x[:, : shape[0], : shape[1]]
    if modality == "rgb":
        return np.round(x.transpose(1, 2, 0) * 255).astype(np.uint8)
    if modality == "depth":
        return _log_denorm(x.mean(axis=0), p["near"], p["far"])
    if modality == "audio":
        m = x.mean(axis=0) if p["channels"] == "replicate" else x[0]
        return (m * (p["db_max"] - p["db_min"]) + p["db_min"]).astype(np.float32)
    if p["channels"] == "range":
        m = x.mean(axis=0)
        r = _log_denorm(m, p["near"], p["far"])
        if p["fill"] == "zero":
            r = np.where(m >= 1 / 255, r, 0.0).astype(np.float32)
        if keep_intensity:
            return np.stack([r, np.zeros_like(r)]).astype(np.float32)
        return r
    valid = x[2] > 0.5
    r = np.where(valid, _log_denorm(x[0], p["near"], p["far"]), 0.0).astype(np.float32)
    if keep_intensity:
        return np.stack([r, np.where(valid, x[1], 0.0)]).astype(np.float32)
    return r


# ----------------------------------------------------------------------------- source samples


def _depth_array(signal: np.ndarray) -> np.ndarray:
    d = np.asarray(signal)
    if d.ndim == 3 and d.shape[0] == 1:
        d = d[0]
    if d.ndim != 2 or d.dtype.kind != "f":
        raise SchemaError(f"depth must be a float H×W map, got {d.dtype} {d.shape}")
    if not np.isfinite(d).all():
        raise SchemaError("depth holds NaN or inf")
    return d.astype(np.float32)


def _lidar_array(signal: np.ndarray) -> np.ndarray:
    """Range image → 1×B×A or 2×B×A (range, intensity) float32."""
    a = np.asarray(signal)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] not in (1, 2) or a.dtype.kind != "f":
        raise SchemaError(f"lidar must be a float B×A (or 2×B×A) range image, got {a.dtype} {a.shape}")
    if not np.isfinite(a).all():
        raise SchemaError("lidar holds NaN or inf")
    if (a[0] < 0).any():
        raise SchemaError("lidar range is negative")
    return a.astype(np.float32)


def audio_from_sample(sample: Mapping[str, Any]) -> tuple[np.ndarray, int]:
    """The (mono float32 waveform, rate) of a source sample's ``audio.flac``."""
    from synesthesia.sources.signals import decode_audio

    if "audio.flac" not in sample:
        raise SchemaError(f"sample {sample.get('__key__')!r} has no audio.flac")
    return decode_audio(sample["audio.flac"])


def signal_from_sample(
    modality: str, sample: Mapping[str, Any], *, sample_rate: int | None = None
) -> np.ndarray:
    """Decode and validate a modality's raw signal from a source sample (``field -> bytes``).

    rgb: H×W×3 uint8 (``rgb.png``/``rgb.jpg``); depth: H×W float32 metres
    (``depth.npy``); audio: mono float32 waveform (``audio.flac``), resampled to
    ``sample_rate`` when given; lidar: B×A float32 range (``lidar.npy``), or
    2×B×A (range, intensity) when ``lidar_intensity.npy`` is present or
    ``lidar.npy`` already holds both. Missing or bad fields raise SchemaError.
    """
    _check_modality(modality)
    key = sample.get("__key__")
    if modality == "rgb":
        from synesthesia.shards.schema import image_field
        from synesthesia.sources.signals import decode_image

        return decode_image(sample[image_field(sample)])
    if modality == "audio":
        wave, rate = audio_from_sample(sample)
        return resample(wave, rate, sample_rate) if sample_rate else wave
    name = {"depth": "depth.npy", "lidar": "lidar.npy"}[modality]
    if name not in sample:
        raise SchemaError(f"sample {key!r} has no {name}")
    floats = ("float16", "float32", "float64")
    if modality == "depth":
        d = decode_npy(sample[name], dtypes=floats, ndim=(2,), finite=True).astype(np.float32)
        if (d < 0).any():
            raise SchemaError(f"sample {key!r}: depth is negative")
        return d
    r = decode_npy(sample[name], dtypes=floats, ndim=(2, 3), finite=True).astype(np.float32)
    if "lidar_intensity.npy" in sample and r.ndim == 2:
        inten = decode_npy(sample["lidar_intensity.npy"], dtypes=floats, ndim=(2,), finite=True)
        if inten.shape != r.shape:
            raise SchemaError(f"sample {key!r}: lidar_intensity {inten.shape} does not match lidar {r.shape}")
        r = np.stack([r, inten.astype(np.float32)])
    return _lidar_array(r)[0] if r.ndim == 2 else _lidar_array(r)
