"""Encoding and decoding of paired signals as stored in source shards."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from PIL import Image

from synesthesia.shards.schema import SchemaError


def encode_png(rgb: np.ndarray) -> bytes:
    """H×W×3 uint8 → PNG bytes (deterministic: no timestamps, fixed compression)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(
        buf, format="PNG", compress_level=6
    )
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes → H×W×3 uint8; unreadable or truncated images raise SchemaError."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise SchemaError(f"unreadable image ({exc.__class__.__name__})") from None


def encode_flac(wave: np.ndarray, rate: int) -> bytes:
    """Mono float waveform in [-1, 1] → 16-bit FLAC bytes."""
    buf = io.BytesIO()
    sf.write(
        buf, np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0), rate, format="FLAC", subtype="PCM_16"
    )
    return buf.getvalue()


def probe_audio(data: bytes) -> tuple[int, int, int]:
    """(sample rate, frames, channels) of FLAC/WAV bytes, from the header alone (nothing decoded).

    These numbers are the file's claims: bound them before decoding, which
    allocates frames × channels samples up front.
    """
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:
        raise SchemaError(f"unreadable audio ({exc.__class__.__name__})") from None
    return int(info.samplerate), int(info.frames), int(info.channels)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC/WAV bytes → (mono float32 waveform, sample rate); bad audio raises SchemaError."""
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise SchemaError(f"unreadable audio ({exc.__class__.__name__})") from None
    wave = wave.mean(axis=1)
    if wave.size == 0 or not np.isfinite(wave).all():
        raise SchemaError("audio is empty or holds NaN/inf")
    return wave, int(rate)
