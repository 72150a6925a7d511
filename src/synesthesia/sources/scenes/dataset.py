"""Rendering the scenes dataset into source shards (``render_dataset``).

Every split (train, val, test, paired; sizes from ``scenes.num_*``) is
rendered in chunks of 32 samples, on a process pool (forked where the platform
can) or in-process for one worker, and written in index order to
``<out>/<dataset>/source/<split>-NNNNNN.tar`` with ``manifest.json`` last, then the
dataset card ``<out>/<dataset>/README.md`` (``synesthesia.shards.card``).
Results come back in order, so the shards are byte-identical across runs and
worker counts.

The manifest records ``render_config`` (seed and ``scenes`` section, without
the worker count) and its hash; an existing, verified render of the same
config is kept (``is_rendered``) unless ``force``. ``check_config`` turns bad
``scenes.*`` values into UserErrors, and refuses a sample whose estimated memory
(``sample_bytes``) is over ``MAX_SAMPLE_BYTES``, before anything is allocated.

With a ``part`` (``synesthesia render --part i/N``, a Slurm array task) only
that part's shards are rendered and the last part to find every shard present
writes the manifest (``render_parts``): the same files as a whole render.
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
from synesthesia.config import PipelineConfig, ScenesConfig, check_section, config_hash
from synesthesia.parts import Part
from synesthesia.processes import DieWithParent
from synesthesia.progress import progress
from synesthesia.shards.card import write_dataset_card
from synesthesia.shards.schema import MANIFEST
from synesthesia.shards.verify import verify
from synesthesia.shards.writer import Manifest, ShardInfo, SplitWriter
from synesthesia.sources.scenes.render import render_sample
from synesthesia.sources.scenes.scene import CLASS_NAMES, HFOV_DEG, NUM_CLASSES, SPLIT_CODES
from synesthesia.storage import as_path, remove_stale_temps

logger = logging.getLogger(__name__)

MODALITIES = ["rgb", "depth", "audio", "lidar"]
PARTS_KEY = ".render-parts.json"  # the render config the parts of an unfinished render share
CHUNK = 32  # samples per pool job


def _render_chunk(job: tuple[int, str, int, int, ScenesConfig]) -> list[dict]:
    seed, split, start, stop, cfg = job
    return [render_sample(seed, split, i, cfg) for i in range(start, stop)]


def split_sizes(cfg: ScenesConfig) -> dict[str, int]:
    return {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test, "paired": cfg.num_paired}


# Peak working memory of render_sample, measured (tracemalloc) at about 180 bytes per camera pixel,
# 120 per LiDAR ray and 80 per audio sample, rounded up; a sample over MAX_SAMPLE_BYTES is refused.
BYTES_PER_PIXEL, BYTES_PER_RAY, BYTES_PER_AUDIO_SAMPLE = 192, 128, 96
MAX_SAMPLE_BYTES = 512 << 20


def sample_bytes(cfg: ScenesConfig) -> int:
    """An upper estimate of the memory rendering one sample takes (camera, LiDAR, sound)."""
    pixels = cfg.image_size * cfg.image_size
    rays = cfg.lidar_beams * cfg.lidar_azimuth
    audio = int(round(cfg.audio_rate * cfg.audio_seconds))
    return BYTES_PER_PIXEL * pixels + BYTES_PER_RAY * rays + BYTES_PER_AUDIO_SAMPLE * audio


def check_config(cfg: ScenesConfig) -> None:
    """Every ``scenes.*`` value finite and in range (``synesthesia.config.BOUNDS``), and one
    sample's estimated memory under MAX_SAMPLE_BYTES, before anything is allocated."""
    check_section(cfg, "scenes")
    need = sample_bytes(cfg)
    if need > MAX_SAMPLE_BYTES:
        raise UserError(
            f"one scenes sample would need about {need / (1 << 20):.0f} MiB to render (at most "
            f"{MAX_SAMPLE_BYTES >> 20} MiB): lower scenes.image_size, lidar_beams x lidar_azimuth "
            "or audio_rate x audio_seconds"
        )


def render_config(cfg: PipelineConfig) -> dict[str, Any]:
    """What the shards depend on (not the worker count): recorded and hashed in the manifest."""
    scenes = asdict(cfg.scenes)
    scenes.pop("workers")
    return {"seed": cfg.seed, "scenes": scenes}


def source_dir(cfg: PipelineConfig, out: str | Path) -> Path:
    """``<out>/<dataset>/source``: a local folder or a folder in a bucket (``s3://…``)."""
    return as_path(out, "--out") / cfg.dataset / "source"


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
    cfg: PipelineConfig,
    out: str | Path,
    *,
    workers: int | None = None,
    force: bool = False,
    part: Part | None = None,
) -> tuple[Path, bool]:
    """Render every split into ``<out>/<dataset>/source``; returns (folder, whether it rendered).

    An existing, verified render of the same config is kept unless ``force``. With ``part`` (one
    of several), only that part's shards are rendered (:mod:`.render_parts`).
    """
    sc = cfg.scenes
    check_config(sc)
    directory = source_dir(cfg, out)
    if part is not None and not part.whole:
        from synesthesia.sources.scenes.render_parts import render_part

        return render_part(cfg, directory, part, workers=workers, force=force)
    # a killed render's temporaries: this render writes these names, so their writer is dead
    own = [f".{split}-*.tar.*.tmp" for split in SPLIT_CODES] + [f".{MANIFEST}.*.tmp"]
    remove_stale_temps(directory, own=own)
    if not force and is_rendered(directory, cfg):
        logger.info(
            "%s already holds this render (config %s); kept", directory, config_hash(render_config(cfg))
        )
        write_dataset_card(directory.parent)  # a root written before cards existed gets one
        return directory, False
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    (directory / PARTS_KEY).unlink(missing_ok=True)
    for split in SPLIT_CODES:
        for stale in directory.glob(f"{split}-*.tar"):
            stale.unlink()
    workers = workers if workers is not None else sc.workers
    workers = workers or os.cpu_count() or 1
    chunk = CHUNK
    splits = {}
    with _worker_pool(workers) as pool:
        for split, count in split_sizes(sc).items():
            if count == 0:
                continue
            writer = SplitWriter(directory, split, sc.shard_size)
            jobs = [(cfg.seed, split, s, min(s + chunk, count), sc) for s in range(0, count, chunk)]
            results = pool.imap(_render_chunk, jobs) if pool is not None else map(_render_chunk, jobs)
            bar = progress(total=count, desc=f"render {split}", unit="sample")
            for samples in results:
                for sample in samples:
                    writer.add(sample)
                bar.update(len(samples))
            bar.close()
            splits[split] = writer.close()
            logger.info("rendered %s: %d samples in %d shards", split, count, len(splits[split]))
    _manifest(cfg, splits).write(directory)
    write_dataset_card(directory.parent)
    return directory, True


def _manifest(cfg: PipelineConfig, splits: dict[str, list[ShardInfo]]) -> Manifest:
    """The source manifest of a finished render (the same for a whole render and for parts)."""
    return Manifest(
        kind="source",
        dataset=cfg.dataset,
        splits=splits,
        config=render_config(cfg),
        config_hash=config_hash(render_config(cfg)),
        extra={
            "generator": "synesthesia.sources.scenes",
            "modalities": MODALITIES,
            "image_fields": ["rgb.png"],
            "num_classes": NUM_CLASSES,
            "class_names": CLASS_NAMES,
            "audio_rate": cfg.scenes.audio_rate,
            "audio_seconds": cfg.scenes.audio_seconds,
            "image_size": [cfg.scenes.image_size, cfg.scenes.image_size],
            "lidar_shape": [cfg.scenes.lidar_beams, cfg.scenes.lidar_azimuth],
            "lidar_fields": ["lidar.npy", "lidar_intensity.npy"],
            "lidar_max_range": cfg.scenes.lidar_max_range,
            "hfov_deg": HFOV_DEG,
            "depth": "z-depth in metres, 0 where the pixel sees the sky",
            "ambiguity": cfg.scenes.ambiguity,
        },
    )


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
    pool = multiprocessing.get_context(method).Pool(workers, initializer=DieWithParent())
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
