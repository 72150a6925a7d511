"""`synesthesia ablate`: run the grid, reusing shards, teachers and finished runs; collect one row per cell.

The steps, each skipped when an earlier run left it complete:

1. **Source set.** The procedural scenes are rendered (a verified render of the
   same config is kept, so a pipeline sharing the demo's ``scenes`` section
   reuses its render); any other dataset must have been ingested.
2. **Stage one, per privileged source** (``ablate.generators``; defaults):
   ``latent`` (DLA) runs ``shard.generators`` (the generating model, no
   decode); ``real`` runs ``tae`` over the true paired signal of each of
   ``train.modalities`` (encode mode); ``decoded`` runs the ``latent``
   generators again with ``shard.decode: true``, which writes the decoded
   sidecar (the decode-encode loop). Finished sidecars are reused (stage one's
   cache key refuses a changed generator config: pass the same generator
   settings as the run that wrote them, or another ``--shards`` root). The
   timing of the run that actually wrote each set is kept in
   ``<out>/stage_one.json`` (``throughput.json`` is overwritten by a rerun that
   has nothing to do).
3. **Teachers**, one per privileged source (``train.seed``, plus
   ``ablate.teacher_overrides``), shared by every student of that source.
4. **Tuned methods.** Per source, KD's α × T grid (``ablate.kd_alphas`` ×
   ``ablate.kd_temperatures``), and the settings ``ablate.tune`` lists for
   other methods (MESSy's weight), are trained at ``ablate.tune_seed`` (default
   the first seed); the setting with the best **val** accuracy
   (:func:`synesthesia.methods.tuned_kd.select_best`: ties by grid order) is
   then used for every seed, so the tuning run at the tune seed *is* that
   seed's cell. Each setting's run is a ``role: "tune"`` row of results.jsonl
   and the tuning seconds are reported beside the method's rows.
5. **Cells**, seed by seed (a stopped ablation holds whole seeds, which pair).
   Steps 3-5 are not barriers: each run starts as soon as what it needs has
   finished (:mod:`~synesthesia.ablate.schedule`), so with ``--jobs`` the ``ce``
   cells train beside the teachers and one source's cells beside another's
   tuning runs. Each appends one row to
   ``results.jsonl`` when it finishes, so a killed ablation rerun skips completed cells. A run that was
   killed part-way resumes from its latest checkpoint when it has one, else it
   starts over.
6. **Findings**: each cell's row gains its teacher's robustness report and, for
   MESSy, the heads' R² on val (:mod:`~synesthesia.ablate.findings`).
7. ``summary.md`` and the plots, from results.jsonl (``--report`` redoes only this).

Every training run is ``synesthesia train PIPELINE <overrides> --out RUNS``;
the row holds that command and the path of the run's resolved ``config.json``.

This module is :class:`Ablation`, the steps in order. What each step draws on:
:mod:`~synesthesia.ablate.grid` (the cells, results.jsonl),
:mod:`~synesthesia.ablate.stage_one_sets` (step 2: a source's generators,
overrides and sidecar sets), :mod:`~synesthesia.ablate.tuning` (step 4),
:mod:`~synesthesia.ablate.schedule` (the order runs train in, steps 3-5),
:mod:`~synesthesia.ablate.runs` (a training job, its finished metrics and loss
curves), :mod:`~synesthesia.ablate.planning` (``--plan``: what is left, and an
estimate of its time) and :mod:`~synesthesia.ablate.report` (step 6).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.ablate import planning
from synesthesia.ablate.findings import complete_rows
from synesthesia.ablate.grid import (
    Cell,
    append_row,
    expand,
    method_kind,
    read_results,
    source_kind,
    teacher_sources,
)
from synesthesia.ablate.parallel import Task, TrainPool
from synesthesia.ablate.planning import Plan
from synesthesia.ablate.reuse import drop_stale, from_current_teacher, read_timing, teacher_weights
from synesthesia.ablate.runs import (
    TIMING,
    Job,
    _acc,
    _finished,
    _logged_span,
    loss_curves,
    qualify,
)
from synesthesia.ablate.schedule import CELLS, TEACHERS, TUNING_RUNS, Schedule
from synesthesia.ablate.stage_one_sets import data_overrides, sidecar_dirs, stage_one_overrides
from synesthesia.ablate.tuning import (
    Setting,
    select_setting,
    setting_row,
    tune_seed,
    tuned_settings,
    tuning_jobs,
)
from synesthesia.config import (
    MethodConfig,
    PipelineConfig,
    build,
    check_section,
    config_hash,
    replace,
    to_dict,
    training_hash,
)
from synesthesia.progress import progress
from synesthesia.utils import atomic_write_text

logger = logging.getLogger(__name__)

STAGE_ONE_LEDGER = "stage_one.json"
TUNING = "tuning.json"  # per tuned method and source: the setting selected on val, and its cost


def _check(cfg: PipelineConfig) -> list[Cell]:
    from synesthesia.methods import METHODS

    cells = expand(cfg.ablate)
    for method in (*cfg.ablate.methods, *cfg.ablate.variants):
        kind = method_kind(method)
        if kind not in METHODS.names():
            raise UserError(
                f"unknown method {method!r} in ablate.methods; valid: {', '.join(METHODS.names())}"
            )
        if getattr(METHODS.get(kind), "stage", "student") == "teacher":
            raise UserError(
                f"{method!r} is a teacher objective; ablate.methods lists student methods "
                "(train a teacher with it and set train.teacher to compare its students)"
            )
    if not any(s != "none" for s in cfg.ablate.sources) and any(
        method_kind(m) != "ce" for m in cfg.ablate.methods
    ):
        raise UserError(
            "ablate.sources has no privileged source (decoded, latent, real) for the non-ce methods"
        )
    if not cfg.train.modalities:
        raise UserError("train.modalities is empty: the ablation needs a privileged modality")
    for source in cfg.ablate.generators:
        if source_kind(source) == "none":
            raise UserError(f"ablate.generators.{source}: source none has no generators")
    _check_distinct_sets(cfg)
    return cells


def variant_overrides(cfg: PipelineConfig, method: str, fields: dict[str, Any]) -> list[str]:
    """The ``method.*`` overrides of the labelled method ``method`` (``ablate.variants[method]``),
    checked: a label, fields of the method section other than ``name``, values of their types."""
    if method == method_kind(method):
        raise UserError(
            f"ablate.variants.{method}: variants are labelled methods (<method>@<label>, e.g. "
            f"{method}@w0.1); the plain method takes the pipeline's `method` section"
        )
    known = {f.name for f in dataclasses.fields(MethodConfig)} - {"name"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(
            f"ablate.variants.{method}: unknown method field(s) {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(known))}"
        )
    check_section(
        build(MethodConfig, {**to_dict(cfg.method), **fields}, f"ablate.variants.{method}"),
        f"ablate.variants.{method}",
    )
    return [f"method.{key}={json.dumps(value)}" for key, value in sorted(fields.items())]


def _check_distinct_sets(cfg: PipelineConfig) -> None:
    """Two sources whose different generators would write the same sidecar set are refused
    (stage one would refuse the second config only after the first had run)."""
    writers: dict[Path, tuple[str, list[str]]] = {}
    for source in dict.fromkeys(s for s in cfg.ablate.sources if s != "none"):
        over = stage_one_overrides(cfg, source)
        for d in sidecar_dirs(cfg, Path(), source):
            first = writers.setdefault(d, (source, over))
            if first[1] != over:
                raise UserError(
                    f"sources {first[0]} and {source} would both write the sidecar set {d.name} with "
                    "different generators: give one of them a set_name in ablate.generators"
                )


class Ablation:
    """The grid of one pipeline: plan it, run it (resumably), report it."""

    def __init__(
        self,
        cfg: PipelineConfig,
        pipeline_path: str,
        overrides: list[str] | tuple[str, ...] = (),
        *,
        shards: str | Path = "shards",
        runs: str | Path = "runs",
        out: str | Path | None = None,
        jobs: int = 1,
    ):
        self.cells = _check(cfg)
        # each labelled method's checked `method.*` overrides, once (every job of the method adds them)
        self.variants = {m: variant_overrides(cfg, m, f) for m, f in cfg.ablate.variants.items()}
        # --jobs N: ready runs train side by side, each as a `synesthesia train` process
        self.pool = TrainPool(jobs) if jobs > 1 else None
        self.shards, self.runs = Path(shards), Path(runs)
        self.out = Path(out) if out is not None else Path("results") / cfg.name
        self.cfg = replace(cfg, [f"train.shards={self.shards}"])
        self.pipeline_path = pipeline_path
        # the training commands carry the user's overrides, less the ablate section's (training ignores it)
        self.user_overrides = [o for o in qualify(overrides, "ablate") if not o.startswith("ablate.")]
        self.sources = teacher_sources(self.cells)
        # each tuned method's settings (kd's α × T, ablate.tune's), checked up front
        self.settings = tuned_settings(self.cfg)

    # -- commands

    def _command(self, verb: str, overrides: list[str], out: Path) -> str:
        words = ["synesthesia", verb, self.pipeline_path, *self.user_overrides, *overrides, "--out", str(out)]
        return " ".join(shlex.quote(w) for w in words)

    def teacher_job(self, source: str) -> Job:
        seed = self.cfg.train.seed
        name = f"teacher-{source}-s{seed}"
        over = [
            "train.stage=teacher",
            *data_overrides(self.cfg, source),
            f"train.seed={seed}",
            f"train.run_name={name}",
            f"train.shards={self.shards}",
            *self.cfg.ablate.teacher_overrides,
        ]
        return Job(name, over, self._command("train", over, self.runs), stage="teacher")

    def run_folder(self, name: str) -> Path:
        """Where the run named ``name`` (a job's name) lives: ``<runs>/<pipeline name>/<name>``."""
        return self.runs / self.cfg.name / name

    def teacher_run(self, source: str) -> Path:
        return self.run_folder(self.teacher_job(source).name)

    def tuned(self, method: str) -> bool:
        """Whether ``method``'s setting is chosen on val (it has more than one)."""
        return len(self.settings.get(method, ())) > 1

    def student_job(self, method: str, source: str, seed: int, setting: Setting | None = None) -> Job:
        name = f"{method}-{source}-s{seed}" + (f"-{setting.name}" if setting is not None else "")
        over = [
            "train.stage=student",
            f"method.name={method_kind(method)}",
            *self.variants.get(method, []),
            *data_overrides(self.cfg, source),
            f"train.seed={seed}",
            f"train.run_name={name}",
            f"train.shards={self.shards}",
        ]
        if setting is not None:
            over += setting.overrides
        if source == "none":
            return Job(name, over, self._command("train", over, self.runs))
        over.append(f"train.teacher={self.teacher_run(source)}")
        return Job(name, over, self._command("train", over, self.runs), source=source)

    def _record(self, job: Job) -> dict[str, Any]:
        """What the ablation writes into a run's TIMING file beside its seconds: a student's teacher."""
        weights = teacher_weights(self, job.source) if job.source not in (None, "none") else None
        return {"teacher_weights": weights} if weights else {}

    def cells_by_seed(self, done: dict[str, dict[str, Any]]) -> list[Cell]:
        """The cells not done, seed by seed: a stopped ablation holds whole seeds, which pair."""
        seeds = list(self.cfg.ablate.seeds)
        return sorted((c for c in self.cells if c.name not in done), key=lambda c: seeds.index(c.seed))

    def tune_cell_name(self, method: str, source: str, setting: Setting) -> str:
        return f"tune/{method}-{source}-s{tune_seed(self.cfg)}-{setting.name}"

    # -- plan

    def plan(self) -> Plan:
        """What the grid holds, what is still to do and how long that should take (before any work)."""
        return planning.plan(self)

    # -- steps

    def prepare_data(self) -> dict[str, dict[str, Any]]:
        """Render (scenes) and run stage one for every privileged source; returns the cost per source."""
        from synesthesia import stage_one
        from synesthesia.sources import scenes

        src = self.shards / self.cfg.dataset / "source"
        if self.cfg.dataset == "scenes":
            scenes.render_dataset(self.cfg, self.shards)
        elif not (src / "manifest.json").is_file():
            raise UserError(f"no source set at {src}; run `synesthesia ingest {self.pipeline_path}` first")
        ledger_path = self.out / STAGE_ONE_LEDGER
        ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
        # decoded last: its run regenerates the latents and rewrites the latent set's throughput.json
        kinds = ("latent", "real", "decoded")
        order = sorted(self.sources, key=lambda s: kinds.index(source_kind(s)))
        for source in order:
            dirs = sidecar_dirs(self.cfg, self.shards, source)
            before = {str(d): _read_throughput(d) for d in dirs}
            over = stage_one_overrides(self.cfg, source)
            logger.info("stage one for source %s: %s", source, ", ".join(d.name for d in dirs))
            stage_one.run_stage_one(replace(self.cfg, over), self.shards)
            for d in dirs:
                key = str(d.relative_to(self.shards))
                now = _read_throughput(d)
                best = now if now and now["samples"] > 0 else None
                if best is None and key not in ledger:
                    old = before[str(d)]
                    best = old if old and old["samples"] > 0 else None
                if best is not None:
                    ledger[key] = {**best, "source": source}
            ledger.setdefault("commands", {})[source] = self._command("shard", over, self.shards)
        atomic_write_text(ledger_path, json.dumps(ledger, indent=2, sort_keys=True) + "\n")
        return {s: self.stage_one_cost(s, ledger) for s in self.sources}

    def stage_one_cost(self, source: str, ledger: dict[str, Any]) -> dict[str, Any]:
        """Seconds and bytes per sample of a source's sidecar sets, and seconds for the whole source set.

        Seconds are the wall time of the stage-one run that wrote the set over the samples it
        wrote; for ``latent`` a decode the run also did is left out, for ``decoded`` it is the
        whole generate + decode run. Unknown timing is NaN.
        """
        from synesthesia.shards.writer import Manifest

        s_per_sample = bytes_per_sample = 0.0
        total = 0
        for d in sidecar_dirs(self.cfg, self.shards, source):
            manifest = Manifest.read(d)
            infos = [i for shards in manifest.splits.values() for i in shards]
            total = max(total, sum(i.samples for i in infos))
            bytes_per_sample += sum(i.bytes for i in infos) / max(1, sum(i.samples for i in infos))
            timing = ledger.get(str(d.relative_to(self.shards)))
            if timing is None:
                s_per_sample = float("nan")
                continue
            wall = timing["wall_s"] - (
                timing.get("decode_s", 0.0) if source_kind(source) != "decoded" else 0.0
            )
            s_per_sample += wall / timing["samples"]
        return {
            "stage1_s_per_sample": s_per_sample,
            "stage1_bytes_per_sample": bytes_per_sample,
            "stage1_seconds": s_per_sample * total,
            "stage1_command": (ledger.get("commands") or {}).get(source, ""),
        }

    def _task(self, job: Job) -> Task:
        """The process that trains ``job``: the command of its row (resuming a killed run)."""
        import sys

        run = self.run_folder(job.name)
        words = [*self.user_overrides, *job.overrides, "--out", str(self.runs)]
        if (run / "checkpoints" / "latest").is_file():
            words += ["--resume", "latest"]
        argv = [sys.executable, "-m", "synesthesia", "--progress", "log", "train", self.pipeline_path, *words]
        return Task(job.name, argv, self.out / "logs" / f"{job.name}.log")

    def run_job(self, job: Job) -> dict[str, Any]:
        """Train ``job`` unless its run already finished; returns metrics plus seconds, run and config paths."""
        from synesthesia.train import loop
        from synesthesia.train.checkpoint import run_dir

        run_cfg = replace(self.cfg, job.overrides)
        run = run_dir(run_cfg, self.runs)
        metrics = _finished(run)
        written = run / "config.json"
        if (
            metrics is not None
            and written.is_file()
            and training_hash(json.loads(written.read_text()).get("config", {})) != training_hash(run_cfg)
        ):
            raise UserError(
                f"{run} was trained with another config than this ablation's; delete it or pass another --runs"
            )
        source = job.source
        if (
            metrics is not None
            and source not in ("none", None)
            and not from_current_teacher(self, run, source)
        ):
            raise UserError(
                f"{run} was distilled from another teacher than this ablation's {self.teacher_run(source)}; "
                "delete it or pass another --runs"
            )
        if metrics is None:
            resume = "latest" if (run / "checkpoints" / "latest").is_file() else None
            logger.info("training %s%s", run.name, " (resuming)" if resume else "")
            start = time.perf_counter()
            metrics = loop.train(run_cfg, self.runs, resume=resume)
            seconds = time.perf_counter() - start
            if run.is_dir():
                atomic_write_text(run / TIMING, json.dumps({"seconds": seconds, **self._record(job)}) + "\n")
        else:
            logger.info("%s already trained; kept", run)
            timing = read_timing(run)
            seconds = float(timing["seconds"]) if "seconds" in timing else _logged_span(run)
        return {
            "metrics": metrics,
            "seconds": seconds,
            "run": str(run),
            "config": str(written),
            "config_hash": config_hash(run_cfg),
        }

    def _row(self, job: Job, result: dict[str, Any], curves: bool) -> dict[str, Any]:
        m = result["metrics"]
        row = {
            "val_acc": _acc(m, "best"),
            "test_acc": _acc(m, "test"),
            "test_n": (m.get("test") or {}).get("samples"),
            "epochs_trained": m.get("epochs_trained", m.get("epochs")),
            "train_seconds": result["seconds"],
            "samples_per_s": float(m.get("train_samples_per_s") or float("nan")),
            "run": result["run"],
            "config": result["config"],
            "config_hash": result["config_hash"],
            "command": job.command,
        }
        if curves:
            row["loss_curves"] = loss_curves(Path(result["run"]))
        return row

    # -- the whole grid

    def run(self) -> Path:
        """Run what is left of the grid and write the report; returns the path of summary.md."""
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        plan = self.plan()
        for line in plan.lines:
            logger.info("%s", line)
        costs = self.prepare_data()
        none_cost = {"stage1_s_per_sample": 0.0, "stage1_bytes_per_sample": 0.0, "stage1_seconds": 0.0}
        costs["none"] = {**none_cost, "stage1_command": ""}
        done = read_results(self.out)
        drop_stale(self, done)
        runs_done = progress(total=plan.todo_runs, desc=f"ablation {self.cfg.name}", unit="run")

        def tick(what: str) -> None:
            runs_done.set_postfix(last=what)
            runs_done.update(1)

        teachers: dict[str, dict[str, Any]] = {}
        selected: dict[tuple[str, str], Setting] = {}  # (method, source) -> its setting
        tuning: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in self.settings}
        teacher_jobs = {self.teacher_job(source).name: source for source in self.sources}
        seeds = list(self.cfg.ablate.seeds)
        schedule = Schedule(self, tick)

        def add_cells(which: Callable[[Cell], bool]) -> None:
            for cell in self.cells_by_seed(done):
                if which(cell):
                    job = self.student_job(cell.method, cell.source, cell.seed, selected.get(cell.key))
                    schedule.add(job, (CELLS, seeds.index(cell.seed)), partial(cell_done, cell))

        def cell_done(cell: Cell, job: Job, result: dict[str, Any]) -> None:
            setting = selected.get(cell.key)
            row = self._row(job, result, curves=method_kind(cell.method) == "messy")
            row.update(costs[cell.source])
            row.update(teachers.get(cell.source, {"teacher_acc": None, "teacher_seconds": 0.0}))
            if setting is not None:
                t = tuning[cell.method][cell.source]
                row.update(setting_row(cell.method, setting), tune_runs=t["runs"], tune_seconds=t["seconds"])
            row["role"] = "cell"
            done[cell.name] = append_row(self.out, {"cell": cell.name, **asdict(cell), **row})

        def teacher_done(job: Job, result: dict[str, Any]) -> None:
            source = teacher_jobs[job.name]
            teachers[source] = {
                "teacher_acc": _acc(result["metrics"], "test"),
                "teacher_val_acc": _acc(result["metrics"], "best"),
                "teacher_seconds": result["seconds"],
                "teacher_run": result["run"],
                "teacher_command": job.command,
                "teacher_weights": teacher_weights(self, source),
            }
            drop_stale(self, done)  # with this teacher trained: rows distilled from another one go
            for method in self.settings:
                jobs, tuned = tuning_jobs(self, method, source, done, costs, teachers)
                left = {j.name for j in jobs}
                if not left:
                    choose(method, source)
                for j in jobs:
                    schedule.add(j, (TUNING_RUNS, 0), partial(tuning_done, tuned, left, method, source))
            add_cells(lambda c: c.source == source and c.method not in self.settings)

        def tuning_done(tuned, left: set[str], method: str, source: str, job: Job, result) -> None:
            tuned(job, result)
            left.discard(job.name)
            if not left:
                choose(method, source)

        def choose(method: str, source: str) -> None:
            selected[(method, source)], tuning[method][source] = select_setting(self, method, source, done)
            atomic_write_text(self.out / TUNING, json.dumps(tuning, indent=2, sort_keys=True) + "\n")
            add_cells(lambda c: c.key == (method, source))

        # the teachers first; the ce cells need none, and take the cores a lone teacher leaves;
        # each finished teacher makes its source's tuning runs and cells ready (schedule.py)
        for source in self.sources:
            schedule.add(self.teacher_job(source), (TEACHERS, 0), teacher_done)
        add_cells(lambda c: c.source == "none")
        schedule.run(most=plan.todo_runs)
        complete_rows(self, done)  # teacher reliance and MESSy heads' R², also for rows from before
        runs_done.close()
        path = self.report()
        logger.info("ablation %s: %s (%.1f min)", self.cfg.name, path, (time.perf_counter() - start) / 60)
        return path

    def report(self) -> Path:
        """summary.md and the plots from results.jsonl."""
        from synesthesia.ablate.report import write_plots, write_summary

        rows = list(read_results(self.out).values())
        if not rows:
            raise UserError(f"{self.out}/results.jsonl has no finished cell yet; run the ablation first")
        path = write_summary(self.out, rows, f"{self.cfg.name}: ablation")
        write_plots(self.out, rows)
        return path


def _read_throughput(directory: Path) -> dict[str, Any] | None:
    """The totals of a set's throughput.json (None when there is none)."""
    path = directory / "throughput.json"
    if not path.is_file():
        return None
    total = json.loads(path.read_text()).get("total") or {}
    return {
        "samples": int(total.get("samples", 0)),
        "wall_s": float(total.get("wall_s", 0.0)),
        "decode_s": float(total.get("decode_s", 0.0)),
    }
