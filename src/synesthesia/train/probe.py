"""How predictable are the teacher's modality features from the student? A trained MESSy run's heads, scored.

MESSy regresses, for each student layer l and privileged modality m, the
teacher's pooled layer-l tokens of m from the student's layer-l feature through
a small head (``methods/messy.py``). When those targets cannot be predicted from
RGB, the heads fit noise and the term adds nothing but its weight. This probe
measures it on a split the run did not train on (val by default): it rebuilds
the run's student, heads and frozen teacher from the run folder
(``best/model.safetensors``, ``best/method.safetensors``, the teacher run its
``config.json`` names), feeds the split with its privileged inputs (eval view,
no augmentation) and reports per (layer, modality)

- ``r2``: 1 − Σ‖prediction − target‖² ÷ Σ‖target − mean target‖², over the
  split's samples that have the modality (0: no better than the split's mean
  feature; 1: exact);
- ``mse`` (the training loss's form: mean over features and samples) and the
  target's variance, ``target_var``, whose ratio gives the same R².

``synesthesia eval PIPELINE --model RUN --heads`` prints it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from synesthesia import UserError


class _Moments:
    """Running sums over samples for one (layer, modality): squared error, target and target²."""

    def __init__(self) -> None:
        self.n = 0
        self.sse = 0.0
        self.sum: torch.Tensor | None = None
        self.sum_sq = 0.0
        self.dim = 0

    def add(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
        prediction, target = prediction.double(), target.double()
        if mask is not None:
            prediction, target = prediction[mask], target[mask]
        if not len(target):
            return
        self.n += len(target)
        self.dim = target.shape[-1]
        self.sse += float((prediction - target).pow(2).sum())
        total = target.sum(dim=0)
        self.sum = total if self.sum is None else self.sum + total
        self.sum_sq += float(target.pow(2).sum())

    def result(self) -> dict[str, float | int]:
        if self.n == 0 or self.sum is None:
            return {"samples": 0, "r2": float("nan"), "mse": float("nan"), "target_var": float("nan")}
        spread = self.sum_sq - float(self.sum.pow(2).sum()) / self.n  # Σ‖t − mean‖²
        return {
            "samples": self.n,
            "r2": 1.0 - self.sse / spread if spread > 0 else float("nan"),
            "mse": self.sse / (self.n * self.dim),
            "target_var": spread / (self.n * self.dim),
        }


def messy_head_r2(run: str | Path, split: str = "val", shards: str | None = None) -> dict[str, Any]:
    """The heads' R² of MESSy run ``run`` on ``split`` (see the module docstring); ``shards``
    overrides the shard root the run was trained on."""
    from synesthesia.config import replace, written_config
    from synesthesia.train.build import build_models
    from synesthesia.train.checkpoint import load_method_state, load_weights
    from synesthesia.train.data import build_loader
    from synesthesia.train.objectives import privileged_inputs
    from synesthesia.train.sidecars import resolve_data

    run = Path(run)
    written = run / "config.json"
    if not written.is_file():
        raise UserError(f"{run} has no config.json: pass a MESSy student run folder")
    cfg = written_config(json.loads(written.read_text()).get("config", {}))
    if cfg is None:
        raise UserError(f"{written} no longer reads as a pipeline config of this version")
    if cfg.train.stage != "student" or cfg.method.name != "messy":
        raise UserError(
            f"{run} is not a MESSy student run (stage {cfg.train.stage}, method {cfg.method.name})"
        )
    if shards is not None:
        cfg = replace(cfg, [f"train.shards={shards}"])
    spec = resolve_data(cfg)
    if not spec.counts.get(split):
        raise UserError(f"{spec.source_dir} has no {split} split")
    trainee, frozen, _ = build_models(cfg, spec, run.parent.parent)  # runs root: <out>/<pipeline>/<run>
    state, _ = load_weights(run / "best")
    trainee.student.load_state_dict(state)
    trainee.method.load_state_dict(load_method_state(run / "best"))
    trainee.eval()
    method = trainee.method
    layers = method.teacher_layers() if frozen is not None else None
    moments: dict[tuple[int, str], _Moments] = {}
    loader = build_loader(spec, split, cfg.train, train=False)
    with torch.inference_mode():
        for batch in loader.epoch(0):
            student_out = trainee.student(batch["rgb"], layers=trainee.layers or None)
            teacher_out = None
            if frozen is not None:
                teacher_out = frozen(
                    batch["rgb"], privileged_inputs(batch), present=batch.get("present"), layers=layers
                )
            for key, (prediction, target, mask) in method.head_outputs(
                student_out, teacher_out, batch
            ).items():
                moments.setdefault(key, _Moments()).add(prediction, target, mask)
    heads = {f"l{layer}/{modality}": m.result() for (layer, modality), m in sorted(moments.items())}
    return {
        "run": str(run),
        "split": split,
        "target": "latent" if frozen is None else "teacher",
        "heads": heads,
    }
