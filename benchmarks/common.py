"""What every benchmark shares: a --json-out flag, JSON on stdout and a one-line summary."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    return p


def machine() -> dict[str, Any]:
    import os

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def emit(name: str, result: dict[str, Any], summary: str, json_out: str | None = None) -> None:
    """Print the JSON result, then the one-line summary; optionally write the JSON to a file."""
    payload = {"benchmark": name, **result, "machine": machine()}
    text = json.dumps(payload, indent=2, sort_keys=True)
    print(text)
    print(f"{name}: {summary}")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(text + "\n")
