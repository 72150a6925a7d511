"""The ingest run (``ingest``): plan the splits, write the source shards and manifest.

The source is listed once (keys and labels, to plan the splits; folder and HF
samples are then read lazily, webdataset samples are held from the listing),
and the first sample of a key wins; bad items and duplicate keys are skipped
with one warning line each and counted by reason in the manifest's
``skipped``. Mistakes of configuration are UserErrors.

Splits present in the source are kept. A missing ``test`` (``val``) split is
carved out of train by a seeded permutation (pipeline ``seed``) of
``ingest.test_fraction`` (``ingest.val_fraction``) of its samples (``plan``).

Order: each split is written in a seeded global permutation of its sorted keys
(``np.random.default_rng([seed, i])``, ``i`` the index of the split in
train, val, test), never in source order — a class-folder source listed in
path order would otherwise give shards of one or two classes each, which
training's shard shuffle and bounded shuffle buffer cannot mix. The label mix
of every shard is recorded in the manifest's ``extra.label_mix`` (see
``synesthesia.shards.mixing``). The set is written to a temporary folder and
moved onto ``<out>/<dataset>/source`` only when complete, manifest last; the
same input and config always give byte-identical shards. The dataset card
``<out>/<dataset>/README.md`` is written after (``synesthesia.shards.card``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from synesthesia import UserError
from synesthesia.config import PipelineConfig, config_hash, to_dict
from synesthesia.processes import remove_stale_temps
from synesthesia.progress import progress
from synesthesia.shards.card import write_dataset_card
from synesthesia.shards.mixing import label_mix_entry
from synesthesia.shards.schema import IMAGE_FIELDS, SchemaError
from synesthesia.shards.writer import Manifest, ShardInfo, SplitWriter
from synesthesia.sources.ingest.checks import (
    MAX_AUDIO_RATE,
    MAX_LIDAR_AZIMUTH,
    MAX_LIDAR_BEAMS,
    MIN_AUDIO_RATE,
    build_sample,
)
from synesthesia.sources.ingest.formats import open_source
from synesthesia.sources.ingest.items import Item
from synesthesia.utils import umask_mode

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")  # output splits; the index seeds each one's write order


def _check_config(cfg: Any) -> None:
    for name in ("val_fraction", "test_fraction"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise UserError(f"ingest.{name} must be in [0, 1), got {value}")
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
        raise UserError("ingest.val_fraction + ingest.test_fraction must be below 1")
    if cfg.shard_size < 1:
        raise UserError(f"ingest.shard_size must be at least 1, got {cfg.shard_size}")
    if not MIN_AUDIO_RATE <= cfg.audio_rate <= MAX_AUDIO_RATE:
        raise UserError(
            f"ingest.audio_rate must be in {MIN_AUDIO_RATE}..{MAX_AUDIO_RATE} Hz, got {cfg.audio_rate}"
        )
    if not (1 <= cfg.lidar_beams <= MAX_LIDAR_BEAMS and 1 <= cfg.lidar_azimuth <= MAX_LIDAR_AZIMUTH):
        raise UserError(
            f"ingest.lidar_beams must be in 1..{MAX_LIDAR_BEAMS} and ingest.lidar_azimuth in 1..{MAX_LIDAR_AZIMUTH}"
        )
    if not all(math.isfinite(v) and -90.0 <= v <= 90.0 for v in (cfg.lidar_fov_up, cfg.lidar_fov_down)):
        raise UserError("ingest.lidar_fov_up and ingest.lidar_fov_down must be angles in -90..90 degrees")
    if cfg.lidar_fov_up <= cfg.lidar_fov_down:
        raise UserError("ingest.lidar_fov_up must be above ingest.lidar_fov_down")


def plan(items: list[Item], cfg: Any, seed: int) -> tuple[dict[str, str], list[str]]:
    """(key → output split, class names) from the first pass over a source.

    Present splits are kept; a missing test / val split takes a seeded share of
    train (permutation of the sorted train keys). The first item of a key wins.
    """
    split_of: dict[str, str] = {}
    labels = []
    for item in items:
        if item.error is None and item.key not in split_of:
            split_of[item.key] = item.split
            labels.append(item.label)
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


def ingest(cfg: PipelineConfig, out: str | Path = "shards") -> tuple[Path, Manifest]:
    """Ingest ``cfg.ingest.source`` into ``<out>/<cfg.dataset>/source``; (set folder, manifest).

    The set is built in a temporary folder beside the target and moved into
    place when complete, replacing an older set as a whole.
    """
    icfg = cfg.ingest
    _check_config(icfg)
    if not re.fullmatch(r"[A-Za-z0-9_\-.]+", cfg.dataset) or cfg.dataset.startswith("."):
        raise UserError(f"dataset name {cfg.dataset!r} must be letters, digits, '_', '-' or '.'")
    source = open_source(icfg)
    items = list(source.items())  # the only pass over the source: it warns about corrupt tars
    split_of, class_names = plan(items, icfg, cfg.seed)
    if not split_of:
        raise UserError(f"no images found in {icfg.source}")
    # Names given by the source (HF ClassLabel, our manifest) fix the label space,
    # classes with no sample included; integer labels index into them.
    given = getattr(source, "class_names", None)
    if given:
        class_names = list(given)
    index_of = {name: i for i, name in enumerate(class_names)}

    def resolve(label: str | int | None) -> tuple[int, str]:
        if isinstance(label, int) and given:
            if 0 <= label < len(class_names):
                return label, class_names[label]
            raise SchemaError(f"label {label} outside the {len(class_names)} named classes", "no_label")
        if str(label) not in index_of:
            raise SchemaError(f"label {label!r} is not a known class", "no_label")
        return index_of[str(label)], str(label)

    final = Path(out) / cfg.dataset / "source"
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent)  # killed ingests' folders, once past the lease (none held open)
    tmp = Path(tempfile.mkdtemp(prefix=".source-", suffix=".tmp", dir=final.parent))
    umask_mode(tmp)  # published as a normal folder (mkdtemp makes it 0700)
    try:
        skipped: Counter[str] = Counter()
        chosen: dict[str, Item] = {}  # key -> the first usable item of that key
        for item in items:
            try:
                if item.error is not None:
                    raise item.error
                if item.key in chosen:
                    raise SchemaError(f"duplicate key {item.key!r}", "duplicate_key")
            except SchemaError as exc:
                skipped[exc.reason] += 1
                logger.warning("skipped %s: %s", item.origin, exc)
                continue
            chosen[item.key] = item
        splits: dict[str, list[ShardInfo]] = {}
        label_mix: dict[str, Any] = {}
        modalities: set[str] = set()
        image_fields: set[str] = set()
        for index, split in enumerate(SPLITS):
            keys = sorted(k for k, s in split_of.items() if s == split)
            order = np.random.default_rng([cfg.seed, index]).permutation(len(keys))
            writer = SplitWriter(tmp, split, icfg.shard_size)
            labels: list[int] = []  # of the written samples, in order
            for i in progress(order, desc=f"ingest {split}", unit="sample"):
                item = chosen[keys[i]]
                try:
                    label, class_name = resolve(item.label)
                    sample = build_sample(item, label, class_name, icfg)
                    if not writer.add(sample):
                        continue  # (keys are unique here: duplicates were skipped above)
                except SchemaError as exc:
                    skipped[exc.reason] += 1
                    logger.warning("skipped %s: %s", item.origin, exc)
                    continue
                labels.append(label)
                image_fields.update(f for f in IMAGE_FIELDS if f in sample)
                modalities.update(
                    m
                    for m, f in (("depth", "depth.npy"), ("audio", "audio.flac"), ("lidar", "lidar.npy"))
                    if f in sample
                )
            infos = writer.close()
            if infos:
                splits[split] = infos
                size = icfg.shard_size  # SplitWriter cuts a shard every shard_size samples
                label_mix[split] = label_mix_entry(
                    [labels[j : j + size] for j in range(0, len(labels), size)]
                )
        kept = sum(info.samples for infos in splits.values() for info in infos)
        # Bad tar entries of a webdataset source (warned about by its error handler).
        skipped.update({k: v for k, v in getattr(source, "tar_errors", {}).items() if v})
        if kept == 0:
            summary = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
            raise UserError(f"no usable samples in {icfg.source} (skipped: {summary})")
        extra: dict[str, Any] = {
            "modalities": sorted(modalities),
            "image_fields": sorted(image_fields),
            "num_classes": len(class_names),
            "class_names": class_names,
            "audio_rate": icfg.audio_rate,
            "format": source.format,
            "source": str(icfg.source),
            "label_mix": label_mix,
        }
        if "lidar" in modalities:
            extra["lidar"] = {
                "beams": icfg.lidar_beams,
                "azimuth": icfg.lidar_azimuth,
                "fov_up": icfg.lidar_fov_up,
                "fov_down": icfg.lidar_fov_down,
            }
        manifest = Manifest(
            kind="source",
            dataset=cfg.dataset,
            splits=splits,
            skipped=dict(sorted(skipped.items())),
            preprocessing={"images": "original bytes", "audio": f"mono 16-bit FLAC at {icfg.audio_rate} Hz"},
            config=to_dict(cfg),
            config_hash=config_hash(cfg),
            extra=extra,
        )
        manifest.write(tmp)
        _swap_into_place(tmp, final)
        write_dataset_card(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    counts = ", ".join(f"{s} {manifest.count(s)}" for s in manifest.splits)
    logger.info("ingested %s → %s: %s; skipped %d", icfg.source, final, counts, sum(skipped.values()))
    return final, manifest


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Move the finished set ``tmp`` onto ``final``, replacing an older set whole."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
