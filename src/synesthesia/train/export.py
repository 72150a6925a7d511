"""Exporting the student alone, as a plain timm model, and loading it back in one line.

An export folder is what timm's own ``save_for_hf`` writes, so timm alone loads it:

- ``model.safetensors``: the timm backbone's state dict, its own keys (no teacher, no
  MESSy heads, no wrapper prefix);
- ``config.json``: timm's hub config: ``architecture`` and ``model_args`` (what
  ``timm.create_model`` needs to rebuild it, a project variant included), ``num_classes``,
  ``label_names`` and ``pretrained_cfg`` (input size, mean, std, interpolation, crop);
  under ``synesthesia`` what the project adds: the student config, method, privileged
  source, dataset, seed, val and test accuracy;
- ``README.md``: a model card (``huggingface_hub.ModelCard``) whose snippet needs only timm;
- ``model.onnx`` after ``synesthesia export RUN --onnx``: logits only, dynamic batch.

Loading::

    model = timm.create_model("local-dir:runs/demo/messy-latent-s0/export", pretrained=True)
    model = timm.create_model("hf-hub:user/repo", pretrained=True)   # after push_to_hub
    student = synesthesia.load_student("runs/demo/messy-latent-s0/export")  # StudentOutput

Exports written before this format (``student`` in config.json, keys under ``model.``)
still load with :func:`load_student`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from synesthesia import UserError, __version__
from synesthesia.shards.schema import read_json_file
from synesthesia.utils import atomic_write_text

#: pretrained_cfg keys that describe timm's source weights for the architecture, not ours
SOURCE_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "hf_hub_id", "url")
#: eval preprocessing (train/samples.py RGBTransform): resize the shorter side, centre crop, no margin
INTERPOLATION, CROP_PCT = "bilinear", 1.0

USAGE = """```python
import timm, torch
from PIL import Image

model = timm.create_model("{source}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
logits = model(transform(Image.open("scene.png").convert("RGB")).unsqueeze(0))
label = model.pretrained_cfg["label_names"][logits.argmax(-1).item()]
```"""

CARD = """
# {title}

An RGB-only image classifier (`{backbone}`: timm `{architecture}`, {params:,} parameters) trained with
**{method}** by synesthesia {version}. During training it learned from a multimodal teacher that
saw privileged modalities ({modalities}) as **{source}** inputs; at inference it needs RGB only, and
it costs exactly what the plain timm model costs: it *is* the plain timm model.

| split | top-1 |
| --- | --- |
| val (selection) | {val} |
| test (once, at the end) | {test} |

Dataset `{dataset}`, {num_classes} classes, seed {seed}.

## Use, with timm alone

{usage}

Input: RGB resized to {size}×{size}, scaled to [0, 1], normalised with mean {mean} and std {std}
(`pretrained_cfg` in config.json). Classes: {classes}. `model.onnx`, where present, takes
`pixel_values` (B, 3, {size}, {size}) and returns `logits`.

## Method

Direct Latent Augmentation and MESSy: Sbrolli, Michel, Matteucci, Yamasaki,
*Synesthesia via Direct Latent Augmentation: Bypassing the Decode-Encode Loop
for Cross-Modal Distillation*, ECCV 2026 (arXiv 2606.08336).
"""


def _fmt(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, int | float) else "n/a"


def timm_config(student: torch.nn.Module, info: dict[str, Any]) -> dict[str, Any]:
    """timm's hub config.json for ``student.model`` (``timm.models.save_config_for_hf``), with the
    source-weight fields of its architecture dropped and the project's record under ``synesthesia``."""
    from timm.models._hub import save_config_for_hf

    from synesthesia.train.samples import IMAGENET_MEAN, IMAGENET_STD

    data_config = {
        "input_size": (3, student.image_size, student.image_size),
        "interpolation": INTERPOLATION,
        "crop_pct": CROP_PCT,
        "crop_mode": "center",
        "mean": tuple(info.get("mean") or IMAGENET_MEAN),
        "std": tuple(info.get("std") or IMAGENET_STD),
    }
    model_config = {"label_names": list(info["class_names"])} if info.get("class_names") else {}
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(
            student.model, f"{tmp}/config.json", model_config=model_config, data_config=data_config
        )
        config = json.loads(Path(tmp, "config.json").read_text())
    for key in SOURCE_KEYS:
        config["pretrained_cfg"].pop(key, None)
    if "label_names" in config:  # timm reads them from pretrained_cfg once loaded
        config["pretrained_cfg"]["label_names"] = config["label_names"]
    config["synesthesia"] = {"version": __version__, "student": student.config_dict(), **info}
    return config


def model_card(config: dict[str, Any], source: str) -> Any:
    """The model card (``huggingface_hub.ModelCard``) of an export; ``source`` is what
    ``timm.create_model`` is given in its snippet (``local-dir:…`` or ``hf-hub:…``)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    info, pcfg = config["synesthesia"], config["pretrained_cfg"]
    name = info["student"]["config"]["name"]
    dataset = str(info.get("dataset") or "synesthesia-scenes")
    title = f"{name} — {info.get('method', '?')} ({info.get('source', '?')})"
    results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=split,
            metric_type="accuracy",
            metric_value=float(info[key]),
        )
        for split, key in (("validation", "val_accuracy"), ("test", "test_accuracy"))
        if isinstance(info.get(key), int | float)
    ]
    data = ModelCardData(
        license="apache-2.0",
        library_name="timm",
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "synesthesia", "cross-modal-distillation", info.get("method")],
        datasets=[dataset],
        metrics=["accuracy"],
        model_name=title,
        eval_results=results or None,
    )
    labels = config.get("label_names") or []
    body = CARD.format(
        title=title,
        backbone=name,
        architecture=config["architecture"],
        params=info.get("params", 0),
        method=info.get("method", "?"),
        version=info.get("version", __version__),
        modalities=", ".join(info.get("modalities") or []) or "none",
        source=info.get("source", "?"),
        val=_fmt(info.get("val_accuracy")),
        test=_fmt(info.get("test_accuracy")),
        dataset=dataset,
        num_classes=config["num_classes"],
        seed=info.get("seed", "?"),
        usage=USAGE.format(source=source),
        size=pcfg["input_size"][-1],
        mean=list(pcfg["mean"]),
        std=list(pcfg["std"]),
        classes=", ".join(labels[:20]) + (" …" if len(labels) > 20 else ""),
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def export_student(student: torch.nn.Module, folder: str | Path, info: dict[str, Any]) -> Path:
    """Write ``student`` (a :class:`~synesthesia.models.students.Student`) as a timm export folder.

    ``info`` adds to config.json's ``synesthesia`` record: dataset, class_names (also timm's
    ``label_names``), mean and std (timm's ``pretrained_cfg``; the ImageNet statistics that
    training normalises with by default), method, source, modalities, seed, val and test accuracy.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in student.model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    info = {**info, "params": sum(p.numel() for p in student.parameters())}
    config = timm_config(student, info)
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    model_card(config, f"local-dir:{folder}").save(folder / "README.md")
    return folder


def export_onnx(student: torch.nn.Module, path: str | Path, opset: int | None = None) -> Path:
    """``model.onnx``: ``pixel_values`` (B, 3, S, S) → ``logits`` (B, C), the batch dimension dynamic.

    Exported from the plain timm backbone (``student.model``), through ``torch.export``.
    """
    path = Path(path)
    rgb = torch.zeros(2, 3, student.image_size, student.image_size)
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        student.model.eval(),
        (rgb,),
        str(path),
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    return path


def _local_folder(path: str | Path, revision: str | None, token: str | None) -> Path:
    """An export folder: as given, a student run's ``export``, or a Hub repo id downloaded."""
    path = Path(path)
    if (path / "export" / "config.json").is_file():
        return path / "export"
    if path.exists() or str(path).count("/") != 1:
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), revision=revision, token=token))
    except Exception as exc:  # offline, unknown repo, no access: huggingface_hub raises many types
        raise UserError(f"{path} is neither a folder nor a Hub repo that could be read: {exc}") from None


def load_student(
    path: str | Path,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    token: str | None = None,
) -> torch.nn.Module:
    """The exported student in eval mode, from an export folder, a student run folder or a Hub
    repo id (``user/name``). Its ``forward`` returns a :class:`StudentOutput`; ``.model`` is the
    plain timm model (logits only). Both go through ``torch.export``."""
    from synesthesia.models.students import Student

    path = _local_folder(path, revision, token)
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise UserError(f"{path} is not an exported student (no config.json and model.safetensors)")
    config = read_json_file(config_file)
    if isinstance(config, dict) and "student" in config:  # before the timm format: Student's own keys
        info, target, state = config, "", load_file(str(weights))
    elif isinstance(config, dict) and isinstance(config.get("synesthesia"), dict):
        info, target, state = config["synesthesia"], "model", load_file(str(weights))
    else:
        raise UserError(f"{config_file} does not describe a synesthesia student")
    if "student" not in info:
        raise UserError(f"{config_file} does not describe a student")
    model = Student.from_config_dict(info["student"])
    module = model.get_submodule(target)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{weights} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.export_config = config
    model.export_info = {k: v for k, v in info.items() if k not in ("student", "version", "params")}
    return model.to(device).eval()


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload synesthesia student",
) -> Any:
    """Upload an export folder to the Hub as a timm model (``HfApi.create_repo`` +
    ``upload_folder``): its weights, config.json, model.onnx if present, and a model card whose
    snippet loads ``hf-hub:<repo_id>``. Returns ``upload_folder``'s commit info."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    config = read_json_file(folder / "config.json")
    if not isinstance(config, dict) or "synesthesia" not in config:
        raise UserError(f"{folder} is not a synesthesia export (re-export it with this version)")
    api = HfApi(token=token, library_name="timm")
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("model.safetensors", "config.json", "model.onnx"):
            if (folder / name).is_file():
                shutil.copy2(folder / name, Path(tmp) / name)
        model_card(config, f"hf-hub:{repo_id}").save(Path(tmp) / "README.md")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            revision=revision,
            commit_message=commit_message,
        )
