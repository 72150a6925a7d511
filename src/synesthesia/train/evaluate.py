"""Top-1 accuracy over a split, summed over ranks; the teacher with each modality missing.

Evaluation runs the unwrapped model (no DDP collectives per batch); each rank
reads its own block of the split (every sample once across ranks) and the
counts are summed with one ``accelerator.reduce`` at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from synesthesia.train.data import ShardLoader


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, dict):
            out[key] = {k: v.to(device, non_blocking=True) for k, v in value.items()}
        else:
            out[key] = value
    return out


def privileged_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What the teacher gets beside RGB: the decoded signals when present, else the latents."""
    return batch.get("decoded") or batch.get("latents") or {}


@torch.no_grad()
def evaluate(
    predictors: dict[str, Callable[[dict[str, Any]], torch.Tensor]],
    loader: ShardLoader,
    accelerator,
    epoch: int = 0,
) -> dict[str, dict[str, float]]:
    """``{name: {"accuracy", "loss", "samples"}}`` for each predictor (batch → logits), one pass."""
    names = list(predictors)
    sums = torch.zeros(len(names), 3, dtype=torch.float64, device=accelerator.device)
    for batch in loader.epoch(epoch):
        batch = to_device(batch, accelerator.device)
        labels = batch["label"]
        with accelerator.autocast():
            for i, name in enumerate(names):
                logits = predictors[name](batch).float()
                sums[i, 0] += (logits.argmax(-1) == labels).sum()
                sums[i, 1] += F.cross_entropy(logits, labels, reduction="sum")
                sums[i, 2] += labels.numel()
    sums = accelerator.reduce(sums, reduction="sum")
    return {
        name: {
            "accuracy": float(sums[i, 0] / sums[i, 2].clamp(min=1)),
            "loss": float(sums[i, 1] / sums[i, 2].clamp(min=1)),
            "samples": int(sums[i, 2]),
        }
        for i, name in enumerate(names)
    }


def student_predictors(student: torch.nn.Module) -> dict[str, Callable]:
    return {"student": lambda batch: student(batch["rgb"]).logits}


def teacher_predictors(teacher: torch.nn.Module, missing: bool = False) -> dict[str, Callable]:
    """``all`` (every modality given) and, with ``missing``, ``without_<m>`` for each modality m."""
    out = {
        "all": lambda batch: (
            teacher(batch["rgb"], privileged_inputs(batch), present=batch.get("present")).logits
        )
    }
    if missing:
        for modality in teacher.modalities:

            def predict(batch, _m=modality):
                inputs = {k: v for k, v in privileged_inputs(batch).items() if k != _m}
                return teacher(batch["rgb"], inputs, present=batch.get("present")).logits

            out[f"without_{modality}"] = predict
        out["rgb_only"] = lambda batch: teacher(batch["rgb"], {}).logits
    return out


def evaluate_model(cfg, path, split: str = "test") -> dict[str, Any]:
    """Evaluate an exported student, a student run or a teacher run on ``split`` of ``cfg``'s dataset."""
    from pathlib import Path

    from accelerate import Accelerator

    from synesthesia import UserError
    from synesthesia.config import replace
    from synesthesia.train.checkpoint import load_weights
    from synesthesia.train.data import build_loader, resolve_data
    from synesthesia.train.export import load_student
    from synesthesia.train.loop import use_cpu

    path = Path(path)
    accelerator = Accelerator(cpu=use_cpu(cfg.train.device), mixed_precision=cfg.train.precision)
    if (path / "best" / "model.json").is_file() and not (path / "export").is_dir():
        state, config = load_weights(path / "best")
        if config.get("kind") != "teacher":
            raise UserError(f"{path} is a {config.get('kind')} run without an export folder")
        from synesthesia.models.teacher import MultimodalTeacher

        model = MultimodalTeacher.from_config_dict(config["model"])
        model.load_state_dict(state)
        modalities = json.dumps(list(model.modalities))
        overrides = [f"train.source={config['source']}", f"train.modalities={modalities}"]
        predictors = teacher_predictors(model, missing=True)
        main = "all"
    else:
        model = load_student(path)
        overrides = ["train.source=none"]
        predictors = student_predictors(model)
        main = "student"
    overrides.append(f"train.image_size={model.image_size}")
    spec = resolve_data(replace(cfg, overrides))
    if not spec.counts.get(split):
        raise UserError(f"{spec.source_dir} has no {split} split")
    loader = build_loader(
        spec, split, cfg.train, rank=accelerator.process_index, world=accelerator.num_processes
    )
    model = model.to(accelerator.device).eval()
    results = evaluate(predictors, loader, accelerator)
    out = {"model": str(path), "split": split, "dataset": cfg.dataset, **results[main]}
    if main == "all":
        out["missing"] = {name: r["accuracy"] for name, r in results.items()}
    return out
