"""Why a student gains from its teacher or does not: what the ablation measures beside accuracy.

Two measurements per privileged source, added to each cell's row once its run
is finished (:func:`complete_rows`, also filling rows written before they were
measured) and tabulated in summary.md (:func:`findings_lines`):

- **Teacher reliance**: the teacher's robustness report (its test accuracy with
  every input, with the privileged modality removed, and with it shuffled across
  the batch: ``teacher_robustness``). A teacher that loses little without the
  modality has little to pass on that RGB does not already give.
- **Predictability** (MESSy cells): the heads' R² on val
  (:func:`synesthesia.train.probe.messy_head_r2`: 1 − SSE ÷ the targets' spread
  about their mean, per layer and modality, ``heads_r2``). Near 0, the student
  cannot predict the teacher's modality features from RGB and the MESSy term is
  mostly noise; near 1, the features add nothing RGB does not hold.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synesthesia import UserError
from synesthesia.ablate.grid import append_row, method_kind
from synesthesia.ablate.stats import pct

if TYPE_CHECKING:
    from synesthesia.ablate.runner import Ablation

logger = logging.getLogger(__name__)


def teacher_robustness(teacher_run: str | Path | None) -> dict[str, float] | None:
    """The teacher run's robustness report (accuracy by condition), or None when it has none."""
    if not teacher_run:
        return None
    path = Path(teacher_run) / "metrics.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text()).get("robustness")
    if not isinstance(report, dict):
        return None
    return {str(k): float(v) for k, v in report.items() if isinstance(v, int | float)}


def heads_r2(run: str | Path, shards: str | Path) -> dict[str, float]:
    """A MESSy run's heads' R² on val, by ``l<layer>/<modality>``."""
    from synesthesia.train.probe import messy_head_r2

    result = messy_head_r2(run, "val", shards=str(shards))
    return {head: float(m["r2"]) for head, m in result["heads"].items()}


def complete_rows(ablation: Ablation, done: dict[str, dict[str, Any]]) -> None:
    """Add the teacher's robustness and a MESSy cell's heads' R² to every finished cell's row that
    lacks them (an updated row is appended to results.jsonl: the last row of a cell wins)."""
    for name, row in list(done.items()):
        if row.get("role", "cell") != "cell" or row.get("source") == "none":
            continue
        update: dict[str, Any] = {}
        if "teacher_robustness" not in row:
            report = teacher_robustness(row.get("teacher_run"))
            if report is not None:
                update["teacher_robustness"] = report
        if (
            method_kind(row.get("method", "")) == "messy"
            and "heads_r2" not in row
            and Path(row.get("run", "")).is_dir()
        ):
            logger.info("heads' R² on val of %s", name)
            try:
                update["heads_r2"] = heads_r2(row["run"], ablation.shards)
            except UserError as err:  # the accuracies stand without it; say why it is missing
                logger.warning("no heads' R² for %s: %s", name, err)
        if update:
            done[name] = append_row(ablation.out, {**row, **update})


def findings_lines(rows: list[dict[str, Any]]) -> list[str]:
    """summary.md's section on teacher reliance and the heads' R², per privileged source."""
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("role", "cell") == "cell" and row.get("source") not in (None, "none"):
            by_source[row["source"]].append(row)
    table = []
    for source, members in by_source.items():
        report = next((r["teacher_robustness"] for r in members if r.get("teacher_robustness")), None)
        r2: dict[tuple[str, str], list[float]] = defaultdict(list)  # (method, head) -> over seeds
        for r in members:
            for head, value in (r.get("heads_r2") or {}).items():
                r2[(r["method"], head)].append(float(value))
        if report is None and not r2:
            continue
        table.append((source, report or {}, r2))
    if not table:
        return []
    lines = [
        "",
        "## What the teacher relies on, and what the student can predict",
        "",
        "Teacher test accuracy (%) with every input, with the privileged modality removed and with it "
        "shuffled across the batch (the teacher's robustness report); MESSy's heads' R² on val, the mean "
        "over seeds [min, max] (1 − SSE ÷ the spread of the teacher's features about their mean: 0, the "
        "student cannot predict them from RGB; 1, they hold nothing RGB lacks). "
        "One run: `synesthesia eval PIPELINE --model RUN --heads --split val`.",
        "",
        "| source | teacher | removed | shuffled | MESSy heads' R² on val |",
        "| --- | --- | --- | --- | --- |",
    ]
    for source, report, r2 in table:
        removed = _condition(report, "removed/")
        shuffled = _condition(report, "shuffled/")
        named = len({method for method, _ in r2}) > 1  # variants (messy@w0.1) beside messy: say whose
        heads = "; ".join(
            f"{f'{method} ' if named else ''}{head} {sum(v) / len(v):.2f} [{min(v):.2f}, {max(v):.2f}]"
            for (method, head), v in sorted(r2.items())
        )
        lines.append(f"| {source} | {pct(report.get('full'))} | {removed} | {shuffled} | {heads or '–'} |")
    return lines


def _condition(report: dict[str, float], prefix: str) -> str:
    """``depth 39.12`` for each modality of a condition (``removed/all`` left out)."""
    parts = [
        f"{key.removeprefix(prefix)} {pct(v)}"
        for key, v in sorted(report.items())
        if key.startswith(prefix) and key != f"{prefix}all"
    ]
    return ", ".join(parts) or "–"
