"""Tuned methods in the ablation: a method's settings trained at the tune seed, the best on val kept.

``kd`` is always tuned over ``ablate.kd_alphas`` × ``ablate.kd_temperatures``;
any other student method can be tuned the same way over the numeric fields of
its method section listed in ``ablate.tune`` (``{messy: {weight: [0.1, 1.0]}}``),
so that a method is not compared at its paper's settings against a baseline
tuned on this data. Per source, every setting is trained at
``ablate.tune_seed`` (default the first seed) and the one with the best **val**
accuracy (:func:`synesthesia.methods.tuned_kd.select_best`: ties by grid order)
is used for every seed, so the tuning run at the tune seed *is* that seed's
cell. Each setting's run is a ``role: "tune"`` row of results.jsonl;
:func:`tuning_jobs` gives the runs and :func:`select_setting`, once they have
finished, the selection and its cost (runs, seconds), which the runner writes to
``tuning.json`` and beside the method's rows. A
one-setting grid is no tuning: it is used as given.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from synesthesia import UserError
from synesthesia.ablate.grid import append_row, method_kind
from synesthesia.ablate.runs import _acc, _finished
from synesthesia.config import MethodConfig, PipelineConfig, to_dict

if TYPE_CHECKING:
    from synesthesia.ablate.runner import Ablation

logger = logging.getLogger(__name__)

# short names of the tunable fields, in run names (messy-latent-s0-w0.1) and in the report
SHORT = {"alpha": "a", "temperature": "T", "weight": "w"}
SYMBOL = {"alpha": "α", "temperature": "T", "weight": "w"}
TUNABLE = tuple(SHORT)  # the numeric fields of the method section


@dataclass(frozen=True)
class Setting:
    """One setting of a tuned method: its name (``a0.5-T4``, ``w0.1``) and its method-section fields."""

    name: str
    fields: dict[str, float]

    @property
    def overrides(self) -> list[str]:
        """The ``method.*`` overrides that train this setting."""
        return [f"method.{key}={json.dumps(value)}" for key, value in self.fields.items()]

    def describe(self) -> str:
        """``α=0.5, T=4``: the setting in words."""
        return describe(self.fields)


def describe(fields: dict[str, Any]) -> str:
    return ", ".join(f"{SYMBOL.get(k, k)}={v:g}" for k, v in fields.items())


def setting_name(fields: dict[str, float]) -> str:
    """A stable, filesystem-safe name: ``a0.5-T4`` for KD (as :func:`tuned_kd.cell_name`), ``w0.1``."""
    return "-".join(f"{SHORT[k]}{v:g}" for k, v in fields.items())


def kd_settings(cfg: PipelineConfig) -> list[Setting]:
    """KD's α × T grid (``ablate.kd_alphas`` × ``ablate.kd_temperatures``), checked, in grid order."""
    from synesthesia.methods.tuned_kd import expand_grid

    options = {"alphas": list(cfg.ablate.kd_alphas), "temperatures": list(cfg.ablate.kd_temperatures)}
    grid = expand_grid(MethodConfig(**{**to_dict(cfg.method), "name": "kd", "options": options}))
    return [Setting(g.name, {"alpha": g.alpha, "temperature": g.temperature}) for g in grid]


def method_settings(cfg: PipelineConfig, method: str, fields: dict[str, Any]) -> list[Setting]:
    """The settings of ``ablate.tune[method]``: every combination of its fields' values, in the
    order given. Their types and ranges were checked when the pipeline was read (check_pipeline
    bounds each value by its own field's range); here, what a grid of settings needs."""
    from synesthesia.methods import METHODS

    where = f"ablate.tune.{method}"
    if method_kind(method) not in METHODS.names():
        raise UserError(f"{where}: unknown method {method!r}; valid: {', '.join(METHODS.names())}")
    if method != method_kind(method):
        raise UserError(
            f"{where}: a labelled method has its one setting (ablate.variants); tune {method_kind(method)}"
        )
    if method in ("ce", "kd"):
        hint = (
            "kd is tuned over ablate.kd_alphas × ablate.kd_temperatures"
            if method == "kd"
            else "ce has no teacher term to weigh"
        )
        raise UserError(f"{where}: not tunable here ({hint})")
    if not isinstance(fields, dict) or not fields:
        raise UserError(f"{where} must map method fields to lists of values, e.g. {{weight: [0.1, 1.0]}}")
    values: dict[str, list[float]] = {}
    for key, vals in fields.items():
        if key not in TUNABLE:
            raise UserError(f"{where}: {key!r} is not a tunable method field; valid: {', '.join(TUNABLE)}")
        if not vals:
            raise UserError(f"{where}.{key} must be a non-empty list of numbers, got {vals!r}")
        if len(set(vals)) != len(vals):
            raise UserError(f"{where}.{key} has repeated values: {vals!r}")
        values[key] = [float(v) for v in vals]
    combos = (dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values()))
    return [Setting(setting_name(chosen), chosen) for chosen in combos]


def tuned_settings(cfg: PipelineConfig) -> dict[str, list[Setting]]:
    """Each tuned method of the grid and its settings: ``kd`` and the methods of ``ablate.tune``
    that are in ``ablate.methods`` (every entry is checked; one for a method this grid leaves out,
    as a sweep over fewer methods does, is not used)."""
    out = {"kd": kd_settings(cfg)} if "kd" in cfg.ablate.methods else {}
    for method, fields in cfg.ablate.tune.items():
        settings = method_settings(cfg, method, fields)
        if method in cfg.ablate.methods:
            out[method] = settings
    for method, settings in out.items():  # each setting's runs are named by it: names must differ
        names = [s.name for s in settings]
        if len(set(names)) != len(names):
            raise UserError(
                f"{method}'s tuned values differ only past 6 significant digits ({', '.join(names)}); "
                "give values that differ sooner"
            )
    return out


def tune_seed(cfg: PipelineConfig) -> int:
    seed = cfg.ablate.tune_seed
    return cfg.ablate.seeds[0] if seed is None else seed


def setting_row(method: str, setting: Setting) -> dict[str, Any]:
    """What a row of a tuned method records of its setting (KD also as kd_alpha and kd_temperature)."""
    row: dict[str, Any] = {"setting": setting.name, "setting_fields": dict(setting.fields)}
    if method == "kd":
        row.update(kd_alpha=setting.fields["alpha"], kd_temperature=setting.fields["temperature"])
    return row


def row_fields(row: dict[str, Any]) -> dict[str, float] | None:
    """The tuned fields a row was trained with (KD rows from before ``setting_fields``: its α and T);
    None for an untuned method's row."""
    if row.get("setting_fields"):
        return row["setting_fields"]
    if row.get("kd_alpha") is not None:
        return {"alpha": row["kd_alpha"], "temperature": row["kd_temperature"]}
    return None


def row_setting(ablation: Ablation, method: str, row: dict[str, Any]) -> Setting | None:
    """The setting a row of a tuned method was trained with (None: one its grid no longer has)."""
    fields = row_fields(row)
    name = None if fields is None else setting_name(fields)
    return next((s for s in ablation.settings[method] if s.name == name), None)


def tuning_jobs(ablation: Ablation, method: str, source: str, done, costs, teachers):
    """The runs that tune ``method`` at ``source`` (its settings at the tune seed without a row yet),
    and the callback that writes each one's ``role: "tune"`` row when it finishes."""
    seed = tune_seed(ablation.cfg)
    settings = ablation.settings[method]
    if len(settings) == 1:
        return [], None
    pending = [s for s in settings if ablation.tune_cell_name(method, source, s) not in done]
    jobs = [ablation.student_job(method, source, seed, s) for s in pending]
    setting_of = {job.name: s for job, s in zip(jobs, pending, strict=True)}

    def tuned(job, result) -> None:
        s = setting_of[job.name]
        row = ablation._row(job, result, curves=False)
        row.update(costs[source])
        row.update(teachers[source])
        name = ablation.tune_cell_name(method, source, s)
        full = {
            "cell": name,
            "method": method,
            "source": source,
            "seed": seed,
            "role": "tune",
            "grid_cell": s.name,
            **setting_row(method, s),
            **row,
        }
        done[name] = append_row(ablation.out, full)

    return jobs, tuned


def select_setting(ablation: Ablation, method: str, source: str, done) -> tuple[Setting, dict[str, Any]]:
    """``method``'s setting at ``source`` once every tuning row is in ``done``: the best on val, and
    what the tuning cost (for ``tuning.json`` and the method's rows)."""
    from synesthesia.methods.tuned_kd import select_best

    settings = ablation.settings[method]
    if len(settings) == 1:
        s = settings[0]
        return s, {"selected": s.name, "fields": s.fields, "runs": 0, "seconds": 0.0}
    rows = [{**done[ablation.tune_cell_name(method, source, s)], "cell": s.name} for s in settings]
    selection = select_best(settings, rows, metric="val_acc")
    best = selection.best
    logger.info(
        "%s tuning (%s): %s selected on val (%.2f %%)",
        method,
        source,
        best.describe(),
        100 * selection.summary[best.name]["mean"],
    )
    return best, {
        "selected": best.name,
        "fields": best.fields,
        "runs": len(rows),
        "seconds": sum(float(r["train_seconds"]) for r in rows if not math.isnan(r["train_seconds"])),
        "val_acc": {name: s["mean"] for name, s in selection.summary.items()},
        "seed": tune_seed(ablation.cfg),
    }


def known_setting(ablation: Ablation, method: str, source: str, done) -> Setting | None:
    """The setting ``method``'s cells at ``source`` will train with, where it is known before any
    work (for the plan): every setting's tuning row is in ``done``, or its tuning run has finished
    (another results folder over the same runs); None while one has not."""
    from synesthesia.methods.tuned_kd import select_best

    settings = ablation.settings[method]
    if len(settings) == 1:
        return settings[0]
    rows = []
    for s in settings:
        row = done.get(ablation.tune_cell_name(method, source, s))
        if row is None:
            job = ablation.student_job(method, source, tune_seed(ablation.cfg), s)
            metrics = _finished(ablation.run_folder(job.name))
            row = None if metrics is None else {"val_acc": _acc(metrics, "best")}
        value = None if row is None else row.get("val_acc")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None  # not trained yet, or a row whose val accuracy is missing or unreadable
        rows.append({"val_acc": value, "cell": s.name})
    return select_best(settings, rows, metric="val_acc").best


def tuning_line(settings: dict[str, list[Setting]], sources: int, seed: int) -> str:
    """The plan's words for the tuning runs: how many, of which methods, at which seed."""
    tuned = {m: s for m, s in settings.items() if len(s) > 1}
    if not tuned:
        return "no tuning"
    runs = sum(len(s) for s in tuned.values()) * sources
    what = ", ".join(
        f"{m}: {len(s)} {'α×T' if m == 'kd' else '×'.join(s[0].fields)} settings" for m, s in tuned.items()
    )
    return (
        f"{runs} tuning runs ({what}; per source at seed {seed}, the best on val reused as that seed's cell)"
    )
