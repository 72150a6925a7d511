"""Pass one of ingest: list the source without its bytes and decide where every sample goes.

- ``list_source``: one walk over ``source.items()`` keeping, per usable key, only
  ``(split, label, origin, ref)`` — ``ref`` is the source's small locator of the
  sample's bytes (a path, a row, a tar and position), read again in pass two.
  Items bad at listing and repeated keys (the first of a key wins) are warned
  about and counted here. A sha256 of the listing, the source's ``stamp`` (file
  sizes and times) and the config is the run's ``fingerprint``: every part of
  one job computes the same one, and a changed input or config gives another.
- ``plan``: key → output split. Present splits are kept; a missing ``test``
  (``val``) split takes a seeded share of train (a permutation of the sorted
  train keys by ``np.random.default_rng(seed)``).
- ``Layout``: each output split's keys in their write order, a seeded global
  permutation of its sorted keys (``np.random.default_rng([seed, i])``, ``i``
  the split's index in train, val, test), cut into ``Chunk`` s of
  ``shard_size`` consecutive positions. A chunk is one output shard: the
  samples of its positions that pass the checks of pass two, so a chunk's
  content never depends on another chunk and parts can write chunks alone.

Memory is a few hundred bytes per sample (the key, label, origin and ref),
never an image's or signal's bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synesthesia.shards.schema import SchemaError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")  # output splits; the index seeds each one's write order


@dataclass
class Listing:
    """What pass one keeps of a source: per usable key its split, label, origin and ref."""

    records: dict[str, tuple[str, str | int, str, Any]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    fingerprint: str = ""


def _interned(value: Any, seen: dict[Any, Any]) -> Any:
    """One object per distinct label or split (labels repeat for every sample of a class)."""
    if isinstance(value, str):
        return sys.intern(value)
    return seen.setdefault(value, value)


def list_source(source: Any, salt: str) -> Listing:
    """Pass one over ``source`` (see the module doc); ``salt`` enters the fingerprint (config hash)."""
    listing = Listing()
    digest = hashlib.sha256(salt.encode())
    seen: dict[Any, Any] = {}
    for item in source.items():
        try:
            if item.error is not None:
                raise item.error
            if item.key in listing.records:
                raise SchemaError(f"duplicate key {item.key!r}", "duplicate_key")
        except SchemaError as exc:
            listing.skipped[exc.reason] += 1
            logger.warning("skipped %s: %s", item.origin, exc)
            continue
        label = _interned(item.label, seen)
        listing.records[item.key] = (sys.intern(item.split), label, item.origin, item.ref)
        digest.update(json.dumps([item.key, item.split, item.label, item.origin]).encode() + b"\n")
    # Bad tar entries of a webdataset source (warned about by its error handler).
    listing.skipped.update({k: v for k, v in getattr(source, "tar_errors", {}).items() if v})
    digest.update(json.dumps([source.stamp(), sorted(listing.skipped.items())]).encode())
    listing.fingerprint = digest.hexdigest()
    return listing


def plan(listing: Listing, cfg: Any, seed: int) -> tuple[dict[str, str], list[str]]:
    """(key → output split, class names) of a listing (see the module doc)."""
    split_of = {key: record[0] for key, record in listing.records.items()}
    labels = {record[1] for record in listing.records.values()}
    present = set(split_of.values())
    train = sorted(k for k, s in split_of.items() if s == "train")
    order = np.random.default_rng(seed).permutation(len(train))
    n_test = 0 if "test" in present else round(cfg.test_fraction * len(train))
    n_val = 0 if "val" in present else round(cfg.val_fraction * len(train))
    for rank, i in enumerate(order):
        if rank < n_test:
            split_of[train[i]] = "test"
        elif rank < n_test + n_val:
            split_of[train[i]] = "val"
    if labels and all(isinstance(label, int) for label in labels):
        class_names = [str(i) for i in range(max(labels) + 1)]
    else:
        class_names = sorted({str(label) for label in labels})
    return split_of, class_names


@dataclass(frozen=True)
class Chunk:
    """Output shard ``index`` of ``split``: the keys at write positions ``start:stop``."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


class Layout:
    """Each output split's keys in write order, cut into chunks of ``shard_size`` positions."""

    def __init__(self, split_of: dict[str, str], seed: int, shard_size: int):
        self.keys: dict[str, list[str]] = {}
        self.chunks: list[Chunk] = []
        for index, split in enumerate(SPLITS):
            keys = sorted(k for k, s in split_of.items() if s == split)
            if not keys:
                continue
            order = np.random.default_rng([seed, index]).permutation(len(keys))
            self.keys[split] = [keys[i] for i in order]
            for j, start in enumerate(range(0, len(keys), shard_size)):
                self.chunks.append(Chunk(split, j, start, min(start + shard_size, len(keys))))

    def chunk_keys(self, chunk: Chunk) -> Iterator[str]:
        yield from self.keys[chunk.split][chunk.start : chunk.stop]
