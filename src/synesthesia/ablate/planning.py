"""The ablation's plan: what the grid holds, what is still to do and how long that should take.

:func:`plan` counts, before any work, the cells, teachers, tuning runs and
stage-one sets of the grid, which of them a previous run already finished, and
estimates the time of the rest on the device the runs will use (:func:`device_name`): from
the training speed (``train_samples_per_s``) of the newest finished runs under the runs root
on that kind of device (:func:`measured_speed`) and the stage-one speed of the sets already
written, else from the constants below (measured on a 2-core CPU, and said so). Its ``lines``
are what ``synesthesia ablate --plan`` prints and what a run logs first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synesthesia.ablate.grid import Cell, read_results
from synesthesia.ablate.parallel import cpu_cores
from synesthesia.ablate.reuse import read_timing, row_is_current
from synesthesia.ablate.runs import _finished
from synesthesia.ablate.stage_one_sets import sidecar_dirs
from synesthesia.ablate.tuning import known_setting, tune_seed, tuning_line
from synesthesia.config import replace

if TYPE_CHECKING:
    from synesthesia.ablate.runner import Ablation

# Start-up estimate, measured on a 2-core CPU (64x64 scenes, vit_tiny_scenes, 1500 train and 1000
# val samples per epoch): a ce student alone trains at 0.69 step/s of 64 (~36 s an epoch with val), a
# KD or MESSy student, which also runs its teacher forward, ~1.4x slower, so 0.030 s per sample-epoch
# between the two; the same-ViT teacher of pipelines/ablation-scenes.yaml ~0.032. Replaced by the
# measured median as runs finish.
EST_STUDENT_S_PER_SAMPLE_EPOCH = 0.030
EST_TEACHER_S_PER_SAMPLE_EPOCH = 0.032
EST_STAGE_ONE_S_PER_SAMPLE = 0.03
EST_RUN_OVERHEAD_S = 10.0  # model build, accelerate, val and test evaluation, checkpoint, export
MEASURED_RUNS = 20  # the newest finished runs a measured speed is the median of


def plan_device(device: str) -> str:
    """``cuda`` or ``cpu``: what ``train.device`` runs on here."""
    if device == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(kind: str) -> str:
    """The device in words: the GPU's name, or ``CPU, N cores`` (the cores this process may use:
    ``taskset -c 0 synesthesia ablate ...`` plans for one)."""
    if kind == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"CPU, {cpu_cores()} cores"


def measured_speed(runs: Path, kind: str) -> dict[str, tuple[float, int]]:
    """stage (teacher, student) → (median training samples/s, runs measured) of the newest
    :data:`MEASURED_RUNS` finished runs under ``runs`` (``<pipeline>/<run>/metrics.json``) that
    trained on ``kind`` (cuda or cpu) in one process, alone (not beside others: ``--jobs``)."""
    from synesthesia.shards.schema import read_json_file

    found: dict[str, list[float]] = {}
    paths = sorted(runs.glob("*/*/metrics.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in paths[: MEASURED_RUNS * 4]:
        try:
            metrics: Any = read_json_file(path, "metrics.json")
        except Exception:  # noqa: BLE001 - someone else's file: unreadable is unmeasured
            continue
        if not isinstance(metrics, dict) or not isinstance(metrics.get("timing"), dict):
            continue
        speed, stage = metrics.get("train_samples_per_s"), metrics.get("stage")
        if metrics["timing"].get("device") != kind or metrics.get("processes", 1) != 1:
            continue
        if _shared_with_others(path.parent):
            continue
        if not (isinstance(speed, int | float) and speed > 0 and stage in ("teacher", "student")):
            continue
        if len(found.setdefault(stage, [])) < MEASURED_RUNS:
            found[stage].append(float(speed))
    return {stage: (sorted(v)[len(v) // 2], len(v)) for stage, v in found.items()}


def _shared_with_others(run: Path) -> bool:
    """Whether the ablation trained ``run`` beside other runs (``--jobs``: its speed is not one run's)."""
    jobs = read_timing(run).get("jobs", 1)
    return isinstance(jobs, int) and jobs > 1


def measured_stage_one(dirs: list[Path]) -> float | None:
    """Seconds per sample of the stage-one sets already written among ``dirs`` (their
    throughput.json), or None when none is."""
    from synesthesia.shards.schema import read_json_file

    samples = wall = 0.0
    for d in dirs:
        if not (d / "throughput.json").is_file():
            continue
        try:
            total = (read_json_file(d / "throughput.json", "throughput.json") or {}).get("total") or {}
            samples += float(total.get("samples", 0))
            wall += float(total.get("wall_s", 0.0))
        except Exception:  # noqa: BLE001 - unreadable is unmeasured
            continue
    return wall / samples if samples > 0 and wall > 0 else None


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

    # rows this grid would not train the same way (another config or teacher) are to do again
    done = {name: row for name, row in read_results(ablation.out).items() if row_is_current(ablation, row)}
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
    kind = plan_device(ablation.cfg.train.device)
    speed = measured_speed(ablation.runs, kind)
    per_sample_epoch = {
        stage: 1.0 / speed[stage][0] if stage in speed else constant
        for stage, constant in (
            ("student", EST_STUDENT_S_PER_SAMPLE_EPOCH),
            ("teacher", EST_TEACHER_S_PER_SAMPLE_EPOCH),
        )
    }
    student_s = EST_RUN_OVERHEAD_S + per_sample_epoch["student"] * n_train * ablation.cfg.train.epochs
    teacher_s = EST_RUN_OVERHEAD_S + per_sample_epoch["teacher"] * n_train * t_epochs

    all_dirs = [d for source in ablation.sources for d in sidecar_dirs(ablation.cfg, ablation.shards, source)]
    stage_one_s = measured_stage_one(all_dirs)
    sets, estimate = [], 0.0
    for d in all_dirs:
        sets.append(str(d.relative_to(ablation.shards)))
        if not (d / "manifest.json").is_file():
            estimate += (stage_one_s or EST_STAGE_ONE_S_PER_SAMPLE) * n_all
    teachers_todo = [s for s in ablation.sources if _finished(ablation.teacher_run(s)) is None]
    estimate += teacher_s * len(teachers_todo)
    tuned = {m: settings for m, settings in ablation.settings.items() if ablation.tuned(m)}
    seed = tune_seed(ablation.cfg)
    tune_todo = sum(  # a finished run folder (another results folder's, or a moved run) is reused
        1
        for m, settings in tuned.items()
        for source in ablation.sources
        for s in settings
        if ablation.tune_cell_name(m, source, s) not in done
        and _finished(ablation.run_folder(ablation.student_job(m, source, seed, s).name)) is None
    )
    todo_cells = [c for c in ablation.cells if c.name not in done]

    def trains(c: Cell) -> bool:
        # a run another results folder's grid finished (a sweep sharing the runs) is reused, not trained
        name = c.name
        if c.method in ablation.settings:  # a tuned method's run is named by the setting selected
            if ablation.tuned(c.method) and c.seed == seed:
                return False  # its tuning run, counted above
            setting = known_setting(ablation, c.method, c.source, done)
            if setting is None:  # selected only once the tuning has run: to train, as far as we know
                return True
            name = ablation.student_job(c.method, c.source, c.seed, setting).name
        return _finished(ablation.run_folder(name)) is None

    todo_students = tune_todo + sum(1 for c in todo_cells if trains(c))
    estimate += student_s * todo_students
    tune_runs = sum(len(settings) for settings in tuned.values()) * len(ablation.sources)
    lines = [
        f"ablation {ablation.cfg.name}: {len(ablation.cells)} cells ({', '.join(ablation.cfg.ablate.methods)} × "
        f"sources {', '.join(ablation.sources) or 'none'} × seeds {', '.join(map(str, ablation.cfg.ablate.seeds))}; "
        "ce runs with source none)",
        f"  + {len(ablation.sources)} teacher(s), {len(sets)} stage-one set(s), "
        + tuning_line(ablation.settings, len(ablation.sources), tune_seed(ablation.cfg)),
        f"  to do: {len(todo_cells)} of {len(ablation.cells)} cells, {len(teachers_todo)} teacher(s), "
        f"{tune_todo} tuning run(s) — {todo_students + len(teachers_todo)} training runs, "
        f"estimate {estimate / 60:.0f} min on {device_name(kind)} (~{student_s:.0f} s per student run)",
    ]
    lines.insert(2, "  " + _basis(speed, stage_one_s, ablation.runs))
    if ablation.pool is not None:
        lines.append(
            f"  --jobs: {ablation.pool.describe()}; the estimate is for one at a time (runs that share "
            "a CPU each go slower: 2 on 2 cores gave 1.75x in total on the scenes students)"
        )
    return Plan(
        ablation.cells, ablation.sources, tune_runs, sets, todo_students + len(teachers_todo), estimate, lines
    )


def _basis(speed: dict[str, tuple[float, int]], stage_one_s: float | None, runs: Path) -> str:
    """What the estimate rests on, in words."""
    parts = [
        f"{stage}s: {speed[stage][0]:.1f} samples/s, the median of {speed[stage][1]} run(s) under {runs}"
        if stage in speed
        else f"{stage}s: a constant measured on a 2-core CPU (no finished {stage} run under {runs} on this device)"
        for stage in ("teacher", "student")
    ]
    parts.append(
        f"stage one: {stage_one_s * 1000:.1f} ms/sample, measured on the sets written"
        if stage_one_s is not None
        else "stage one: a constant measured on a 2-core CPU"
    )
    return "estimated from " + "; ".join(parts)
