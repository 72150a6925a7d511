"""Image folders with paired signal files: ``FolderSource``.

Layout ::

    ROOT/[split/]class/.../stem.(png|jpg|jpeg)
    ROOT/depth/[split/]class/.../stem.npy           H×W float depth in metres
    ROOT/audio/[split/]class/.../stem.(wav|flac)     any rate; resampled, stored as 16-bit FLAC
    ROOT/lidar/[split/]class/.../stem.(npy|bin)      beams×azimuth range image, or a KITTI Velodyne scan

``split`` is ``train``, ``val`` (or ``validation``/``valid``) or ``test``; the
top-level folders ``depth``, ``audio`` and ``lidar`` hold the paired signals of
the image with the same relative path and stem (they are not classes). The
class is the first folder below the split; hidden files and folders are ignored. The sample key is the relative path
without extension, sanitised (``sanitise_key``). Images are listed once, in
sorted path order; their bytes and signals are read lazily, when written (an
item's ``ref`` is its relative path).
Names that are not valid UTF-8 and images outside a class folder become
bad items (skipped and counted by the writer). Only regular files (symlinks
resolved) of at most ``items.MAX_FILE_BYTES`` are read: a FIFO, a device or a
larger file is skipped and counted (``not_regular_file``, ``file_too_large``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.shards.schema import SchemaError
from synesthesia.sources.ingest.items import (
    SIGNAL_SUFFIXES,
    SPLIT_ALIASES,
    Item,
    direct_reader,
    read_regular,
    sanitise_key,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _utf8(name: str, origin: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise SchemaError(f"{origin!r}: file name is not valid UTF-8", "non_utf8_name") from None


class FolderSource:
    """``ROOT/[split/]class/.../stem.(png|jpg|jpeg)`` with paired signals in ``ROOT/<modality>/`` (see module doc)."""

    format = "folder"

    def __init__(self, root: Path):
        self.root = root
        tops = sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and p.name not in SIGNAL_SUFFIXES and not p.name.startswith(".")
        )
        split_dirs = [t for t in tops if t in SPLIT_ALIASES]
        if split_dirs and len(split_dirs) != len(tops):
            others = [t for t in tops if t not in SPLIT_ALIASES]
            raise UserError(
                f"{root} mixes split folders ({', '.join(split_dirs)}) with other folders ({', '.join(others[:3])});"
                " use ROOT/split/class/... or ROOT/class/..."
            )
        self.has_splits = bool(split_dirs)
        if not tops:
            raise UserError(f"{root} has no class folders; the layout is ROOT/[split/]class/image.png")

    def _images(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(relative path, its parts) of every image file, sorted, skipping the signal folders."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = Path(dirpath).relative_to(self.root)
            if rel_dir.parts and rel_dir.parts[0] in SIGNAL_SUFFIXES:
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                found.append(rel_dir.parts + (name,))
        for parts in sorted(found, key=lambda p: [os.fsencode(x) for x in p]):
            yield "/".join(parts), parts

    def items(self, warn: bool = True) -> Iterator[Item]:
        for rel, parts in self._images():
            split = SPLIT_ALIASES[parts[0]] if self.has_splits else "train"
            body = parts[1:] if self.has_splits else parts
            try:
                _utf8(rel, rel)
            except SchemaError as exc:
                yield Item(
                    key="", split=split, label=None, origin=rel.encode("utf-8", "replace").decode(), error=exc
                )
                continue
            if len(body) < 2:
                err = SchemaError(f"{rel}: an image must lie in a class folder", "no_class")
                yield Item(key="", split=split, label=None, origin=rel, error=err)
                continue
            stem_parts = [*parts[:-1], Path(parts[-1]).stem]
            yield Item(
                key=sanitise_key(stem_parts),
                split=split,
                label=body[0],
                origin=rel,
                load=lambda parts=parts: self._load(parts),
                ref=rel,
            )

    def stamp(self) -> str:
        """A digest of every image's path, size and modification time (a changed input changes it)."""
        digest = hashlib.sha256()
        for rel, parts in self._images():
            try:
                st = os.stat(self.root.joinpath(*parts))
                digest.update(f"{rel!a} {st.st_size} {st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{rel!a} -\n".encode())
        return digest.hexdigest()

    def open_reader(self, refs: list[Any], staging: Path) -> AbstractContextManager:
        """Items are read again by relative path, in any order."""
        return direct_reader(lambda rel: self._load(tuple(rel.split("/"))))

    def _load(self, parts: tuple[str, ...]) -> tuple[bytes, dict[str, tuple[bytes, str]]]:
        """Image and signal bytes; only regular files up to ``MAX_FILE_BYTES`` are read (``read_regular``)."""
        image = read_regular(self.root.joinpath(*parts))
        signals = {}
        stem = Path(parts[-1]).stem
        for modality, suffixes in SIGNAL_SUFFIXES.items():
            folder = self.root.joinpath(modality, *parts[:-1])
            for suffix in suffixes:
                candidate = folder / f"{stem}{suffix}"
                if os.path.lexists(candidate):  # a FIFO or a dangling link is refused, not ignored
                    signals[modality] = (read_regular(candidate), suffix)
                    break
        return image, signals
