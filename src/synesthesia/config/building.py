"""Dicts ↔ config dataclasses: type-checked building, plain dicts back, and the config hash.

:func:`build` checks every value against its field's annotation (nested
dataclasses, lists, dicts, optionals, unions) and rejects unknown keys, naming
the valid ones; a :class:`YamlScalar` (a plain YAML scalar that read as a boolean, number or
date, with its source text) is its value, except for a ``str`` field, which takes the text
(``run_name: 2024`` is ``"2024"``, ``yes`` is ``"yes"``; a mixed ``str | bool`` field reads it as
YAML does); :func:`to_dict` is its inverse; :func:`config_hash` hashes a
config's canonical JSON (what run folders and stage-one caches key on);
:func:`written_config` reads a run's written ``config.json`` back, or None when
it no longer builds under this version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from typing import Any, Union

from synesthesia import UserError
from synesthesia.config.sections import PipelineConfig


@dataclasses.dataclass(frozen=True)
class YamlScalar:
    """A plain YAML scalar that read as a boolean, number or date, and the text it was written as."""

    value: Any
    text: str

    def __repr__(self) -> str:
        return repr(self.value)


def plain(value: Any) -> Any:
    """``value`` with every :class:`YamlScalar` replaced by its value (YAML's reading)."""
    if isinstance(value, YamlScalar):
        return value.value
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return plain(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [arg for arg in args if arg is not type(None)]
        if members == [str]:  # str | None: a string field
            return _convert(value, str, where)
        errors = []
        for arg in members:  # a mixed field (str | bool): YAML's reading decides
            try:
                return _convert(plain(value) if arg is str else value, arg, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0] if args else Any, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, YamlScalar):  # `run_name: 2024`, `yes`: the text as written
            return value.text
        raise UserError(f"{where}: expected a string, got {value!r}")
    value = plain(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    raise UserError(f"{where}: unsupported type {_type_name(tp)}")


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are UserErrors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)  # YAML keys may be numbers, dates, None
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(
            f"unknown key {prefix}{unknown[0]}; valid keys{' of ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-JSON form of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_hash(data: Any) -> str:
    """A short stable hash of any JSON-able config (dataclass or mapping)."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def comparable(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with what the launcher decides resolved, to compare two runs' configs by hash:
    ``train.precision`` unset (the launcher's choice) is the ``ACCELERATE_MIXED_PRECISION`` the
    launcher set, else ``"no"`` — so a run written as ``precision: "no"`` (the default before it
    could be unset) is the same run as an unset one trained without a launcher's precision."""
    if cfg.train.precision is not None:
        return cfg
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=launched))


def written_config(data: dict[str, Any]) -> PipelineConfig | None:
    """A pipeline config as a run wrote it (its config.json ``config``), read by this version:
    fields added since take their defaults, so a run stays the same config when a new option
    keeps the old behaviour by default; None when it no longer reads (a field was removed)."""
    try:
        return build(PipelineConfig, dict(data))
    except (UserError, TypeError, ValueError):
        return None


def training_hash(cfg: PipelineConfig | dict[str, Any]) -> str | None:
    """The config hash of what a training run depends on: everything but the ``ablate`` section,
    the ``teacher`` section for a student (``student`` for a teacher), ``train.save_every`` and
    ``train.run_name`` (the run's folder name: a run moved to another name is the same run).

    A written config (a dict) is read by this version first (fields added since take their
    defaults: :func:`~synesthesia.config.written_config`); None when it no longer reads.
    """
    if not isinstance(cfg, PipelineConfig):
        cfg = written_config(cfg)
        if cfg is None:
            return None
    data = to_dict(comparable(cfg))
    data.pop("ablate", None)
    # a student reads no teacher section (its teacher is a trained run, which the ablation
    # identifies by its weights: ablate/reuse.py) and a teacher no student section
    data.pop("teacher" if cfg.train.stage == "student" else "student", None)
    data["train"].pop("save_every", None)  # how often it checkpoints: resuming is exact, the run the same
    data["train"].pop("run_name", None)
    return config_hash(data)
