"""`synesthesia inspect`: describe a shard set (or a dataset root) and optionally re-hash it.

For a source set the description includes each split's label mixing across
shards (``synesthesia.shards.mixing``) and a warning when the train split looks
class-sorted — the one split whose order matters, as training reads it through
a bounded shuffle buffer.

:func:`verify` (``inspect --verify``) and :func:`check_shards` (what ``train``
checks when it opens a set: ``size``, each shard's existence and bytes, or
``full``, also its sha256 and sample count) compare a set's shards with its
manifest; :func:`scan_shard` hashes and counts a shard in one read.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from webdataset.tariterators import group_by_keys, tar_file_iterator

from synesthesia import UserError
from synesthesia.shards.mixing import class_sorted, split_mixing, warning_text
from synesthesia.shards.schema import MANIFEST
from synesthesia.shards.writer import Manifest
from synesthesia.storage import as_path, open_input, refresh

LEVELS = ("size", "full")


def find_sets(path: str | Path) -> list[Path]:
    """Every shard set (a folder with a manifest) at or below ``path`` (local or an fsspec URL), sorted."""
    path = as_path(path)
    refresh(path)  # a bucket listing cached before another process wrote the sets
    if not path.exists():
        raise UserError(f"no such path: {path}")
    if (path / MANIFEST).is_file():
        return [path]
    # Hidden folders are sets being written or replaced (``.source-*.tmp``, ``.source.old-*``).
    sets = sorted(
        p.parent
        for p in path.rglob(MANIFEST)
        if not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not sets:
        raise UserError(f"no shard set (no {MANIFEST}) at or below {path}")
    return sets


def describe(directory: str | Path) -> dict[str, Any]:
    """A summary of one set: kind, splits and counts, modalities, latent spec, generator (its weights
    and their ``weights_sha256``), the software versions that wrote it.

    Source sets add ``label_mixing`` (split → ``SplitMixing.summary()``) and
    ``warnings`` (one line each).
    """
    directory = as_path(directory)
    m = Manifest.read(directory)
    info: dict[str, Any] = {
        "path": str(directory),
        "kind": m.kind,
        "dataset": m.dataset,
        "splits": {
            split: {"shards": len(shards), "samples": m.count(split)} for split, shards in m.splits.items()
        },
        "bytes": sum(s.bytes for shards in m.splits.values() for s in shards),
        "skipped": m.skipped,
    }
    if "modalities" in m.extra:
        info["modalities"] = m.extra["modalities"]
    if "num_classes" in m.extra:
        info["num_classes"] = m.extra["num_classes"]
    if m.generator:
        # Generators record their weights' digest as ``sha256`` (``Generator.identity``).
        info["generator"] = {k: m.generator.get(k) for k in ("name", "class", "modality", "mode", "weights")}
        info["generator"]["weights_sha256"] = m.generator.get("sha256")
    if m.latent_spec:
        info["latent_spec"] = m.latent_spec
    if m.channel_stats:
        info["channel_stats"] = m.channel_stats
    if m.config_hash:
        info["config_hash"] = m.config_hash
    if m.software:
        info["software"] = m.software
    if m.kind == "source":
        info["label_mixing"] = {}
        info["warnings"] = []
        for split in m.splits:
            mixing = split_mixing(directory, split, manifest=m)
            if mixing is None:
                continue
            info["label_mixing"][split] = mixing.summary()
            if split == "train" and class_sorted(mixing):
                info["warnings"].append(warning_text(mixing, directory))
    return info


class HashingReader(io.RawIOBase):
    """A read-only stream that feeds every byte it passes on into a sha256."""

    def __init__(self, raw: io.BufferedReader):
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.hash.update(memoryview(buffer)[:n])
            self.size += n
        return n

    def drain(self) -> None:
        """Read (and hash) whatever the tar parser left unread: end-of-archive padding."""
        while block := self.raw.read(1 << 20):
            self.hash.update(block)
            self.size += len(block)


def iter_tar_samples(stream: io.RawIOBase, url: str) -> Iterator[dict[str, Any]]:
    """Samples (``__key__`` plus ``suffix -> bytes``) of a tar stream, in order."""
    members = ({**member, "__url__": url} for member in tar_file_iterator(stream))
    for sample in group_by_keys(members):
        sample.pop("__url__", None)
        yield sample


def scan_shard(path: str | Path) -> tuple[str, int | None]:
    """A shard's sha256 and sample count, in one read (count None when the tar is unreadable)."""
    with open_input(path) as fh:
        reader = HashingReader(fh)
        try:
            count = sum(1 for _ in iter_tar_samples(reader, str(path)))
        except (tarfile.TarError, OSError, ValueError, EOFError):
            count = None
        reader.drain()
    return reader.hash.hexdigest(), count


def check_shards(directory: str | Path, manifest: Manifest, level: str = "full") -> list[str]:
    """How the shards of a set differ from its manifest, one line each naming the shard (empty when
    they agree): missing, another byte size and, at level ``full``, another sha256 or sample count."""
    if level not in LEVELS:
        raise UserError(f"unknown verify level {level!r}; valid: {', '.join(LEVELS)}")
    directory = as_path(directory)
    problems = []
    for shards in manifest.splits.values():
        for s in shards:
            path = directory / s.name
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            size = path.stat().st_size
            if size != s.bytes:
                problems.append(f"{path}: {size} bytes, manifest says {s.bytes}")
                continue
            if level == "size":
                continue
            digest, count = scan_shard(path)
            if digest != s.sha256:
                problems.append(f"{path}: sha256 differs from the manifest")
            elif count is None:
                problems.append(f"{path}: unreadable tar")
            elif count != s.samples:
                problems.append(f"{path}: {count} samples, manifest says {s.samples}")
    return problems


def verify(directory: str | Path) -> list[str]:
    """Re-hash and re-count every shard against the manifest, and list shards it does not know;
    the list of problems (empty when all match)."""
    directory = as_path(directory)
    m = Manifest.read(directory)  # refreshes a bucket folder's listing
    problems = check_shards(directory, m, "full")
    listed = {s.name for shards in m.splits.values() for s in shards}
    for path in sorted(directory.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path}: not listed in the manifest")
    return problems
