"""Experiment trackers for ``accelerator.log``: accelerate's own by name, and a local JSONL default.

``train.log_with`` is ``jsonl`` (default: one JSON object per logged step in
``<run>/logs/metrics.jsonl``, no dependency), any tracker accelerate knows
(``tensorboard``, ``wandb``, ``mlflow``, ...), several separated by commas, or
``none``.
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


def build_trackers(log_with: str, logging_dir: Path) -> list[Any]:
    """The ``log_with`` list for the Accelerator: names accelerate resolves, JSONL as an instance."""
    names = [n.strip() for n in log_with.split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    from accelerate.utils import LoggerType

    valid = {t.value for t in LoggerType} | {"jsonl"}
    out: list[Any] = []
    for name in names:
        if name not in valid:
            raise UserError(
                f"unknown tracker {name!r} in train.log_with; valid: {', '.join(sorted(valid))}, none"
            )
        out.append(JSONLTracker("synesthesia", logging_dir) if name == "jsonl" else name)
    return out


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
