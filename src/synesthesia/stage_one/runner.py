"""``run_stage_one``: every configured generator over the source set, one set after the other.

- :func:`run_stage_one` - what ``synesthesia shard`` runs: check the settings, read the source
  manifest, find this process's part (:mod:`synesthesia.parts`), run each generator; raises
  :class:`StageOneIncomplete` when a source shard failed, after every other shard was written;
- :func:`_run_generator` - one generator's sets in four steps: 1. every process checks the set
  folders and the lead prepares them (:mod:`~synesthesia.stage_one.cache`); 2. a fixed assignment
  over every source shard, the complete ones skipped (:mod:`~synesthesia.stage_one.assignment`);
  3. each remaining shard's lease claimed (:mod:`~synesthesia.stage_one.leases`), then inference
  (:class:`~synesthesia.stage_one.set_runner.SetRunner`) and this part's report; 4. if every shard
  now exists, the part reports merged and the manifests written
  (:mod:`~synesthesia.stage_one.finish`), else the rest is left to the parts that own it. The
  processes of one torchrun/accelerate job wait for each other between the steps (the main process
  is the lead); independent parts (``--part``, Slurm) never wait and each is its own lead;
- :func:`finalize_stage_one` - ``synesthesia shard --finalize``: step 4 alone, from the files;
- :class:`SetResult`, :class:`StageOneResult`, :class:`StageOneIncomplete` - the outcome.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synesthesia import UserError
from synesthesia.config import GeneratorConfig, PipelineConfig
from synesthesia.parts import TORCH, Part
from synesthesia.shards.schema import MANIFEST
from synesthesia.shards.writer import Manifest
from synesthesia.stage_one.assignment import pending_tasks, source_tasks
from synesthesia.stage_one.cache import cache_key, check_set, prepare_set
from synesthesia.stage_one.finish import (
    SetPlan,
    finish_set,
    generator_material,
    missing_message,
    plan_from_cache_key,
    write_part_report,
)
from synesthesia.stage_one.generator import build_generator, prepare_generator, storage_dtype
from synesthesia.stage_one.leases import LeaseKeeper
from synesthesia.stage_one.paths import decoded_dir, latent_dir, set_name, source_dir
from synesthesia.stage_one.runtime import Runtime, resolve_runtime, validate
from synesthesia.stage_one.set_runner import SetRunner
from synesthesia.storage import as_path

logger = logging.getLogger(__name__)


@dataclass
class SetResult:
    """The outcome of one generator's sets in one process."""

    name: str
    latent_dir: Path
    decoded_dir: Path | None
    complete: bool = False
    failures: list[str] = field(default_factory=list)
    waiting: int = 0  # shards missing that belong to other parts or jobs (not failures of this one)
    throughput: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageOneResult:
    sets: list[SetResult]

    @property
    def ok(self) -> bool:
        """No shard failed here, and every set is complete or waits only on other parts."""
        return all(not s.failures and (s.complete or s.waiting) for s in self.sets)


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
    part: Part,
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
    dtype = storage_dtype(spec, cfg.shard)
    spec_dict = {**spec.to_dict(), "dtype": dtype.name}
    settings = {
        "batch_size": cfg.shard.batch_size,
        "latent_dtype": dtype.name,
        **runtime.settings(attention),
    }
    material = generator_material(gcfg, source, identity, spec_dict, settings)
    plan = SetPlan(name, lat_dir, dec_dir, material, identity, generator.mode, spec, spec_dict)
    # the processes of one torchrun/accelerate job wait for each other; independent parts never do
    grouped = not part.independent and state.num_processes > 1
    lead = part.independent or state.is_main_process

    def sync() -> None:
        if grouped:
            state.wait_for_everyone()

    # 1. every process checks the set folders (read-only), then the lead prepares them
    actions = [check_set(d, cache_key(m), m, overwrite) for d, m in plan.dirs]
    sync()
    if lead:
        for (d, m), action in zip(plan.dirs, actions, strict=True):
            prepare_set(d, cache_key(m), m, action, shared=part.independent)
    sync()

    # 2. a fixed assignment over every source shard, then the complete ones are skipped
    tasks = source_tasks(source, source_dir(out, cfg.dataset), splits)
    share = part.take(tasks)
    todo = pending_tasks(share, lat_dir, dec_dir)
    missing = pending_tasks(tasks, lat_dir, dec_dir)
    sync()
    if missing and lead:  # a manifest must never describe a set with shards missing
        for d, _ in plan.dirs:
            (d / MANIFEST).unlink(missing_ok=True)
    logger.info(
        "%s: %s takes %d of %d shards, %d already complete: %d shards to do (%d complete)",
        name,
        part,
        len(share),
        len(tasks),
        len(share) - len(todo),
        len(todo),
        len(share) - len(todo),
    )

    # 3. claim each shard's lease, then inference and the part report; the leases go when the run ends
    runner = SetRunner(generator, runtime, cfg.shard, gcfg.modality)
    with LeaseKeeper(str(part), cfg.shard.lease_timeout_s) as leases:
        mine = []
        for task in todo:
            if not leases.claim(lat_dir, task.name):
                continue
            if pending_tasks([task], lat_dir, dec_dir):
                mine.append(task)
            else:  # published by another job between listing and claiming
                leases.release(lat_dir, task.name)
        if len(mine) < len(todo):
            logger.info(
                "%s: %d shard(s) are another job's (leased or just written)", name, len(todo) - len(mine)
            )
        report = runner.run(mine, lat_dir, dec_dir, progress=progress)
        # before the leases go: a finisher that still sees them keeps the part reports for this one
        write_part_report(lat_dir, part, report, skipped=len(share) - len(todo))
    result.failures = list(report["failures"])
    del runner, generator
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    sync()

    # 4. whoever finds every shard present merges the part reports and writes the manifests
    if lead:
        remaining = pending_tasks(tasks, lat_dir, dec_dir)
        if remaining:
            logger.log(
                logging.ERROR if result.failures else logging.INFO,
                "%s: %s; no manifest yet",
                name,
                missing_message(plan, tasks, remaining, part.count if part.independent else None, "left to"),
            )
        else:
            merged, result.complete = finish_set(cfg, gcfg, source, splits, plan)
            result.throughput = merged
            if grouped:
                result.failures = merged["failures"]
    sync()
    if not lead:  # the main process wrote the manifests iff the sets are complete
        result.complete = all((d / MANIFEST).is_file() for d, _ in plan.dirs)
    if not result.complete:
        result.waiting = len(pending_tasks(tasks, lat_dir, dec_dir))
    return result


def _source_set(cfg: PipelineConfig, out: Path) -> tuple[Manifest, list[str]]:
    """The source manifest of ``cfg.dataset`` under ``out`` and the configured splits it has."""
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
    return source, splits


def run_stage_one(
    cfg: PipelineConfig,
    out: str | Path = "shards",
    overwrite: bool = False,
    progress: bool = True,
    part: Part | None = None,
) -> StageOneResult:
    """Run every configured generator over the source set of ``cfg.dataset`` under ``out``.

    ``part``: which independent part of the job this process does (the CLI passes
    :func:`~synesthesia.parts.resolve_part`'s; default: the whole job, split over the processes of a
    torchrun/accelerate launch if there are several). A part leaves the shards of other parts, and of jobs
    holding their leases, to them, and writes the manifests when it finds every shard present.

    Raises :class:`StageOneIncomplete` (a ``UserError``) when a source shard failed, after every
    other shard was written; its ``result`` says which sets are complete.
    """
    validate(cfg)
    out = as_path(out, "--out")
    part = Part() if part is None else part
    if overwrite and part.independent:
        raise UserError(
            f"--overwrite with independent parts ({part}): the parts cannot agree who deletes the old"
            " set; delete it, or run `synesthesia shard --overwrite` once without parts, first"
        )
    source, splits = _source_set(cfg, out)
    runtime = resolve_runtime(cfg.shard)
    if not part.independent:  # a torchrun/accelerate job: the process group says which part
        state = runtime.state
        part = Part(state.process_index, state.num_processes, TORCH) if state.num_processes > 1 else Part()
    logger.info(
        "stage one on %s (%s), process %d of %d",
        runtime.device,
        runtime.precision,
        runtime.state.process_index,
        runtime.state.num_processes,
    )
    results = [
        _run_generator(cfg, g, out, source, splits, runtime, part, overwrite, progress)
        for g in cfg.shard.generators
    ]
    result = StageOneResult(sets=results)
    if not result.ok:
        raise StageOneIncomplete(result)
    return result


def finalize_stage_one(cfg: PipelineConfig, out: str | Path = "shards") -> StageOneResult:
    """``synesthesia shard --finalize``: write each configured set's manifests if every shard exists.

    No inference and no generator is built (:func:`~synesthesia.stage_one.finish.plan_from_cache_key`).
    The same bytes as the run that completed the set, however often it runs. A set with shards
    missing is a ``UserError`` saying how many and which parts own them (after the complete sets
    were finalized).
    """
    validate(cfg)
    out = as_path(out, "--out")
    source, splits = _source_set(cfg, out)
    results, problems = [], []
    for gcfg in cfg.shard.generators:
        plan = plan_from_cache_key(cfg, gcfg, source, out)
        tasks = source_tasks(source, source_dir(out, cfg.dataset), splits)
        missing = pending_tasks(tasks, plan.latent_dir, plan.decoded_dir)
        result = SetResult(name=plan.name, latent_dir=plan.latent_dir, decoded_dir=plan.decoded_dir)
        if missing:
            result.waiting = len(missing)
            problems.append(f"{plan.name}: {missing_message(plan, tasks, missing)}")
        else:
            result.throughput, result.complete = finish_set(cfg, gcfg, source, splits, plan)
        results.append(result)
    if problems:
        raise UserError("cannot finalize yet: " + "; ".join(problems))
    return StageOneResult(sets=results)
