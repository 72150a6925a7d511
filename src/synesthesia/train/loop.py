"""Stage two: one accelerate loop for the multimodal teacher and the RGB-only students.

``train(cfg, out)`` is what ``synesthesia train`` runs, alone or under
``accelerate launch`` / ``torchrun`` (the Accelerator joins the process group
those start; gloo on CPU). The loop is accelerate's minimal one with each
feature visible:

- mixed precision (``train.precision``) through ``accelerator.autocast`` and
  ``accelerator.backward``;
- gradient accumulation over ``train.grad_accum`` micro-batches with
  ``accelerator.no_sync`` (the window restarts at each epoch, and its loss is
  divided by its length, so a short last window is still an average);
- gradient clipping (``train.clip_grad``, on the sync step);
- AdamW (no weight decay on biases, norms and embeddings' 1-D parameters) with
  a cosine schedule after linear warmup (``get_cosine_schedule_with_warmup``),
  counted in optimizer steps;
- ``accelerator.save_state`` every ``train.save_every`` optimizer steps and at
  the end, ``checkpoints/latest`` pointing at the newest; ``--resume`` loads
  it and continues exactly: the data order is a pure function of
  ``(seed, epoch)``, the skipped micro-batches of a part-done epoch are read
  past, and the RNG, scheduler and :class:`TrainState` come back with the
  checkpoint, so the final weights equal an uninterrupted run's;
- trackers through ``log_with`` (default ``jsonl``: ``<run>/logs/metrics.jsonl``);
- a tqdm progress bar on the main process;
- model selection on val (top-1, evaluated after every epoch; ``best/``),
  early stopping on it (``train.early_stop_patience`` epochs without a better
  val accuracy end the run; ``train.epochs`` caps it and sizes the cosine
  schedule), and the test split evaluated once, at the end, with the selected
  weights.

stage=teacher trains :class:`~synesthesia.models.teacher.MultimodalTeacher`
with cross-entropy on RGB plus the privileged inputs of ``train.source``, or,
when ``method.name`` is a *teacher objective* (``modalimmune``,
``basis-realloc``: a method with ``stage = "teacher"``), with that objective
(:class:`TeacherObjectiveTrainee`): its ``teacher_step`` gives the loss, its
``after_backward`` runs on the sync step (after the backward, before clipping
and the optimizer step), val/test are evaluated with its ``predict``, and its
own parameters (basis-realloc's fusion head) train with the teacher. Such a run
is ``teacher-<objective>-<source>-s<seed>`` (the plain one
``teacher-<source>-s<seed>``), so both coexist; ``best/model.safetensors``
holds the teacher alone, under the plain teacher's keys, and
``best/method.safetensors`` the objective's state, with what rebuilds it in
``best/model.json["objective"]``. A student reads only the teacher
(``train.teacher=teacher-modalimmune-latent-s0`` picks that one; it distils
from the teacher network's logits and tokens, not from an objective's head).
Every teacher run writes to metrics.json a robustness report (test accuracy
with all modalities, each removed, each corrupted by noise and by shuffling;
:func:`~synesthesia.methods.modalimmune.modality_robustness`), the plain
teacher's report beside it when that run exists, and collapse diagnostics
(stable/effective rank, per-modality contribution) on a test batch.

stage=student loads the frozen teacher (eval mode, no gradients) from its run
folder and trains the student with ``method`` (the methods registry); the
student alone is exported to ``export/``.

metrics.json also splits each training step's wall time (``timing``): waiting
for the loader (``data_s``: reading shards, decoding images and sidecars),
the frozen teacher's forward (``teacher_forward_s``, students only; with
``train.source=decoded`` this is where the decode-encode loop's encoder runs)
and the rest of the step (``step_s``: forward, backward, optimizer). With
``train.decoded_from=latents`` the latents are decoded while the batch is
fetched, on the accelerator's device: that time is inside ``data_s`` and also
reported alone as ``decode_s`` (the decode-encode loop's decoder, paid at
train time; the run is ``<stage or method>-decoded-latents-s<seed>``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synesthesia import UserError
from synesthesia.config import to_dict, write_resolved
from synesthesia.shards.mixing import warn_if_class_sorted
from synesthesia.train.checkpoint import (
    TrainState,
    checkpoint_path,
    copy_best,
    find_checkpoint,
    load_method_state,
    load_weights,
    mark_latest,
    run_dir,
    save_method_state,
    save_weights,
    source_tag,
    teacher_dir,
    teacher_objective,
)
from synesthesia.train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataSpec,
    build_loader,
    check_decoded_from,
    resolve_data,
)
from synesthesia.train.evaluate import (
    evaluate,
    objective_predictors,
    privileged_inputs,
    robustness_report,
    student_predictors,
    teacher_predictors,
    to_device,
)
from synesthesia.train.export import export_student
from synesthesia.train.trackers import build_trackers
from synesthesia.utils import atomic_write_text

logger = logging.getLogger(__name__)

STAGES = ("teacher", "student")
PRECISIONS = ("no", "bf16", "fp16")


# ----------------------------------------------------------------------------- trainees


class TeacherTrainee(nn.Module):
    """The teacher and its objective: cross-entropy on RGB + privileged inputs (with modality dropout)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, batch: dict[str, Any], teacher_out=None) -> dict[str, torch.Tensor]:
        logits = self.teacher(batch["rgb"], privileged_inputs(batch), present=batch.get("present")).logits
        ce = F.cross_entropy(logits.float(), batch["label"])
        return {"loss": ce, "ce": ce}


class TeacherObjectiveTrainee(nn.Module):
    """The teacher and a teacher objective (``modalimmune``, ``basis-realloc``), whose parameters train with it.

    ``forward`` is the objective's ``teacher_step(teacher, batch)`` (which may
    run the teacher several times); the trainer calls
    ``method.after_backward(teacher)`` itself, between backward and step.
    """

    def __init__(self, teacher: nn.Module, method: nn.Module):
        super().__init__()
        self.teacher = teacher
        self.method = method

    def forward(self, batch: dict[str, Any], teacher_out=None) -> dict[str, torch.Tensor]:
        return self.method.teacher_step(self.teacher, batch)


class StudentTrainee(nn.Module):
    """The student and its method (whose parameters, e.g. MESSy's heads, train with it)."""

    def __init__(self, student: nn.Module, method: nn.Module):
        super().__init__()
        self.student = student
        self.method = method
        self.layers = method.student_layers()

    def forward(self, batch: dict[str, Any], teacher_out=None) -> dict[str, torch.Tensor]:
        out = self.student(batch["rgb"], layers=self.layers or None)
        return self.method(out, teacher_out, batch)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases, norms, tokens and embeddings of rank < 2."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "token" in name or "pos_embed" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- building


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


def check_config(cfg) -> None:
    t = cfg.train
    if t.stage not in STAGES:
        raise UserError(f"unknown train.stage {t.stage!r}; valid: {', '.join(STAGES)}")
    if t.precision not in PRECISIONS:
        raise UserError(f"unknown train.precision {t.precision!r}; valid: {', '.join(PRECISIONS)}")
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


def _unwrapped_model(trainee: nn.Module) -> nn.Module:
    return (
        trainee.teacher if isinstance(trainee, TeacherTrainee | TeacherObjectiveTrainee) else trainee.student
    )


# ----------------------------------------------------------------------------- the loop


def train(cfg, out: str | Path = "runs", resume: str | None = None) -> dict[str, Any]:
    """Train the teacher or a student as ``cfg`` says; returns (and writes) ``metrics.json``'s content."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    check_config(cfg)
    t = cfg.train
    if t.stage == "teacher" and cfg.teacher.epochs > 0:  # teachers may train longer than students
        t = dataclasses.replace(t, epochs=cfg.teacher.epochs)
    out = Path(out)
    run = run_dir(cfg, out)
    accelerator = Accelerator(
        cpu=use_cpu(t.device),
        mixed_precision=t.precision,
        log_with=build_trackers(t.log_with, run / "logs"),
        project_config=ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        step_scheduler_with_optimizer=False,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
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

    # latents decoded on the fly (train.decoded_from=latents) are decoded on this process's device
    where = {"rank": rank, "world": world, "device": accelerator.device}
    train_loader = build_loader(spec, "train", t, **where)
    # a student is evaluated on RGB alone: its val/test read no sidecars
    eval_spec = spec if t.stage == "teacher" else dataclasses.replace(spec, sidecars={})
    val_loader = build_loader(eval_spec, "val", t, **where) if spec.counts.get("val") else None
    test_loader = build_loader(eval_spec, "test", t, **where) if spec.counts.get("test") else None
    steps_per_epoch = train_loader.steps_per_epoch
    updates_per_epoch = math.ceil(steps_per_epoch / t.grad_accum)
    total_updates = t.epochs * updates_per_epoch

    optimizer = torch.optim.AdamW(parameter_groups(trainee, t.weight_decay), lr=t.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(t.warmup_steps, total_updates), total_updates)
    state = TrainState()
    trainee, optimizer = accelerator.prepare(trainee, optimizer)
    accelerator.register_for_checkpointing(scheduler, state)
    set_seed(t.seed, device_specific=True)  # dropout and modality dropout: a stream per rank
    if frozen is not None:
        frozen.to(accelerator.device)

    if resume is not None:
        checkpoint = find_checkpoint(resume, run)
        _warn_if_config_changed(cfg, checkpoint.parent.parent)
        accelerator.load_state(str(checkpoint))
        if accelerator.is_main_process:
            copy_best(checkpoint / "best", run / "best")
        accelerator.wait_for_everyone()
        logger.info("resumed from %s at epoch %d, step %d", checkpoint, state.epoch, state.step)
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, run)
    accelerator.init_trackers(cfg.name, config=_flat(to_dict(cfg)))

    def save_checkpoint() -> None:
        path = checkpoint_path(run, state.step)
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            copy_best(run / "best", path / "best")  # a checkpoint is whole: resuming restores the selection
            mark_latest(run, path, t.keep_checkpoints)
        accelerator.wait_for_everyone()

    unwrapped = accelerator.unwrap_model(trainee)
    model = _unwrapped_model(unwrapped)  # the teacher or the student alone
    objective = unwrapped.method if isinstance(unwrapped, TeacherObjectiveTrainee) else None
    # a student method's own modules (MESSy's heads) are kept beside the selected student, for
    # analysis (benchmarks/probe_messy_heads.py: the heads' R² on val); the export never has them
    student_method = unwrapped.method if isinstance(unwrapped, StudentTrainee) else None
    if student_method is not None and not any(True for _ in student_method.parameters()):
        student_method = None
    cuda = accelerator.device.type == "cuda"

    def save_best() -> None:
        save_weights(model, model_config, run / "best")
        if objective is not None or student_method is not None:
            save_method_state(objective or student_method, run / "best")

    bar = tqdm(
        total=total_updates,
        initial=state.step,
        disable=not accelerator.is_local_main_process,
        desc=f"{run.name}",
        dynamic_ncols=True,
    )
    start_time, samples_seen = time.perf_counter(), 0
    timing = {"data_s": 0.0, "teacher_forward_s": 0.0, "step_s": 0.0, "micro_batches": 0}
    while state.epoch < t.epochs and not state.stopped:
        epoch = state.epoch
        trainee.train()
        keys_seen: list[str] = []
        batches = enumerate(train_loader.epoch(epoch, skip=state.batch), start=state.batch)
        while True:
            tick = time.perf_counter()
            index, batch = next(batches, (None, None))
            if batch is None:
                break
            batch = to_device(batch, accelerator.device)
            tock = time.perf_counter()
            timing["data_s"] += tock - tick
            timing["micro_batches"] += 1
            if t.record_keys:
                keys_seen.extend(batch["keys"])
            window_start = (index // t.grad_accum) * t.grad_accum
            window = min(t.grad_accum, steps_per_epoch - window_start)
            sync = index + 1 == window_start + window
            with nullcontext() if sync else accelerator.no_sync(trainee):
                with accelerator.autocast():
                    teacher_out = None
                    if frozen is not None:
                        if cuda:
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        with torch.no_grad():
                            teacher_out = frozen(
                                batch["rgb"],
                                privileged_inputs(batch),
                                present=batch.get("present"),
                                layers=teacher_layers,
                            )
                        if cuda:
                            torch.cuda.synchronize()
                        timing["teacher_forward_s"] += time.perf_counter() - start
                    terms = trainee(batch, teacher_out)
                accelerator.backward(terms["loss"] / window)
            samples_seen += batch["label"].numel()
            if not sync:
                timing["step_s"] += time.perf_counter() - tock
                continue
            unscaled = False
            if objective is not None:
                # between backward and step, on the whole window's gradients (unscaled under fp16)
                if t.precision == "fp16":
                    accelerator.unscale_gradients()
                    unscaled = True
                terms = {**terms, **objective.after_backward(model)}
            if t.clip_grad > 0:
                if unscaled:  # accelerate's clip would unscale a second time
                    torch.nn.utils.clip_grad_norm_(trainee.parameters(), t.clip_grad)
                else:
                    accelerator.clip_grad_norm_(trainee.parameters(), t.clip_grad)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch = index + 1
            bar.update(1)
            logs = {f"train/{k}": float(v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()}
            logs["train/lr"] = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}", epoch=epoch)
            accelerator.log(logs, step=state.step)
            epoch_done = index + 1 == steps_per_epoch
            if t.save_every and state.step % t.save_every == 0 and not epoch_done:
                save_checkpoint()
            timing["step_s"] += time.perf_counter() - tock
        if t.record_keys:
            _record_keys(run, rank, epoch, keys_seen)

        # end of epoch: validate, select, then checkpoint (a resume starts at the next epoch)
        state.epoch, state.batch = epoch + 1, 0
        record: dict[str, Any] = {"epoch": epoch, "step": state.step}
        if val_loader is not None:
            model.eval()
            predictors = _predictors(model, t.stage, objective=objective)
            record.update(evaluate(predictors, val_loader, accelerator)[_main(t.stage)])
            accelerator.log({"val/accuracy": record["accuracy"], "val/loss": record["loss"]}, step=state.step)
        state.history.append(record)
        if (
            not state.best
            or record.get("accuracy", 0.0) > state.best.get("accuracy", 0.0)
            or val_loader is None
        ):
            state.best = dict(record)
            if accelerator.is_main_process:
                save_best()
        accelerator.wait_for_everyone()
        if val_loader is not None and early_stop_due(state.history, state.best, t.early_stop_patience):
            state.stopped = True
            logger.info(
                "%s: val accuracy has not improved for %d epochs (best %.4f at epoch %d): stopping",
                run.name,
                t.early_stop_patience,
                state.best.get("accuracy", 0.0),
                state.best.get("epoch", 0),
            )
        last = state.epoch == t.epochs or state.stopped
        if last or (t.save_every and state.step % t.save_every == 0):
            save_checkpoint()
    bar.close()
    elapsed = time.perf_counter() - start_time
    # every rank's final weights, hashed: replicas that drifted apart would show here
    from accelerate.utils import gather_object

    digests = gather_object([state_digest(model)])

    # test: once, at the end, with the selected weights
    best_state, _ = load_weights(run / "best")
    model.load_state_dict(best_state)
    model.eval()
    if objective is not None:
        objective.load_state_dict(load_method_state(run / "best"))
        objective.eval()
    steps_timed = max(timing.pop("micro_batches"), 1)
    timing["step_s"] -= timing["teacher_forward_s"]  # step_s: the student's or teacher's own step
    if train_loader.decoder is not None:  # decoding on the fly: part of data_s, reported alone too
        timing["decode_s"] = train_loader.decode_s
    metrics: dict[str, Any] = {
        "run": str(run),
        "stage": t.stage,
        "method": cfg.method.name if t.stage == "student" else teacher_objective(cfg),
        "source": t.source,
        **({"decoded_from": t.decoded_from} if t.source == "decoded" else {}),
        "seed": t.seed,
        "modalities": list(spec.sidecars),
        "steps": state.step,
        "epochs": t.epochs,
        "epochs_trained": state.epoch,
        "stopped_early": state.stopped,
        "early_stop_patience": t.early_stop_patience,
        "processes": world,
        "history": state.history,
        "best": state.best,
        "train_samples_per_s": samples_seen * world / elapsed if elapsed > 0 else None,
        "timing": {
            f"{k}_per_step": v / steps_timed for k, v in timing.items() if frozen or k != "teacher_forward_s"
        }
        | {"micro_batches": steps_timed, "device": accelerator.device.type},
        "final_weights_sha256": digests,
    }
    if test_loader is not None:
        results = evaluate(
            _predictors(model, t.stage, missing=True, objective=objective), test_loader, accelerator
        )
        metrics["test"] = results[_main(t.stage)]
        if t.stage == "teacher":
            metrics["test_missing"] = {name: r["accuracy"] for name, r in results.items()}
            metrics.update(robustness_report(model, objective, test_loader, accelerator, seed=t.seed))
            plain = run.parent / f"teacher-{source_tag(t)}-s{t.seed}" / "metrics.json"
            if objective is not None and plain.is_file():
                metrics["robustness_plain_teacher"] = json.loads(plain.read_text()).get("robustness")
        accelerator.log({"test/accuracy": metrics["test"]["accuracy"]}, step=state.step)
    if accelerator.is_main_process:
        atomic_write_text(run / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if t.stage == "student":
            export_student(
                model,
                run / "export",
                {
                    "dataset": cfg.dataset,
                    "class_names": spec.class_names,
                    "mean": list(IMAGENET_MEAN),
                    "std": list(IMAGENET_STD),
                    "method": cfg.method.name,
                    "source": t.source,
                    "modalities": list(spec.sidecars),
                    "seed": t.seed,
                    "val_accuracy": state.best.get("accuracy"),
                    "test_accuracy": metrics.get("test", {}).get("accuracy"),
                },
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def early_stop_due(history: list[dict[str, Any]], best: dict[str, Any], patience: int) -> bool:
    """Whether the last ``patience`` epochs of ``history`` all came after the selected (best-on-val)
    epoch without beating it; never with ``patience`` 0."""
    if patience <= 0 or not history or "epoch" not in best:
        return False
    return history[-1]["epoch"] - best["epoch"] >= patience


def state_digest(model: nn.Module) -> str:
    """sha256 over a module's state dict (names and bytes, in order): equal iff the weights are equal."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _main(stage: str) -> str:
    return "all" if stage == "teacher" else "student"


def _predictors(model: nn.Module, stage: str, missing: bool = False, objective=None) -> dict[str, Any]:
    if objective is not None:
        return objective_predictors(model, objective, missing)
    return teacher_predictors(model, missing) if stage == "teacher" else student_predictors(model)


def _warn_if_config_changed(cfg, previous_run: Path) -> None:
    """Resuming under another config is allowed (e.g. more epochs) but no longer reproduces the run."""
    from synesthesia.config import config_hash

    written = previous_run / "config.json"
    if written.is_file() and json.loads(written.read_text()).get("config_hash") != config_hash(cfg):
        logger.warning("resuming %s with a config that differs from its config.json", previous_run)


def _record_keys(run: Path, rank: int, epoch: int, keys: list[str]) -> None:
    """Audit trail: the sample keys this process trained on in ``epoch`` (``<run>/keys/rank<r>.jsonl``)."""
    folder = run / "keys"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{rank}.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": epoch, "rank": rank, "keys": keys}) + "\n")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config flattened to ``a.b: scalar`` pairs (what trackers accept as hyperparameters)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(value)
        elif value is None or isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out
