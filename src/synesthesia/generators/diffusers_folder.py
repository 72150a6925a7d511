"""The diffusers-format folder a ``latent-diffusion`` model is loaded from: found, read, hashed.

:func:`resolve_folder` takes a local folder (it must hold ``model_index.json``)
or a hub id, fetched by huggingface_hub (from the cache only when
``HF_HUB_OFFLINE`` or ``SYNESTHESIA_OFFLINE`` is set); :func:`_read_json` reads
one of its JSON files, a missing or malformed one being a one-line
``UserError``; :func:`folder_sha256` is one hash of its weights and configs
(README and quality.json left out), the ``sha256`` of the generator's identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from synesthesia import UserError

MODEL_INDEX = "model_index.json"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from None


def resolve_folder(weights: str | Path | None) -> Path:
    """A local diffusers-format folder, or a hub id fetched by huggingface_hub (cached / online only)."""
    if not weights:
        raise UserError(
            "latent-diffusion needs weights: a Marigold checkpoint folder or a `synesthesia bootstrap` model folder"
        )
    path = Path(weights).expanduser()
    if path.is_dir():
        if not (path / MODEL_INDEX).is_file():
            raise UserError(f"{path} has no {MODEL_INDEX}: not a diffusers pipeline folder")
        return path
    if path.exists() or str(weights).count("/") != 1:
        raise UserError(f"latent-diffusion weights {weights} is not a folder")
    offline = bool(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("SYNESTHESIA_OFFLINE"))
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(weights), local_files_only=offline))
    except Exception as exc:
        raise UserError(
            f"cannot load {weights} ({exc.__class__.__name__}); download it first, e.g. "
            f"`huggingface-cli download {weights} --local-dir DIR`, and pass weights=DIR"
        ) from None


def folder_sha256(folder: Path) -> str:
    """One sha256 over every weight and config file of a model folder (not its README or quality.json)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if (
            path.is_file()
            and path.suffix in (".safetensors", ".json", ".txt")
            and path.name != "quality.json"
        ):
            from synesthesia.utils import sha256_file

            h.update(f"{path.relative_to(folder).as_posix()}:{sha256_file(path)}\n".encode())
    return h.hexdigest()
