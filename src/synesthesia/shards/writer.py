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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from synesthesia.shards.schema import MANIFEST, SCHEMA_VERSION, check_key, shard_name
from synesthesia.utils import atomic_path, atomic_write_text, sha256_file

logger = logging.getLogger(__name__)


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def write_shard(path: str | Path, samples: list[dict[str, Any]]) -> ShardInfo:
    """Write ``samples`` (``__key__`` plus ``field -> bytes``) as one tar shard, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer = wds.TarWriter(fh, user="synesthesia", group="synesthesia", mtime=0, encoder=False)
        for sample in samples:
            check_key(sample["__key__"])
            writer.write(sample)
        writer.close()
    return ShardInfo(name=path.name, samples=len(samples), bytes=path.stat().st_size, sha256=sha256_file(path))


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
        from synesthesia import UserError

        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise UserError(f"no {MANIFEST} in {directory}: not a complete shard set")
        data = json.loads(path.read_text())
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path}: schema version {data.get('schema_version')} is not {SCHEMA_VERSION}")
        data.pop("counts", None)
        data["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in data["splits"].items()}
        return cls(**data)

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
        """Queue a sample; a duplicate key is skipped, counted and warned about. Returns whether kept."""
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
