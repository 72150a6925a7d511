"""`synesthesia config PIPELINE [key=value ...] [--section NAME]`.

Prints the resolved config, one key a line: its dotted name, its value, its
default and its comment (the comment beside or above the field in
:mod:`synesthesia.config.sections`, read from its source with ``ast`` and
``tokenize`` once). What a verb would run with, before it runs.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import tokenize
from typing import Any

from synesthesia.cli import add_pipeline_arguments


def add_arguments(parser):
    add_pipeline_arguments(parser)
    parser.add_argument(
        "--section",
        default=None,
        help="the section a bare key (lr=1e-3) belongs to, as the verb reading it would take it",
    )


def run(args) -> int:
    from synesthesia.config import config_hash, load_pipeline

    cfg = load_pipeline(args.pipeline, args.overrides, section=args.section)
    print(f"# {cfg.name}: config hash {config_hash(cfg)}; `key = value  (default ...)  # what it does`")
    print("\n".join(describe(cfg)))
    return 0


@functools.cache
def field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) → the field's comment in config/sections.py: the full-line
    comments right above it and the one at the end of its line, joined."""
    from synesthesia.config import sections

    source = inspect.getsource(sections)
    comments: dict[int, str] = {}  # line → comment text
    full_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                full_line.add(tok.start[0])
    found: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line in full_line:
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[stmt.end_lineno]] if stmt.end_lineno in comments else []
            text = " ".join(above + trailing)
            if text:
                found[(node.name, stmt.target.id)] = text
    return found


def _show(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """One line per key of the dataclass ``cfg`` (recursing into sections and lists of them):
    ``key = value  (default: d)  # comment``."""
    comments = field_comments()
    defaults = type(cfg)()
    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        key, value, default = f"{prefix}{f.name}", getattr(cfg, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            doc = (inspect.getdoc(type(value)) or "").split("\n")[0]
            lines.append(f"# {key}: {doc}" if doc else f"# {key}")
            lines.extend(describe(value, f"{key}."))
            continue
        comment = comments.get((type(cfg).__name__, f.name))
        line = f"{key} = {_show(_asplain(value))}  (default: {_show(_asplain(default))})"
        lines.append(f"{line}  # {comment}" if comment else line)
        if isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    lines.extend(describe(item, f"{key}.{i}."))
    return lines


def _asplain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_asplain(v) for v in value]
    if isinstance(value, dict):
        return {k: _asplain(v) for k, v in value.items()}
    return value
