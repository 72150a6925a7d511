"""Pipeline files and overrides: YAML → :class:`~synesthesia.config.sections.PipelineConfig`.

:func:`load_pipeline` reads a YAML file (``yaml.safe_load``) and applies
``key.sub=value`` overrides (:func:`parse_override`: the value is read as YAML,
so ``train.modalities=[depth]`` is a list; :func:`apply_overrides`: a bare key
is looked up in the section of the verb being run); :func:`replace` overrides a
built config; :func:`write_resolved` writes the config a run used, with its hash.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from synesthesia import UserError
from synesthesia.config.building import build, config_hash, to_dict
from synesthesia.config.sections import PipelineConfig


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.0.c=value`` → (["a", "b", "0", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any, full: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override {full}: {part!r} is not an index of a list of {len(node)}")
            node = node[int(part)]
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict | list):
            raise UserError(f"override {full}: {'.'.join(path[: i + 1])} is not a section")
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"override {full}: {last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(data: dict[str, Any], overrides: list[str], section: str | None = None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a plain mapping (in place, and returned).

    A bare key that is not a top-level field is taken from ``section`` when given.
    """
    top = {f.name for f in dataclasses.fields(PipelineConfig)}
    for text in overrides:
        path, value = parse_override(text)
        if section and len(path) == 1 and path[0] not in top:
            path = [section, *path]
        _set_path(data, path, value, text)
    return data


# ----------------------------------------------------------------------------- loading


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a pipeline file must be a mapping of sections")
    return data


def load_pipeline(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), section: str | None = None
) -> PipelineConfig:
    """Load a pipeline YAML file (or the defaults when ``path`` is None) with overrides."""
    data = load_yaml(path) if path is not None else {}
    if path is not None and "name" not in data:
        data["name"] = Path(path).stem
    apply_overrides(data, list(overrides), section)
    return build(PipelineConfig, data)


def replace(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A copy of ``cfg`` with overrides applied (type-checked like a file)."""
    data = apply_overrides(to_dict(cfg), overrides)
    return build(PipelineConfig, data)


def write_resolved(cfg: Any, out_dir: str | Path, name: str = "config.json") -> Path:
    """Write the resolved config as JSON beside an output (atomically)."""
    from synesthesia.utils import atomic_write_text

    out = Path(out_dir) / name
    payload = {
        "config": to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg,
        "config_hash": config_hash(cfg),
    }
    atomic_write_text(out, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return out
