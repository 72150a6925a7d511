"""``run_stage_one``: every configured generator over the source set, one set after the other.

- :func:`run_stage_one` - what ``synesthesia shard`` runs: check the settings, read the source
  manifest, join the distributed job, run each generator; raises :class:`StageOneIncomplete` when a
  source shard failed, after every other shard was written;
- :func:`_run_generator` - one generator's sets in four steps, with a barrier between them: 1. every
  process checks the set folders and the main process prepares them
  (:mod:`~synesthesia.stage_one.cache`); 2. every process lists the same pending shards and takes its
  share (:mod:`~synesthesia.stage_one.assignment`); 3. inference
  (:class:`~synesthesia.stage_one.set_runner.SetRunner`); 4. the main process merges the timings and
  writes the manifests (:mod:`~synesthesia.stage_one.finalize`);
- :class:`SetResult`, :class:`StageOneResult`, :class:`StageOneIncomplete` - the outcome.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synesthesia import UserError
from synesthesia.config import GeneratorConfig, PipelineConfig, to_dict
from synesthesia.shards.schema import MANIFEST, SCHEMA_VERSION, read_json_file
from synesthesia.shards.writer import Manifest
from synesthesia.stage_one.assignment import pending_tasks, source_tasks, tasks_for_process
from synesthesia.stage_one.cache import cache_key, check_set, prepare_set
from synesthesia.stage_one.finalize import _finalize, _merge_reports, write_throughput
from synesthesia.stage_one.generator import build_generator, prepare_generator, storage_dtype
from synesthesia.stage_one.paths import decoded_dir, latent_dir, set_name, source_dir
from synesthesia.stage_one.runtime import Runtime, resolve_runtime, validate
from synesthesia.stage_one.set_runner import SetRunner
from synesthesia.utils import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class SetResult:
    """The outcome of one generator's sets in one process."""

    name: str
    latent_dir: Path
    decoded_dir: Path | None
    complete: bool = False
    failures: list[str] = field(default_factory=list)
    throughput: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageOneResult:
    sets: list[SetResult]

    @property
    def ok(self) -> bool:
        return all(s.complete and not s.failures for s in self.sets)


class StageOneIncomplete(UserError):
    """Some source shards failed: the other shards are written, the affected sets have no manifest."""

    def __init__(self, result: StageOneResult):
        self.result = result
        failures = [f for s in result.sets for f in s.failures]
        incomplete = [s.name for s in result.sets if not s.complete]
        first = f"; first: {failures[0]}" if failures else ""
        super().__init__(
            f"{len(failures)} source shard(s) failed{first}. Set(s) {', '.join(incomplete) or '-'} left without"
            " a manifest; the other shards are written - fix the source and rerun to complete them"
        )


def _run_generator(
    cfg: PipelineConfig,
    gcfg: GeneratorConfig,
    out: Path,
    source: Manifest,
    splits: list[str],
    runtime: Runtime,
    overwrite: bool,
    progress: bool = True,
) -> SetResult:
    state = runtime.state
    name = set_name(gcfg)
    lat_dir = latent_dir(out, cfg.dataset, name)
    dec_dir = decoded_dir(out, cfg.dataset, name) if cfg.shard.decode else None
    result = SetResult(name=name, latent_dir=lat_dir, decoded_dir=dec_dir)

    generator = build_generator(gcfg)
    attention = prepare_generator(generator, runtime)
    spec = generator.latent_spec()
    identity = generator.identity()
    mode = generator.mode
    dtype = storage_dtype(spec, cfg.shard)
    spec_dict = {**spec.to_dict(), "dtype": dtype.name}
    settings = {
        "batch_size": cfg.shard.batch_size,
        "latent_dtype": dtype.name,
        **runtime.settings(attention),
    }
    generator_config = {k: v for k, v in to_dict(gcfg).items() if k != "set_name"}
    material = {
        "schema_version": SCHEMA_VERSION,
        "kind": "latent",
        "generator": {"config": generator_config, "identity": identity},
        "latent_spec": spec_dict,
        "stage_one": settings,
        "source": {split: [s.sha256 for s in shards] for split, shards in sorted(source.splits.items())},
    }
    dirs = [(lat_dir, material)]
    if dec_dir is not None:
        dirs.append((dec_dir, {**material, "kind": "decoded"}))

    # 1. every process checks the set folders (read-only), then the main process prepares them
    actions = [check_set(d, cache_key(m), m, overwrite) for d, m in dirs]
    state.wait_for_everyone()
    if state.is_main_process:
        for (d, m), action in zip(dirs, actions, strict=True):
            prepare_set(d, cache_key(m), m, action)
    state.wait_for_everyone()

    # 2. every process lists the same pending shards before any of them writes
    tasks = source_tasks(source, source_dir(out, cfg.dataset), splits)
    pending = pending_tasks(tasks, lat_dir, dec_dir)
    state.wait_for_everyone()
    if pending and state.is_main_process:
        for d, _ in dirs:
            (d / MANIFEST).unlink(missing_ok=True)
    mine = tasks_for_process(pending, state.process_index, state.num_processes)
    logger.info(
        "%s: %d shards to do (%d complete), process %d of %d takes %d",
        name,
        len(pending),
        len(tasks) - len(pending),
        state.process_index,
        state.num_processes,
        len(mine),
    )

    # 3. inference
    runner = SetRunner(generator, runtime, cfg.shard, gcfg.modality)
    report = runner.run(mine, lat_dir, dec_dir, progress=progress)
    atomic_write_text(
        lat_dir / f".throughput-rank-{state.process_index}.json", json.dumps(report, sort_keys=True)
    )
    result.failures = list(report["failures"])
    del runner, generator
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    state.wait_for_everyone()

    # 4. the main process merges timings and writes the manifests from the files on disk
    if state.is_main_process:
        rank_files = [lat_dir / f".throughput-rank-{r}.json" for r in range(state.num_processes)]
        reports = [read_json_file(p) for p in rank_files if p.is_file()]
        merged = _merge_reports(reports, len(tasks) - len(pending), runtime.settings(attention))
        for p in rank_files:
            p.unlink(missing_ok=True)
        result.throughput = merged
        total = merged["total"]
        logger.info(
            "%s: %d samples in %d shards, %.1f samples/s over %d process(es)"
            " (read %.2f s, infer %.2f s, decode %.2f s, write %.2f s; waited %.2f s on input, %.2f s on writes)",
            name,
            total["samples"],
            total["shards"],
            total["samples_per_s"],
            merged["num_processes"],
            total["read_s"],
            total["infer_s"],
            total["decode_s"],
            total["write_s"],
            total["wait_s"],
            total["write_wait_s"],
        )
        for d, _ in dirs:
            write_throughput(d, merged)
        result.failures = merged["failures"]
        result.complete = _finalize(
            cfg, gcfg, source, splits, identity, mode, spec, spec_dict, material, dirs
        )
    state.wait_for_everyone()
    if not state.is_main_process:  # the main process wrote the manifests iff the sets are complete
        result.complete = all((d / MANIFEST).is_file() for d, _ in dirs)
    return result


def run_stage_one(
    cfg: PipelineConfig, out: str | Path = "shards", overwrite: bool = False, progress: bool = True
) -> StageOneResult:
    """Run every configured generator over the source set of ``cfg.dataset`` under ``out``.

    Raises :class:`StageOneIncomplete` (a ``UserError``) when a source shard failed, after every
    other shard was written; its ``result`` says which sets are complete.
    """
    validate(cfg)
    out = Path(out)
    src_dir = source_dir(out, cfg.dataset)
    if not (src_dir / MANIFEST).is_file():
        raise UserError(f"no source set at {src_dir}: run `synesthesia render` or `synesthesia ingest` first")
    source = Manifest.read(src_dir)
    splits = [s for s in cfg.shard.splits if s in source.splits]
    absent = [s for s in cfg.shard.splits if s not in source.splits]
    if absent:
        logger.warning("source set %s has no split(s) %s; skipping them", src_dir, ", ".join(absent))
    if not splits:
        raise UserError(
            f"none of shard.splits ({', '.join(cfg.shard.splits)}) is in the source set {src_dir}"
        )
    runtime = resolve_runtime(cfg.shard)
    logger.info(
        "stage one on %s (%s), process %d of %d",
        runtime.device,
        runtime.precision,
        runtime.state.process_index,
        runtime.state.num_processes,
    )
    results = [
        _run_generator(cfg, g, out, source, splits, runtime, overwrite, progress)
        for g in cfg.shard.generators
    ]
    result = StageOneResult(sets=results)
    if not result.ok:
        raise StageOneIncomplete(result)
    return result
