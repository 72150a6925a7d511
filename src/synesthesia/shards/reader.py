"""Reading shard sets: one split of a source set zipped with any number of sidecar sets.

Sidecars are aligned shard for shard and key for key with their source; a key
or count mismatch is a clear error naming the set, the shard and the key.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

import webdataset as wds

from synesthesia import UserError
from synesthesia.shards.writer import Manifest

logger = logging.getLogger(__name__)

POLICIES = ("raise", "skip", "warn")


class ErrorPolicy:
    """A webdataset error handler that applies a named policy and counts what it saw.

    ``raise`` re-raises, ``skip`` continues silently, ``warn`` logs one line and
    continues. ``counts`` maps exception class names to how often they occurred.
    """

    def __init__(self, policy: str = "warn"):
        if policy not in POLICIES:
            raise UserError(f"unknown error policy {policy!r}; valid: {', '.join(POLICIES)}")
        self.policy = policy
        self.counts: Counter[str] = Counter()

    def __call__(self, exn: BaseException) -> bool:
        self.counts[exn.__class__.__name__] += 1
        if self.policy == "raise":
            raise exn
        if self.policy == "warn":
            logger.warning("skipped a bad sample: %s", exn)
        return True


class ShardMismatchError(UserError):
    """A sidecar set that is not aligned with its source set."""


def shard_paths(directory: str | Path, split: str) -> list[Path]:
    """The shards of ``split`` in a set, in order, as listed by its manifest."""
    manifest = Manifest.read(directory)
    return [Path(directory) / info.name for info in manifest.splits.get(split, [])]


def iter_shard(path: str | Path, handler: ErrorPolicy | None = None) -> Iterator[dict[str, Any]]:
    """The raw samples (``__key__`` and ``field -> bytes``) of one tar shard, in order.

    The caller chose this shard, so no node or worker splitter runs: webdataset's
    defaults (``single_node_only``, ``split_by_worker``) would refuse to run under
    ``torch.distributed`` or hand this one shard to DataLoader worker 0 only.
    """
    handler = handler or ErrorPolicy("raise")
    dataset = wds.WebDataset(
        str(path),
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=None,
        handler=handler,
        empty_check=False,
    )
    for sample in dataset:
        sample.pop("__url__", None)
        sample.pop("__local_path__", None)
        yield sample


def iter_aligned_shard(
    source: Path, sidecars: dict[str, Path], handler: ErrorPolicy | None = None, expected: int | None = None
) -> Iterator[dict[str, Any]]:
    """Samples of one source shard merged with the same-index shard of each sidecar.

    With ``expected`` (the manifest's sample count), a shard that yields fewer
    samples (cut short at a member boundary, which tar readers take for its end)
    is an error under the ``raise`` policy and is counted as ``ShortShard`` otherwise.
    """
    position = -1
    streams = {name: iter_shard(path, handler) for name, path in sidecars.items()}
    sentinel = object()
    for position, (sample, *others) in enumerate(
        zip_longest(iter_shard(source, handler), *streams.values(), fillvalue=sentinel)
    ):
        if sample is sentinel:
            raise ShardMismatchError(
                f"{source.name}: a sidecar has more samples than the source ({position}+)"
            )
        merged = dict(sample)
        for name, other in zip(streams, others, strict=True):
            if other is sentinel:
                raise ShardMismatchError(
                    f"sidecar {name} shard {sidecars[name].name} ends at sample {position}, before its source"
                )
            if other["__key__"] != sample["__key__"]:
                raise ShardMismatchError(
                    f"sidecar {name} shard {sidecars[name].name} sample {position}: key {other['__key__']!r}"
                    f" != source key {sample['__key__']!r}"
                )
            for field, value in other.items():
                if field != "__key__":
                    merged[field] = value
        yield merged
    if expected is not None and position + 1 != expected:
        error = ShardMismatchError(
            f"{source}: yielded {position + 1} samples, its manifest says {expected}"
            " (truncated or corrupt: run synesthesia inspect --verify)"
        )
        if handler is None or handler.policy == "raise":
            raise error
        handler.counts["ShortShard"] += 1
        if handler.policy == "warn":
            logger.warning("%s", error)


def aligned_shards(
    source_dir: str | Path, sidecar_dirs: dict[str, str | Path], split: str
) -> list[tuple[Path, dict]]:
    """(source shard, {sidecar name: shard}) per shard index, checked against the manifests."""
    source_dir = Path(source_dir)
    src_manifest = Manifest.read(source_dir)
    src = src_manifest.splits.get(split, [])
    pairs: list[tuple[Path, dict]] = [(source_dir / info.name, {}) for info in src]
    for name, directory in sidecar_dirs.items():
        manifest = Manifest.read(directory)
        side = manifest.splits.get(split, [])
        if len(side) != len(src):
            raise ShardMismatchError(
                f"sidecar {name} has {len(side)} {split} shards, the source has {len(src)}"
            )
        for (_, mapping), info, src_info in zip(pairs, side, src, strict=True):
            if info.samples != src_info.samples:
                raise ShardMismatchError(
                    f"sidecar {name} shard {info.name} has {info.samples} samples, source has {src_info.samples}"
                )
            mapping[name] = Path(directory) / info.name
    return pairs


def iter_aligned(
    source_dir: str | Path,
    sidecar_dirs: dict[str, str | Path] | None = None,
    split: str = "train",
    shard_indices: Sequence[int] | None = None,
    handler: ErrorPolicy | None = None,
) -> Iterator[dict[str, Any]]:
    """All samples of ``split`` with their sidecars' fields merged in, shard by shard."""
    pairs = aligned_shards(source_dir, sidecar_dirs or {}, split)
    counts = [info.samples for info in Manifest.read(source_dir).splits.get(split, [])]
    indices = range(len(pairs)) if shard_indices is None else shard_indices
    for i in indices:
        source, sidecars = pairs[i]
        yield from iter_aligned_shard(source, sidecars, handler, expected=counts[i])
