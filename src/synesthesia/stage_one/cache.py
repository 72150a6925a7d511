"""A set folder's cache key: is the folder resumed, replaced, or refused?

- :func:`canonical_json`, :func:`cache_key` - the sha256 of the canonical JSON of everything a set's
  bytes depend on: the generator's identity and config, its latent spec, the settings that change the
  bytes (batch size, precision, device type, storage dtype, channels_last, attention backend) and the
  source shards' sha256s;
- :func:`check_set` - read-only, on every process: ``fresh``, ``resume`` or ``replace``, or a
  ``UserError`` naming what changed (a different key is refused unless ``--overwrite``);
- :func:`prepare_set` - main process only: delete a replaced set, drop a killed run's temporaries,
  write ``cache_key.json``; with ``shared`` (independent parts) only what is provably dead goes;
- :func:`part_report_name`, ``PART_REPORTS`` - the hidden per-part throughput reports.

A pure function of the configuration and the files on disk, so a set that was interrupted and then
completed gets the same ``cache_key.json``, byte for byte, as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.shards.schema import MANIFEST, read_json_file
from synesthesia.stage_one.paths import CACHE_KEY, THROUGHPUT
from synesthesia.storage import atomic_write_text, remove_stale_temps
from synesthesia.utils import sha256_bytes

logger = logging.getLogger(__name__)

PART_REPORTS = ".throughput-part-*-of-*.json"  # one per part of the job that wrote the set


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(material: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything a set's bytes depend on."""
    return sha256_bytes(canonical_json(material).encode())


def _differences(old: Any, new: Any, prefix: str = "", depth: int = 0) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict) and depth < 2:
        out = []
        for k in sorted(set(old) | set(new)):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(path)
            else:
                out.extend(_differences(old[k], new[k], path, depth + 1))
        return out
    return [] if canonical_json(old) == canonical_json(new) else [prefix or "everything"]


def check_set(directory: Path, key: str, material: dict[str, Any], overwrite: bool) -> str:
    """What to do with a set folder: ``fresh``, ``resume`` or ``replace`` (UserError on a mismatch).

    A folder whose ``cache_key.json`` matches is resumed (complete shards are
    kept). A different key, or shards without a key, is refused unless
    ``overwrite``, which replaces the set.
    """
    key_file = directory / CACHE_KEY
    has_content = directory.is_dir() and (any(directory.glob("*.tar")) or (directory / MANIFEST).exists())
    if overwrite and (key_file.exists() or has_content):
        return "replace"
    existing = read_json_file(key_file) if key_file.exists() else None
    if existing is not None and not isinstance(existing, dict):
        raise UserError(f"{key_file}: not a cache key this tool writes; pass --overwrite to replace the set")
    if existing is None:
        if has_content:
            raise UserError(
                f"{directory} holds shards with no {CACHE_KEY} (unknown origin); pass --overwrite to replace them"
            )
        return "fresh"
    if existing.get("cache_key") != key:
        changed = _differences(existing.get("material", {}), material) or ["cache key"]
        raise UserError(
            f"{directory} was made with a different {', '.join(changed[:4])}; pass --overwrite to replace it"
        )
    return "resume"


def part_report_name(index: int, count: int) -> str:
    """The hidden file with the throughput report of part ``index`` of ``count``."""
    return f".throughput-part-{index}-of-{count}.json"


def prepare_set(
    directory: Path, key: str, material: dict[str, Any], action: str, shared: bool = False
) -> None:
    """Delete a replaced set, drop stale temporaries, write ``cache_key.json``.

    Run by the main process of a job. ``shared``: other independent parts may be writing into the
    folder right now, so only temporaries older than a lease go and the part reports of the other
    parts stay (``cache_key.json`` is written with the same bytes by every part that finds the
    folder fresh). Otherwise the job is alone: its predecessors' temporaries and part reports go.
    """
    if shared and action == "replace":
        raise ValueError("an independent part cannot replace a set other parts may be writing")
    directory.mkdir(parents=True, exist_ok=True)
    if action == "replace":
        logger.warning("--overwrite: deleting the old set in %s", directory)
        for name in (MANIFEST, THROUGHPUT):
            (directory / name).unlink(missing_ok=True)
        for path in sorted(directory.glob("*.tar")):
            path.unlink()
        (directory / CACHE_KEY).unlink(missing_ok=True)
    if shared:
        remove_stale_temps(directory)  # only those untouched for an hour: other parts are live
    else:
        remove_stale_temps(directory, own=[".*.tmp"])  # left behind by a killed run (not a live one's)
        for pattern in (".throughput-rank-*.json", PART_REPORTS):
            for path in sorted(directory.glob(pattern)):
                path.unlink(missing_ok=True)
    if action in ("fresh", "replace"):
        payload = {"cache_key": key, "material": material}
        atomic_write_text(
            directory / CACHE_KEY, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
        )
