"""Pipeline files and overrides: YAML → :class:`~synesthesia.config.sections.PipelineConfig`.

:func:`load_pipeline` reads a YAML file (``yaml.safe_load``) and applies
``key.sub=value`` overrides (:func:`parse_override`: the value is read as YAML,
so ``train.modalities=[depth]`` is a list; a plain scalar that YAML reads as a boolean,
number or date keeps its text, so a string field takes ``train.run_name=2024`` as ``"2024"``
and ``yes`` as ``"yes"``, in a file as on the command line; :func:`apply_overrides`: a bare key
is looked up in the section of the verb being run); :func:`replace` overrides a
built config; :func:`write_resolved` writes the config a run used, with its hash. Both
end in :func:`~synesthesia.config.checks.check_pipeline` (every number bounded, every
output name a plain folder name).

A pipeline file is hostile until read: it must be a regular file of at most 1 MB of
UTF-8 YAML, nested at most 64 levels and at most 100,000 values once its aliases are
expanded (so a "billion laughs" file is refused, not expanded); override values obey
the same limits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from synesthesia import UserError
from synesthesia.config.building import YamlScalar, build, config_hash, plain, to_dict
from synesthesia.config.checks import check_pipeline
from synesthesia.config.sections import PipelineConfig
from synesthesia.utils import UnsafeFile, read_regular_file

MAX_FILE_BYTES = 1 << 20  # a pipeline file
MAX_DEPTH = 64  # nesting of YAML collections
MAX_VALUES = 100_000  # YAML nodes once aliases are expanded


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where there is one: ~20x faster


class _TextLoader(_LOADER):
    """The safe loader, its plain booleans, numbers and dates wrapped as :class:`YamlScalar`."""


def _keeping_text(construct):
    def wrapped(loader, node):
        value = construct(loader, node)
        return YamlScalar(value, node.value) if not node.style else value  # plain: None or ""

    return wrapped


for _tag in ("bool", "int", "float", "timestamp"):
    _tag = f"tag:yaml.org,2002:{_tag}"
    _TextLoader.add_constructor(_tag, _keeping_text(_LOADER.yaml_constructors[_tag]))


def _plain_keys(data: Any) -> Any:
    """Mapping keys as YAML reads them (only values keep their text)."""
    if isinstance(data, dict):
        return {plain(k): _plain_keys(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain_keys(v) for v in data]
    return data


def _check_events(text: str, where: str) -> None:
    """Stream the YAML's events and refuse, before anything is built, a document nested deeper
    than MAX_DEPTH or one that would expand to more than MAX_VALUES nodes once its aliases are
    expanded (each alias counts the size of what it repeats; one inside its own anchor is refused)."""
    sizes: dict[str, int] = {}  # anchor -> expanded size of the node it names
    stack: list[list[Any]] = []  # open collections: [anchor, expanded size so far]
    total = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise UserError(f"{where}: nested deeper than {MAX_DEPTH} levels")
            stack.append([event.anchor, 1])
            size = 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, inner = stack.pop()
            if anchor is not None:
                sizes[anchor] = inner
            if stack:
                stack[-1][1] += inner
            continue
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in stack):
                raise UserError(f"{where}: a value holds itself (alias *{event.anchor} inside its anchor)")
            size = sizes.get(event.anchor, 1)  # an undefined alias: the loader names it
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        else:
            continue
        total += size
        if total > MAX_VALUES:
            raise UserError(f"{where}: more than {MAX_VALUES} values (aliases expanded)")
        if stack and not isinstance(event, yaml.CollectionStartEvent):
            stack[-1][1] += size


def _safe_load(text: str, where: str, keep_text: bool = False) -> Any:
    """``yaml.safe_load`` within the limits above: a UserError past them, yaml.YAMLError for bad syntax.
    With ``keep_text``, plain booleans, numbers and dates are :class:`YamlScalar` (value and text)."""
    _check_events(text, where)
    try:
        if keep_text:
            return _plain_keys(yaml.load(text, Loader=_TextLoader))  # noqa: S506 - a safe loader
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{where}: {str(exc).splitlines()[0]}") from None


def _problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.0.c=value`` → (["a", "b", "0", "c"], value parsed as YAML, its plain booleans and
    numbers as :class:`YamlScalar`, so a string field takes them as written)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} has an empty key")
    try:
        value = _safe_load(raw, f"override {key}", keep_text=True) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _index(part: str, node: list, full: str) -> int:
    """``part`` as an index of the list ``node``, or a UserError."""
    if not (part.isascii() and part.isdigit() and len(part) < 10) or int(part) >= len(node):
        raise UserError(f"override {full}: {part[:20]!r} is not an index of a list of {len(node)}")
    return int(part)


def _set_path(data: dict[str, Any], path: list[str], value: Any, full: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_index(part, node, full)]
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict | list):
            raise UserError(f"override {full}: {'.'.join(path[: i + 1])} is not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_index(last, node, full)] = value
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


def load_yaml(path: str | Path, keep_text: bool = False) -> dict[str, Any]:
    """A pipeline file's mapping; anything but a regular file of at most 1 MB of UTF-8 YAML
    within the nesting and alias limits is a one-line UserError. ``keep_text``: plain booleans,
    numbers and dates are :class:`YamlScalar` (what :func:`build` reads)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"pipeline file not found: {path}")
    try:
        blob = read_regular_file(path, MAX_FILE_BYTES)
    except UnsafeFile as exc:
        if exc.reason == "file_too_large":
            raise UserError(
                f"{path}: a pipeline file must be at most {MAX_FILE_BYTES // (1 << 20)} MB"
            ) from None
        raise UserError(f"pipeline file {path} is not a regular file") from None
    except OSError as exc:
        raise UserError(f"cannot read pipeline file {path}: {exc.strerror or exc}") from None
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        data = _safe_load(text, str(path), keep_text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({_problem(exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", int: "a number", float: "a number"}.get(
            type(plain(data)), "a scalar"
        )
        raise UserError(f"{path}: a pipeline file must be a mapping of sections, got {kind}")
    return data


def load_pipeline(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), section: str | None = None
) -> PipelineConfig:
    """Load a pipeline YAML file (or the defaults when ``path`` is None) with overrides."""
    data = load_yaml(path, keep_text=True) if path is not None else {}
    if path is not None and "name" not in data:
        data["name"] = Path(path).stem
    apply_overrides(data, list(overrides), section)
    return check_pipeline(build(PipelineConfig, data))


def replace(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A copy of ``cfg`` with overrides applied (type-checked like a file)."""
    data = apply_overrides(to_dict(cfg), overrides)
    return check_pipeline(build(PipelineConfig, data))


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
