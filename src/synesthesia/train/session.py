"""What one :func:`~synesthesia.train.loop.train` call builds before its loop, and the set-up steps.

- :class:`Session`: the config, run folder, accelerator, data, prepared trainee
  and optimizer, frozen teacher and loaders, and what the loop accumulates;
- :func:`build_accelerator`: the Accelerator, obeying its launcher (:func:`check_launch`
  refuses ``accelerate launch --cpu --num_processes N``, which starts one process);
- :func:`setup`: resolve the data, build the models (:mod:`synesthesia.train.build`),
  the loaders (:func:`build_loaders`), AdamW and the cosine schedule, and
  ``accelerator.prepare`` them (the seeds are set exactly where a run's
  reproducibility needs them: before building, and per device after prepare);
- :func:`resume_from`: ``--resume`` (the checkpoint, no pickle, and ``best/``);
- :func:`unwrap_models`: the modules saved and evaluated (the teacher or the
  student alone, an objective's or a student method's state).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from synesthesia import UserError
from synesthesia.shards.mixing import warn_if_class_sorted
from synesthesia.train.build import (
    build_models,
    finds_unused_parameters,
    parameter_groups,
    unwrapped_model,
    use_cpu,
)
from synesthesia.train.checkpoint import (
    TrainState,
    copy_best,
    find_checkpoint,
    load_training_state,
    run_dir,
)
from synesthesia.train.data import ShardLoader, build_loader
from synesthesia.train.objectives import StudentTrainee, TeacherObjectiveTrainee
from synesthesia.train.sidecars import DataSpec, resolve_data
from synesthesia.train.trackers import build_trackers

logger = logging.getLogger(__name__)


@dataclass
class Loaders:
    train: ShardLoader
    val: ShardLoader | None
    test: ShardLoader | None


@dataclass
class Session:
    """What one :func:`train` call works with: its config (``t``: the train section with the
    stage's epochs), run folder, accelerator, data, the prepared trainee and optimizer, the
    frozen teacher, and what the loop accumulates (state, timing, samples seen)."""

    cfg: Any
    t: Any
    run: Path
    accelerator: Any
    spec: DataSpec
    trainee: nn.Module
    frozen: nn.Module | None
    model_config: dict[str, Any]
    teacher_layers: list[int] | None
    loaders: Loaders
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainState
    total_updates: int
    # set by unwrap_models once the trainee is prepared (and resumed)
    model: nn.Module | None = None  # the teacher or the student alone
    objective: nn.Module | None = None  # a teacher objective
    student_method: nn.Module | None = None  # a student method's own modules (MESSy's heads)
    samples_seen: int = 0
    timing: dict[str, float] = field(
        default_factory=lambda: {"data_s": 0.0, "teacher_forward_s": 0.0, "step_s": 0.0, "micro_batches": 0}
    )

    @property
    def steps_per_epoch(self) -> int:
        return self.loaders.train.steps_per_epoch


def build_accelerator(t, run: Path, find_unused_parameters: bool = False):
    """The run's Accelerator. What the launcher (``accelerate launch``, ``accelerate config``,
    ``torchrun``) chose stands unless the config says otherwise: the mixed precision when
    ``train.precision`` is null, the process group it started. DDP looks for parameters without
    a gradient only when the method says some may get none (``find_unused_parameters``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    check_launch()
    try:
        return Accelerator(
            cpu=use_cpu(t.device),
            mixed_precision=t.precision,  # None: ACCELERATE_MIXED_PRECISION (the launcher's), else no
            log_with=build_trackers(t.log_with, run / "logs"),
            project_config=ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "logs")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
            step_scheduler_with_optimizer=False,
        )
    except ValueError as exc:  # e.g. bf16 on a device without it, fp8 without its library
        if "precision requires" not in str(exc):
            raise
        chosen = t.precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        source = "train.precision" if t.precision else "the launcher's mixed precision"
        raise UserError(f"{source} {chosen} is not available here: {exc}") from exc


# what a process started by torchrun, accelerate's torchrun launcher or MPI knows its world size by
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch() -> None:
    """Refuse the one launch that silently trains alone: ``accelerate launch --num_processes N``
    (N > 1) through accelerate's simple launcher (``--cpu``, or no ``--multi_gpu`` on one GPU),
    which starts a single process unless MPI starts the rest (``--mpirun_hostfile``). It marks
    that process with ``ACCELERATE_USE_CPU`` and, for N > 1, ``MASTER_ADDR``, but no world size."""
    env = os.environ
    if "ACCELERATE_USE_CPU" not in env or "MASTER_ADDR" not in env:
        return
    if any(name in env for name in WORLD_SIZE_VARIABLES):
        return
    raise UserError(
        "accelerate launch asked for several processes but started this one alone (its --cpu launcher "
        "starts one without --mpirun_hostfile); use `accelerate launch --multi_gpu --num_processes N "
        "-m synesthesia train ...` (also on CPU; add train.device=cpu on a GPU machine) or "
        "`torchrun --nproc_per_node N -m synesthesia train ...`"
    )


def build_loaders(spec: DataSpec, t, accelerator) -> Loaders:
    """Train, val and test loaders of this rank (val/test None when the split is empty)."""
    # latents decoded on the fly (train.decoded_from=latents) are decoded on this process's device
    where = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "device": accelerator.device,
    }
    train_loader = build_loader(spec, "train", t, **where)
    # a student is evaluated on RGB alone: its val/test read no sidecars
    eval_spec = spec if t.stage == "teacher" else dataclasses.replace(spec, sidecars={})
    val_loader = build_loader(eval_spec, "val", t, **where) if spec.counts.get("val") else None
    test_loader = build_loader(eval_spec, "test", t, **where) if spec.counts.get("test") else None
    return Loaders(train_loader, val_loader, test_loader)


def setup(cfg, out: Path) -> Session:
    """Build everything and ``accelerator.prepare`` it: data, models, loaders, AdamW + cosine schedule."""
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    t = cfg.train
    if t.stage == "teacher" and cfg.teacher.epochs > 0:  # teachers may train longer than students
        t = dataclasses.replace(t, epochs=cfg.teacher.epochs)
    run = run_dir(cfg, out)
    accelerator = build_accelerator(t, run, finds_unused_parameters(cfg))
    set_seed(t.seed)  # the same initial weights on every rank
    spec = resolve_data(cfg)
    if accelerator.is_main_process and t.shuffle_buffer < spec.counts.get("train", 0):
        # shards that each hold one or two classes defeat a buffer smaller than the split
        warn_if_class_sorted(spec.source_dir, "train", logger)
    trainee, frozen, model_config = build_models(cfg, spec, out)
    # the frozen teacher keeps only the hidden states the method reads (None: all of them)
    method = getattr(trainee, "method", None)
    teacher_layers = method.teacher_layers() if hasattr(method, "teacher_layers") else None
    model_config.update(
        num_classes=spec.num_classes,
        image_size=spec.image_size,
        class_names=spec.class_names,
        dataset=cfg.dataset,
    )
    loaders = build_loaders(spec, t, accelerator)
    total_updates = t.epochs * math.ceil(loaders.train.steps_per_epoch / t.grad_accum)

    optimizer = torch.optim.AdamW(parameter_groups(trainee, t.weight_decay), lr=t.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(t.warmup_steps, total_updates), total_updates)
    state = TrainState()
    trainee, optimizer = accelerator.prepare(trainee, optimizer)
    set_seed(t.seed, device_specific=True)  # dropout and modality dropout: a stream per rank
    if frozen is not None:
        frozen.to(accelerator.device)
    return Session(
        cfg, t, run, accelerator, spec, trainee, frozen, model_config, teacher_layers, loaders,
        optimizer, scheduler, state, total_updates,
    )  # fmt: skip


def resume_from(s: Session, resume: str) -> None:
    """Load a checkpoint (``--resume``): weights, optimizer, scheduler, RNG, :class:`TrainState`, ``best/``."""
    checkpoint = find_checkpoint(resume, s.run)
    _warn_if_config_changed(s.cfg, checkpoint.parent.parent)
    load_training_state(checkpoint, s.accelerator, s.trainee, s.optimizer, s.scheduler, s.state)
    if s.accelerator.is_main_process:
        copy_best(checkpoint / "best", s.run / "best")
    s.accelerator.wait_for_everyone()
    logger.info("resumed from %s at epoch %d, step %d", checkpoint, s.state.epoch, s.state.step)


def unwrap_models(s: Session) -> None:
    """The modules saved and evaluated: the teacher or student alone, and an objective's or
    student method's own state (kept beside the selected weights in ``best/``)."""
    unwrapped = s.accelerator.unwrap_model(s.trainee)
    s.model = unwrapped_model(unwrapped)
    s.objective = unwrapped.method if isinstance(unwrapped, TeacherObjectiveTrainee) else None
    # a student method's own modules (MESSy's heads) are kept beside the selected student, for
    # analysis (benchmarks/probe_messy_heads.py: the heads' R² on val); the export never has them
    student_method = unwrapped.method if isinstance(unwrapped, StudentTrainee) else None
    if student_method is not None and not any(True for _ in student_method.parameters()):
        student_method = None
    s.student_method = student_method


def _warn_if_config_changed(cfg, previous_run: Path) -> None:
    """Resuming under another config is allowed (e.g. more epochs) but no longer reproduces the run.
    Only what training depends on counts (:func:`~synesthesia.config.training_hash`): not the
    ``ablate`` section, so an ablation resuming a run under other ``ablate.*`` overrides is quiet."""
    from synesthesia.config import training_hash
    from synesthesia.shards.schema import read_json_file

    written = previous_run / "config.json"
    if not written.is_file():
        return
    data = read_json_file(written)  # read as this version reads it: options added since take defaults
    before = training_hash(data.get("config") or {}) if isinstance(data, dict) else None
    if before is None or before != training_hash(cfg):
        logger.warning("resuming %s with a config that differs from its config.json", previous_run)
