"""Finishing a set from the files on disk: part reports, the manifest once every shard exists, ``--finalize``.

A set is written by one or more *parts* (:mod:`synesthesia.parts`); each part leaves its throughput
report in ``.throughput-part-<i>-of-<N>.json`` beside the shards (a rerun of a part that wrote
nothing keeps its earlier report). Whoever finds every shard present - the last part to finish, or
``synesthesia shard --finalize`` - merges the reports in part order into ``throughput.json``, writes
the manifests (:func:`~synesthesia.stage_one.finalize._finalize`) and then deletes the reports it
merged (a later finish merges none and keeps ``throughput.json``) - unless another part still holds
leases: that part has published its shards but not yet written its report, and finishes again
once it has, merging every report. Everything it reads is on disk
and it writes with atomic renames, so it is safe when parts finish in any order, when two finish at
once and when it runs twice (the manifests are the same bytes each time).

- :class:`SetPlan` - what finishing one generator's sets needs: folders, cache-key material,
  identity, mode and latent spec;
- :func:`plan_from_cache_key` - the plan of ``--finalize``, read from ``cache_key.json`` after checking
  that it matches the configuration and the source set (no generator is built);
- :func:`write_part_report`, :func:`read_part_reports` - the per-part reports;
- :func:`finish_set` - merge the reports, write ``throughput.json`` and the manifests;
- :func:`missing_message` - how many shards are missing and which parts own them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.config import GeneratorConfig, PipelineConfig, to_dict
from synesthesia.generators.base import GENERATORS, LatentSpec
from synesthesia.parts import Part
from synesthesia.shards.schema import SCHEMA_VERSION, read_json_file
from synesthesia.shards.writer import Manifest
from synesthesia.stage_one.cache import PART_REPORTS, cache_key, canonical_json, part_report_name
from synesthesia.stage_one.data import ShardTask
from synesthesia.stage_one.finalize import _finalize, _merge_reports, write_throughput
from synesthesia.stage_one.leases import LeaseKeeper
from synesthesia.stage_one.paths import CACHE_KEY, decoded_dir, latent_dir, set_name
from synesthesia.storage import atomic_write_text, refresh

logger = logging.getLogger(__name__)

FINALIZE = "finalize"  # the lease of the one job merging the reports and writing the manifests
WAIT_FOR_REPORTS_S = 120.0  # a part writes its report within moments of publishing its last shard

_PART_REPORT = re.compile(r"^\.throughput-part-(\d{1,5})-of-(\d{1,5})\.json$")
BYTES_SETTINGS = ("batch_size", "latent_dtype")  # of material["stage_one"]; the rest is the runtime's


@dataclass
class SetPlan:
    """One generator's sets: where they are and what their manifests say about the generator."""

    name: str
    latent_dir: Path
    decoded_dir: Path | None
    material: dict[str, Any]
    identity: dict[str, Any]
    mode: str
    spec: LatentSpec
    spec_dict: dict[str, Any]
    dirs: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self):
        if not self.dirs:
            self.dirs = [(self.latent_dir, self.material)]
            if self.decoded_dir is not None:
                self.dirs.append((self.decoded_dir, {**self.material, "kind": "decoded"}))

    @property
    def settings(self) -> dict[str, Any]:
        """The runtime settings recorded in the cache key (device type, precision, ...)."""
        return {k: v for k, v in self.material["stage_one"].items() if k not in BYTES_SETTINGS}


def generator_material(
    gcfg: GeneratorConfig,
    source: Manifest,
    identity: dict[str, Any],
    spec_dict: dict[str, Any],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Everything a set's bytes depend on (hashed into its cache key)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "latent",
        "generator": {
            "config": {k: v for k, v in to_dict(gcfg).items() if k != "set_name"},
            "identity": identity,
        },
        "latent_spec": spec_dict,
        "stage_one": settings,
        "source": {split: [s.sha256 for s in shards] for split, shards in sorted(source.splits.items())},
    }


def plan_from_cache_key(cfg: PipelineConfig, gcfg: GeneratorConfig, source: Manifest, out: Path) -> SetPlan:
    """The plan of a set stage one started, from its ``cache_key.json``, checked against the config.

    The generator config, the source shards' sha256s, the batch size and any storage dtype override
    must equal what the cache key recorded (its hash is checked too); the identity and latent spec
    are taken from it, so finalizing builds no generator.
    """
    name = set_name(gcfg)
    lat_dir = latent_dir(out, cfg.dataset, name)
    key_file = lat_dir / CACHE_KEY
    if not key_file.is_file():
        raise UserError(
            f"{lat_dir}: no {CACHE_KEY}; stage one never ran this set - run `synesthesia shard` first"
        )
    stored = read_json_file(key_file, "cache key")
    material = stored.get("material") if isinstance(stored, dict) else None
    if not isinstance(material, dict) or stored.get("cache_key") != cache_key(material):
        raise UserError(
            f"{key_file}: not a cache key this tool wrote; rerun `synesthesia shard` with --overwrite"
        )
    generator = material.get("generator") if isinstance(material.get("generator"), dict) else {}
    stage_one = material.get("stage_one") if isinstance(material.get("stage_one"), dict) else {}
    expected = generator_material(gcfg, source, {}, {}, {})
    checks = [
        ("schema version", material.get("schema_version"), SCHEMA_VERSION),
        ("kind", material.get("kind"), "latent"),
        ("generator config", generator.get("config"), expected["generator"]["config"]),
        ("source set", material.get("source"), expected["source"]),
        ("shard.batch_size", stage_one.get("batch_size"), cfg.shard.batch_size),
    ]
    if cfg.shard.latent_dtype != "auto" and not str(stage_one.get("latent_dtype", "")).startswith("int"):
        checks.append(("shard.latent_dtype", stage_one.get("latent_dtype"), cfg.shard.latent_dtype))
    changed = [what for what, got, want in checks if canonical_json(got) != canonical_json(want)]
    if changed:
        raise UserError(
            f"{lat_dir} was made with a different {', '.join(changed)}; run `synesthesia shard` with this"
            " configuration (it resumes or refuses) instead of --finalize"
        )
    identity, spec_dict = generator.get("identity"), material.get("latent_spec")
    try:
        if not isinstance(identity, dict) or not isinstance(spec_dict, dict):
            raise TypeError("identity or latent_spec is not an object")
        spec = LatentSpec(**{**spec_dict, "shape": tuple(spec_dict["shape"])})
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(
            f"{key_file}: malformed ({exc}); rerun `synesthesia shard` with --overwrite"
        ) from None
    from synesthesia import generators  # noqa: F401  (registers the built-in generators)

    mode = getattr(GENERATORS.get(gcfg.name), "mode", "encode")
    dec_dir = decoded_dir(out, cfg.dataset, name) if cfg.shard.decode else None
    plan = SetPlan(name, lat_dir, dec_dir, material, identity, str(mode), spec, spec_dict)
    if dec_dir is not None:
        dec_key = dec_dir / CACHE_KEY
        dec_stored = read_json_file(dec_key, "cache key") if dec_key.is_file() else None
        if not isinstance(dec_stored, dict) or dec_stored.get("cache_key") != cache_key(plan.dirs[1][1]):
            raise UserError(
                f"{dec_dir}: no matching {CACHE_KEY}; run `synesthesia shard` with shard.decode=true"
            )
    return plan


# ----------------------------------------------------------------------------- part reports


def write_part_report(directory: Path, part: Part, report: dict[str, Any], skipped: int) -> None:
    """This part's throughput report; a run that wrote no shard keeps the part's earlier one."""
    path = directory / part_report_name(part.index, part.count)
    if not report["shards"] and not report["failures"] and path.is_file():
        return
    payload = {"part": str(part), "skipped": skipped, **report}
    atomic_write_text(path, json.dumps(payload, sort_keys=True) + "\n")


def read_part_reports(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every part report of the set, in part order (count, then index); unreadable ones are skipped."""
    found = []
    refresh(directory)
    for path in directory.glob(PART_REPORTS):
        match = _PART_REPORT.match(path.name)
        if not match:
            continue
        try:
            report = read_json_file(path, "part report")
            report["total"]["samples"], report["shards"], report["failures"]  # noqa: B018 (shape check)
        except (UserError, TypeError, KeyError):
            logger.warning("%s: not a part report; left out of the timings", path)
            continue
        found.append(((int(match.group(2)), int(match.group(1))), path, report))
    return [(path, report) for _, path, report in sorted(found, key=lambda item: item[0])]


def report_counts(directory: Path) -> list[int]:
    """The part counts (N of ``i/N``) the set's part reports name, most recent layout first."""
    counts = []
    refresh(directory)
    for path in directory.glob(PART_REPORTS):
        match = _PART_REPORT.match(path.name)
        if match and int(match.group(2)) not in counts:
            counts.append(int(match.group(2)))
    return sorted(counts, reverse=True)


def missing_message(
    plan: SetPlan,
    tasks: list[ShardTask],
    missing: list[ShardTask],
    count: int | None = None,
    verb: str = "run",
) -> str:
    """``"3 of 12 shards missing (first: train-000004.tar); run part(s) 1/3, 2/3"``.

    The owners are computed for ``count`` parts, else for the count the part reports name.
    """
    positions = {t.name: i for i, t in enumerate(tasks)}
    counts = [count] if count else report_counts(plan.latent_dir)
    hint = f"{verb} `synesthesia shard` (or the parts that own them)"
    if counts:
        n = counts[0]
        owners = sorted({positions[t.name] % n for t in missing})
        listed = ", ".join(f"{i}/{n}" for i in owners[:8]) + (" ..." if len(owners) > 8 else "")
        hint = f"{verb} part(s) {listed}"
    return f"{len(missing)} of {len(tasks)} shards missing (first: {missing[0].name}); {hint}"


# ----------------------------------------------------------------------------- finishing


def finish_set(
    cfg: PipelineConfig, gcfg: GeneratorConfig, source: Manifest, splits: list[str], plan: SetPlan
) -> tuple[dict[str, Any], bool]:
    """Merge the part reports into ``throughput.json`` and write the manifests (every shard exists).

    One job at a time: the finisher holds the set's ``finalize`` lease (others wait for it), and
    first waits for the jobs that still hold shard leases - they published their last shard but
    have not written their report yet - so that no merge misses a report and no late finisher
    overwrites a complete ``throughput.json`` with a partial one. Returns the merged report and
    whether every set of the plan got its manifest.
    """
    with LeaseKeeper("finalize", cfg.shard.lease_timeout_s) as lock:
        _wait(lambda: lock.claim(plan.latent_dir, FINALIZE), cfg.shard.lease_timeout_s * 1.5)
        if not _wait(lambda: not lock.live(plan.latent_dir), WAIT_FOR_REPORTS_S):
            logger.warning("%s: other jobs still hold leases; merging the reports written so far", plan.name)
        return _finish_set(cfg, gcfg, source, splits, plan)


def _wait(ready: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``ready`` until it holds (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _finish_set(
    cfg: PipelineConfig, gcfg: GeneratorConfig, source: Manifest, splits: list[str], plan: SetPlan
) -> tuple[dict[str, Any], bool]:
    found = read_part_reports(plan.latent_dir)
    reports = [report for _, report in found]
    skipped = sum(int(r.get("skipped", 0)) for r in reports)
    merged = _merge_reports(reports, skipped, plan.settings)
    total = merged["total"]
    if not reports:
        logger.info("%s: no part reports to merge (merged before); throughput.json kept", plan.name)
    else:
        logger.info(
            "%s: %d samples in %d shards, %.1f samples/s over %d part(s)"
            " (read %.2f s, infer %.2f s, decode %.2f s, write %.2f s; waited %.2f s on input, %.2f s on writes)",
            plan.name,
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
    for directory, _ in plan.dirs:
        write_throughput(directory, merged)
    names = [info.name for split in splits for info in source.splits.get(split, [])]
    leases = LeaseKeeper("finalize", cfg.shard.lease_timeout_s)
    leases.sweep(plan.latent_dir, names)  # a killed job's
    complete = _finalize(
        cfg,
        gcfg,
        source,
        splits,
        plan.identity,
        plan.mode,
        plan.spec,
        plan.spec_dict,
        plan.material,
        plan.dirs,
    )
    # merged into throughput.json: a later finish finds none and keeps that file. A part still holding
    # leases has published its last shard but not yet written its report: it finishes again after
    # writing it, so the reports stay for that merge (which then removes them).
    if complete and not [name for name in leases.live(plan.latent_dir) if name != FINALIZE]:
        for path, _ in found:
            path.unlink(missing_ok=True)
    return merged, complete
