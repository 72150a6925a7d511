"""One part of a render split into independent parts (``synesthesia render --part i/N``).

The shards of every split are listed in order (train, val, test, paired; shard *k* of a split holds
samples ``k * shard_size`` up to the next shard) and part *i* of *N* renders those at positions *p*
with *p* mod *N* = *i* that do not exist yet. Every sample is a pure function of
``(seed, split, index)`` and a shard is written exactly as the whole render writes it
(:func:`~synesthesia.shards.writer.write_shard`), so the parts together give the same bytes as one
process. Parts never wait for each other:

- the first part writes ``.render-parts.json`` (the render config); a part that finds another
  config there, or shards with no such file and no manifest, refuses rather than mix renders;
- each shard is claimed with a lease (:mod:`synesthesia.stage_one.leases`), so two jobs given the
  same part never both render it;
- the part that finds every shard present writes ``manifest.json`` and the dataset card and drops
  ``.render-parts.json``; the others log how many shards remain and return.

``--force`` is refused with parts (they cannot agree who deletes the old render); temporaries of
killed renders are removed only once an hour old, since other parts may be writing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from synesthesia import UserError
from synesthesia.config import PipelineConfig, config_hash
from synesthesia.parts import Part
from synesthesia.progress import progress
from synesthesia.shards.card import write_dataset_card
from synesthesia.shards.schema import MANIFEST, read_json_file, shard_name
from synesthesia.shards.writer import shard_info, write_shard
from synesthesia.sources.scenes.dataset import (
    CHUNK,
    PARTS_KEY,
    _manifest,
    _render_chunk,
    _worker_pool,
    is_rendered,
    render_config,
    split_sizes,
)
from synesthesia.stage_one.leases import LeaseKeeper
from synesthesia.storage import atomic_write_text, remove_stale_temps

logger = logging.getLogger(__name__)


def render_shards(cfg: PipelineConfig) -> list[tuple[str, int, int, int]]:
    """Every shard of the render in order: ``(split, k, first sample, end)``."""
    size = cfg.scenes.shard_size
    return [
        (split, k, start, min(start + size, count))
        for split, count in split_sizes(cfg.scenes).items()
        for k, start in enumerate(range(0, count, size))
    ]


def _claim_folder(cfg: PipelineConfig, directory: Path) -> None:
    """Check that the folder holds nothing but this render's parts, and record its config."""
    key = {"config": render_config(cfg), "config_hash": config_hash(render_config(cfg))}
    path = directory / PARTS_KEY
    if path.is_file():
        found = read_json_file(path, "render parts key")
        if not isinstance(found, dict) or found.get("config_hash") != key["config_hash"]:
            raise UserError(
                f"{directory} holds parts of another render; delete it or render it whole with --force"
            )
        return
    if (directory / MANIFEST).is_file():
        raise UserError(f"{directory} holds another render; delete it or render it whole with --force")
    if any(directory.glob("*.tar")):
        raise UserError(
            f"{directory} holds shards of an unfinished render of unknown config; delete them or render"
            " it whole with --force"
        )
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(key, indent=2, sort_keys=True) + "\n")  # same bytes from any part


def render_part(
    cfg: PipelineConfig, directory: Path, part: Part, *, workers: int | None = None, force: bool = False
) -> tuple[Path, bool]:
    """Render part ``part`` of the scenes dataset into ``directory``; returns (folder, rendered any)."""
    if force:
        raise UserError(
            f"--force with independent parts ({part}): the parts cannot agree who deletes the old render;"
            " delete the folder first"
        )
    remove_stale_temps(directory)  # only those an hour old: other parts may be writing right now
    if is_rendered(directory, cfg):
        logger.info(
            "%s already holds this render (config %s); kept", directory, config_hash(render_config(cfg))
        )
        return directory, False
    _claim_folder(cfg, directory)
    shards = render_shards(cfg)
    share = part.take(shards)
    todo = [s for s in share if not (directory / shard_name(s[0], s[1])).exists()]
    logger.info(
        "render: %s takes %d of %d shards, %d already complete",
        part,
        len(share),
        len(shards),
        len(share) - len(todo),
    )
    workers = workers if workers is not None else cfg.scenes.workers
    workers = workers or os.cpu_count() or 1
    written = 0
    # the pool forks its workers before the lease heartbeat thread starts
    with (
        _worker_pool(workers if todo else 1) as pool,
        LeaseKeeper(str(part), cfg.shard.lease_timeout_s) as leases,
    ):
        mine = [s for s in todo if leases.claim(directory, shard_name(s[0], s[1]))]
        mine = [s for s in mine if not (directory / shard_name(s[0], s[1])).exists()]
        jobs = [
            (cfg.seed, split, first, min(first + CHUNK, end), cfg.scenes)
            for split, _, start, end in mine
            for first in range(start, end, CHUNK)
        ]
        bar = progress(total=sum(end - start for _, _, start, end in mine), desc="render", unit="sample")
        results = pool.imap(_render_chunk, jobs) if pool is not None else map(_render_chunk, jobs)
        for split, k, start, end in mine:  # results come back in job order, shard after shard
            samples: list[dict] = []
            while len(samples) < end - start:
                chunk = next(results)
                samples.extend(chunk)
                bar.update(len(chunk))
            write_shard(directory / shard_name(split, k), samples)
            leases.release(directory, shard_name(split, k))
            written += 1
        bar.close()
    _finish(cfg, directory, shards, part, written)
    return directory, written > 0


def _finish(cfg: PipelineConfig, directory: Path, shards: list, part: Part, written: int) -> bool:
    """Write the manifest if every shard exists (whoever gets here last); else log what remains."""
    missing = [s for s in shards if not (directory / shard_name(s[0], s[1])).exists()]
    if missing:
        logger.info(
            "render: %s wrote %d shard(s); %d of %d shards remain for the other parts (first: %s)",
            part,
            written,
            len(missing),
            len(shards),
            shard_name(missing[0][0], missing[0][1]),
        )
        return False
    splits: dict = {}
    for split, k, start, end in shards:
        splits.setdefault(split, []).append(shard_info(directory / shard_name(split, k), end - start))
    LeaseKeeper("finalize", cfg.shard.lease_timeout_s).sweep(
        directory, [shard_name(s[0], s[1]) for s in shards]
    )
    _manifest(cfg, splits).write(directory)
    (directory / PARTS_KEY).unlink(missing_ok=True)
    write_dataset_card(directory.parent)
    logger.info("render: %s found every shard present; wrote %s", part, directory / MANIFEST)
    return True
