"""Run folders, checkpoints with a ``latest`` pointer, and the selected (``best/``) weights.

A run folder ``<out>/<pipeline name>/<run name>/`` holds::

    config.json              the resolved pipeline config (config.write_resolved)
    checkpoints/step-N/      a checkpoint (:func:`save_training_state`), and best/ as it was then
                             (a checkpoint is whole)
    checkpoints/latest       the name of the newest complete checkpoint (written after it)
    best/model.safetensors   the weights selected on val, with best/model.json to rebuild the model
    best/method.safetensors  teacher objectives only: the objective's own parameters and buffers
                             (e.g. basis-realloc's fusion head), beside the teacher's unchanged ones
    metrics.json             val history, the selection, the test split (evaluated once, at the end)
    logs/                    tracker output (jsonl by default)
    export/                  students only: the deployable model (see synesthesia.train.export)

Resuming reads ``checkpoints/latest``; folder names are never parsed.

A checkpoint holds no pickle, so resuming from a shared run folder never runs code from it: the
trainee's weights (``model.safetensors``), the optimizer's tensors (``optimizer.safetensors``) with its
param groups and scalars (``optimizer.json``), the :class:`TrainState`, the LR schedule and the
fp16 loss scale (``trainer.json``), and one ``rng-<rank>.safetensors`` per process (python, numpy,
torch and CUDA generator states; scalars in its metadata).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from synesthesia import UserError
from synesthesia.utils import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

LATEST = "latest"
TRAINER = "trainer.json"
CHECKPOINT_FORMAT = 1


def teacher_objective(cfg) -> str | None:
    """The teacher objective a teacher run trains with (``method.name`` of a ``stage = "teacher"``
    method, e.g. ``modalimmune``), or None for the plain teacher (cross-entropy)."""
    from synesthesia.methods import METHODS

    if cfg.train.stage != "teacher" or cfg.method.name not in METHODS:
        return None
    return cfg.method.name if getattr(METHODS.get(cfg.method.name), "stage", "student") == "teacher" else None


def source_tag(train) -> str:
    """The privileged source as run names spell it: ``train.source``, except ``decoded-latents``
    for ``source=decoded`` with ``decoded_from=latents`` (decoded on the fly), so such a run
    never lands in the folder of the run that read stage one's decoded sidecars."""
    if train.source == "decoded" and train.decoded_from == "latents":
        return "decoded-latents"
    return train.source


def default_run_name(cfg) -> str:
    """``teacher-<source>-s<seed>`` for the plain teacher, ``teacher-<objective>-<source>-s<seed>``
    for a teacher trained with a teacher objective, ``<method>-<source>-s<seed>`` for a student;
    ``<source>`` is :func:`source_tag` (``decoded-latents`` when decoding on the fly)."""
    if cfg.train.stage == "teacher":
        objective = teacher_objective(cfg)
        head = f"teacher-{objective}" if objective else "teacher"
    else:
        head = cfg.method.name
    return f"{head}-{source_tag(cfg.train)}-s{cfg.train.seed}"


def run_dir(cfg, out: str | Path = "runs") -> Path:
    """Where ``synesthesia train`` writes a run: ``<out>/<pipeline name>/<train.run_name or default>``."""
    return Path(out) / cfg.name / (cfg.train.run_name or default_run_name(cfg))


def teacher_dir(cfg, out: str | Path = "runs") -> Path:
    """The teacher run a student distils from.

    ``train.teacher`` as a folder path (one that exists, or that has a path
    separator); a bare name (``teacher-modalimmune-latent-s0``) is a run of this
    pipeline, ``<out>/<name>/<train.teacher>``; unset, the plain teacher
    ``<out>/<name>/teacher-<source>-s<seed>`` (``<source>`` as :func:`source_tag`
    spells it: a student decoding on the fly distils from the teacher that did too;
    either teacher loads with either kind of decoded data, so ``train.teacher`` may
    name the other).
    """
    chosen = cfg.train.teacher
    if chosen:
        path = Path(chosen)
        if path.is_dir() or len(path.parts) > 1 or path.is_absolute():
            return path
        return Path(out) / cfg.name / chosen
    return Path(out) / cfg.name / f"teacher-{source_tag(cfg.train)}-s{cfg.train.seed}"


@dataclass
class TrainState:
    """Loop counters and the model-selection record, saved with every checkpoint.

    ``epoch``: the epoch being trained; ``batch``: micro-batches of it already
    done; ``step``: optimizer steps done in all; ``best``: the val record of the
    selected weights; ``history``: one val record per epoch; ``stopped``: the run
    ended early on val (``train.early_stop_patience``), so a resume trains no further.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False


def checkpoint_path(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step}"


def mark_latest(run: Path, checkpoint: Path, keep: int) -> None:
    """Point ``checkpoints/latest`` at ``checkpoint`` and delete all but the ``keep`` newest (0: keep all)."""
    folder = run / "checkpoints"
    history_file = folder / "history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    history = [name for name in history if name != checkpoint.name] + [checkpoint.name]
    atomic_write_text(folder / LATEST, checkpoint.name + "\n")
    if keep > 0:
        for name in history[:-keep]:
            shutil.rmtree(folder / name, ignore_errors=True)
        history = history[-keep:]
    atomic_write_text(history_file, json.dumps(history) + "\n")


def find_checkpoint(resume: str | Path, run: Path) -> Path:
    """The checkpoint to resume from: ``latest`` of ``run``, a run folder, or a checkpoint folder."""
    if str(resume) in ("", "latest", "auto"):
        candidate = run
    else:
        candidate = Path(resume)
    if (candidate / "checkpoints" / LATEST).is_file():
        name = (candidate / "checkpoints" / LATEST).read_text().strip()
        candidate = candidate / "checkpoints" / name
    if candidate.is_dir() and not (candidate / TRAINER).is_file() and any(candidate.glob("*.pkl")):
        raise UserError(
            f"{candidate} is an older, pickled checkpoint, which this version does not load "
            "(a run folder must not be a code-execution path); train the run again"
        )
    if not (candidate / TRAINER).is_file():
        raise UserError(f"no checkpoint to resume from at {candidate}")
    return candidate


def save_training_state(folder: Path, accelerator, trainee, optimizer, scheduler, state: TrainState) -> None:
    """Write a checkpoint into ``folder`` (no pickle): the main process the weights, optimizer and
    trainer state, every process its own RNG. Call it on every process; the caller waits for all."""
    folder.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(trainee)
        _save_tensors(folder / "model.safetensors", unwrapped.state_dict())
        tensors, rest = _flatten_optimizer(optimizer.state_dict())
        _save_tensors(folder / "optimizer.safetensors", tensors)
        atomic_write_text(folder / "optimizer.json", json.dumps(rest, indent=1) + "\n")
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        trainer = {
            "format": CHECKPOINT_FORMAT,
            "train_state": asdict(state),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler,
        }
        atomic_write_text(folder / TRAINER, json.dumps(trainer, indent=1) + "\n")
    tensors, metadata = _rng_state()
    _save_tensors(folder / f"rng-{accelerator.process_index}.safetensors", tensors, metadata)


def load_training_state(folder: Path, accelerator, trainee, optimizer, scheduler, state: TrainState) -> None:
    """Restore what :func:`save_training_state` wrote, on every process (its own rank's RNG); a
    damaged checkpoint, or one of another model, is a UserError."""
    try:
        _load_training_state(folder, accelerator, trainee, optimizer, scheduler, state)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"{folder}: unreadable checkpoint ({exc.__class__.__name__}: {exc})") from None


def _load_training_state(folder: Path, accelerator, trainee, optimizer, scheduler, state: TrainState) -> None:
    trainer = json.loads((folder / TRAINER).read_text())
    if trainer.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{folder}: checkpoint format {trainer.get('format')} is not {CHECKPOINT_FORMAT}")
    accelerator.unwrap_model(trainee).load_state_dict(load_file(str(folder / "model.safetensors")))
    rest = json.loads((folder / "optimizer.json").read_text())
    optimizer.load_state_dict(
        _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), rest, optimizer.state_dict())
    )
    scheduler.load_state_dict(trainer["scheduler"])
    if accelerator.scaler is not None and trainer.get("scaler"):
        accelerator.scaler.load_state_dict(trainer["scaler"])
    saved = trainer["train_state"]
    for name in (f.name for f in fields(TrainState) if f.name in saved):
        setattr(state, name, saved[name])
    rng = folder / f"rng-{accelerator.process_index}.safetensors"
    if rng.is_file():
        _set_rng_state(rng)
    else:  # resumed on more processes than saved: this rank's random streams start afresh
        logger.warning("%s has no RNG state for process %d", folder, accelerator.process_index)


def _save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Own CPU copies (safetensors refuses shared storage), written atomically."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})})


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as tensors ``<param index>.<name>`` plus JSON (param groups, scalars)."""
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(
    tensors: dict[str, torch.Tensor], rest: dict[str, Any], current: dict[str, Any]
) -> dict[str, Any]:
    """The inverse of :func:`_flatten_optimizer`; JSON lists become tuples where ``current`` has tuples
    (AdamW's ``betas``)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for saved, now in zip(rest["param_groups"], current["param_groups"], strict=False):
        groups.append({k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in saved.items()})
    groups += rest["param_groups"][len(groups) :]  # a mismatch is load_state_dict's to report
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's python, numpy, torch (and CUDA) generator states as tensors and metadata."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "python": torch.tensor(internal, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{device}"] = cuda_state
    metadata = {
        "python": json.dumps([version, gauss]),
        "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
    }
    return tensors, metadata


def _set_rng_state(path: Path) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    version, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    kind, pos, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("cuda.")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_weights(model: torch.nn.Module, config: dict[str, Any], folder: Path) -> None:
    """``model.safetensors`` (the state dict, contiguous) and ``model.json`` (what rebuilds it).

    Keys keep their order: a teacher's modality order is its token order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    atomic_write_text(folder / "model.json", json.dumps(config, indent=2) + "\n")


def save_method_state(method: torch.nn.Module, folder: Path) -> None:
    """A method's parameters and buffers (a teacher objective's, or a student method's such as MESSy's
    heads) as ``method.safetensors`` beside the selected weights."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in method.state_dict().items()}
    tmp = folder / ".method.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / "method.safetensors")


def load_method_state(folder: Path) -> dict[str, torch.Tensor]:
    """What :func:`save_method_state` wrote; a UserError when ``folder`` has none."""
    path = folder / "method.safetensors"
    if not path.is_file():
        raise UserError(
            f"{folder} has no method.safetensors (was it trained with a method that has parameters?)"
        )
    return load_file(str(path))


def copy_best(source: Path, target: Path) -> None:
    """Replace ``target`` by a copy of the selected weights in ``source`` (nothing when there are none)."""
    if not (source / "model.safetensors").is_file():
        return
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def load_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and config written by :func:`save_weights`."""
    weights, config = folder / "model.safetensors", folder / "model.json"
    if not weights.is_file() or not config.is_file():
        raise UserError(f"{folder} has no model.safetensors and model.json (is it a finished run?)")
    return load_file(str(weights)), json.loads(config.read_text())


def state_digest(model: nn.Module) -> str:
    """sha256 over a module's state dict (names and bytes, in order): equal iff the weights are equal."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
