"""Rendering the scenes dataset into source shards (``render_dataset``).

Every split (train, val, test, paired; sizes from ``scenes.num_*``) is
rendered in chunks of 32 samples, on a process pool (forked where the platform
can) or in-process for one worker, and written in index order to
``<out>/<dataset>/source/<split>-NNNNNN.tar`` with ``manifest.json`` last.
Results come back in order, so the shards are byte-identical across runs and
worker counts.

The manifest records ``render_config`` (seed and ``scenes`` section, without
the worker count) and its hash; an existing, verified render of the same
config is kept (``is_rendered``) unless ``force``. ``check_config`` turns bad
``scenes.*`` values into UserErrors.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.config import PipelineConfig, ScenesConfig, config_hash
from synesthesia.shards.schema import MANIFEST
from synesthesia.shards.verify import verify
from synesthesia.shards.writer import Manifest, SplitWriter
from synesthesia.sources.scenes.render import render_sample
from synesthesia.sources.scenes.scene import CLASS_NAMES, HFOV_DEG, NUM_CLASSES, SPLIT_CODES

logger = logging.getLogger(__name__)

MODALITIES = ["rgb", "depth", "audio", "lidar"]


def _render_chunk(job: tuple[int, str, int, int, ScenesConfig]) -> list[dict]:
    seed, split, start, stop, cfg = job
    return [render_sample(seed, split, i, cfg) for i in range(start, stop)]


def split_sizes(cfg: ScenesConfig) -> dict[str, int]:
    return {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test, "paired": cfg.num_paired}


def check_config(cfg: ScenesConfig) -> None:
    if not 0.0 <= cfg.ambiguity <= 1.0:
        raise UserError(f"scenes.ambiguity must lie in [0, 1], got {cfg.ambiguity}")
    if cfg.image_size < 8:
        raise UserError(f"scenes.image_size must be at least 8, got {cfg.image_size}")
    if cfg.lidar_beams < 1 or cfg.lidar_azimuth < 1:
        raise UserError("scenes.lidar_beams and scenes.lidar_azimuth must be positive")
    if cfg.audio_rate < 4000 or cfg.audio_seconds <= 0.05:
        raise UserError("scenes.audio_rate must be ≥ 4000 and scenes.audio_seconds > 0.05")
    if not 0.0 <= cfg.lidar_dropout < 1.0 / 3 or cfg.lidar_noise < 0 or cfg.lidar_max_range <= 0:
        raise UserError("scenes.lidar_dropout must lie in [0, 1/3), lidar_noise ≥ 0 and lidar_max_range > 0")
    if cfg.shard_size < 1 or cfg.clutter < 0 or cfg.workers < 0:
        raise UserError("scenes.shard_size must be ≥ 1, scenes.clutter and scenes.workers ≥ 0")
    for split, n in split_sizes(cfg).items():
        if n < 0:
            raise UserError(f"scenes.num_{split} must be ≥ 0, got {n}")


def render_config(cfg: PipelineConfig) -> dict[str, Any]:
    """What the shards depend on (not the worker count): recorded and hashed in the manifest."""
    scenes = asdict(cfg.scenes)
    scenes.pop("workers")
    return {"seed": cfg.seed, "scenes": scenes}


def source_dir(cfg: PipelineConfig, out: str | Path) -> Path:
    return Path(out) / cfg.dataset / "source"


def is_rendered(directory: Path, cfg: PipelineConfig) -> bool:
    """Whether ``directory`` already holds a verified render of this exact config."""
    if not (directory / MANIFEST).is_file():
        return False
    try:
        manifest = Manifest.read(directory)
    except (UserError, ValueError, TypeError):
        return False
    return manifest.config_hash == config_hash(render_config(cfg)) and not verify(directory)


def render_dataset(
    cfg: PipelineConfig, out: str | Path, *, workers: int | None = None, force: bool = False
) -> tuple[Path, bool]:
    """Render every split into ``<out>/<dataset>/source``; returns (folder, whether it rendered).

    An existing, verified render of the same config is kept unless ``force``.
    """
    sc = cfg.scenes
    check_config(sc)
    directory = source_dir(cfg, out)
    if not force and is_rendered(directory, cfg):
        logger.info(
            "%s already holds this render (config %s); kept", directory, config_hash(render_config(cfg))
        )
        return directory, False
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    for split in SPLIT_CODES:
        for stale in directory.glob(f"{split}-*.tar"):
            stale.unlink()
    workers = workers if workers is not None else sc.workers
    workers = workers or os.cpu_count() or 1
    chunk = 32
    splits = {}
    with _worker_pool(workers) as pool:
        for split, count in split_sizes(sc).items():
            if count == 0:
                continue
            writer = SplitWriter(directory, split, sc.shard_size)
            jobs = [(cfg.seed, split, s, min(s + chunk, count), sc) for s in range(0, count, chunk)]
            results = pool.imap(_render_chunk, jobs) if pool is not None else map(_render_chunk, jobs)
            for samples in results:
                for sample in samples:
                    writer.add(sample)
            splits[split] = writer.close()
            logger.info("rendered %s: %d samples in %d shards", split, count, len(splits[split]))
    manifest = Manifest(
        kind="source",
        dataset=cfg.dataset,
        splits=splits,
        config=render_config(cfg),
        config_hash=config_hash(render_config(cfg)),
        extra={
            "generator": "synesthesia.sources.scenes",
            "modalities": MODALITIES,
            "num_classes": NUM_CLASSES,
            "class_names": CLASS_NAMES,
            "audio_rate": sc.audio_rate,
            "audio_seconds": sc.audio_seconds,
            "image_size": [sc.image_size, sc.image_size],
            "lidar_shape": [sc.lidar_beams, sc.lidar_azimuth],
            "lidar_fields": ["lidar.npy", "lidar_intensity.npy"],
            "lidar_max_range": sc.lidar_max_range,
            "hfov_deg": HFOV_DEG,
            "depth": "z-depth in metres, 0 where the pixel sees the sky",
            "ambiguity": sc.ambiguity,
        },
    )
    manifest.write(directory)
    return directory, True


@contextmanager
def _worker_pool(workers: int) -> Iterator[Any]:
    """A process pool, or ``None`` for one worker.

    Forked where the platform can (workers start at once with the modules
    already imported; rendering is numpy only and starts no threads), spawned
    elsewhere. Results come back in order, so the shards do not depend on it.
    """
    if workers <= 1:
        yield None
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers)
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
