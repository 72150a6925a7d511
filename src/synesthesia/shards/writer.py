"""Atomic, byte-reproducible shard writing and the manifest.

A shard is written under a temporary name and renamed when complete, so a shard
that exists under its final name is complete. Members are written in a fixed
order with fixed mtime, owner and mode, so the same samples give the same bytes.
The manifest is written last, also atomically.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import webdataset as wds

from synesthesia.shards.schema import KINDS, MANIFEST, SCHEMA_VERSION, SchemaError, check_key, shard_name
from synesthesia.utils import atomic_path, atomic_write_text, sha256_file

logger = logging.getLogger(__name__)


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def check_sample(sample: dict[str, Any]) -> None:
    """Raise SchemaError unless ``sample`` is ``__key__`` plus ``field -> bytes`` with valid names."""
    check_key(sample.get("__key__"))
    for name, value in sample.items():
        if name == "__key__":
            continue
        if not name or name.startswith((".", "_")) or "/" in name or not name.isascii():
            raise SchemaError(f"sample {sample['__key__']}: bad field name {name!r}", "bad_field")
        if not isinstance(value, bytes | bytearray | memoryview):
            raise SchemaError(
                f"sample {sample['__key__']}: field {name} is {type(value).__name__}, not bytes", "bad_field"
            )


def write_shard(path: str | Path, samples: list[dict[str, Any]]) -> ShardInfo:
    """Write ``samples`` (``__key__`` plus ``field -> bytes``) as one tar shard, atomically.

    Members are ``<key>.<field>`` in sample order and, within a sample, sorted by
    field name; mtime is 0, owner/group ``synesthesia``, mode 0444, USTAR format,
    so the same samples always give the same bytes. Samples are checked before
    anything is written; a bad one raises SchemaError and no file appears.
    """
    path = Path(path)
    keys = set()
    for sample in samples:
        check_sample(sample)
        if sample["__key__"] in keys:
            raise SchemaError(f"duplicate key {sample['__key__']!r} in one shard", "duplicate_key")
        keys.add(sample["__key__"])
    # atomic_path removes the temporary file when anything below raises; the TarWriter is closed
    # either way (``with``), so no descriptor stays open on a failure and no partial shard appears.
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as fh,
        wds.TarWriter(fh, user="synesthesia", group="synesthesia", mtime=0, encoder=False) as writer,
    ):
        for sample in samples:
            writer.write(sample)
    return shard_info(path, len(samples))


def shard_info(path: str | Path, samples: int) -> ShardInfo:
    path = Path(path)
    return ShardInfo(name=path.name, samples=samples, bytes=path.stat().st_size, sha256=sha256_file(path))


@dataclass
class Manifest:
    """``manifest.json`` of one shard set (source, latent or decoded sidecar)."""

    kind: str
    dataset: str
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    generator: dict[str, Any] | None = None
    latent_spec: dict[str, Any] | None = None
    channel_stats: dict[str, Any] | None = None
    preprocessing: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    config_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["counts"] = {split: sum(s.samples for s in shards) for split, shards in self.splits.items()}
        return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"

    def write(self, directory: str | Path) -> Path:
        out = Path(directory) / MANIFEST
        atomic_write_text(out, self.to_json())
        return out

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """Read ``directory/manifest.json``; a missing, corrupt or foreign manifest is a UserError."""
        from synesthesia import UserError

        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise UserError(f"no {MANIFEST} in {directory}: not a complete shard set")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: unreadable manifest ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a manifest is a JSON object")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path}: schema version {data.get('schema_version')} is not {SCHEMA_VERSION}")
        data.pop("counts", None)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"{path}: unknown manifest key {unknown[0]!r}")
        try:
            data["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in data.get("splits", {}).items()}
            manifest = cls(**data)
        except (TypeError, AttributeError) as exc:
            raise UserError(f"{path}: malformed manifest ({exc})") from None
        if manifest.kind not in KINDS:
            raise UserError(f"{path}: unknown set kind {manifest.kind!r}; valid: {', '.join(KINDS)}")
        return manifest

    def count(self, split: str) -> int:
        return sum(s.samples for s in self.splits.get(split, []))


class SplitWriter:
    """Collects samples of one split and writes a shard every ``shard_size`` samples."""

    def __init__(self, directory: str | Path, split: str, shard_size: int):
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        self.directory = Path(directory)
        self.split = split
        self.shard_size = shard_size
        self.buffer: list[dict[str, Any]] = []
        self.infos: list[ShardInfo] = []
        self.keys: set[str] = set()
        self.skipped: Counter[str] = Counter()

    def add(self, sample: dict[str, Any]) -> bool:
        """Queue a sample; a duplicate key is skipped, counted and warned about. Returns whether kept.

        A malformed sample (bad key, non-bytes field) raises SchemaError here, before
        it can spoil a shard.
        """
        check_sample(sample)
        key = sample["__key__"]
        if key in self.keys:
            self.skipped["duplicate_key"] += 1
            logger.warning("skipped %s/%s: duplicate key", self.split, key)
            return False
        self.keys.add(key)
        self.buffer.append(sample)
        if len(self.buffer) >= self.shard_size:
            self.flush()
        return True

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.directory / shard_name(self.split, len(self.infos))
        self.infos.append(write_shard(path, self.buffer))
        self.buffer = []

    def close(self) -> list[ShardInfo]:
        self.flush()
        return self.infos
