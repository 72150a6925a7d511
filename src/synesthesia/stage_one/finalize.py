"""Stage one, bookkeeping side: channel statistics, merged timings and the manifest of a finished set.

- :class:`ChannelStats`, :func:`channel_axis` - per-channel mean and std of the train latents, float64
  sums accumulated in shard order;
- :func:`scan_set` - re-read a set in shard order: re-hash, sample counts, flagged keys, statistics,
  missing shards; :func:`stored_shape` - the shape of one stored sample (a decoded set's
  ``extra.shape``);
- :func:`_merge_reports`, :func:`write_throughput` - every process's timings merged into one report,
  written to ``throughput.json``;
- :func:`build_manifest`, :func:`_finalize` - main process: each set's ``manifest.json``, written last
  and atomically, only when every shard exists; then the dataset card (``synesthesia.shards.card``).

A set folder may be local or in a bucket (``synesthesia.storage``): the listing is refreshed before
the scan, as other processes wrote shards there, and the manifest is the last key written - its
presence commits the set. Everything in the manifest is a pure function of files on disk and the configuration, so a set that
was interrupted (even by SIGKILL) and then completed gets the same ``manifest.json``, byte for byte, as
an uninterrupted run. Wall-clock timings can never be byte-identical, so they go to ``throughput.json``
beside the manifest, which names that file in ``extra.throughput``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from upath import UPath

from synesthesia import UserError
from synesthesia.config import config_hash as hash_config
from synesthesia.config import to_dict
from synesthesia.shards.card import write_dataset_card
from synesthesia.shards.schema import SCHEMA_VERSION, SchemaError, decode_npy, decoded_field, latent_field
from synesthesia.shards.writer import Manifest, ShardInfo
from synesthesia.stage_one.cache import cache_key
from synesthesia.stage_one.data import read_shard_samples
from synesthesia.stage_one.paths import THROUGHPUT, flag_field, set_name
from synesthesia.storage import atomic_write_text, refresh

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- statistics


class ChannelStats:
    """Per-channel mean and (population) std with float64 sums, accumulated in a fixed order."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.count = 0

    def add(self, array: np.ndarray, axis: int | None) -> None:
        x = np.asarray(array, dtype=np.float64)
        x = x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        if self.total is None:
            self.total = np.zeros(x.shape[0])
            self.squares = np.zeros(x.shape[0])
        if x.shape[0] != self.total.shape[0]:
            raise SchemaError(f"{x.shape[0]} channels, earlier samples had {self.total.shape[0]}")
        self.total += x.sum(axis=1)
        self.squares += (x * x).sum(axis=1)
        self.count += x.shape[1]

    def result(self) -> dict[str, Any] | None:
        if self.total is None or self.count == 0:
            return None
        mean = self.total / self.count
        var = np.maximum(self.squares / self.count - mean * mean, 0.0)
        return {
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in np.sqrt(var)],
            "count": self.count,
        }


def channel_axis(kind: str, spec_ndim: int, array_ndim: int) -> int | None:
    """Channel axis of one stored latent: C of C×h×w (after any leading S), C of T×C; None for codes."""
    if kind == "spatial":
        return array_ndim - spec_ndim
    if kind == "tokens":
        return array_ndim - 1
    return None


# ----------------------------------------------------------------------------- manifest


def scan_set(
    directory: Path | UPath,
    source: Manifest,
    splits: list[str],
    field: str,
    flag_field: str,
    stats_axis: Any,
) -> tuple[dict[str, list[ShardInfo]], dict[str, list[list[str]]], Counter, dict[str, Any] | None, list[str]]:
    """Re-read a sidecar set in shard order: shard infos, flagged keys, stats over train, missing shards.

    ``stats_axis(array) -> axis | None`` picks the channel axis; ``False`` turns statistics off.
    """
    refresh(directory)  # a bucket listing cached before other processes wrote their shards
    infos: dict[str, list[ShardInfo]] = {}
    flagged: dict[str, list[list[str]]] = {}
    counts: Counter[str] = Counter()
    missing: list[str] = []
    stats = ChannelStats()
    for split in splits:
        infos[split] = []
        for src in source.splits.get(split, []):
            path = directory / src.name
            if not path.is_file():
                missing.append(src.name)
                continue
            samples, digest, size = read_shard_samples(path)
            if len(samples) != src.samples:
                raise UserError(
                    f"{path}: {len(samples)} samples, its source shard has {src.samples}; rerun with --overwrite"
                )
            for sample in samples:
                flag = sample.get(flag_field)
                if flag is not None:
                    reason = flag.decode()
                    flagged.setdefault(split, []).append([sample["__key__"], reason])
                    counts[reason] += 1
                elif split == "train" and stats_axis is not False:
                    array = decode_npy(sample[field])
                    stats.add(array, stats_axis(array))
            infos[split].append(ShardInfo(name=src.name, samples=len(samples), bytes=size, sha256=digest))
    return infos, flagged, counts, stats.result(), missing


def stored_shape(directory: Path | UPath, infos: dict[str, list[ShardInfo]], field: str) -> list[int] | None:
    """The shape of one sample's ``field`` as stored (the first sample of the first non-empty shard).

    Every sample of a set has the same shape (flagged samples hold zeros of it), so
    a decoded set records it as ``extra.shape``, which the stage-two reader and the
    teacher's decoded-signal adapter read instead of probing a shard.
    """
    for shards in infos.values():
        for info in shards:
            if info.samples:
                samples, _, _ = read_shard_samples(directory / info.name)
                return [int(n) for n in decode_npy(samples[0][field]).shape]
    return None


def write_throughput(directory: Path | UPath, report: dict[str, Any]) -> None:
    """Write ``throughput.json``, except for a rerun that wrote nothing (every shard already
    complete): that keeps the timing of the run that did write the shards."""
    path = directory / THROUGHPUT
    if not (report.get("total") or {}).get("samples") and path.is_file():
        return
    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")


def build_manifest(
    *,
    kind: str,
    dataset: str,
    splits: dict[str, list[ShardInfo]],
    generator: dict[str, Any],
    latent_spec: dict[str, Any],
    channel_stats: dict[str, Any] | None,
    preprocessing: dict[str, Any] | None,
    config: dict[str, Any],
    config_hash: str,
    extra: dict[str, Any],
) -> Manifest:
    return Manifest(
        kind=kind,
        dataset=dataset,
        splits=splits,
        skipped={},
        generator=generator,
        latent_spec=latent_spec,
        channel_stats=channel_stats,
        preprocessing=preprocessing,
        config=config,
        config_hash=config_hash,
        extra=extra,
        schema_version=SCHEMA_VERSION,
    )


def _merge_reports(reports: list[dict[str, Any]], skipped: int, settings: dict[str, Any]) -> dict[str, Any]:
    shards = sorted((s for r in reports for s in r["shards"]), key=lambda s: (s["split"], s["shard"]))
    keys = ("read_s", "infer_s", "decode_s", "write_s", "wait_s", "write_wait_s")
    samples = sum(r["total"]["samples"] for r in reports)
    wall = max((r["total"]["wall_s"] for r in reports), default=0.0)
    return {
        "num_processes": len(reports),
        **settings,
        "skipped_complete_shards": skipped,
        "failures": [f for r in reports for f in r["failures"]],
        "total": {
            "samples": samples,
            "shards": len(shards),
            "wall_s": wall,
            "samples_per_s": round(samples / wall, 3) if wall > 0 else 0.0,
            **{k: round(sum(r["total"][k] for r in reports), 6) for k in keys},
        },
        "ranks": [{"rank": i, **r["total"]} for i, r in enumerate(reports)],
        "shards": shards,
    }


def _finalize(cfg, gcfg, source, splits, identity, mode, spec, spec_dict, material, dirs) -> bool:
    """Main process: write each set's manifest if every shard exists. Returns whether all are complete."""
    generator_info = {
        **identity,
        "name": gcfg.name,
        "modality": gcfg.modality,
        "mode": mode,
    }
    config = {"dataset": cfg.dataset, "generator": to_dict(gcfg), "stage_one": material["stage_one"]}
    complete = True
    for directory, mat in dirs:
        kind = mat["kind"]
        if kind == "latent":
            field_name = latent_field(gcfg.modality)

            def axis(array, _nd=len(spec.shape)):
                return channel_axis(spec.kind, _nd, array.ndim)

            stats_axis = axis if spec.kind != "codes" else False
        else:
            field_name = decoded_field(gcfg.modality)

            def stats_axis(array):
                return None

        infos, flagged, counts, stats, missing = scan_set(
            directory, source, splits, field_name, flag_field(gcfg.modality), stats_axis
        )
        if missing:
            logger.error(
                "%s: %d shard(s) missing (%s); no manifest written",
                directory,
                len(missing),
                ", ".join(missing[:5]),
            )
            complete = False
            continue
        extra = {
            "set_name": set_name(gcfg),
            "modality": gcfg.modality,
            "field": field_name,
            "flag_field": flag_field(gcfg.modality),
            "flagged": flagged,
            "flag_counts": dict(sorted(counts.items())),
            "cache_key": cache_key(mat),
            "source": {"path": "../../source", "config_hash": source.config_hash},
            "throughput": THROUGHPUT,
        }
        if kind == "decoded":
            extra["decoded_from"] = f"../../latents/{set_name(gcfg)}"
            extra["shape"] = stored_shape(directory, infos, field_name)
        manifest = build_manifest(
            kind=kind,
            dataset=cfg.dataset,
            splits=infos,
            generator=generator_info,
            latent_spec=spec_dict,
            channel_stats=stats,
            preprocessing=identity.get("preprocessing"),
            config=config,
            config_hash=hash_config(config),
            extra=extra,
        )
        manifest.write(directory)
        logger.info(
            "%s: manifest written (%s)", directory, ", ".join(f"{k} {manifest.count(k)}" for k in infos)
        )
        write_dataset_card(directory.parent.parent)  # <out>/<dataset>/README.md lists the new set
    return complete
