"""Checking a loaded item and building its canonical source sample (``build_sample``).

- ``check_image``: image bytes are stored exactly as read (``rgb.png`` or
  ``rgb.jpg`` after the actual format); the size is read from the header and
  capped (``MAX_IMAGE_PIXELS``) before they are decoded once, only to check them.
- ``check_depth``: H×W float depth in metres → float32, ≥ 0 and finite after
  the cast; H×W must equal the decoded image's (no resampling is done).
- ``check_audio``: WAV/FLAC → mono 16-bit FLAC at ``ingest.audio_rate``; the
  rate (``MIN_AUDIO_RATE``..``MAX_AUDIO_RATE``) and length (``MAX_AUDIO_SECONDS``,
  ``MAX_AUDIO_SAMPLES``) are read from the header and capped before decoding.
- ``check_lidar`` / ``check_intensity``: a beams×azimuth range image (``.npy``,
  optionally 2×beams×azimuth with intensity; at most ``MAX_LIDAR_BEAMS`` ×
  ``MAX_LIDAR_AZIMUTH``, ranges up to ``lidar.MAX_LIDAR_RANGE``) or a KITTI
  ``.bin`` scan projected with ``ingest.lidar_*``; intensity clipped to [0, 1].

Bad samples — unreadable or truncated images, zero-byte or oversized files,
other image formats, images over the pixel cap, ``.npy`` files with a wrong
dtype, rank or a pickle inside, NaN/inf in a signal (also after the cast to
float32), a depth map of another size than its image, audio at an absurd rate
or length, absurd LiDAR values — raise ``SchemaError`` with a reason, which the
writer counts in the manifest's ``skipped``. Every number read from a file is
bounded before it sizes an allocation.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
from PIL import Image

from synesthesia.shards.schema import SchemaError, encode_json, encode_npy
from synesthesia.sources.ingest.items import MAX_FILE_BYTES, SIGNAL_SUFFIXES, Item
from synesthesia.sources.lidar import MAX_LIDAR_RANGE, project_scan, read_velodyne_bin
from synesthesia.sources.signals import decode_audio, encode_flac, probe_audio

FLOAT_DTYPES = ("float16", "float32", "float64")

MAX_IMAGE_PIXELS = 8192 * 8192
"""The most pixels (width × height, from the header) an input image may have (64 MP).

Checked before decoding: a PNG of zeros compresses ~1000:1, so a 200 KB file
can claim 13000×13000 pixels and cost 1.4 GB to decode, below PIL's own
decompression-bomb limit (2 × 89 MP). 64 MP (8192²) is above any camera
photo used for training; larger images are skipped as ``image_too_large``.
"""
MIN_AUDIO_RATE = 1_000
MAX_AUDIO_RATE = 384_000
"""Sample rates (Hz) accepted from an input audio file; others are ``bad_audio_rate``.

A 1 Hz file resampled to 16 kHz multiplies its length by 16000; 384 kHz is the
highest rate of common audio hardware.
"""
MAX_AUDIO_SECONDS = 600.0
MAX_AUDIO_SAMPLES = 2**25
"""Caps on one audio file's length, from its header, before decoding: 10 minutes, and 32 Mi
samples (128 MiB as float32) both as decoded (frames × channels) and after resampling to
``ingest.audio_rate``. A FLAC of silence is tiny on disk, so the file-size cap alone does
not bound it. Longer audio is skipped as ``audio_too_long``."""
MAX_AUDIO_CHANNELS = 64
MAX_LIDAR_BEAMS = 1024
MAX_LIDAR_AZIMUTH = 16384
"""The largest beams × azimuth range image accepted (real sensors: 16..128 beams, ≤ 4096 columns)."""


def check_image(data: bytes) -> tuple[str, dict[str, Any]]:
    """(``rgb.png`` | ``rgb.jpg``, metadata) of image bytes, decoding them fully once to check them."""
    if not data:
        raise SchemaError("zero-byte image", "empty_file")
    if len(data) > MAX_FILE_BYTES:
        raise SchemaError(f"image of {len(data)} bytes, over the {MAX_FILE_BYTES}-byte cap", "file_too_large")
    try:
        with warnings.catch_warnings():  # our cap, below PIL's, decides; no stray warning line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only: format and size
        with im:
            fmt = im.format
            if fmt not in ("PNG", "JPEG"):
                raise SchemaError(f"image format {fmt} is not PNG or JPEG", "unsupported_image")
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                raise SchemaError(
                    f"image of {width}×{height} pixels, over the {MAX_IMAGE_PIXELS}-pixel cap",
                    "image_too_large",
                )
            im.load()
            im.convert("RGB")
    except SchemaError:
        raise
    except Image.DecompressionBombError:
        raise SchemaError(
            f"image over PIL's pixel limit (cap {MAX_IMAGE_PIXELS})", "image_too_large"
        ) from None
    except Exception as exc:
        raise SchemaError(f"unreadable image ({exc.__class__.__name__})", "unreadable_image") from None
    return ("rgb.png" if fmt == "PNG" else "rgb.jpg"), {"width": width, "height": height, "image_format": fmt}


def check_depth(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """H×W float depth in metres (a singleton channel is squeezed) → float32; ≥ 0 and finite.

    With ``size`` (the image's width, height), the depth map must be exactly
    height × width: depth is paired pixel for pixel with its image.
    """
    if not data:
        raise SchemaError("zero-byte depth file", "empty_file")
    from synesthesia.shards.schema import decode_npy

    depth = decode_npy(data, dtypes=FLOAT_DTYPES, ndim=(2, 3), finite=True)
    if depth.ndim == 3:
        if 1 not in (depth.shape[0], depth.shape[-1]):
            raise SchemaError(f"depth of shape {depth.shape} is not H×W", "bad_npy")
        depth = depth.reshape(depth.shape[1:] if depth.shape[0] == 1 else depth.shape[:-1])
    if depth.size == 0:
        raise SchemaError("empty depth map", "bad_npy")
    if size is not None and depth.shape != (size[1], size[0]):
        height, width = depth.shape
        raise SchemaError(
            f"depth of {height}×{width} does not match its image of {size[1]}×{size[0]} (H×W)",
            "size_mismatch",
        )
    if (depth < 0).any():
        raise SchemaError("negative depth", "bad_signal")
    return _finite_float32(depth, "depth")


def _finite_float32(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` as float32, refused (``non_finite``) if the cast overflows (float64 above 3.4e38)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = array.astype(np.float32)
    if not np.isfinite(out).all():
        raise SchemaError(f"{what} holds values beyond float32's range", "non_finite")
    return out


def check_audio(data: bytes, rate: int) -> tuple[bytes, dict[str, Any]]:
    """WAV/FLAC bytes → mono 16-bit FLAC at ``rate`` (resampled with a polyphase filter)."""
    if not data:
        raise SchemaError("zero-byte audio file", "empty_file")
    if len(data) > MAX_FILE_BYTES:
        raise SchemaError(f"audio of {len(data)} bytes, over the {MAX_FILE_BYTES}-byte cap", "file_too_large")
    try:
        source_rate, frames, channels = probe_audio(data)
    except SchemaError as exc:
        raise SchemaError(str(exc), "unreadable_audio") from None
    if not MIN_AUDIO_RATE <= source_rate <= MAX_AUDIO_RATE:
        raise SchemaError(
            f"sample rate {source_rate} Hz outside {MIN_AUDIO_RATE}..{MAX_AUDIO_RATE} Hz", "bad_audio_rate"
        )
    if not 1 <= channels <= MAX_AUDIO_CHANNELS:
        raise SchemaError(f"{channels} audio channels (at most {MAX_AUDIO_CHANNELS})", "unreadable_audio")
    seconds = frames / source_rate
    if (
        seconds > MAX_AUDIO_SECONDS
        or frames * channels > MAX_AUDIO_SAMPLES
        or seconds * rate > MAX_AUDIO_SAMPLES
    ):
        raise SchemaError(
            f"audio of {frames} frames × {channels} channels at {source_rate} Hz ({seconds:.0f} s) is over the caps"
            f" ({MAX_AUDIO_SECONDS:.0f} s, {MAX_AUDIO_SAMPLES} samples)",
            "audio_too_long",
        )
    try:
        wave, source_rate = decode_audio(data)
    except SchemaError as exc:
        raise SchemaError(str(exc), "unreadable_audio") from None
    if source_rate != rate:
        from scipy.signal import resample_poly

        g = math.gcd(source_rate, rate)
        wave = _finite_float32(resample_poly(wave, rate // g, source_rate // g), "resampled audio")
    return encode_flac(wave, rate), {"audio_rate": rate, "audio_samples": int(len(wave))}


def check_lidar(data: bytes, suffix: str, cfg: Any) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(range, intensity or None, metadata) from a ``.npy`` range image or a KITTI ``.bin`` scan."""
    if not data:
        raise SchemaError("zero-byte lidar file", "empty_file")
    if len(data) > MAX_FILE_BYTES:
        raise SchemaError(f"lidar of {len(data)} bytes, over the {MAX_FILE_BYTES}-byte cap", "file_too_large")
    if suffix == ".bin":
        projected = project_scan(
            read_velodyne_bin(data),
            beams=cfg.lidar_beams,
            azimuth=cfg.lidar_azimuth,
            fov_up=cfg.lidar_fov_up,
            fov_down=cfg.lidar_fov_down,
        )
        meta = {
            "lidar_source": "kitti_bin",
            "lidar_points": projected.points_in,
            "lidar_points_kept": projected.points_kept,
            "lidar_fov": [cfg.lidar_fov_up, cfg.lidar_fov_down],
        }
        return projected.range, projected.intensity, meta
    from synesthesia.shards.schema import decode_npy

    array = decode_npy(data, dtypes=FLOAT_DTYPES, ndim=(2, 3), finite=True)
    intensity = None
    if array.ndim == 3:
        if array.shape[0] != 2:
            raise SchemaError(
                f"lidar of shape {array.shape} is not beams×azimuth or 2×beams×azimuth", "bad_npy"
            )
        array, intensity = array[0], np.clip(_finite_float32(array[1], "lidar intensity"), 0.0, 1.0)
    beams, azimuth = array.shape
    if not (1 <= beams <= MAX_LIDAR_BEAMS and 1 <= azimuth <= MAX_LIDAR_AZIMUTH):
        raise SchemaError(
            f"lidar range image of {beams}×{azimuth} (at most {MAX_LIDAR_BEAMS}×{MAX_LIDAR_AZIMUTH})",
            "bad_lidar",
        )
    if (array < 0).any():
        raise SchemaError("negative lidar range", "bad_signal")
    if (array > MAX_LIDAR_RANGE).any():
        raise SchemaError(f"lidar range above {MAX_LIDAR_RANGE:.0f} m", "bad_lidar")
    return _finite_float32(array, "lidar range"), intensity, {"lidar_source": "range_npy"}


def check_intensity(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A beams×azimuth intensity image matching the range image, clipped to [0, 1]."""
    from synesthesia.shards.schema import decode_npy

    intensity = decode_npy(data, dtypes=FLOAT_DTYPES, ndim=(2,), finite=True)
    if intensity.shape != tuple(shape):
        raise SchemaError(f"intensity shape {intensity.shape} != range shape {tuple(shape)}", "bad_npy")
    return np.clip(_finite_float32(intensity, "lidar intensity"), 0.0, 1.0)


def build_sample(item: Item, label: int, class_name: str, cfg: Any) -> dict[str, Any]:
    """The canonical source sample of a loaded item; raises SchemaError on anything bad."""
    try:
        image, signals = item.load()
    except SchemaError:
        raise
    except OSError as exc:
        raise SchemaError(f"unreadable file ({exc.__class__.__name__})", "unreadable_file") from None
    image_name, meta = check_image(image)
    image_size = (meta["width"], meta["height"])
    sample: dict[str, Any] = {"__key__": item.key, image_name: image, "cls": str(label).encode()}
    meta.update({"class_name": class_name, "source": item.origin})
    for modality, (data, suffix) in sorted(signals.items()):
        if modality not in SIGNAL_SUFFIXES:
            continue  # companions (lidar_intensity) are read with their modality
        try:
            if len(data) > MAX_FILE_BYTES:
                raise SchemaError(f"{len(data)} bytes, over the {MAX_FILE_BYTES}-byte cap", "file_too_large")
            if modality == "depth":
                depth = check_depth(data, image_size)
                sample["depth.npy"] = encode_npy(depth)
                meta["depth_shape"] = list(depth.shape)
            elif modality == "audio":
                sample["audio.flac"], audio_meta = check_audio(data, cfg.audio_rate)
                meta.update(audio_meta)
            elif modality == "lidar":
                rng, intensity, lidar_meta = check_lidar(data, suffix, cfg)
                if intensity is None and "lidar_intensity" in signals:
                    intensity = check_intensity(signals["lidar_intensity"][0], rng.shape)
                sample["lidar.npy"] = encode_npy(rng)
                if intensity is not None:
                    sample["lidar_intensity.npy"] = encode_npy(intensity)
                meta.update(lidar_meta, lidar_shape=list(rng.shape))
        except SchemaError as exc:
            raise SchemaError(f"{modality}: {exc}", exc.reason) from None
    sample["json"] = encode_json(meta)
    return sample
