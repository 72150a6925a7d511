"""Stage two: one accelerate loop for the multimodal teacher and the RGB-only students.

``train(cfg, out)`` is what ``synesthesia train`` runs, alone or under
``accelerate launch`` / ``torchrun`` (the Accelerator joins the process group
those start; gloo on CPU). It reads like accelerate's minimal example, each
part a named helper here: :func:`setup` (build the models, loaders and
optimizer and ``accelerator.prepare`` them), :func:`resume_from`,
:func:`train_epoch` (the loop), :func:`end_epoch` (evaluate on val, select,
stop early, checkpoint) and :func:`finish` (test, ``metrics.json``, export).
Each feature stays visible:

- mixed precision (``train.precision``, else the launcher's) through ``accelerator.autocast`` and
  ``accelerator.backward``;
- gradient accumulation over ``train.grad_accum`` micro-batches with
  ``accelerator.no_sync`` (the window restarts at each epoch, and its loss is
  divided by its length, so a short last window is still an average);
- gradient clipping (``train.clip_grad``, on the sync step);
- AdamW (no weight decay on biases, norms and embeddings' 1-D parameters) with
  a cosine schedule after linear warmup (``get_cosine_schedule_with_warmup``),
  counted in optimizer steps;
- a checkpoint (no pickle: :func:`save_training_state`) every ``train.save_every`` optimizer steps and at
  the end, ``checkpoints/latest`` pointing at the newest; ``--resume`` loads
  it and continues exactly: the data order is a pure function of
  ``(seed, epoch)``, the skipped micro-batches of a part-done epoch are read
  past, and the RNG, scheduler and :class:`TrainState` come back with the
  checkpoint, so the final weights equal an uninterrupted run's;
- trackers through ``log_with`` (default ``jsonl``: ``<run>/logs/metrics.jsonl``);
- progress on the local main process (:mod:`synesthesia.progress`: a tqdm bar on a terminal, else a
  log line with n/N and the ETA every 30 s);
- model selection on val (top-1, evaluated after every epoch; ``best/``),
  early stopping on it (``train.early_stop_patience`` epochs without a better
  val accuracy end the run, once ``train.early_stop_min_epochs`` have trained;
  ``train.epochs`` caps it and sizes the cosine
  schedule), and the test split evaluated once, at the end, with the selected
  weights.

What trains is built in :mod:`synesthesia.train.build` (the teacher, with
cross-entropy or a teacher objective, or a student and its method, with the
frozen teacher) and optimised through :mod:`synesthesia.train.objectives`.
A teacher objective's ``after_backward`` runs on the sync step (after the
backward, before clipping and the optimizer step), val/test are evaluated with
its ``predict``, and its own parameters (basis-realloc's fusion head) train
with the teacher. Such a run is ``teacher-<objective>-<source>-s<seed>`` (the
plain one ``teacher-<source>-s<seed>``), so both coexist; ``best/method.safetensors``
holds the objective's state beside the teacher's weights. A student reads only
the teacher (``train.teacher=teacher-modalimmune-latent-s0`` picks that one;
it distils from the teacher network's logits and tokens, not from an
objective's head). Every teacher run writes to metrics.json a robustness report
(test accuracy with all modalities, each removed, each corrupted by noise and
by shuffling; :func:`~synesthesia.methods.teacher_probes.modality_robustness`),
the plain teacher's report beside it when that run exists, and collapse
diagnostics (stable/effective rank, per-modality contribution) on a test batch.
A student alone is exported to ``export/``.

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

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from synesthesia.config import to_dict, write_resolved
from synesthesia.progress import progress
from synesthesia.shards.schema import read_json_file
from synesthesia.train.build import (
    check_config,
)
from synesthesia.train.checkpoint import (
    checkpoint_path,
    copy_best,
    load_method_state,
    load_weights,
    mark_latest,
    save_method_state,
    save_training_state,
    save_weights,
    source_tag,
    state_digest,
    teacher_objective,
)
from synesthesia.train.evaluate import (
    evaluate,
    objective_predictors,
    robustness_report,
    student_predictors,
    teacher_predictors,
    to_device,
)
from synesthesia.train.export import export_student
from synesthesia.train.objectives import privileged_inputs
from synesthesia.train.samples import IMAGENET_MEAN, IMAGENET_STD
from synesthesia.train.session import Session, resume_from, setup, unwrap_models
from synesthesia.train.trackers import flat_config, tracker_init_kwargs
from synesthesia.utils import atomic_write_text

logger = logging.getLogger(__name__)


def train(cfg, out: str | Path = "runs", resume: str | None = None) -> dict[str, Any]:
    """Train the teacher or a student as ``cfg`` says; returns (and writes) ``metrics.json``'s content."""
    check_config(cfg)
    s = setup(cfg, Path(out))
    if resume is not None:
        resume_from(s, resume)
    if s.accelerator.is_main_process:
        s.run.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, s.run)
    s.accelerator.init_trackers(
        cfg.name,
        config=flat_config(to_dict(cfg)),
        init_kwargs=tracker_init_kwargs(cfg.train.log_with, cfg.train.tracker_kwargs),
    )
    unwrap_models(s)
    bar = progress(
        total=s.total_updates,
        initial=s.state.step,
        disable=not s.accelerator.is_local_main_process,
        desc=s.run.name,
        unit="step",
    )
    start_time = time.perf_counter()
    while s.state.epoch < s.t.epochs and not s.state.stopped:
        train_epoch(s, bar)
        end_epoch(s)
    bar.close()
    return finish(s, time.perf_counter() - start_time)


# ----------------------------------------------------------------------------- the loop


def train_epoch(s: Session, bar) -> None:
    """One epoch of micro-batches from where the state says (a resumed epoch skips what it did)."""
    t, state, accelerator = s.t, s.state, s.accelerator
    epoch = state.epoch
    s.trainee.train()
    keys_seen: list[str] = []
    batches = enumerate(s.loaders.train.epoch(epoch, skip=state.batch), start=state.batch)
    while True:
        tick = time.perf_counter()
        index, batch = next(batches, (None, None))
        if batch is None:
            break
        batch = to_device(batch, accelerator.device)
        tock = time.perf_counter()
        s.timing["data_s"] += tock - tick
        s.timing["micro_batches"] += 1
        if t.record_keys:
            keys_seen.extend(batch["keys"])
        window_start = (index // t.grad_accum) * t.grad_accum
        window = min(t.grad_accum, s.steps_per_epoch - window_start)
        sync = index + 1 == window_start + window
        with nullcontext() if sync else accelerator.no_sync(s.trainee):
            with accelerator.autocast():
                terms = s.trainee(batch, teacher_forward(s, batch))
            accelerator.backward(terms["loss"] / window)
        s.samples_seen += batch["label"].numel()
        if sync:
            optimizer_step(s, terms, index, bar)
        s.timing["step_s"] += time.perf_counter() - tock
    if t.record_keys:
        _record_keys(s.run, accelerator.process_index, epoch, keys_seen)


def teacher_forward(s: Session, batch: dict[str, Any]):
    """The frozen teacher's output on ``batch`` (students; None otherwise), its time counted."""
    if s.frozen is None:
        return None
    cuda = s.accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        teacher_out = s.frozen(
            batch["rgb"], privileged_inputs(batch), present=batch.get("present"), layers=s.teacher_layers
        )
    if cuda:
        torch.cuda.synchronize()
    s.timing["teacher_forward_s"] += time.perf_counter() - start
    return teacher_out


def optimizer_step(s: Session, terms: dict[str, Any], index: int, bar) -> None:
    """The sync step of an accumulation window: objective hook, clip, step, schedule, log, checkpoint."""
    t, state, accelerator = s.t, s.state, s.accelerator
    unscaled = False
    if s.objective is not None:
        # between backward and step, on the whole window's gradients (unscaled under fp16)
        if accelerator.mixed_precision == "fp16":
            accelerator.unscale_gradients()
            unscaled = True
        terms = {**terms, **s.objective.after_backward(s.model)}
    if t.clip_grad > 0:
        if unscaled:  # accelerate's clip would unscale a second time
            torch.nn.utils.clip_grad_norm_(s.trainee.parameters(), t.clip_grad)
        else:
            accelerator.clip_grad_norm_(s.trainee.parameters(), t.clip_grad)
    s.optimizer.step()
    if not accelerator.optimizer_step_was_skipped:
        s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.batch = index + 1
    bar.update(1)
    logs = {f"train/{k}": float(v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()}
    logs["train/lr"] = s.scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{logs['train/loss']:.4f}", epoch=state.epoch)
    accelerator.log(logs, step=state.step)
    epoch_done = index + 1 == s.steps_per_epoch
    if t.save_every and state.step % t.save_every == 0 and not epoch_done:
        save_checkpoint(s)


def end_epoch(s: Session) -> None:
    """Validate, select (``best/``), decide on early stopping, then checkpoint (a resume starts at
    the next epoch)."""
    t, state, accelerator = s.t, s.state, s.accelerator
    epoch = state.epoch
    state.epoch, state.batch = epoch + 1, 0
    record: dict[str, Any] = {"epoch": epoch, "step": state.step}
    val_loader = s.loaders.val
    if val_loader is not None:
        s.model.eval()
        predictors = _predictors(s.model, t.stage, objective=s.objective)
        record.update(evaluate(predictors, val_loader, accelerator)[_main(t.stage)])
        accelerator.log({"val/accuracy": record["accuracy"], "val/loss": record["loss"]}, step=state.step)
    state.history.append(record)
    if not state.best or record.get("accuracy", 0.0) > state.best.get("accuracy", 0.0) or val_loader is None:
        state.best = dict(record)
        if accelerator.is_main_process:
            save_best(s)
    accelerator.wait_for_everyone()
    if val_loader is not None and early_stop_due(
        state.history, state.best, t.early_stop_patience, t.early_stop_min_epochs
    ):
        state.stopped = True
        logger.info(
            "%s: val accuracy has not improved for %d epochs (best %.4f at epoch %d): stopping",
            s.run.name,
            t.early_stop_patience,
            state.best.get("accuracy", 0.0),
            state.best.get("epoch", 0),
        )
    last = state.epoch == t.epochs or state.stopped
    if last or (t.save_every and state.step % t.save_every == 0):
        save_checkpoint(s)


def early_stop_due(
    history: list[dict[str, Any]], best: dict[str, Any], patience: int, min_epochs: int = 0
) -> bool:
    """Whether the last ``patience`` epochs of ``history`` all came after the selected (best-on-val)
    epoch without beating it; never with ``patience`` 0, nor before ``min_epochs`` epochs trained."""
    if patience <= 0 or not history or "epoch" not in best:
        return False
    if history[-1]["epoch"] + 1 < min_epochs:  # epochs count from 0
        return False
    return history[-1]["epoch"] - best["epoch"] >= patience


def save_best(s: Session) -> None:
    save_weights(s.model, s.model_config, s.run / "best")
    if s.objective is not None or s.student_method is not None:
        save_method_state(s.objective or s.student_method, s.run / "best")


def save_checkpoint(s: Session) -> None:
    path = checkpoint_path(s.run, s.state.step)
    save_training_state(path, s.accelerator, s.trainee, s.optimizer, s.scheduler, s.state)
    if s.accelerator.is_main_process:
        copy_best(s.run / "best", path / "best")  # a checkpoint is whole: resuming restores the selection
    s.accelerator.wait_for_everyone()  # every rank's RNG is written before ``latest`` names it
    if s.accelerator.is_main_process:
        mark_latest(s.run, path, s.t.keep_checkpoints)
    s.accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- the end


def finish(s: Session, elapsed: float) -> dict[str, Any]:
    """Test the selected weights once, write ``metrics.json`` and (students) the export."""
    from accelerate.utils import gather_object

    t, state, accelerator, model, objective = s.t, s.state, s.accelerator, s.model, s.objective
    # every rank's final weights, hashed: replicas that drifted apart would show here
    digests = gather_object([state_digest(model)])

    # test: once, at the end, with the selected weights
    best_state, _ = load_weights(s.run / "best")
    model.load_state_dict(best_state)
    model.eval()
    if objective is not None:
        objective.load_state_dict(load_method_state(s.run / "best"))
        objective.eval()
    metrics = run_metrics(s, elapsed, digests)
    test_loader = s.loaders.test
    if test_loader is not None:
        results = evaluate(
            _predictors(model, t.stage, missing=True, objective=objective), test_loader, accelerator
        )
        metrics["test"] = results[_main(t.stage)]
        if t.stage == "teacher":
            metrics["test_missing"] = {name: r["accuracy"] for name, r in results.items()}
            metrics.update(robustness_report(model, objective, test_loader, accelerator, seed=t.seed))
            plain = s.run.parent / f"teacher-{source_tag(t)}-s{t.seed}" / "metrics.json"
            if objective is not None and plain.is_file():
                plain_metrics = read_json_file(plain)  # another run's file: read as hostile
                if isinstance(plain_metrics, dict):
                    metrics["robustness_plain_teacher"] = plain_metrics.get("robustness")
        accelerator.log({"test/accuracy": metrics["test"]["accuracy"]}, step=state.step)
    if accelerator.is_main_process:
        atomic_write_text(s.run / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if t.stage == "student":
            export_student(model, s.run / "export", export_info(s, metrics))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def run_metrics(s: Session, elapsed: float, digests: list[str]) -> dict[str, Any]:
    """metrics.json before the test split: what ran, the val history and selection, speed and timing."""
    t, state, cfg, world = s.t, s.state, s.cfg, s.accelerator.num_processes
    timing = dict(s.timing)
    steps_timed = max(timing.pop("micro_batches"), 1)
    timing["step_s"] -= timing["teacher_forward_s"]  # step_s: the student's or teacher's own step
    if s.loaders.train.decoder is not None:  # decoding on the fly: part of data_s, reported alone too
        timing["decode_s"] = s.loaders.train.decode_s
    return {
        "run": str(s.run),
        "stage": t.stage,
        "method": cfg.method.name if t.stage == "student" else teacher_objective(cfg),
        "source": t.source,
        **({"decoded_from": t.decoded_from} if t.source == "decoded" else {}),
        "seed": t.seed,
        "modalities": list(s.spec.sidecars),
        "steps": state.step,
        "epochs": t.epochs,
        "epochs_trained": state.epoch,
        "stopped_early": state.stopped,
        "early_stop_patience": t.early_stop_patience,
        "early_stop_min_epochs": t.early_stop_min_epochs,
        "processes": world,
        "precision": s.accelerator.mixed_precision,  # train.precision, else the launcher's
        "history": state.history,
        "best": state.best,
        "train_samples_per_s": s.samples_seen * world / elapsed if elapsed > 0 else None,
        "timing": {
            f"{k}_per_step": v / steps_timed
            for k, v in timing.items()
            if s.frozen or k != "teacher_forward_s"
        }
        | {"micro_batches": steps_timed, "device": s.accelerator.device.type},
        "final_weights_sha256": digests,
        # bad samples skipped per split (train.on_error), this process's reads; the test
        # loader's record is filled in as the test split is read, before metrics.json is written
        "skipped": {split: loader.skipped for split, loader in vars(s.loaders).items() if loader is not None},
    }


def export_info(s: Session, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the student's export records beside its weights (preprocessing, provenance, accuracy)."""
    return {
        "dataset": s.cfg.dataset,
        "class_names": s.spec.class_names,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "method": s.cfg.method.name,
        "source": s.t.source,
        "modalities": list(s.spec.sidecars),
        "seed": s.t.seed,
        "val_accuracy": s.state.best.get("accuracy"),
        "test_accuracy": metrics.get("test", {}).get("accuracy"),
    }


def _main(stage: str) -> str:
    return "all" if stage == "teacher" else "student"


def _predictors(model: nn.Module, stage: str, missing: bool = False, objective=None) -> dict[str, Any]:
    if objective is not None:
        return objective_predictors(model, objective, missing)
    return teacher_predictors(model, missing) if stage == "teacher" else student_predictors(model)


def _record_keys(run: Path, rank: int, epoch: int, keys: list[str]) -> None:
    """Audit trail: the sample keys this process trained on in ``epoch`` (``<run>/keys/rank<r>.jsonl``)."""
    folder = run / "keys"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{rank}.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": epoch, "rank": rank, "keys": keys}) + "\n")
