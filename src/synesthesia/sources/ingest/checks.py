"""Checking a loaded item and building its canonical source sample (``build_sample``).

- ``check_image``: image bytes are stored exactly as read (``rgb.png`` or
  ``rgb.jpg`` after the actual format); they are decoded once, only to check them.
- ``check_depth``: H×W float depth in metres → float32, ≥ 0 and finite.
- ``check_audio``: WAV/FLAC → mono 16-bit FLAC at ``ingest.audio_rate``.
- ``check_lidar`` / ``check_intensity``: a beams×azimuth range image (``.npy``,
  optionally 2×beams×azimuth with intensity) or a KITTI ``.bin`` scan projected
  with ``ingest.lidar_*``; intensity clipped to [0, 1].

Bad samples — unreadable or truncated images, zero-byte files, other image
formats, ``.npy`` files with a wrong dtype, rank or a pickle inside, NaN/inf in
a signal — raise ``SchemaError`` with a reason, which the writer counts in the
manifest's ``skipped``.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

from synesthesia.shards.schema import SchemaError, encode_json, encode_npy
from synesthesia.sources.ingest.items import SIGNAL_SUFFIXES, Item
from synesthesia.sources.lidar import project_scan, read_velodyne_bin
from synesthesia.sources.signals import decode_audio, encode_flac

FLOAT_DTYPES = ("float16", "float32", "float64")


def check_image(data: bytes) -> tuple[str, dict[str, Any]]:
    """(``rgb.png`` | ``rgb.jpg``, metadata) of image bytes, decoding them fully once to check them."""
    if not data:
        raise SchemaError("zero-byte image", "empty_file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in ("PNG", "JPEG"):
                raise SchemaError(f"image format {fmt} is not PNG or JPEG", "unsupported_image")
            im.load()
            im.convert("RGB")
            width, height = im.size
    except SchemaError:
        raise
    except Exception as exc:
        raise SchemaError(f"unreadable image ({exc.__class__.__name__})", "unreadable_image") from None
    return ("rgb.png" if fmt == "PNG" else "rgb.jpg"), {"width": width, "height": height, "image_format": fmt}


def check_depth(data: bytes) -> np.ndarray:
    """H×W float depth in metres (a singleton channel is squeezed) → float32; ≥ 0 and finite."""
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
    if (depth < 0).any():
        raise SchemaError("negative depth", "bad_signal")
    return depth.astype(np.float32)


def check_audio(data: bytes, rate: int) -> tuple[bytes, dict[str, Any]]:
    """WAV/FLAC bytes → mono 16-bit FLAC at ``rate`` (resampled with a polyphase filter)."""
    if not data:
        raise SchemaError("zero-byte audio file", "empty_file")
    try:
        wave, source_rate = decode_audio(data)
    except SchemaError as exc:
        raise SchemaError(str(exc), "unreadable_audio") from None
    if source_rate != rate:
        from scipy.signal import resample_poly

        g = math.gcd(source_rate, rate)
        wave = resample_poly(wave, rate // g, source_rate // g).astype(np.float32)
    return encode_flac(wave, rate), {"audio_rate": rate, "audio_samples": int(len(wave))}


def check_lidar(data: bytes, suffix: str, cfg: Any) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(range, intensity or None, metadata) from a ``.npy`` range image or a KITTI ``.bin`` scan."""
    if not data:
        raise SchemaError("zero-byte lidar file", "empty_file")
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
        array, intensity = array[0], np.clip(array[1], 0.0, 1.0).astype(np.float32)
    if (array < 0).any():
        raise SchemaError("negative lidar range", "bad_signal")
    return array.astype(np.float32), intensity, {"lidar_source": "range_npy"}


def check_intensity(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A beams×azimuth intensity image matching the range image, clipped to [0, 1]."""
    from synesthesia.shards.schema import decode_npy

    intensity = decode_npy(data, dtypes=FLOAT_DTYPES, ndim=(2,), finite=True)
    if intensity.shape != tuple(shape):
        raise SchemaError(f"intensity shape {intensity.shape} != range shape {tuple(shape)}", "bad_npy")
    return np.clip(intensity, 0.0, 1.0).astype(np.float32)


def build_sample(item: Item, label: int, class_name: str, cfg: Any) -> dict[str, Any]:
    """The canonical source sample of a loaded item; raises SchemaError on anything bad."""
    try:
        image, signals = item.load()
    except SchemaError:
        raise
    except OSError as exc:
        raise SchemaError(f"unreadable file ({exc.__class__.__name__})", "unreadable_file") from None
    image_name, meta = check_image(image)
    sample: dict[str, Any] = {"__key__": item.key, image_name: image, "cls": str(label).encode()}
    meta.update({"class_name": class_name, "source": item.origin})
    for modality, (data, suffix) in sorted(signals.items()):
        if modality not in SIGNAL_SUFFIXES:
            continue  # companions (lidar_intensity) are read with their modality
        try:
            if modality == "depth":
                depth = check_depth(data)
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
