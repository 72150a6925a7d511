"""How well classes are mixed across the shards of a source set.

Training reads shards in a shuffled order through a bounded shuffle buffer
(``train.shuffle_buffer``), so a set written in class order — every shard one
or two classes — feeds the model a few classes at a time, and it may not learn
at all. Sets ingested by this version are written in a seeded permutation
(see ``synesthesia.sources.ingest``); older sets, and sets written by other
tools, may not be.

Per shard: the label entropy ``H = -Σ p_k ln p_k`` (nats) of its samples and
the number of classes present. The split's **mixing** score is ::

    mixing = Σ_shards H(shard) / Σ_shards E[H(n_shard labels drawn at random from the split)]

where the draw is without replacement (a shard of a random permutation) and
the expectation is exact: by linearity it is a sum over classes of
hypergeometric expectations. A well-shuffled set scores ≈ 1.0 (a split held in
one shard exactly 1.0); a class-sorted 10-class set ≈ 0.3.

Where the numbers come from: the manifest's ``extra.label_mix[split]``, written
by ingest for every split (:func:`label_mix_entry`)::

    {"shard_entropy": [nats per shard], "shard_classes": [classes present per shard],
     "classes": classes present in the split, "expected_entropy": mean over shards of E[H],
     "mixing": score or null}

Sets without it (written before it existed) are read instead: the ``cls`` field
of at most ``MAX_SHARDS`` evenly spaced shards, the first
``MAX_SAMPLES_PER_SHARD`` samples of each, the expectation then taken over the
samples read.

The verdict (:func:`class_sorted`): mixing below ``MIXING_THRESHOLD`` (0.7),
judged only when it means something — the split has at least two classes and
two shards, and shards hold ``MIN_SHARD_SAMPLES`` (8) samples on average. 0.7
sits between the two cases with margin on both sides: shuffled shards score
within a few per cent of 1.0, class-sorted ones 0.1–0.4; it flags a 10-class
set whose shards hold fewer than about five effective classes (``e^H``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synesthesia.shards.reader import ErrorPolicy, iter_shard
from synesthesia.shards.writer import Manifest
from synesthesia.storage import as_path

logger = logging.getLogger(__name__)

MIXING_THRESHOLD = 0.7
MIN_SHARD_SAMPLES = 8
MAX_SHARDS = 64
MAX_SAMPLES_PER_SHARD = 512


@dataclass(frozen=True)
class SplitMixing:
    """Label mixing of one split: per-shard entropy (nats) and classes, and the mixing score."""

    split: str
    samples: int  # samples in the split (the manifest's count)
    shard_entropy: list[float]
    shard_classes: list[int]
    shard_samples: list[int]  # samples per shard (those counted, when read from the shards)
    classes: int  # classes present in the split
    expected_entropy: float  # mean over shards of the entropy of a random draw of the same size
    mixing: float | None  # None when the split has a single class
    origin: str  # "manifest" or "shards"

    def summary(self) -> dict[str, Any]:
        """The short form ``inspect`` reports."""
        return {
            "mixing": None if self.mixing is None else round(self.mixing, 3),
            "entropy_min": round(min(self.shard_entropy), 3),
            "entropy_mean": round(float(np.mean(self.shard_entropy)), 3),
            "entropy_max": round(max(self.shard_entropy), 3),
            "expected_entropy": round(self.expected_entropy, 3),
            "min_classes_per_shard": min(self.shard_classes),
            "classes": self.classes,
            "shards": len(self.shard_entropy),
            "origin": self.origin,
            "class_sorted": class_sorted(self),
        }


def entropy(counts: Sequence[int] | np.ndarray) -> float:
    """Shannon entropy (nats) of a label histogram; 0 for an empty one."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


def expected_entropy(class_counts: Sequence[int] | np.ndarray, n: int) -> float:
    """E[entropy] (nats) of ``n`` labels drawn without replacement from a split with these class counts.

    Exact: ``Σ_k Σ_x P(X_k = x)·(-(x/n) ln(x/n))`` with ``X_k`` hypergeometric.
    """
    from scipy.special import gammaln

    counts = np.asarray(class_counts, dtype=np.int64)
    counts = counts[counts > 0]
    total = int(counts.sum())
    if n <= 0 or total == 0:
        return 0.0
    n = min(n, total)

    def log_choose(a, b):
        return gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)

    result = 0.0
    for k, multiplicity in Counter(counts.tolist()).items():
        x = np.arange(max(1, n - (total - k)), min(n, k) + 1)
        if x.size == 0:
            continue
        pmf = np.exp(log_choose(k, x) + log_choose(total - k, n - x) - log_choose(total, n))
        share = x / n
        result += multiplicity * float((pmf * -share * np.log(share)).sum())
    return result


def from_counts(
    split: str, shard_counts: Sequence[Counter[int]], origin: str, samples: int | None = None
) -> SplitMixing:
    """The mixing of a split from the label histogram of each of its shards (``samples``: split size)."""
    totals: Counter[int] = Counter()
    for counts in shard_counts:
        totals.update(counts)
    population = list(totals.values())
    sizes = [sum(c.values()) for c in shard_counts]
    shard_entropy = [entropy(list(c.values())) for c in shard_counts]
    by_size = {n: expected_entropy(population, n) for n in set(sizes)}
    expected = float(np.mean([by_size[n] for n in sizes])) if sizes else 0.0
    score = float(np.mean(shard_entropy)) / expected if expected > 0 else None
    return SplitMixing(
        split=split,
        samples=sum(sizes) if samples is None else samples,
        shard_entropy=shard_entropy,
        shard_classes=[sum(1 for v in c.values() if v) for c in shard_counts],
        shard_samples=sizes,
        classes=len([v for v in population if v]),
        expected_entropy=expected,
        mixing=score,
        origin=origin,
    )


def label_mix_entry(shard_labels: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The manifest's ``extra.label_mix[split]`` for shards holding these labels (see the module doc)."""
    m = from_counts("", [Counter(labels) for labels in shard_labels], "manifest")
    return {
        "shard_entropy": [round(h, 4) for h in m.shard_entropy],
        "shard_classes": m.shard_classes,
        "classes": m.classes,
        "expected_entropy": round(m.expected_entropy, 4),
        "mixing": None if m.mixing is None else round(m.mixing, 4),
    }


def _from_manifest(manifest: Manifest, split: str) -> SplitMixing | None:
    """The recorded mixing of ``split``, or None when absent or not matching the shard list."""
    entry = (manifest.extra.get("label_mix") or {}).get(split)
    shards = manifest.splits.get(split, [])
    try:
        if len(entry["shard_entropy"]) != len(shards) or len(entry["shard_classes"]) != len(shards):
            return None
        return SplitMixing(
            split=split,
            samples=manifest.count(split),
            shard_entropy=[float(h) for h in entry["shard_entropy"]],
            shard_classes=[int(c) for c in entry["shard_classes"]],
            shard_samples=[s.samples for s in shards],
            classes=int(entry["classes"]),
            expected_entropy=float(entry["expected_entropy"]),
            mixing=None if entry["mixing"] is None else float(entry["mixing"]),
            origin="manifest",
        )
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


def _read_labels(path: Path, max_samples: int) -> Counter[int]:
    """Histogram of the ``cls`` field of the first ``max_samples`` samples of a shard (unreadable ones skipped)."""
    counts: Counter[int] = Counter()
    if not path.is_file():
        return counts  # verify reports missing shards
    samples = iter_shard(path, ErrorPolicy("skip"))
    for sample in itertools.islice(samples, max_samples):
        with contextlib.suppress(KeyError, ValueError, UnicodeDecodeError):
            counts[int(bytes(sample["cls"]).decode().strip())] += 1
    samples.close()  # stop reading the tar
    return counts


def split_mixing(
    source_dir: str | Path,
    split: str = "train",
    *,
    manifest: Manifest | None = None,
    max_shards: int = MAX_SHARDS,
    max_samples: int = MAX_SAMPLES_PER_SHARD,
) -> SplitMixing | None:
    """The label mixing of ``split`` of a source set; None when it has no shards, or no readable labels.

    Taken from the manifest's record when there is one, else read from (a
    capped part of) the shards — see the module doc.
    """
    source_dir = as_path(source_dir)
    manifest = manifest or Manifest.read(source_dir)
    shards = manifest.splits.get(split, [])
    if not shards:
        return None
    recorded = _from_manifest(manifest, split)
    if recorded is not None:
        return recorded
    picked = sorted({int(i) for i in np.linspace(0, len(shards) - 1, min(max_shards, len(shards)))})
    counts = [_read_labels(source_dir / shards[i].name, max_samples) for i in picked]
    counts = [c for c in counts if c]  # a missing or unreadable shard, or one without labels, says nothing
    if not counts:
        return None
    return from_counts(split, counts, "shards", samples=manifest.count(split))


def class_sorted(m: SplitMixing) -> bool:
    """Whether a split looks class-sorted: mixing below MIXING_THRESHOLD where the score means something."""
    meaningful = (
        m.mixing is not None
        and m.classes >= 2
        and len(m.shard_entropy) >= 2
        and float(np.mean(m.shard_samples)) >= MIN_SHARD_SAMPLES
    )
    return meaningful and m.mixing < MIXING_THRESHOLD


def warning_text(m: SplitMixing, source_dir: str | Path) -> str:
    """One line saying that ``m``'s split looks class-sorted, and what to do about it."""
    return (
        f"{m.split} split of {source_dir} looks class-sorted: label mixing {m.mixing:.2f} "
        f"(< {MIXING_THRESHOLD}; a shard holds as few as {min(m.shard_classes)} of {m.classes} classes); "
        f"re-ingest it with this version of synesthesia (written shuffled), "
        f"or raise train.shuffle_buffer to about the split size ({m.samples})"
    )


def warn_if_class_sorted(
    source_dir: str | Path, split: str = "train", logger: logging.Logger | None = None
) -> bool:
    """Log a warning when ``split`` of a source set looks class-sorted; whether it does."""
    m = split_mixing(source_dir, split)
    if m is None or not class_sorted(m):
        return False
    (logger or logging.getLogger(__name__)).warning("%s", warning_text(m, source_dir))
    return True
