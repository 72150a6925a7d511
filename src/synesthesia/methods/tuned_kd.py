"""Tuned KD: a small α × T grid for knowledge distillation, selected on the validation split.

Knowledge distillation (Hinton, Vinyals, Dean 2015) as the ``kd`` method trains

    L = α·CE(y, s) + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T))

and its two hyper-parameters decide whether "MESSy beats KD" is a finding or an
artefact: a public CIFAR-100 replication of the DLA/MESSy paper found KD with
T=1, α=0.3 (78.00 ± 0.39, 5 seeds) above MESSy (77.45 ± 0.25). So every
comparison this project reports carries a *tuned* KD baseline: the grid below is
trained, the cell with the best mean **validation** accuracy over seeds is kept,
and only that cell's test accuracy is reported. Selecting on a test metric is
refused.

This module is pure logic: :func:`expand_grid` turns one ``MethodConfig`` into
the grid's cells (plain ``MethodConfig`` objects of the ``kd`` method, with the
``key=value`` overrides that reproduce each), and :func:`select_best` picks the
winner from the results the trainer or the ablation collected.
``synesthesia ablate`` drives it (:mod:`synesthesia.ablate.tuning`): the grid is
trained per privileged source at one seed (``ablate.tune_seed``, default the
first), and the selected (α, T) is then trained at every seed; each grid run is
a row of results.jsonl and its cost is reported beside the KD rows.

Grid (``method.options``; defaults documented):

- ``alphas``: the CE weights α, default ``[0.1, 0.3, 0.5, 0.7]`` (0.25–0.3 are
  the paper's and the replication's values; α=1 would be plain CE);
- ``temperatures``: default ``[1.0, 2.0, 4.0]`` (1 the replication's best, 2 the
  paper's, 4 the common Hinton setting);
- ``base``: the method every cell runs, default ``"kd"``.

Ties in mean validation accuracy are broken by the smaller standard deviation
over seeds, then by grid order (smaller α, then smaller T), so the choice is
deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from synesthesia import UserError
from synesthesia.config import MethodConfig

DEFAULT_ALPHAS = (0.1, 0.3, 0.5, 0.7)
DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0)
GRID_KEYS = ("alphas", "temperatures", "base")


@dataclass(frozen=True)
class GridCell:
    """One (α, T) cell: its name, the method config it trains, and the overrides that reproduce it."""

    name: str
    alpha: float
    temperature: float
    method: MethodConfig

    @property
    def overrides(self) -> list[str]:
        """``key=value`` pipeline overrides selecting this cell (``synesthesia train p.yaml ...``)."""
        return [
            f"method.name={self.method.name}",
            f"method.alpha={self.alpha!r}",
            f"method.temperature={self.temperature!r}",
            f"method.options={json.dumps(self.method.options, sort_keys=True)}",  # JSON is YAML
        ]


@dataclass(frozen=True)
class Selection:
    """The chosen cell and the per-cell summary it was chosen from (mean/std of the val metric)."""

    best: Any  # a GridCell, or the ablation's setting of a tuned method: anything with a name
    metric: str
    summary: dict[str, dict[str, float]]


def _floats(value: Any, key: str) -> list[float]:
    if not isinstance(value, list | tuple) or not value:
        raise UserError(f"method.options.{key} must be a non-empty list of numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise UserError(f"method.options.{key} must hold numbers, got {v!r}")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise UserError(f"method.options.{key} has repeated values: {value!r}")
    return out


def cell_name(alpha: float, temperature: float) -> str:
    """A stable, filesystem-safe cell name, e.g. ``a0.3-T2``."""
    return f"a{alpha:g}-T{temperature:g}"


def expand_grid(cfg: MethodConfig) -> list[GridCell]:
    """The α × T cells of ``cfg`` (grid from ``cfg.options``), in grid order (α outer, T inner).

    Each cell's ``MethodConfig`` is ``cfg`` with ``name=base``, its α and T, and
    the grid keys removed from ``options`` (other options pass through).
    """
    options = dict(cfg.options)
    alphas = _floats(options.get("alphas", list(DEFAULT_ALPHAS)), "alphas")
    temperatures = _floats(options.get("temperatures", list(DEFAULT_TEMPERATURES)), "temperatures")
    base = options.get("base", "kd")
    if not isinstance(base, str) or not base:
        raise UserError(f"method.options.base must be a method name, got {base!r}")
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise UserError(f"method.options.alphas: α={a:g} is outside [0, 1]")
    for t in temperatures:
        if not t > 0.0 or not math.isfinite(t):
            raise UserError(f"method.options.temperatures: T={t:g} must be a positive number")
    rest = {k: v for k, v in options.items() if k not in GRID_KEYS}
    cells = []
    for a in alphas:
        for t in temperatures:
            method = dataclasses.replace(cfg, name=base, alpha=a, temperature=t, options=dict(rest))
            cells.append(GridCell(cell_name(a, t), a, t, method))
    return cells


def select_best(
    cells: list[Any],
    results: Iterable[Mapping[str, Any]],
    metric: str = "val_acc",
) -> Selection:
    """Pick the cell with the best mean ``metric`` over seeds (cells: anything named, a
    :class:`GridCell` here, a tuned method's setting in the ablation).

    ``results`` are rows with ``"cell"`` (a cell name) and ``metric`` (higher is
    better), one per (cell, seed) run; extra keys are ignored. A metric whose
    name mentions ``test`` is refused: model selection happens on validation.
    Cells with no result are left out; if none has one, that is an error.
    """
    if "test" in metric.lower():
        raise UserError(f"refusing to select the KD cell on {metric!r}: select on a validation metric")
    by_name = {c.name: c for c in cells}
    values: dict[str, list[float]] = {c.name: [] for c in cells}
    for row in results:
        name = row.get("cell")
        if name not in by_name:
            raise UserError(f"result for unknown grid cell {name!r}; cells: {', '.join(by_name)}")
        if metric not in row:
            raise UserError(f"result for cell {name!r} has no {metric!r}; keys: {', '.join(sorted(row))}")
        value = float(row[metric])
        if not math.isfinite(value):
            raise UserError(f"result for cell {name!r}: {metric} is {value}")
        values[name].append(value)
    summary = {
        name: {
            "mean": statistics.fmean(v),
            "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "n": float(len(v)),
        }
        for name, v in values.items()
        if v
    }
    if not summary:
        raise UserError("no grid cell has a result to select from")
    order = {c.name: i for i, c in enumerate(cells)}
    best_name = min(summary, key=lambda n: (-summary[n]["mean"], summary[n]["std"], order[n]))
    return Selection(best=by_name[best_name], metric=metric, summary=summary)
