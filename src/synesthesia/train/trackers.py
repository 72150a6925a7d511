"""Experiment trackers for ``accelerator.log``: accelerate's own by name, and a local JSONL default.

``train.log_with`` is ``jsonl`` (default: one JSON object per logged step in
``<run>/logs/metrics.jsonl``, no dependency), any tracker accelerate knows
(``tensorboard``, ``wandb``, ``mlflow``, ...), several separated by commas, or
``none``. A tracker whose package is not installed is a :class:`~synesthesia.UserError`
naming the package (accelerate would drop it silently). ``train.tracker_kwargs``
(``{tracker: {keyword: value}}``: run names, entity, tags) is what each named tracker's
run starts with (``init_trackers(init_kwargs=...)``): :func:`tracker_init_kwargs`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process

from synesthesia import UserError


class JSONLTracker(GeneralTracker):
    """Appends ``{"step": s, "time": t, **values}`` lines to ``<logging_dir>/metrics.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / "metrics.jsonl"

    @property
    def tracker(self) -> Path:
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "hparams.json").write_text(
            json.dumps(values, indent=2, sort_keys=True, default=str) + "\n"
        )

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, "time": time.time(), **values}, default=float) + "\n")


def tracker_names(log_with: str) -> list[str]:
    """The trackers ``train.log_with`` names (none for ``""`` or ``none``), each checked: an unknown
    name, or one whose package is not installed, is a UserError."""
    names = [n.strip() for n in log_with.split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    valid = {t.value for t in LoggerType} | {"jsonl"}
    available = {LoggerType(t).value for t in get_available_trackers()}
    for name in names:
        if name not in valid:
            raise UserError(
                f"unknown tracker {name!r} in train.log_with; valid: {', '.join(sorted(valid))}, none"
            )
        if name not in ("jsonl", "all") and name not in available:
            # each accelerate tracker's package has its name (tensorboardX also serves tensorboard)
            raise UserError(
                f"train.log_with={name} needs the {name} package, which is not installed: "
                f"pip install {name} (or set train.log_with=jsonl)"
            )
    return names


def build_trackers(log_with: str, logging_dir: Path) -> list[Any]:
    """The ``log_with`` list for the Accelerator: names accelerate resolves, JSONL as an instance."""
    return [
        JSONLTracker("synesthesia", logging_dir) if name == "jsonl" else name
        for name in tracker_names(log_with)
    ]


def tracker_init_kwargs(
    log_with: str, tracker_kwargs: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``train.tracker_kwargs`` checked against ``train.log_with``: each key one of its accelerate
    trackers (the JSONL tracker takes none), so a misspelt name is an error, not a plain run."""
    names = [n for n in tracker_names(log_with) if n not in ("jsonl", "all")]
    for name in tracker_kwargs:
        if name not in names:
            raise UserError(
                f"train.tracker_kwargs.{name}: {name!r} is not a tracker of train.log_with={log_with!r}; "
                f"keys may be: {', '.join(names) or '(none: train.log_with names no accelerate tracker)'}"
            )
    return {name: dict(kwargs) for name, kwargs in tracker_kwargs.items()}


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config flattened to ``a.b: scalar`` pairs (what trackers accept as hyperparameters)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(value)
        elif value is None or isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out
