"""Building stage two's models from a pipeline config, and loading trained teachers.

- :func:`check_config`: every bound of the config
  (:func:`~synesthesia.config.check_pipeline`), the ``train`` section's choices (stage,
  precision, trackers and their kwargs, sizes, early stopping, the teacher's privileged source, method vs stage)
  and the run folder's name;
- :func:`use_cpu`: ``train.device`` → whether accelerate runs on the CPU;
- :func:`finds_unused_parameters`: whether DDP looks for parameters without a gradient
  (the method says);
- :func:`build_models`: (trainee, frozen teacher or None, the model config
  written to ``best/model.json``). stage=teacher builds
  :class:`~synesthesia.models.teacher.MultimodalTeacher`, trained with
  cross-entropy or, when ``method.name`` is a *teacher objective* (a method
  with ``stage = "teacher"``: ``modalimmune``, ``basis-realloc``), with that
  objective, whose rebuild recipe (method config and :func:`objective_context`)
  goes to ``best/model.json["objective"]``. stage=student builds the student
  (the students registry) and its method (the methods registry) and, when the
  method needs one, loads the frozen teacher;
- :func:`load_teacher`: a trained teacher's ``best/`` weights, frozen, checked
  against this run's modalities (a teacher objective's run loads the same way:
  ``best/model.safetensors`` holds the teacher alone, under the plain teacher's
  keys);
- :func:`load_teacher_objective`: (teacher, objective or None) of a teacher
  run, for evaluation;
- :func:`parameter_groups`: AdamW's groups (no weight decay on biases, norms
  and embeddings' 1-D parameters).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from synesthesia import UserError
from synesthesia.config import check_pipeline, to_dict
from synesthesia.train.checkpoint import (
    default_run_name,
    load_method_state,
    load_weights,
    teacher_dir,
    teacher_objective,
)
from synesthesia.train.objectives import StudentTrainee, TeacherObjectiveTrainee, TeacherTrainee
from synesthesia.train.sidecars import DataSpec, check_decoded_from
from synesthesia.train.trackers import tracker_init_kwargs
from synesthesia.utils import check_name

logger = logging.getLogger(__name__)

STAGES = ("teacher", "student")
PRECISIONS = ("no", "bf16", "fp16")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases, norms, tokens and embeddings of rank < 2."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "token" in name or "pos_embed" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def use_cpu(device: str) -> bool:
    """Whether to run on CPU: asked for, or ``auto`` with no accelerator (also what makes
    accelerate join a torchrun process group over gloo rather than run each process alone)."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown train.device {device!r}; valid: auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda asked for, but CUDA is not available")
    if device == "auto":
        xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
        return not (torch.cuda.is_available() or torch.backends.mps.is_available() or xpu)
    return device == "cpu"


def finds_unused_parameters(cfg) -> bool:
    """Whether DDP must look for parameters without a gradient after each backward
    (``find_unused_parameters``): only for a method whose ``find_unused_parameters`` says some of
    its trainee's parameters may get none on a step; the search costs a graph walk every step."""
    from synesthesia.methods import METHODS

    method_cls = METHODS.get(cfg.method.name)
    if cfg.train.stage == "teacher" and getattr(method_cls, "stage", "student") != "teacher":
        return False  # the plain teacher with cross-entropy: every parameter has a gradient
    return bool(getattr(method_cls, "find_unused_parameters", False))


def check_config(cfg) -> None:
    check_pipeline(cfg)  # again: a config built in code never went through load_pipeline
    t = cfg.train
    if t.stage not in STAGES:
        raise UserError(f"unknown train.stage {t.stage!r}; valid: {', '.join(STAGES)}")
    if t.precision is not None and t.precision not in PRECISIONS:
        raise UserError(
            f"unknown train.precision {t.precision!r}; valid: {', '.join(PRECISIONS)}, "
            "or null (the launcher's choice)"
        )
    tracker_init_kwargs(t.log_with, t.tracker_kwargs)  # each tracker installed, each key one of them
    check_decoded_from(t)
    for name in ("epochs", "batch_size", "grad_accum"):
        if getattr(t, name) < 1:
            raise UserError(f"train.{name} must be at least 1")
    if t.early_stop_patience < 0:
        raise UserError("train.early_stop_patience must be 0 (never stop early) or a number of epochs")
    if t.stage == "teacher" and t.source == "none":
        raise UserError(
            "train.stage=teacher needs privileged inputs: set train.source to latent, decoded or real"
        )
    if t.stage == "teacher" and not t.modalities:
        raise UserError("train.stage=teacher needs train.modalities")
    from synesthesia.methods import METHODS

    stage = getattr(METHODS.get(cfg.method.name), "stage", "student")
    if t.stage == "student" and stage == "teacher":
        raise UserError(
            f"method {cfg.method.name!r} is a teacher objective: train it with train.stage=teacher"
        )
    # the run folder <out>/<name>/<run name>: a default name is built from method, source and seed
    check_name(t.run_name or default_run_name(cfg), "train.run_name")
    if t.stage == "teacher" and stage != "teacher" and cfg.method.name != "ce":
        logger.info("method %r is a student method: the teacher trains with cross-entropy", cfg.method.name)


def load_teacher(folder: Path, spec: DataSpec) -> nn.Module:
    """A trained teacher (its selected weights), frozen, checked against the data's modalities.

    A teacher trained with a teacher objective loads the same way: ``best/``'s
    model weights are the teacher's alone (the objective's are beside them).
    """
    from synesthesia.models.teacher import MultimodalTeacher

    if not (folder / "best" / "model.json").is_file():
        raise UserError(
            f"no trained teacher at {folder}; train it first (synesthesia train <pipeline> stage=teacher) "
            "or set train.teacher=<teacher run folder>"
        )
    state, config = load_weights(folder / "best")
    if config.get("kind") != "teacher":
        raise UserError(f"{folder} is not a teacher run")
    teacher = MultimodalTeacher.from_config_dict(config["model"])
    teacher.load_state_dict(state)
    wanted = spec.teacher_modalities()
    have = {m: {k: v for k, v in s.items()} for m, s in teacher.modalities.items()}
    if {m: s["kind"] for m, s in have.items()} != {m: s["kind"] for m, s in wanted.items()}:
        raise UserError(
            f"teacher {folder} was trained on {sorted(have)} ({config.get('source')}); "
            f"this run's data gives {sorted(wanted)} ({spec.sidecars and next(iter(spec.sidecars.values())).kind})"
        )
    for m, s in wanted.items():  # decoded signals: another decoder or resolution than the teacher's
        if s["kind"] == "decoded" and list(have[m].get("shape") or []) != list(s["shape"]):
            raise UserError(
                f"teacher {folder} reads {m} decoded signals of shape {have[m].get('shape')}, "
                f"this run's data gives {s['shape']}"
            )
    teacher.requires_grad_(False)
    return teacher.eval()


def objective_context(teacher: nn.Module, spec: DataSpec):
    """The MethodContext a teacher objective is built with (also recorded in best/model.json)."""
    from synesthesia.methods import MethodContext

    return MethodContext(
        num_classes=spec.num_classes,
        student_dims={},
        student_depth=0,
        teacher_dim=teacher.dim,
        teacher_depth=teacher.depth,
        modalities=tuple(spec.sidecars),
        latent_dims={m: math.prod(s.spec["shape"]) for m, s in spec.sidecars.items()} or None,
        modality_specs=spec.teacher_modalities(),
    )


def load_teacher_objective(folder: Path) -> tuple[nn.Module, nn.Module | None]:
    """(teacher, its objective or None) of a teacher run's ``best/``, in eval mode, for evaluation.

    The objective is rebuilt from ``best/model.json["objective"]`` (method
    config and context) and loaded from ``best/method.safetensors``.
    """
    from synesthesia.config import MethodConfig, build
    from synesthesia.methods import MethodContext, build_method
    from synesthesia.models.teacher import MultimodalTeacher

    state, config = load_weights(folder / "best")
    if config.get("kind") != "teacher":
        raise UserError(f"{folder} is not a teacher run")
    teacher = MultimodalTeacher.from_config_dict(config["model"])
    teacher.load_state_dict(state)
    teacher.eval()
    objective = config.get("objective")
    if not objective:
        return teacher, None
    ctx = dict(objective["context"])
    ctx["modalities"] = tuple(ctx.get("modalities") or ())
    ctx["student_dims"] = {int(k): int(v) for k, v in (ctx.get("student_dims") or {}).items()}
    method = build_method(build(MethodConfig, objective["method"], "method"), MethodContext(**ctx))
    method.load_state_dict(load_method_state(folder / "best"))
    return teacher, method.eval()


def build_models(cfg, spec: DataSpec, out: Path):
    """(trainee, frozen teacher or None, model config for best/)."""
    t = cfg.train
    if t.stage == "teacher":
        from synesthesia.models.teacher import MultimodalTeacher

        teacher = MultimodalTeacher(cfg.teacher, spec.num_classes, spec.image_size, spec.teacher_modalities())
        config = {"kind": "teacher", "model": teacher.config_dict(), "source": t.source}
        objective = teacher_objective(cfg)
        if objective is None:
            return TeacherTrainee(teacher), None, config
        from synesthesia.methods import build_method

        ctx = objective_context(teacher, spec)
        method = build_method(cfg.method, ctx)
        config["objective"] = {
            "name": objective,
            "method": to_dict(cfg.method),
            "context": dataclasses.asdict(ctx),
        }
        return TeacherObjectiveTrainee(teacher, method), None, config
    from synesthesia.methods import MethodContext, build_method
    from synesthesia.models.students import build_student

    student = build_student(cfg.student, spec.num_classes, spec.image_size)
    method_cls_needs = _method_needs_teacher(cfg)
    frozen = None
    if method_cls_needs:
        if t.source == "none":
            raise UserError(f"method {cfg.method.name!r} needs a teacher; train.source=none has none")
        frozen = load_teacher(teacher_dir(cfg, out), spec)
    latent_dims = {m: math.prod(s.spec["shape"]) for m, s in spec.sidecars.items() if s.kind == "latent"}
    ctx = MethodContext(
        num_classes=spec.num_classes,
        student_dims=dict(student.feature_dims),
        student_depth=student.depth,
        teacher_dim=frozen.dim if frozen is not None else 0,
        teacher_depth=frozen.depth if frozen is not None else 0,
        modalities=tuple(spec.sidecars),
        latent_dims=latent_dims or None,
        modality_specs=spec.teacher_modalities() or None,
    )
    method = build_method(cfg.method, ctx)
    config = {
        "kind": "student",
        "model": student.config_dict(),
        "method": cfg.method.name,
        "source": t.source,
    }
    return StudentTrainee(student, method), frozen, config


def _method_needs_teacher(cfg) -> bool:
    from synesthesia.methods import METHODS

    method_cls = METHODS.get(cfg.method.name)
    if hasattr(method_cls, "needs_teacher_for"):
        return bool(method_cls.needs_teacher_for(cfg.method))
    return bool(getattr(method_cls, "needs_teacher", False))


def unwrapped_model(trainee: nn.Module) -> nn.Module:
    return (
        trainee.teacher if isinstance(trainee, TeacherTrainee | TeacherObjectiveTrainee) else trainee.student
    )
