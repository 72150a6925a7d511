"""Shard format v1: sample keys, field names and safe (no-pickle) array encoding.

A source sample holds ``__key__`` (no dots), ``rgb.png`` or ``rgb.jpg`` (the
original bytes), ``cls`` (an int label, as text), ``json`` (metadata) and any
paired signals: ``depth.npy`` (H×W float32 metres), ``audio.flac`` (mono),
``lidar.npy`` (beams×azimuth float32 metres, 0 = no return) with an optional
``lidar_intensity.npy`` (beams×azimuth float32 in [0, 1]). A latent sidecar
sample holds the same ``__key__`` and ``<modality>.latent.npy``; a decoded
sidecar holds ``<modality>.decoded.npy``.

Every JSON file read from a set (a manifest, a cache key) goes through
:func:`read_json_file`: a regular file (local or in a bucket), of bounded size
and nesting, one-line errors naming it. :func:`check_shard_name` is the only shard name a manifest
may list: ``<split>-NNNNNN.tar``, a plain file name in the set's own folder.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from synesthesia import UserError
from synesthesia.storage import as_path, read_capped
from synesthesia.utils import UnsafeFile

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

# JSON files read from a shard set (written by someone else, perhaps downloaded) are hostile
# until bounded: a manifest of a million shards is ~200 MB less than this cap allows.
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 32


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


def check_shard_name(name: Any, split: str, index: int) -> str:
    """``name`` if it is shard ``index`` of ``split`` as we write it (``train-000003.tar``).

    A manifest must never choose where files land: a name with a folder, an absolute
    path or ``..`` - or any other name - raises SchemaError.
    """
    expected = shard_name(split, index)
    if name == expected:
        return name
    if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..") or "\0" in name:
        raise SchemaError(f"shard {str(name)[:60]!r} is not a plain shard name ({expected})", "bad_name")
    raise SchemaError(f"shard {name[:60]!r} is listed where {expected} belongs", "bad_name")


def read_json_file(
    path: str | Path, what: str = "JSON", max_bytes: int | None = None, max_depth: int | None = None
) -> Any:
    """The JSON in ``path`` (local or an fsspec URL), read as hostile input: a regular file (not a
    FIFO, device or folder) of at most ``max_bytes`` (:data:`MAX_JSON_BYTES`), UTF-8 JSON without
    NaN or infinities, nested at most ``max_depth`` (:data:`MAX_JSON_DEPTH`) levels. Anything else is a one-line UserError
    naming the file (``what`` says what it should have been: ``unreadable manifest``)."""
    path = as_path(path)
    max_bytes = MAX_JSON_BYTES if max_bytes is None else max_bytes
    max_depth = MAX_JSON_DEPTH if max_depth is None else max_depth
    try:
        data = read_capped(path, max_bytes)
    except UnsafeFile as exc:
        if exc.reason == "file_too_large":
            raise UserError(f"{path}: larger than {max_bytes} bytes; not a file this tool writes") from None
        raise UserError(f"{path}: not a regular file") from None
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({exc.strerror or exc.__class__.__name__})") from None
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise UserError(f"{path}: JSON nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: unreadable {what} ({exc.__class__.__name__}: {str(exc)[:80]})") from None
    if json_depth(value) > max_depth:
        raise UserError(f"{path}: JSON nested deeper than {max_depth} levels")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def json_depth(value: Any) -> int:
    """How many containers deep ``value`` (parsed JSON) nests, found without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


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
    """A sample's ``json`` field; malformed or deeply nested JSON raises SchemaError."""
    try:
        value = json.loads(data.decode())
    except (RecursionError, UnicodeDecodeError, ValueError) as exc:
        raise SchemaError(f"json field unreadable ({exc.__class__.__name__})", "bad_json") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise SchemaError(f"json field nested deeper than {MAX_JSON_DEPTH} levels", "bad_json")
    return value


def image_field(sample: dict[str, Any]) -> str:
    for name in IMAGE_FIELDS:
        if name in sample:
            return name
    raise SchemaError(f"sample {sample.get('__key__')!r} has no rgb.png or rgb.jpg", "no_image")
