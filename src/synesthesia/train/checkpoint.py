"""Run folders, accelerate checkpoints with a ``latest`` pointer, and the selected (``best/``) weights.

A run folder ``<out>/<pipeline name>/<run name>/`` holds::

    config.json              the resolved pipeline config (config.write_resolved)
    checkpoints/step-N/      accelerator.save_state: model, optimizer, scheduler, TrainState, RNG,
                             and best/ as it was then (a checkpoint is whole)
    checkpoints/latest       the name of the newest complete checkpoint (written after it)
    best/model.safetensors   the weights selected on val, with best/model.json to rebuild the model
    best/method.safetensors  teacher objectives only: the objective's own parameters and buffers
                             (e.g. basis-realloc's fusion head), beside the teacher's unchanged ones
    metrics.json             val history, the selection, the test split (evaluated once, at the end)
    logs/                    tracker output (jsonl by default)
    export/                  students only: the deployable model (see synesthesia.train.export)

Resuming reads ``checkpoints/latest``; folder names are never parsed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from synesthesia import UserError
from synesthesia.utils import atomic_write_text

LATEST = "latest"


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

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(asdict(self))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data = json.loads(state["json"])
        for key, value in data.items():
            setattr(self, key, value)


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
    if (
        not candidate.is_dir()
        or not any(candidate.glob("*.safetensors"))
        and not any(candidate.glob("*.bin"))
    ):
        raise UserError(f"no checkpoint to resume from at {candidate}")
    return candidate


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
