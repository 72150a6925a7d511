"""Stage one, bookkeeping side: cache keys, set folders, channel statistics and the manifest.

Everything here is a pure function of files on disk and the configuration, so
a set that was interrupted (even by SIGKILL) and then completed gets the same
``cache_key.json`` and ``manifest.json``, byte for byte, as an uninterrupted
run. Wall-clock timings can never be byte-identical, so they go to
``throughput.json`` beside the manifest, which names that file in
``extra.throughput``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from synesthesia import UserError
from synesthesia.shards.schema import MANIFEST, SCHEMA_VERSION, SchemaError, decode_npy
from synesthesia.shards.writer import Manifest, ShardInfo
from synesthesia.stage_one_data import read_shard_samples
from synesthesia.utils import atomic_write_text, sha256_bytes

logger = logging.getLogger(__name__)

CACHE_KEY = "cache_key.json"
THROUGHPUT = "throughput.json"


# ----------------------------------------------------------------------------- cache key


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(material: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything a set's bytes depend on."""
    return sha256_bytes(canonical_json(material).encode())


def _differences(old: Any, new: Any, prefix: str = "", depth: int = 0) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict) and depth < 2:
        out = []
        for k in sorted(set(old) | set(new)):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(path)
            else:
                out.extend(_differences(old[k], new[k], path, depth + 1))
        return out
    return [] if canonical_json(old) == canonical_json(new) else [prefix or "everything"]


def check_set(directory: Path, key: str, material: dict[str, Any], overwrite: bool) -> str:
    """What to do with a set folder: ``fresh``, ``resume`` or ``replace`` (UserError on a mismatch).

    A folder whose ``cache_key.json`` matches is resumed (complete shards are
    kept). A different key, or shards without a key, is refused unless
    ``overwrite``, which replaces the set.
    """
    key_file = directory / CACHE_KEY
    existing = json.loads(key_file.read_text()) if key_file.is_file() else None
    has_content = directory.is_dir() and (any(directory.glob("*.tar")) or (directory / MANIFEST).exists())
    if overwrite and (existing is not None or has_content):
        return "replace"
    if existing is None:
        if has_content:
            raise UserError(
                f"{directory} holds shards with no {CACHE_KEY} (unknown origin); pass --overwrite to replace them"
            )
        return "fresh"
    if existing.get("cache_key") != key:
        changed = _differences(existing.get("material", {}), material) or ["cache key"]
        raise UserError(
            f"{directory} was made with a different {', '.join(changed[:4])}; pass --overwrite to replace it"
        )
    return "resume"


def prepare_set(directory: Path, key: str, material: dict[str, Any], action: str) -> None:
    """Main process only: delete a replaced set, drop stale temporaries, write ``cache_key.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    if action == "replace":
        logger.warning("--overwrite: deleting the old set in %s", directory)
        for name in (MANIFEST, THROUGHPUT):
            (directory / name).unlink(missing_ok=True)
        for path in sorted(directory.glob("*.tar")):
            path.unlink()
        (directory / CACHE_KEY).unlink(missing_ok=True)
    for path in sorted(directory.glob(".*.tmp")):  # left behind by a killed run
        path.unlink(missing_ok=True)
    for path in sorted(directory.glob(".throughput-rank-*.json")):
        path.unlink(missing_ok=True)
    if action in ("fresh", "replace"):
        payload = {"cache_key": key, "material": material}
        atomic_write_text(
            directory / CACHE_KEY, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
        )


# ----------------------------------------------------------------------------- statistics


class ChannelStats:
    """Per-channel mean and (population) std with float64 sums, accumulated in a fixed order."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.count = 0

    def add(self, array: np.ndarray, axis: int | None) -> None:
        x = np.asarray(array, dtype=np.float64)
        x = x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        if self.total is None:
            self.total = np.zeros(x.shape[0])
            self.squares = np.zeros(x.shape[0])
        if x.shape[0] != self.total.shape[0]:
            raise SchemaError(f"{x.shape[0]} channels, earlier samples had {self.total.shape[0]}")
        self.total += x.sum(axis=1)
        self.squares += (x * x).sum(axis=1)
        self.count += x.shape[1]

    def result(self) -> dict[str, Any] | None:
        if self.total is None or self.count == 0:
            return None
        mean = self.total / self.count
        var = np.maximum(self.squares / self.count - mean * mean, 0.0)
        return {
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in np.sqrt(var)],
            "count": self.count,
        }


def channel_axis(kind: str, spec_ndim: int, array_ndim: int) -> int | None:
    """Channel axis of one stored latent: C of C×h×w (after any leading S), C of T×C; None for codes."""
    if kind == "spatial":
        return array_ndim - spec_ndim
    if kind == "tokens":
        return array_ndim - 1
    return None


# ----------------------------------------------------------------------------- manifest


def scan_set(
    directory: Path,
    source: Manifest,
    splits: list[str],
    field: str,
    flag_field: str,
    stats_axis: Any,
) -> tuple[dict[str, list[ShardInfo]], dict[str, list[list[str]]], Counter, dict[str, Any] | None, list[str]]:
    """Re-read a sidecar set in shard order: shard infos, flagged keys, stats over train, missing shards.

    ``stats_axis(array) -> axis | None`` picks the channel axis; ``False`` turns statistics off.
    """
    infos: dict[str, list[ShardInfo]] = {}
    flagged: dict[str, list[list[str]]] = {}
    counts: Counter[str] = Counter()
    missing: list[str] = []
    stats = ChannelStats()
    for split in splits:
        infos[split] = []
        for src in source.splits.get(split, []):
            path = directory / src.name
            if not path.is_file():
                missing.append(src.name)
                continue
            samples, digest, size = read_shard_samples(path)
            if len(samples) != src.samples:
                raise UserError(
                    f"{path}: {len(samples)} samples, its source shard has {src.samples}; rerun with --overwrite"
                )
            for sample in samples:
                flag = sample.get(flag_field)
                if flag is not None:
                    reason = flag.decode()
                    flagged.setdefault(split, []).append([sample["__key__"], reason])
                    counts[reason] += 1
                elif split == "train" and stats_axis is not False:
                    array = decode_npy(sample[field])
                    stats.add(array, stats_axis(array))
            infos[split].append(ShardInfo(name=src.name, samples=len(samples), bytes=size, sha256=digest))
    return infos, flagged, counts, stats.result(), missing


def stored_shape(directory: Path, infos: dict[str, list[ShardInfo]], field: str) -> list[int] | None:
    """The shape of one sample's ``field`` as stored (the first sample of the first non-empty shard).

    Every sample of a set has the same shape (flagged samples hold zeros of it), so
    a decoded set records it as ``extra.shape``, which the stage-two reader and the
    teacher's decoded-signal adapter read instead of probing a shard.
    """
    for shards in infos.values():
        for info in shards:
            if info.samples:
                samples, _, _ = read_shard_samples(directory / info.name)
                return [int(n) for n in decode_npy(samples[0][field]).shape]
    return None


def write_throughput(directory: Path, report: dict[str, Any]) -> None:
    """Write ``throughput.json``, except for a rerun that wrote nothing (every shard already
    complete): that keeps the timing of the run that did write the shards."""
    path = directory / THROUGHPUT
    if not (report.get("total") or {}).get("samples") and path.is_file():
        return
    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")


def build_manifest(
    *,
    kind: str,
    dataset: str,
    splits: dict[str, list[ShardInfo]],
    generator: dict[str, Any],
    latent_spec: dict[str, Any],
    channel_stats: dict[str, Any] | None,
    preprocessing: dict[str, Any] | None,
    config: dict[str, Any],
    config_hash: str,
    extra: dict[str, Any],
) -> Manifest:
    return Manifest(
        kind=kind,
        dataset=dataset,
        splits=splits,
        skipped={},
        generator=generator,
        latent_spec=latent_spec,
        channel_stats=channel_stats,
        preprocessing=preprocessing,
        config=config,
        config_hash=config_hash,
        extra=extra,
        schema_version=SCHEMA_VERSION,
    )
