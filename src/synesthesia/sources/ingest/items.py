"""What every ingest reader yields, and the naming rules they share.

- ``Item``: one candidate sample of a source, before checking (its key, split,
  label, origin, and a lazy ``load`` of the image and paired-signal bytes).
- ``sanitise_key``: the sample key of a relative path or raw key. ``/`` becomes
  ``__``, and every character that is not an ASCII letter, digit, ``_`` or
  ``-`` (dots included) becomes ``_``. Keys longer than 80 characters are
  shortened with a hash suffix.
- ``split_word``: the split a file or folder name refers to: ``train``,
  ``val`` (or ``validation``/``valid``) or ``test`` (``SPLIT_ALIASES``).
- ``_parse_label``: a class name or index from a tar field or HF column value.
- ``SIGNAL_SUFFIXES``: the paired modalities (``depth``, ``audio``, ``lidar``)
  and the file suffixes each accepts.
- ``direct_reader``: the ``open_reader`` of a source whose items can be read
  again in any order (folders, HF datasets).
- ``read_regular``: the bytes of one input file, read only if it is a regular
  file (symlinks resolved) of at most ``MAX_FILE_BYTES``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synesthesia.shards.schema import MAX_KEY_LENGTH, SchemaError
from synesthesia.utils import UnsafeFile, read_regular_file, sha256_bytes

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# Paired-signal folders of the image-folder layout and the file suffixes each accepts.
SIGNAL_SUFFIXES = {"depth": (".npy",), "audio": (".wav", ".flac"), "lidar": (".npy", ".bin")}
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")
MAX_FILE_BYTES = 64 * 2**20
"""The largest input file (image, ``.npy``, audio, LiDAR scan or tar member) ingest reads, in bytes.

Every file is read whole into memory; a 64 MiB cap is far above a photo, a
depth map, a minute of 48 kHz audio or a KITTI scan (about 2 MB), and keeps a
hostile file (``/dev/zero`` behind a symlink, a multi-GB blob) from exhausting
memory. Larger files are skipped and counted as ``file_too_large``.
"""


@dataclass
class Item:
    """One candidate sample of a source, before checking.

    ``label`` is a class name (str) or index (int); ``load`` returns the image
    bytes and ``{modality: (bytes, suffix)}``, reading lazily. ``error`` marks an
    item known to be bad before loading (skipped and counted when written).
    ``ref`` is a small locator of the item's bytes that the source's
    ``open_reader`` reads again in ingest's second pass (no bytes are kept).
    """

    key: str
    split: str
    label: str | int | None
    origin: str
    load: Callable[[], tuple[bytes, dict[str, tuple[bytes, str]]]] | None = None
    error: SchemaError | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    ref: Any = None


def sanitise_key(parts: list[str] | str) -> str:
    """A format-v1 key from path parts: ``/`` → ``__``, other bad characters (dots too) → ``_``."""
    if isinstance(parts, str):
        parts = [p for p in parts.split("/") if p]
    key = "__".join(_BAD_KEY_CHARS.sub("_", part) for part in parts) or "_"
    if len(key) > MAX_KEY_LENGTH:
        key = f"{key[: MAX_KEY_LENGTH - 17]}-{sha256_bytes(key.encode())[:16]}"
    return key


def split_word(name: str) -> str | None:
    """The canonical split a file or folder name refers to (``train-000.tar`` → train), if any."""
    for token in re.split(r"[-_.\s]+", name.lower()):
        if token in SPLIT_ALIASES:
            return SPLIT_ALIASES[token]
    return None


def _parse_label(value: Any) -> str | int | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        try:
            value = value.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        value = value.strip()
        if re.fullmatch(r"\d+", value):
            return int(value)
        return value or None
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    return None


def read_regular(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes
    (:func:`synesthesia.utils.read_regular_file`); else ``SchemaError`` with the reason
    (``not_regular_file``, ``file_too_large``), so the sample is skipped and counted."""
    try:
        return read_regular_file(path, limit)
    except UnsafeFile as exc:
        raise SchemaError(str(exc), exc.reason) from None


@contextmanager
def direct_reader(load: Callable[[Any], Any]) -> Iterator[Callable[[Any], Any]]:
    """``open_reader`` of a source that reads any item by its ref directly: nothing to stage."""
    yield load
