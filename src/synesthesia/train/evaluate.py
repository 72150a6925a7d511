"""Top-1 accuracy over a split, summed over ranks; the teacher with each modality missing.

For a teacher, also the robustness report (:func:`robustness_report`): accuracy
with every modality, each one removed (null tokens) and each one corrupted
(Gaussian noise, and shuffled across the batch), and the collapse diagnostics
on one test batch — for the plain teacher, or through a teacher objective's
``predict`` and ``diagnostics``.

Evaluation runs the unwrapped model (no DDP collectives per batch); each rank
reads its own block of the split (every sample once across ranks) and the
counts are summed with one ``accelerator.reduce`` at the end.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from synesthesia.train.data import ShardLoader
from synesthesia.train.objectives import privileged_inputs


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


def objective_predictors(teacher: torch.nn.Module, objective, missing: bool = False) -> dict[str, Callable]:
    """As :func:`teacher_predictors`, through a teacher objective's ``predict(teacher, batch)``."""
    from synesthesia.methods.teacher_probes import privileged, with_privileged

    out = {"all": lambda batch: objective.predict(teacher, batch)}
    if missing:
        for modality in teacher.modalities:

            def predict(batch, _m=modality):
                inputs = {k: v for k, v in privileged(batch).items() if k != _m}
                return objective.predict(teacher, with_privileged(batch, inputs))

            out[f"without_{modality}"] = predict
        out["rgb_only"] = lambda batch: objective.predict(teacher, with_privileged(batch, {}))
    return out


def robustness_report(teacher: torch.nn.Module, objective, loader: ShardLoader, accelerator, seed: int = 0):
    """``{"robustness": {...}, "diagnostics": {...}}`` of a trained teacher (or teacher objective) on ``loader``.

    ``robustness``: top-1 under ``full``, ``removed/<m>``, ``corrupted/<m>``
    (Gaussian noise with the batch's mean and std), ``shuffled/<m>`` (another
    sample's real input) and ``removed/all``
    (:func:`~synesthesia.methods.teacher_probes.modality_robustness`, seeded),
    averaged over ranks by sample count. ``diagnostics``: the objective's
    ``diagnostics`` (else :func:`~synesthesia.methods.teacher_probes.teacher_diagnostics`)
    on the first batch this process reads (of at least 2 samples): per-modality contribution (CE
    without m − CE with all), accuracy without m, stable rank of each
    modality's pooled tokens and stable/effective rank of the fused CLS features.
    """
    from accelerate.utils import gather_object

    from synesthesia.methods.teacher_probes import modality_robustness, teacher_diagnostics, teacher_predict

    inner = (lambda b: objective.predict(teacher, b)) if objective is not None else teacher_predict(teacher)

    def predict(batch: dict[str, Any]) -> torch.Tensor:  # batches stay on the host between conditions
        return inner(to_device(batch, accelerator.device)).float().cpu()

    modalities = list(teacher.modalities)
    # streamed: one pass of the split per corruption (the loader's eval order is fixed), never
    # the whole split in memory
    seen = {"count": 0, "first": None}

    def counted(batches):
        for batch in batches:
            seen["count"] += int(batch["label"].numel())
            if seen["first"] is None and batch["label"].numel() >= 2:
                seen["first"] = batch
            yield batch

    local: dict[str, float] = {}
    diagnostics: dict[str, float] = {}
    batches = loader.epoch(0)
    head = next(batches, None)
    if head is not None:
        with accelerator.autocast():
            local = modality_robustness(
                predict, counted(itertools.chain([head], batches)), modalities, "gaussian", seed
            )
            shuffled = modality_robustness(predict, loader.epoch(0), modalities, "shuffle", seed)
            local.update({f"shuffled/{m}": shuffled[f"corrupted/{m}"] for m in modalities})
            if seen["first"] is not None:
                source = objective.diagnostics if objective is not None else teacher_diagnostics
                report = source(teacher, to_device(seen["first"], accelerator.device))
                diagnostics = {k: float(v) for k, v in report.items()}
    count = seen["count"]
    parts = gather_object([(count, local, diagnostics)])
    total = sum(n for n, _, _ in parts)
    report = {}
    if total:
        names = next(r for n, r, _ in parts if n)
        report = {k: sum(n * r[k] for n, r, _ in parts if n) / total for k in names}
    diag = next((d for _, _, d in parts if d), {})
    return {"robustness": report, "diagnostics": diag}


def evaluate_model(cfg, path, split: str = "test") -> dict[str, Any]:
    """Evaluate an exported student, a student run or a teacher run on ``split`` of ``cfg``'s dataset.

    A teacher of the decoded source reads decoded signals from where ``cfg.train.decoded_from``
    says (stage one's decoded sidecars, or the latents decoded on the fly), whichever way it was
    trained: both give it the same input spec.
    """
    from pathlib import Path

    from accelerate import Accelerator

    from synesthesia import UserError
    from synesthesia.config import replace
    from synesthesia.train.build import load_teacher_objective, use_cpu
    from synesthesia.train.checkpoint import load_weights
    from synesthesia.train.data import build_loader
    from synesthesia.train.export import load_student
    from synesthesia.train.sidecars import resolve_data

    path = Path(path)
    accelerator = Accelerator(cpu=use_cpu(cfg.train.device), mixed_precision=cfg.train.precision)
    objective = None
    if (path / "best" / "model.json").is_file() and not (path / "export").is_dir():
        _, config = load_weights(path / "best")
        if config.get("kind") != "teacher":
            raise UserError(f"{path} is a {config.get('kind')} run without an export folder")
        model, objective = load_teacher_objective(path)
        modalities = json.dumps(list(model.modalities))
        overrides = [f"train.source={config['source']}", f"train.modalities={modalities}"]
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
        spec,
        split,
        cfg.train,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        device=accelerator.device,
    )
    model = model.to(accelerator.device).eval()
    if main == "all":
        if objective is not None:
            objective.to(accelerator.device)
            predictors = objective_predictors(model, objective, missing=True)
        else:
            predictors = teacher_predictors(model, missing=True)
    results = evaluate(predictors, loader, accelerator)
    out = {"model": str(path), "split": split, "dataset": cfg.dataset, **results[main]}
    if main == "all":
        out["missing"] = {name: r["accuracy"] for name, r in results.items()}
    return out
