"""`synesthesia inspect`: describe a shard set (or a dataset root) and optionally re-hash it.

For a source set the description includes each split's label mixing across
shards (``synesthesia.shards.mixing``) and a warning when the train split looks
class-sorted — the one split whose order matters, as training reads it through
a bounded shuffle buffer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.shards.mixing import class_sorted, split_mixing, warning_text
from synesthesia.shards.schema import MANIFEST
from synesthesia.shards.writer import Manifest
from synesthesia.utils import sha256_file


def find_sets(path: str | Path) -> list[Path]:
    """Every shard set (a folder with a manifest) at or below ``path``, sorted."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such path: {path}")
    if (path / MANIFEST).is_file():
        return [path]
    # Hidden folders are sets being written or replaced (``.source-*.tmp``, ``.source.old-*``).
    sets = sorted(
        p.parent
        for p in path.rglob(MANIFEST)
        if not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not sets:
        raise UserError(f"no shard set (no {MANIFEST}) at or below {path}")
    return sets


def describe(directory: str | Path) -> dict[str, Any]:
    """A summary of one set: kind, splits and counts, modalities, latent spec, generator.

    Source sets add ``label_mixing`` (split → ``SplitMixing.summary()``) and
    ``warnings`` (one line each).
    """
    directory = Path(directory)
    m = Manifest.read(directory)
    info: dict[str, Any] = {
        "path": str(directory),
        "kind": m.kind,
        "dataset": m.dataset,
        "splits": {
            split: {"shards": len(shards), "samples": m.count(split)} for split, shards in m.splits.items()
        },
        "bytes": sum(s.bytes for shards in m.splits.values() for s in shards),
        "skipped": m.skipped,
    }
    if "modalities" in m.extra:
        info["modalities"] = m.extra["modalities"]
    if "num_classes" in m.extra:
        info["num_classes"] = m.extra["num_classes"]
    if m.generator:
        info["generator"] = {
            k: m.generator.get(k) for k in ("name", "class", "modality", "mode", "weights_sha256")
        }
    if m.latent_spec:
        info["latent_spec"] = m.latent_spec
    if m.channel_stats:
        info["channel_stats"] = m.channel_stats
    if m.config_hash:
        info["config_hash"] = m.config_hash
    if m.kind == "source":
        info["label_mixing"] = {}
        info["warnings"] = []
        for split in m.splits:
            mixing = split_mixing(directory, split, manifest=m)
            if mixing is None:
                continue
            info["label_mixing"][split] = mixing.summary()
            if split == "train" and class_sorted(mixing):
                info["warnings"].append(warning_text(mixing, directory))
    return info


def verify(directory: str | Path) -> list[str]:
    """Re-hash every shard against the manifest; the list of problems (empty when all match)."""
    directory = Path(directory)
    m = Manifest.read(directory)
    problems = []
    listed = set()
    for shards in m.splits.values():
        for s in shards:
            listed.add(s.name)
            path = directory / s.name
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            size = path.stat().st_size
            if size != s.bytes:
                problems.append(f"{path}: {size} bytes, manifest says {s.bytes}")
            elif sha256_file(path) != s.sha256:
                problems.append(f"{path}: sha256 differs from the manifest")
    for path in sorted(directory.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path}: not listed in the manifest")
    return problems
