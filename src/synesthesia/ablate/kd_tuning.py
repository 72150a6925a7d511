"""Tuned KD in the ablation: the α × T grid, trained at the tune seed, the best val setting kept.

Per source, every setting of ``ablate.kd_alphas`` × ``ablate.kd_temperatures``
is trained at ``ablate.tune_seed`` (default the first seed) and the setting with
the best **val** accuracy (:func:`synesthesia.methods.tuned_kd.select_best`:
ties by grid order) is used for every seed, so the tuning run at the tune seed
*is* that seed's KD cell. Each grid run is a ``role: "tune"`` row of
results.jsonl; :func:`tune_kd` returns the selection and its cost (runs,
seconds), which the runner writes to ``kd_selection.json`` and beside the KD
rows. A one-setting grid is no tuning: it is used as given.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from synesthesia.ablate.grid import append_row
from synesthesia.config import MethodConfig, PipelineConfig, to_dict

if TYPE_CHECKING:
    from synesthesia.ablate.runner import Ablation

logger = logging.getLogger(__name__)


def kd_grid(cfg: PipelineConfig):
    from synesthesia.methods.tuned_kd import expand_grid

    options = {"alphas": list(cfg.ablate.kd_alphas), "temperatures": list(cfg.ablate.kd_temperatures)}
    return expand_grid(MethodConfig(**{**to_dict(cfg.method), "name": "kd", "options": options}))


def tune_seed(cfg: PipelineConfig) -> int:
    seed = cfg.ablate.tune_seed
    return cfg.ablate.seeds[0] if seed is None else seed


def tune_kd(ablation: Ablation, source, done, costs, teachers, tick):
    """Train (or reuse) the α × T grid at the tune seed; pick the best val accuracy."""
    from synesthesia.methods.tuned_kd import select_best

    seed = tune_seed(ablation.cfg)
    if not ablation.tuned:
        g = ablation.grid[0]
        return g, {
            "selected": g.name,
            "alpha": g.alpha,
            "temperature": g.temperature,
            "runs": 0,
            "seconds": 0.0,
        }
    pending = [g for g in ablation.grid if ablation.tune_cell_name(source, g) not in done]
    jobs = [ablation.student_job("kd", source, seed, g) for g in pending]
    grid_of = {job.name: g for job, g in zip(jobs, pending, strict=True)}

    def tuned(job, result) -> None:
        g = grid_of[job.name]
        row = ablation._row(job, result, curves=False)
        row.update(costs[source])
        row.update(teachers[source])
        name = ablation.tune_cell_name(source, g)
        full = {
            "cell": name,
            "method": "kd",
            "source": source,
            "seed": seed,
            "role": "tune",
            "kd_alpha": g.alpha,
            "kd_temperature": g.temperature,
            "grid_cell": g.name,
            **row,
        }
        done[name] = append_row(ablation.out, full)

    ablation.run_jobs(jobs, tuned, tick)
    rows = [{**done[ablation.tune_cell_name(source, g)], "cell": g.name} for g in ablation.grid]
    selection = select_best(ablation.grid, rows, metric="val_acc")
    best = selection.best
    logger.info(
        "KD tuning (%s): α=%g, T=%g selected on val (%.2f %%)",
        source,
        best.alpha,
        best.temperature,
        100 * selection.summary[best.name]["mean"],
    )
    return best, {
        "selected": best.name,
        "alpha": best.alpha,
        "temperature": best.temperature,
        "runs": len(rows),
        "seconds": sum(float(r["train_seconds"]) for r in rows if not math.isnan(r["train_seconds"])),
        "val_acc": {g: s["mean"] for g, s in selection.summary.items()},
        "seed": seed,
    }
