"""Exporting the student alone, and loading it back in one line.

An export folder holds ``model.safetensors`` (the student's weights only: no
teacher, no MESSy heads), ``config.json`` (what rebuilds it, the classes and the
input normalisation) and ``README.md`` (a model card). Its inference cost is
that of the plain student: it *is* the plain student::

    import synesthesia
    model = synesthesia.load_student("runs/demo/messy-latent-s0/export")
    logits = model(rgb).logits        # rgb: (B, 3, S, S), normalised with config.json's mean/std
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from synesthesia import UserError, __version__
from synesthesia.shards.schema import read_json_file
from synesthesia.utils import atomic_write_text

CARD = """---
library_name: synesthesia
tags: [image-classification, cross-modal-distillation, direct-latent-augmentation, {method}]
---

# {title}

An RGB-only image classifier ({backbone}, {params:,} parameters) trained with
**{method}** by synesthesia {version}. During training it
learned from a multimodal teacher that saw privileged modalities
({modalities}) as **{source}** inputs; at inference it needs RGB only, and it
costs exactly what the plain {backbone} costs.

| split | top-1 |
| --- | --- |
| val (selection) | {val} |
| test (once, at the end) | {test} |

Dataset `{dataset}`, {num_classes} classes, seed {seed}.

## Use

```python
import synesthesia
model = synesthesia.load_student("{folder}")
logits = model(rgb).logits  # rgb: (B, 3, {size}, {size}) float, normalised
```

Input: RGB resized to {size}×{size}, scaled to [0, 1], normalised with mean
{mean} and std {std}. Classes: {classes}.

## Method

Direct Latent Augmentation and MESSy: Sbrolli, Michel, Matteucci, Yamasaki,
*Synesthesia via Direct Latent Augmentation: Bypassing the Decode-Encode Loop
for Cross-Modal Distillation*, ECCV 2026 (arXiv 2606.08336).
"""


def _fmt(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, int | float) else "n/a"


def export_student(student: torch.nn.Module, folder: str | Path, info: dict[str, Any]) -> Path:
    """Write ``student`` (a :class:`~synesthesia.models.students.Student`) as a deployable folder.

    ``info`` adds to config.json: dataset, class_names, normalisation (mean, std),
    method, source, modalities, seed, val and test accuracy.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"student": student.config_dict(), "synesthesia_version": __version__, **info}
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    classes = info.get("class_names") or []
    card = CARD.format(
        title=f"{student.cfg.name} — {info.get('method', '?')} ({info.get('source', '?')})",
        backbone=student.cfg.name,
        params=sum(p.numel() for p in student.parameters()),
        method=info.get("method", "?"),
        version=__version__,
        modalities=", ".join(info.get("modalities") or []) or "none",
        source=info.get("source", "?"),
        val=_fmt(info.get("val_accuracy")),
        test=_fmt(info.get("test_accuracy")),
        dataset=info.get("dataset", "?"),
        num_classes=student.num_classes,
        seed=info.get("seed", "?"),
        folder=str(folder),
        size=student.image_size,
        mean=list(info.get("mean", [])),
        std=list(info.get("std", [])),
        classes=", ".join(classes[:20]) + (" …" if len(classes) > 20 else ""),
    )
    atomic_write_text(folder / "README.md", card)
    return folder


def load_student(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The exported student in eval mode, from an export folder or a student run folder."""
    from synesthesia.models.students import Student

    path = Path(path)
    if (path / "export" / "config.json").is_file():
        path = path / "export"
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise UserError(f"{path} is not an exported student (no config.json and model.safetensors)")
    config = read_json_file(config_file)
    if not isinstance(config, dict) or "student" not in config:
        raise UserError(f"{config_file} does not describe a student")
    model = Student.from_config_dict(config["student"])
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise UserError(
            f"{weights} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.export_config = config
    return model.to(device).eval()
