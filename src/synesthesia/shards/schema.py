"""Shard format v1: sample keys, field names and safe (no-pickle) array encoding.

A source sample holds ``__key__`` (no dots), ``rgb.png`` or ``rgb.jpg`` (the
original bytes), ``cls`` (an int label, as text), ``json`` (metadata) and any
paired signals: ``depth.npy`` (H×W float32 metres), ``audio.flac`` (mono),
``lidar.npy`` (beams×azimuth float32 metres, 0 = no return) with an optional
``lidar_intensity.npy`` (beams×azimuth float32 in [0, 1]). A latent sidecar
sample holds the same ``__key__`` and ``<modality>.latent.npy``; a decoded
sidecar holds ``<modality>.decoded.npy``.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test", "paired")
KINDS = ("source", "latent", "decoded")
IMAGE_FIELDS = ("rgb.png", "rgb.jpg")
MANIFEST = "manifest.json"

# Paired-signal field of each modality in a source sample.
SIGNAL_FIELDS = {"depth": "depth.npy", "audio": "audio.flac", "lidar": "lidar.npy"}

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# A tar member is ``<key>.<field>``; USTAR names hold 100 bytes and fields such as
# ``lidar_intensity.npy`` or ``depth.latent.npy`` need room, so keys stop at 80.
MAX_KEY_LENGTH = 80


class SchemaError(ValueError):
    """A sample or array that does not follow format v1 (skipped and counted by callers).

    ``reason`` is the short name the sample is counted under in a manifest's
    ``skipped`` mapping (``unreadable_image``, ``bad_npy`` ...).
    """

    def __init__(self, message: str, reason: str = "bad_sample"):
        super().__init__(message)
        self.reason = reason


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (ASCII letters, digits, ``_``, ``-``; ≤ 80)."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise SchemaError(
            f"bad key {key!r}: keys are ASCII letters, digits, '_' and '-' (no dots)", "bad_key"
        )
    if len(key) > MAX_KEY_LENGTH:
        raise SchemaError(f"bad key {key[:20]!r}...: longer than {MAX_KEY_LENGTH} characters", "bad_key")
    return key


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def latent_field(modality: str) -> str:
    return f"{modality}.latent.npy"


def decoded_field(modality: str) -> str:
    return f"{modality}.decoded.npy"


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(
    data: bytes,
    *,
    dtypes: tuple[str, ...] | None = None,
    ndim: tuple[int, ...] | None = None,
    finite: bool = False,
) -> np.ndarray:
    """Load ``.npy`` bytes without pickle, checking dtype, rank and (optionally) finiteness."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle; also malformed headers
        raise SchemaError(f"npy refused: {str(exc).splitlines()[0]}", "bad_npy") from None
    except Exception as exc:
        raise SchemaError(f"npy unreadable: {exc.__class__.__name__}", "bad_npy") from None
    if dtypes is not None and array.dtype.name not in dtypes:
        raise SchemaError(f"npy dtype {array.dtype} not in {dtypes}", "bad_npy")
    if ndim is not None and array.ndim not in ndim:
        raise SchemaError(f"npy rank {array.ndim} not in {ndim}", "bad_npy")
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise SchemaError("npy holds NaN or inf", "non_finite")
    return array


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def decode_json(data: bytes) -> Any:
    return json.loads(data.decode())


def image_field(sample: dict[str, Any]) -> str:
    for name in IMAGE_FIELDS:
        if name in sample:
            return name
    raise SchemaError(f"sample {sample.get('__key__')!r} has no rgb.png or rgb.jpg", "no_image")
