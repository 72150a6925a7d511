"""Which finished work an ablation may reuse: rows of results.jsonl and run folders.

A row or a run is reused only when this pipeline would train it the same way:
its written config's training hash (:func:`~synesthesia.config.training_hash`,
recomputed by this version: a student's leaves the teacher section out) equals
that of this grid's job, and for a student with a teacher, that teacher is the
one trained now: the digest of the teacher's weights recorded in the run's TIMING
file and in its row, or, for runs from before it was recorded, a teacher older
than the student. :func:`drop_stale` forgets
the rows that fail (their cells train again); the runner refuses a finished run
folder that fails (:func:`from_current_teacher`), naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synesthesia.ablate.runs import TIMING
from synesthesia.ablate.tuning import row_setting
from synesthesia.config import replace, training_hash

if TYPE_CHECKING:
    from synesthesia.ablate.runner import Ablation

logger = logging.getLogger(__name__)


def read_timing(run: Path) -> dict[str, Any]:
    """The run's ablate_time.json (seconds, jobs, teacher_weights), or {} when there is none."""
    path = run / TIMING
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def teacher_weights(ablation: Ablation, source: str) -> str | None:
    """Which trained teacher ``source`` has now: a digest of its final weights (its metrics.json's
    ``final_weights_sha256``), or None while it is not trained."""
    path = ablation.teacher_run(source) / "metrics.json"
    if not path.is_file():
        return None
    digests = json.loads(path.read_text()).get("final_weights_sha256")
    if not digests:
        return None
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


def from_current_teacher(ablation: Ablation, run: Path, source: str, recorded: str | None = None) -> bool:
    """Whether student ``run`` was distilled from the teacher ``source`` has now: the teacher
    digest recorded in the run (its TIMING file) or its row (``recorded``); for runs from before
    it was recorded, whether the run finished after the teacher did (a teacher trained again is
    newer). Unknowable (no teacher yet) counts as yes: the runner asks again once it is trained."""
    recorded = recorded or read_timing(run).get("teacher_weights")
    current = teacher_weights(ablation, source)
    if current is None:
        return True
    if recorded is not None:
        return recorded == current
    mine, theirs = run / "metrics.json", ablation.teacher_run(source) / "metrics.json"
    if mine.is_file() and theirs.is_file():
        return mine.stat().st_mtime >= theirs.stat().st_mtime
    return True


def drop_stale(ablation: Ablation, done: dict[str, dict[str, Any]]) -> None:
    """Forget the rows of results.jsonl that this grid would not train the same way: their run's
    config differs from this pipeline's now, or they were distilled from another teacher than the
    one trained now. Those cells train again (the runs root refuses a finished run of another
    config: pass a new --runs)."""
    stale = [name for name, row in done.items() if not row_is_current(ablation, row)]
    for name in stale:
        del done[name]
    if stale:
        logger.warning(
            "%d row(s) of %s were trained under another config or teacher than this pipeline's now "
            "(%s); they are trained again",
            len(stale),
            ablation.out / "results.jsonl",
            ", ".join(stale[:4]) + (", ..." if len(stale) > 4 else ""),
        )


def row_is_current(ablation: Ablation, row: dict[str, Any]) -> bool:
    method, source, seed = row.get("method"), row.get("source"), row.get("seed")
    if method not in ablation.cfg.ablate.methods or source not in (*ablation.sources, "none"):
        return True  # not a cell of this grid: reported as it is, never reused for one
    run = Path(str(row.get("run", "")))
    if source != "none" and not from_current_teacher(ablation, run, source, row.get("teacher_weights")):
        return False
    setting = None
    if method in ablation.settings:
        setting = row_setting(ablation, method, row)
        if setting is None:
            return False  # a setting the method's grid no longer has, or a row from before it was tuned
    written = Path(str(row.get("config", "")))
    if not written.is_file():
        return True  # its run is gone: the row stands as it was reported
    want = training_hash(replace(ablation.cfg, ablation.student_job(method, source, seed, setting).overrides))
    return training_hash(json.loads(written.read_text()).get("config", {})) == want
