"""The ingest run (``ingest``): list the source, plan the splits, write the chunks, publish the set.

Two passes over the source, so memory does not grow with its bytes:

1. ``layout.list_source`` lists keys, labels, splits and small locators (no
   image or signal bytes); bad items and repeated keys (the first of a key
   wins) are skipped with one warning line each and counted by reason in the
   manifest's ``skipped``. ``layout.plan`` keeps the splits present in the
   source and carves a missing ``test`` (``val``) split out of train by a
   seeded permutation (pipeline ``seed``) of ``ingest.test_fraction``
   (``ingest.val_fraction``) of its samples; ``layout.Layout`` orders each
   split by a seeded global permutation of its sorted keys, never in source
   order — a class-folder source listed in path order would otherwise give
   shards of one or two classes each, which training's shard shuffle and
   bounded shuffle buffer cannot mix — and cuts it into chunks of
   ``ingest.shard_size`` positions, one output shard each.
2. This part's chunks (all of them for a whole run) are read back by locator
   through ``source.open_reader``, checked (``checks.build_sample``) and
   written one chunk at a time into a staging folder (``staging``). A sample
   that fails its checks here is skipped and counted, and leaves its shard one
   sample short, so a chunk never depends on another.

Parts: ``synesthesia ingest --part i/N`` (or a Slurm array / torchrun
environment, ``synesthesia.parts``) writes chunks ``i, i+N, ...`` of the list
every part computes alike; whichever part finds every chunk written publishes
the set. A rerun keeps the chunks already written; a part rerun after the set
was published (same config and source) finds it and does nothing. Every way
to split the job gives byte-identical shards and manifest.

The set is moved onto ``<out>/<dataset>/source`` only when complete, manifest
last; the label mix of every shard is recorded in the manifest's
``extra.label_mix`` (see ``synesthesia.shards.mixing``). The dataset card
``<out>/<dataset>/README.md`` is written after (``synesthesia.shards.card``).
Mistakes of configuration are UserErrors.
"""

from __future__ import annotations

import logging
import math
import re
from functools import partial
from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.config import PipelineConfig, config_hash, to_dict
from synesthesia.parts import Part
from synesthesia.progress import progress
from synesthesia.shards.card import write_dataset_card
from synesthesia.shards.schema import SchemaError
from synesthesia.shards.writer import Manifest, ShardInfo
from synesthesia.sources.ingest.checks import (
    MAX_AUDIO_RATE,
    MAX_LIDAR_AZIMUTH,
    MAX_LIDAR_BEAMS,
    MIN_AUDIO_RATE,
)
from synesthesia.sources.ingest.formats import open_source
from synesthesia.sources.ingest.items import Item
from synesthesia.sources.ingest.layout import SPLITS, Layout, list_source, plan
from synesthesia.sources.ingest.staging import (
    chunk_record,
    finalize,
    remove_stale_staging,
    staging_folder,
    write_chunk,
)
from synesthesia.storage import as_path, is_remote, remove_stale_temps
from synesthesia.utils import umask_mode

__all__ = ["SPLITS", "ingest", "plan"]

logger = logging.getLogger(__name__)


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


def ingest(
    cfg: PipelineConfig, out: str | Path = "shards", part: Part | None = None
) -> tuple[Path, Manifest | None]:
    """Ingest ``cfg.ingest.source`` into ``<out>/<cfg.dataset>/source``; (set folder, manifest).

    With ``part`` (see ``synesthesia.parts``), only that part's chunks are
    written; the manifest is None unless this part found the set complete and
    published it. The set is built beside the target and moved into place when
    complete, replacing an older set as a whole.
    """
    part = part or Part()
    icfg = cfg.ingest
    _check_config(icfg)
    if not re.fullmatch(r"[A-Za-z0-9_\-.]+", cfg.dataset) or cfg.dataset.startswith("."):
        raise UserError(f"dataset name {cfg.dataset!r} must be letters, digits, '_', '-' or '.'")
    source = open_source(icfg)
    listing = list_source(source, config_hash(cfg))
    split_of, class_names = plan(listing, icfg, cfg.seed)
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

    layout = Layout(split_of, cfg.seed, icfg.shard_size)
    del split_of
    final = as_path(out, "--out") / cfg.dataset / "source"
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent)  # killed ingests' folders, once past the lease (none held open)
    staging = staging_folder(final.parent, listing.fingerprint)
    if not part.whole and not staging.exists() and (published := _published(final, cfg, layout)):
        logger.info("%s: %s is already published by this job's parts; nothing to do", part, final)
        return final, published
    remove_stale_staging(final.parent, keep=staging)
    staging.mkdir(exist_ok=True)
    if not is_remote(staging):
        umask_mode(staging)
    todo = [c for c in part.take(layout.chunks) if chunk_record(staging, c) is None]
    if todo:
        refs = [listing.records[key][3] for chunk in todo for key in layout.chunk_keys(chunk)]
        with source.open_reader(refs, staging) as load:
            del refs
            total = sum(chunk.stop - chunk.start for chunk in todo)
            bar = progress(total=total, desc=f"ingest {part}" if not part.whole else "ingest", unit="sample")
            for chunk in todo:
                items = (
                    Item(key, split, label, origin, load=partial(load, ref))
                    for key in layout.chunk_keys(chunk)
                    for split, label, origin, ref in [listing.records[key]]
                )
                write_chunk(staging, chunk, _counted(items, bar), resolve, icfg)
            bar.close()
    records = [chunk_record(staging, c) for c in layout.chunks]
    if any(r is None for r in records):
        missing = sum(r is None for r in records)
        logger.info(
            "%s: wrote its shards; %d of %d shards still to come from other parts",
            part,
            missing,
            len(records),
        )
        return final, None

    def make_manifest(
        splits: dict[str, list[ShardInfo]], skipped: dict[str, int], found: dict[str, Any]
    ) -> Manifest:
        extra: dict[str, Any] = {
            "modalities": found["modalities"],
            "image_fields": found["image_fields"],
            "num_classes": len(class_names),
            "class_names": class_names,
            "audio_rate": icfg.audio_rate,
            "format": source.format,
            "source": str(icfg.source),
            "label_mix": found["label_mix"],
        }
        if "lidar" in found["modalities"]:
            extra["lidar"] = {
                "beams": icfg.lidar_beams,
                "azimuth": icfg.lidar_azimuth,
                "fov_up": icfg.lidar_fov_up,
                "fov_down": icfg.lidar_fov_down,
            }
        return Manifest(
            kind="source",
            dataset=cfg.dataset,
            splits=splits,
            skipped=skipped,
            preprocessing={"images": "original bytes", "audio": f"mono 16-bit FLAC at {icfg.audio_rate} Hz"},
            config=to_dict(cfg),
            config_hash=config_hash(cfg),
            extra=extra,
        )

    manifest = finalize(
        staging, final, layout.chunks, records, listing.skipped, make_manifest, str(icfg.source)
    )
    write_dataset_card(final.parent)
    counts = ", ".join(f"{s} {manifest.count(s)}" for s in manifest.splits)
    skipped = sum(manifest.skipped.values())
    logger.info("ingested %s → %s: %s; skipped %d", icfg.source, final, counts, skipped)
    return final, manifest


def _counted(items, bar):
    """``items``, advancing the progress ``bar`` by one as each is taken."""
    for item in items:
        yield item
        bar.update(1)


def _published(final: Path, cfg: PipelineConfig, layout: Layout) -> Manifest | None:
    """The manifest at ``final`` if it looks like this job's output (same config and source, the
    planned splits, no more samples than planned): a part rerun after the set was published."""
    try:
        manifest = Manifest.read(final)
    except UserError:
        return None
    same = (
        manifest.config_hash == config_hash(cfg)
        and manifest.extra.get("source") == str(cfg.ingest.source)
        and set(manifest.splits) == set(layout.keys)
        and all(manifest.count(split) <= len(keys) for split, keys in layout.keys.items())
    )
    return manifest if same else None
