"""One training run of the ablation: its job, whether it finished, and what it left behind.

A :class:`Job` is a run's name, overrides and ``synesthesia train`` command
(:func:`qualify` writes the user's bare override keys in full, as the CLI reads them).
:func:`~synesthesia.config.training_hash` is the config hash a finished run must
match to be reused (everything but the ``ablate`` section). From a run folder:
:func:`_finished` (its metrics once it has a test accuracy), :func:`_acc`,
:func:`loss_curves` (``loss`` and the MESSy terms from ``logs/metrics.jsonl``,
thinned) and :func:`_logged_span` (the seconds its log spans, restarts left
out, for runs trained outside the ablation, which times its own in ``TIMING``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synesthesia.config import PipelineConfig

TIMING = "ablate_time.json"  # written into each run folder by the ablation: wall seconds of train(), and more
CURVE_POINTS = 200  # loss curves kept in results.jsonl are thinned to about this many points


@dataclass
class Job:
    """One training run: its name under ``<runs>/<pipeline name>/``, overrides and the command."""

    name: str
    overrides: list[str]
    command: str
    stage: str = "student"
    source: str | None = None  # a student's privileged source, when it has a teacher


def qualify(overrides: list[str] | tuple[str, ...], section: str) -> list[str]:
    """Overrides with a bare key (``seeds=[0]``) written in full (``ablate.seeds=[0]``), as the CLI reads them."""
    import dataclasses

    top = {f.name for f in dataclasses.fields(PipelineConfig)}
    out = []
    for text in overrides:
        key = text.split("=", 1)[0]
        out.append(f"{section}.{text}" if "." not in key and key not in top else text)
    return out


def _finished(run: Path) -> dict[str, Any] | None:
    path = run / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if (metrics.get("test") or {}).get("accuracy") is not None else None


def _acc(metrics: dict[str, Any], key: str) -> float:
    value = (metrics.get(key) or {}).get("accuracy")
    return float("nan") if value is None else float(value)


def _log_lines(run: Path) -> list[dict[str, Any]]:
    path = run / "logs" / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def loss_curves(run: Path, points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """``loss`` and every ``messy/l<layer>/<modality>`` term from ``<run>/logs/metrics.jsonl``.

    A run restarted from scratch appended to the same log: the last value per step wins.
    Long curves are thinned (every k-th step) to about ``points`` values.
    """
    by_step: dict[str, dict[int, float]] = {}
    for row in _log_lines(run):
        step = row.get("step")
        if step is None:
            continue
        for key, value in row.items():
            if key == "train/loss" or key.startswith("train/messy/"):
                by_step.setdefault(key.removeprefix("train/"), {})[int(step)] = float(value)
    curves = {}
    for term, values in by_step.items():
        ordered = [values[s] for s in sorted(values)]
        stride = max(1, math.ceil(len(ordered) / points))
        curves[term] = ordered[::stride]
    return curves


def _logged_span(run: Path) -> float:
    """Seconds the run's training took, from its log's times: for runs trained outside the ablation
    (no ``TIMING``). A restart (from scratch, or resumed from a checkpoint) appends to the same log
    with a smaller step; each attempt counts only up to the step the next one started from, so a
    discarded attempt and the pause before the restart add nothing. NaN with fewer than two lines."""
    lines = [
        (int(r["step"]), float(r["time"]))
        for r in _log_lines(run)
        if "time" in r and r.get("step") is not None
    ]
    attempts: list[list[tuple[int, float]]] = []
    for step, when in lines:
        if not attempts or step < attempts[-1][-1][0]:
            attempts.append([])
        attempts[-1].append((step, when))
    total, counted = 0.0, 0
    for k, attempt in enumerate(attempts):
        until = attempts[k + 1][0][0] if k + 1 < len(attempts) else attempt[-1][0]
        kept = [when for step, when in attempt if step <= until]
        if kept:
            total += kept[-1] - kept[0]
            counted += len(kept)
    return total if counted > 1 else float("nan")
