"""Atomic, byte-reproducible shard writing and the manifest.

A shard is written under a temporary name and renamed when complete, so a shard
that exists under its final name is complete. Members are written in a fixed
order with fixed mtime, owner and mode, so the same samples give the same bytes.
Paths may be local or any fsspec URL (``synesthesia.storage``: in a bucket a shard is written under a
hidden temporary key and moved onto its name). The manifest is written last, also atomically, and records the versions of the software
that wrote the set (:func:`software_versions`). :meth:`Manifest.read` reads one as
hostile input: bounded size and nesting, every split and shard name one we write,
every count, size and shape a bounded non-negative integer (:func:`check_manifest`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import webdataset as wds

from synesthesia import UserError
from synesthesia.shards.schema import (
    KINDS,
    MANIFEST,
    SCHEMA_VERSION,
    SPLITS,
    SchemaError,
    check_key,
    check_shard_name,
    read_json_file,
    shard_name,
)
from synesthesia.storage import as_path, atomic_path, atomic_write_text, open_input, refresh
from synesthesia.utils import check_name

logger = logging.getLogger(__name__)

# Bounds on the numbers a manifest may hold (anything beyond is not a set this tool wrote).
MAX_SHARD_SAMPLES = 10**7
MAX_SHARD_BYTES = 1 << 40
MAX_COUNT = 10**12
MAX_CLASSES = 10**6
MAX_DIM = 1 << 16  # one dimension of a latent, signal or image
MAX_ELEMENTS = 1 << 28  # elements of one stored latent or signal
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# The packages whose versions a manifest records (``software``): those that shape a set's bytes.
SOFTWARE = ("synesthesia", "torch", "diffusers", "transformers", "timm", "accelerate", "webdataset", "numpy")


def software_versions() -> dict[str, str | None]:
    """The installed version of each package in ``SOFTWARE`` (None when absent), and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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
    path = as_path(path)
    keys = set()
    for sample in samples:
        check_sample(sample)
        if sample["__key__"] in keys:
            raise SchemaError(f"duplicate key {sample['__key__']!r} in one shard", "duplicate_key")
        keys.add(sample["__key__"])
    # atomic_path removes the temporary file (or key) when anything below raises; the TarWriter is
    # closed either way (``with``), so no descriptor stays open on a failure and no partial shard
    # appears. The bytes are hashed as they are written: no second read, from a bucket least of all.
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        sink = HashingWriter(fh)
        with wds.TarWriter(sink, user="synesthesia", group="synesthesia", mtime=0, encoder=False) as writer:
            for sample in samples:
                writer.write(sample)
    return ShardInfo(name=path.name, samples=len(samples), bytes=sink.size, sha256=sink.hash.hexdigest())


class HashingWriter:
    """A write-only stream that passes bytes on to ``raw`` and feeds them into a sha256."""

    def __init__(self, raw):
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.raw.write(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def shard_info(path: str | Path, samples: int) -> ShardInfo:
    """A written shard's entry in the manifest (its bytes read again to hash them)."""
    path = as_path(path)
    digest, size = hashlib.sha256(), 0
    with open_input(path) as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return ShardInfo(name=path.name, samples=samples, bytes=size, sha256=digest.hexdigest())


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
    # Versions of the software that wrote the set; a manifest read from disk keeps what it holds
    # (None for one written before versions were recorded).
    software: dict[str, Any] | None = field(default_factory=software_versions)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["counts"] = {split: sum(s.samples for s in shards) for split, shards in self.splits.items()}
        return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"

    def write(self, directory: str | Path) -> Path:
        out = as_path(directory) / MANIFEST
        atomic_write_text(out, self.to_json())
        return out

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """Read ``directory/manifest.json``; a missing, corrupt, foreign or lying manifest is a
        UserError naming the file (:func:`check_manifest`). In a bucket, the folder's cached listing is
        dropped first: the manifest commits a set, and another process may just have written it."""
        refresh(as_path(directory))
        path = as_path(directory) / MANIFEST
        if not path.is_file():
            raise UserError(f"no {MANIFEST} in {directory}: not a complete shard set")
        data = read_json_file(path, "manifest")
        if not isinstance(data, dict):
            raise UserError(f"{path}: a manifest is a JSON object")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path}: schema version {data.get('schema_version')} is not {SCHEMA_VERSION}")
        data.pop("counts", None)
        data.setdefault("software", None)  # written before versions were recorded
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
            raise UserError(
                f"{path}: unknown set kind {str(manifest.kind)[:40]!r}; valid: {', '.join(KINDS)}"
            )
        try:
            check_manifest(manifest)
        except (SchemaError, ValueError, TypeError) as exc:
            raise UserError(f"{path}: {exc}") from None
        return manifest

    def count(self, split: str) -> int:
        return sum(s.samples for s in self.splits.get(split, []))


def _bounded(value: Any, what: str, high: int, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} is {str(value)[:40]!r}, not an integer in [{low}, {high}]")
    return value


def _shape(value: Any, what: str) -> None:
    if not isinstance(value, list) or len(value) > 8:
        raise ValueError(f"{what} is {str(value)[:40]!r}, not a list of at most 8 sizes")
    for n in value:
        _bounded(n, what, MAX_DIM, 1)
    if math.prod(value) > MAX_ELEMENTS:
        raise ValueError(f"{what} {value} holds more than {MAX_ELEMENTS} elements")


def check_manifest(m: Manifest) -> None:
    """Raise ValueError (SchemaError for a name) unless every name and number in ``m`` is one this
    tool writes: splits from ``SPLITS``, shard i of a split named ``<split>-NNNNNN.tar`` (i), sample
    counts, byte sizes and ``skipped`` counts bounded non-negative integers, sha256 hex digests,
    and - where present - the class count, image size, latent shape and samples per input bounded."""
    try:
        check_name(m.dataset, "dataset")  # the same rule as a config's dataset name
    except UserError as exc:
        raise ValueError(str(exc)) from None
    for split, shards in m.splits.items():
        if split not in SPLITS:
            raise SchemaError(f"split {str(split)[:40]!r} is not one of {', '.join(SPLITS)}", "bad_name")
        for index, info in enumerate(shards):
            check_shard_name(info.name, split, index)
            _bounded(info.samples, f"{info.name} samples", MAX_SHARD_SAMPLES)
            _bounded(info.bytes, f"{info.name} bytes", MAX_SHARD_BYTES)
            if not isinstance(info.sha256, str) or not _SHA256.match(info.sha256):
                raise ValueError(f"{info.name} sha256 {str(info.sha256)[:20]!r} is not a sha256 hex digest")
    if not isinstance(m.skipped, dict):
        raise ValueError("skipped is not a mapping of reasons to counts")
    for reason, count in m.skipped.items():
        _bounded(count, f"skipped {str(reason)[:40]!r}", MAX_COUNT)
    for name in ("extra", "generator", "latent_spec", "channel_stats", "preprocessing", "config", "software"):
        if getattr(m, name) is not None and not isinstance(getattr(m, name), dict):
            raise ValueError(f"{name} is not a mapping")
    for name, version in (m.software or {}).items():
        if not isinstance(name, str) or len(name) > 64 or not (version is None or isinstance(version, str)):
            raise ValueError(f"software {str(name)[:40]!r} is not a package name and version")
        if version is not None and len(version) > 64:
            raise ValueError(f"software {name!r} version {version[:40]!r}... is longer than 64 characters")
    extra = m.extra or {}
    if "num_classes" in extra:
        _bounded(extra["num_classes"], "extra.num_classes", MAX_CLASSES, 1)
    size = extra.get("image_size")
    if size is not None:
        for n in size if isinstance(size, list) else [size]:
            _bounded(n, "extra.image_size", MAX_DIM)
    spec = m.latent_spec or {}
    for key in ("shape", "decoded_shape"):
        if spec.get(key) is not None:
            _shape(spec[key], f"latent_spec.{key}")
    if spec.get("samples_per_input") is not None:
        _bounded(spec["samples_per_input"], "latent_spec.samples_per_input", 1024)
    if extra.get("shape") is not None:  # a decoded set's signal shape
        _shape(extra["shape"], "extra.shape")


class SplitWriter:
    """Collects samples of one split and writes a shard every ``shard_size`` samples."""

    def __init__(self, directory: str | Path, split: str, shard_size: int):
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        self.directory = as_path(directory)
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
