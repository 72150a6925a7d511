"""Pass two of ingest: write chunks into a staging folder, and publish the set when all are there.

The staging folder ``<out>/<dataset>/.ingest-<fingerprint>`` is named by the run's
fingerprint (``layout.list_source``), so every part of one job, and a rerun of a
killed one, writes into the same folder; it is not a ``.tmp`` name, so no other
run removes it as stale while a part is still to come. A staging folder of
another fingerprint (the input or config changed) is removed once untouched for
``processes.LEASE_S`` (``remove_stale_staging``).

- ``write_chunk``: build the samples of one chunk (``checks.build_sample``) and
  write them as ``<split>-<index>.tar`` (atomic, as every shard), then its
  record ``<split>-<index>.json`` (samples, labels, skip counts, fields, size,
  sha256), also atomically. A chunk is complete when its record is there; a
  rerun keeps complete chunks. A chunk whose every sample is bad has a record
  and no tar.
- ``finalize``: once every chunk's record is there, hard-link the non-empty
  chunks' tars under the usual shard names (``train-000000.tar``, numbered
  without gaps) into a fresh ``.source-*.tmp`` folder, write the manifest, move
  the folder onto ``<out>/<dataset>/source`` (replacing an older set whole)
  and remove the staging folder (also when no sample was usable: a UserError). Two parts that finish at once may both
  finalise; they write the same bytes, and the second one's swap replaces the
  first's. In a bucket (``--out s3://…``), where there are no folders to swap, the old
  manifest is removed first, each chunk is copied onto its shard name (one server-side
  copy per object), shards the new manifest does not list are deleted and the manifest
  is written last: until it is there, the set reads as unfinished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.processes import LEASE_S
from synesthesia.shards.mixing import label_mix_entry
from synesthesia.shards.schema import IMAGE_FIELDS, SchemaError, read_json_file, shard_name
from synesthesia.shards.writer import Manifest, ShardInfo, write_shard
from synesthesia.sources.ingest.checks import build_sample
from synesthesia.sources.ingest.items import Item
from synesthesia.sources.ingest.layout import Chunk
from synesthesia.storage import atomic_write_text, is_remote, refresh
from synesthesia.utils import umask_mode

logger = logging.getLogger(__name__)

SIGNAL_FIELDS = (("depth", "depth.npy"), ("audio", "audio.flac"), ("lidar", "lidar.npy"))


def staging_folder(parent: Path, fingerprint: str) -> Path:
    return parent / f".ingest-{fingerprint[:24]}"


def remove_stale_staging(parent: Path, keep: Path, lease_s: float = LEASE_S) -> None:
    """Remove other runs' staging folders (another input or config) untouched for ``lease_s``."""
    now = time.time()
    refresh(parent)
    for folder in parent.glob(".ingest-*"):
        if folder == keep or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            if is_remote(folder):
                found = folder.fs.find(folder.path, detail=True).values()
                times = [info["LastModified"].timestamp() for info in found if "LastModified" in info]
                newest = max(times, default=now)
            else:
                newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])
        except OSError:
            continue
        if now - newest > lease_s:
            remove_folder(folder)


def remove_folder(folder: Path) -> None:
    """Delete a folder and everything in it, local or in a bucket; what is gone already is fine."""
    if is_remote(folder):
        with contextlib.suppress(FileNotFoundError):
            folder.fs.rm(folder.path, recursive=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def chunk_record(staging: Path, chunk: Chunk) -> dict[str, Any] | None:
    """The record of a complete chunk, or None (no record, or its tar is missing)."""
    path = staging / f"{chunk.name}.json"
    if not path.is_file():
        return None
    # a record holds a label per sample and a few short lists: bounded by the chunk's size
    record = read_json_file(path, "ingest chunk record", max_bytes=4096 + 32 * (chunk.stop - chunk.start))
    if not isinstance(record, dict) or not isinstance(record.get("samples"), int):
        return None
    if record["samples"] and not (staging / f"{chunk.name}.tar").is_file():
        return None
    return record


def write_chunk(
    staging: Path,
    chunk: Chunk,
    items: Iterable[Item],
    resolve: Callable[[Any], tuple[int, str]],
    icfg: Any,
) -> dict[str, Any]:
    """Build and write one chunk (see the module doc); returns its record."""
    samples: list[dict[str, Any]] = []
    labels: list[int] = []
    skipped: Counter[str] = Counter()
    image_fields: set[str] = set()
    modalities: set[str] = set()
    for item in items:
        try:
            label, class_name = resolve(item.label)
            sample = build_sample(item, label, class_name, icfg)
        except SchemaError as exc:
            skipped[exc.reason] += 1
            logger.warning("skipped %s: %s", item.origin, exc)
            continue
        samples.append(sample)
        labels.append(label)
        image_fields.update(f for f in IMAGE_FIELDS if f in sample)
        modalities.update(m for m, f in SIGNAL_FIELDS if f in sample)
    record: dict[str, Any] = {
        "samples": len(samples),
        "labels": labels,
        "skipped": dict(sorted(skipped.items())),
        "image_fields": sorted(image_fields),
        "modalities": sorted(modalities),
    }
    if samples:
        info = write_shard(staging / f"{chunk.name}.tar", samples)
        record.update(bytes=info.bytes, sha256=info.sha256)
    atomic_write_text(staging / f"{chunk.name}.json", json.dumps(record, sort_keys=True) + "\n")
    return record


def finalize(
    staging: Path,
    final: Path,
    chunks: list[Chunk],
    records: list[dict[str, Any]],
    skipped: Counter[str],
    make_manifest: Callable[[dict[str, list[ShardInfo]], dict[str, int], dict[str, Any]], Manifest],
    source_name: str,
) -> Manifest:
    """Publish the complete set (see the module doc); returns its manifest."""
    splits: dict[str, list[ShardInfo]] = {}
    shard_labels: dict[str, list[list[int]]] = {}
    image_fields: set[str] = set()
    modalities: set[str] = set()
    skipped = Counter(skipped)
    links: list[tuple[str, str]] = []  # (chunk tar, shard name)
    for chunk, record in zip(chunks, records, strict=True):
        skipped.update(record["skipped"])
        if not record["samples"]:
            continue
        infos = splits.setdefault(chunk.split, [])
        name = shard_name(chunk.split, len(infos))
        infos.append(ShardInfo(name, record["samples"], record["bytes"], record["sha256"]))
        shard_labels.setdefault(chunk.split, []).append(record["labels"])
        image_fields.update(record["image_fields"])
        modalities.update(record["modalities"])
        links.append((f"{chunk.name}.tar", name))
    if not splits:  # the job is done, and gave nothing
        remove_folder(staging)
        summary = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
        raise UserError(f"no usable samples in {source_name} (skipped: {summary})")
    label_mix = {split: label_mix_entry(labels) for split, labels in shard_labels.items()}
    found = {"image_fields": sorted(image_fields), "modalities": sorted(modalities), "label_mix": label_mix}
    manifest = make_manifest(splits, dict(sorted(skipped.items())), found)
    if is_remote(final):
        publish_in_bucket(staging, final, links, manifest)
        return manifest
    tmp = Path(tempfile.mkdtemp(prefix=".source-", suffix=".tmp", dir=final.parent))
    umask_mode(tmp)  # published as a normal folder (mkdtemp makes it 0700)
    try:
        for chunk_tar, name in links:
            _link_or_copy(staging / chunk_tar, tmp / name)
        manifest.write(tmp)
        swap_into_place(tmp, final)
    except FileNotFoundError:
        # another part finalised the same set at the same moment and removed the staging folder
        if not (final / "manifest.json").is_file():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    remove_folder(staging)
    return manifest


def publish_in_bucket(staging: Path, final: Path, links: list[tuple[str, str]], manifest: Manifest) -> None:
    """``finalize`` in a bucket: uncommit the old set, copy the chunks onto their names, delete
    shards the new manifest does not list, commit with the manifest, drop the staging folder."""
    (final / "manifest.json").unlink(missing_ok=True)
    fs = final.fs
    for chunk_tar, name in links:
        fs.copy((staging / chunk_tar).path, (final / name).path)
    names = {name for _, name in links}
    refresh(final)
    for path in list(final.glob("*.tar")):
        if path.name not in names:
            path.unlink(missing_ok=True)
    manifest.write(final)
    remove_folder(staging)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        shutil.copyfile(src, dst)  # a file system without hard links


def swap_into_place(tmp: Path, final: Path) -> None:
    """Move the finished set ``tmp`` onto ``final``, replacing an older set whole."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
