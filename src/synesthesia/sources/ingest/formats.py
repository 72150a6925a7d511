"""Which reader a source needs: ``detect_format`` and ``open_source``.

``ingest.format`` is ``folder`` (``folder.FolderSource``), ``webdataset``
(``webdataset.WebDatasetSource``), ``hf`` (``hf.HFSource``) or ``auto``, which
picks by looking: a brace pattern or ``.tar`` path is webdataset; a
``.parquet`` file, a folder with parquet files (flat or one folder down) or a
``save_to_disk`` folder is hf; a folder of tars without subfolders is
webdataset; any other folder is an image folder. Any of these may be in a bucket
(``s3://…``); ``pipe:COMMAND`` is a webdataset tar stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.sources.ingest.folder import FolderSource
from synesthesia.sources.ingest.hf import HFSource
from synesthesia.sources.ingest.webdataset import WebDatasetSource
from synesthesia.storage import as_path

FORMATS = ("auto", "folder", "webdataset", "hf")


def detect_format(source: str) -> str:
    """``folder``, ``webdataset`` or ``hf`` for a source path or pattern."""
    if "{" in source or source.startswith("pipe:") or source.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    path = as_path(source, "ingest.source")
    if source.endswith(".parquet"):
        return "hf"
    if not path.is_dir():
        raise UserError(f"ingest source not found: {source}")
    if any((path / n).is_file() for n in ("dataset_dict.json", "dataset_info.json", "state.json")):
        return "hf"
    names = [p.name for p in path.iterdir()]
    if any(path.glob("*.parquet")) or any(path.glob("*/*.parquet")):  # flat, or the hub's data/ layout
        return "hf"
    has_dirs = any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
    if not has_dirs and any(n.endswith((".tar", ".tar.gz", ".tgz")) for n in names):
        return "webdataset"
    return "folder"


def open_source(cfg: Any) -> FolderSource | WebDatasetSource | HFSource:
    """The reader for ``cfg`` (an IngestConfig)."""
    if not cfg.source:
        raise UserError("no ingest source: pass ingest.source=PATH")
    if cfg.format not in FORMATS:
        raise UserError(f"unknown ingest.format {cfg.format!r}; valid: {', '.join(FORMATS)}")
    fmt = detect_format(cfg.source) if cfg.format == "auto" else cfg.format
    if fmt == "folder":
        if not Path(cfg.source).is_dir():
            raise UserError(f"image folder not found: {cfg.source}")
        return FolderSource(Path(cfg.source))
    if fmt == "webdataset":
        return WebDatasetSource(cfg.source, cfg.image_field, cfg.label_field)
    if not Path(cfg.source).exists():
        raise UserError(f"HF dataset not found: {cfg.source}")
    return HFSource(cfg.source, cfg.image_field, cfg.label_field)
