"""The ablation grid: student method × privileged source × seed, and its results file.

The image-only baseline (``ce``) sees no privileged data, so it is run once per
seed with source ``none``; every other method is crossed with every privileged
source that is not ``none``. Teachers are trained once per source (with the
pipeline seed) and shared by all the cells of that source: student seeds vary
the student's initialisation and data order, not the teacher.

A source is one of :data:`SOURCES`, or a *labelled* one, ``<kind>@<label>``
(``latent@weak``): the same kind of privileged data from the generators given
in ``ablate.generators["latent@weak"]``. Labelled sources put several
generators in one grid (a generator-quality sweep), sharing the ``ce`` cells
and paired with them by seed.

A method is a registered student method, or a *labelled* one,
``<method>@<label>`` (``messy@w0.1``): that method with the method-section
fields given in ``ablate.variants["messy@w0.1"]`` (``{weight: 0.1}``) in place
of the pipeline's. Variants put a method's settings side by side in one grid,
paired by seed with ``ce`` and tuned KD. A labelled method is not tuned
(:mod:`~synesthesia.ablate.tuning`): it trains with its variant's fields at
every seed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.config import AblateConfig

SOURCES = ("none", "decoded", "latent", "real")
RESULTS = "results.jsonl"
LABEL = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


def source_kind(source: str) -> str:
    """``latent`` for ``latent`` and ``latent@weak``: the kind of privileged data a source is.

    An unknown kind, a label that is not a short lowercase word, or ``none@…`` is a one-line error.
    """
    kind, at, label = str(source).partition("@")
    if kind not in SOURCES or (at and (kind == "none" or not LABEL.fullmatch(label))):
        raise UserError(
            f"unknown privileged source {source!r}; valid: {', '.join(SOURCES)}, or <kind>@<label> "
            "with a lowercase label of letters, digits, _, . and - (e.g. latent@weak)"
        )
    return kind


def method_kind(method: str) -> str:
    """``messy`` for ``messy`` and ``messy@w0.1``: the registered method a grid method trains.

    A label that is not a short lowercase word is a one-line error (the registry checks the name).
    """
    kind, at, label = str(method).partition("@")
    if at and not LABEL.fullmatch(label):
        raise UserError(
            f"method {method!r}: a labelled method is <method>@<label> with a lowercase label of "
            "letters, digits, _, . and - (e.g. messy@w0.1)"
        )
    return kind


@dataclass(frozen=True)
class Cell:
    """One grid cell; ``name`` is its stable identifier in results.jsonl and on disk."""

    method: str
    source: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.source}-s{self.seed}"

    @property
    def key(self) -> tuple[str, str]:
        """(method, source): what a tuned method's selected setting is per."""
        return self.method, self.source


def expand(cfg: AblateConfig) -> list[Cell]:
    """The cells of a grid, in a fixed order (methods, then sources, then seeds)."""
    for source in cfg.sources:
        if source != source_kind(source) and source not in cfg.generators:
            raise UserError(
                f"source {source!r} is labelled: give its generators as ablate.generators.{source}"
            )
    for method in cfg.methods:
        if method != method_kind(method) and method not in cfg.variants:
            raise UserError(
                f"method {method!r} is labelled: give its settings as ablate.variants.{method} "
                "(e.g. {weight: 0.1})"
            )
    if not cfg.seeds:
        raise UserError("ablate.seeds is empty")
    for name, seq in (("methods", cfg.methods), ("sources", cfg.sources), ("seeds", cfg.seeds)):
        if len(set(seq)) != len(seq):
            raise UserError(f"ablate.{name} has duplicates: {seq}")
    cells = []
    for method in cfg.methods:
        sources = ["none"] if method_kind(method) == "ce" else [s for s in cfg.sources if s != "none"]
        for source in sources:
            for seed in cfg.seeds:
                cells.append(Cell(method, source, seed))
    return cells


def teacher_sources(cells: list[Cell]) -> list[str]:
    """The privileged sources that need a teacher, in grid order."""
    seen: list[str] = []
    for cell in cells:
        if cell.source != "none" and cell.source not in seen:
            seen.append(cell.source)
    return seen


def read_results(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Completed cells by name (the last row wins; a torn last line from a kill is ignored)."""
    path = Path(out_dir) / RESULTS
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "cell" in row:
            rows[row["cell"]] = row
    return rows


def append_result(out_dir: str | Path, cell: Cell, row: dict[str, Any]) -> dict[str, Any]:
    """Append one finished cell to results.jsonl (one line, flushed and fsynced)."""
    return append_row(out_dir, {"cell": cell.name, **asdict(cell), **row})


def append_row(out_dir: str | Path, row: dict[str, Any]) -> dict[str, Any]:
    """Append one row (it must hold ``cell``, its unique name) to results.jsonl, flushed and fsynced.

    A kill can tear at most this last line, which :func:`read_results` then ignores.
    """
    import os

    if "cell" not in row:
        raise ValueError("a results row needs a 'cell' name")
    path = Path(out_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = ""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            prefix = "" if fh.read(1) == b"\n" else "\n"  # start a new line after a torn one
    with open(path, "a") as fh:
        fh.write(prefix + json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return row


def pending(cells: list[Cell], done: dict[str, dict[str, Any]]) -> list[Cell]:
    return [c for c in cells if c.name not in done]
