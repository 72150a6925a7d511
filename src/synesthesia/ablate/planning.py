"""The ablation's plan: what the grid holds, what is still to do and how long that should take.

:func:`plan` counts, before any work, the cells, teachers, KD tuning runs and
stage-one sets of the grid, which of them a previous run already finished, and
estimates the time of the rest from the constants below (per sample and epoch,
measured on a 2-core CPU). Its ``lines`` are what ``synesthesia ablate --plan``
prints and what a run logs first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from synesthesia.ablate.grid import Cell, read_results
from synesthesia.ablate.kd_tuning import tune_seed
from synesthesia.ablate.runs import _finished
from synesthesia.ablate.stage_one_sets import sidecar_dirs
from synesthesia.config import replace

if TYPE_CHECKING:
    from synesthesia.ablate.runner import Ablation

# Start-up estimate, measured with the demo on a 2-core CPU (64x64 scenes, vit_tiny_scenes; a ce
# student epoch over 1500 samples with its val pass over 1000 took 27 s); replaced by the measured
# mean as runs finish.
EST_STUDENT_S_PER_SAMPLE_EPOCH = 0.018
EST_TEACHER_S_PER_SAMPLE_EPOCH = 0.0075
EST_STAGE_ONE_S_PER_SAMPLE = 0.03
EST_RUN_OVERHEAD_S = 10.0  # model build, accelerate, val and test evaluation, checkpoint, export


@dataclass
class Plan:
    cells: list[Cell]
    teachers: list[str]
    tune_runs: int
    stage_one_sets: list[str]
    todo_runs: int
    estimate_s: float
    lines: list[str] = field(default_factory=list)


def plan(ablation: Ablation) -> Plan:
    """What the grid holds, what is still to do and how long that should take (before any work)."""
    from synesthesia.shards.writer import Manifest

    done = read_results(ablation.out)
    counts: dict[str, int] = {}
    src = ablation.shards / ablation.cfg.dataset / "source"
    if ablation.cfg.dataset == "scenes":  # what the render step will leave, whatever is there now
        sc = ablation.cfg.scenes
        counts = {"train": sc.num_train, "val": sc.num_val, "test": sc.num_test}
    elif (src / "manifest.json").is_file():
        manifest = Manifest.read(src)
        counts = {s: manifest.count(s) for s in manifest.splits}
    n_train = counts.get("train", 0)
    n_all = sum(counts.get(s, 0) for s in ablation.cfg.shard.splits)
    t_cfg = replace(ablation.cfg, ablation.cfg.ablate.teacher_overrides)
    t_epochs = t_cfg.teacher.epochs or t_cfg.train.epochs
    student_s = EST_RUN_OVERHEAD_S + EST_STUDENT_S_PER_SAMPLE_EPOCH * n_train * ablation.cfg.train.epochs
    teacher_s = EST_RUN_OVERHEAD_S + EST_TEACHER_S_PER_SAMPLE_EPOCH * n_train * t_epochs

    sets, estimate = [], 0.0
    for source in ablation.sources:
        for d in sidecar_dirs(ablation.cfg, ablation.shards, source):
            sets.append(str(d.relative_to(ablation.shards)))
            if not (d / "manifest.json").is_file():
                estimate += EST_STAGE_ONE_S_PER_SAMPLE * n_all
    teachers_todo = [s for s in ablation.sources if _finished(ablation.teacher_run(s)) is None]
    estimate += teacher_s * len(teachers_todo)
    tune_todo = 0
    if ablation.tuned:
        for source in ablation.sources:
            tune_todo += sum(1 for g in ablation.grid if ablation.tune_cell_name(source, g) not in done)
    todo_cells = [c for c in ablation.cells if c.name not in done]
    # the KD cell at the tune seed is one of the tuning runs
    todo_students = tune_todo + sum(
        1
        for c in todo_cells
        if not (ablation.tuned and c.method == "kd" and c.seed == tune_seed(ablation.cfg))
    )
    estimate += student_s * todo_students
    tune_runs = len(ablation.grid) * len(ablation.sources) if ablation.tuned else 0
    lines = [
        f"ablation {ablation.cfg.name}: {len(ablation.cells)} cells ({', '.join(ablation.cfg.ablate.methods)} × "
        f"sources {', '.join(ablation.sources) or 'none'} × seeds {', '.join(map(str, ablation.cfg.ablate.seeds))}; "
        "ce runs with source none)",
        f"  + {len(ablation.sources)} teacher(s), {len(sets)} stage-one set(s), "
        + (
            f"{tune_runs} KD tuning runs ({len(ablation.grid)} α×T settings per source at seed "
            f"{tune_seed(ablation.cfg)}, one of them reused as that seed's KD cell)"
            if ablation.tuned
            else "no KD tuning"
        ),
        f"  to do: {len(todo_cells)} of {len(ablation.cells)} cells, {len(teachers_todo)} teacher(s), "
        f"{tune_todo} tuning run(s) — {todo_students + len(teachers_todo)} training runs, "
        f"estimate {estimate / 60:.0f} min on a 2-core CPU (~{student_s:.0f} s per student run)",
    ]
    return Plan(
        ablation.cells, ablation.sources, tune_runs, sets, todo_students + len(teachers_todo), estimate, lines
    )
