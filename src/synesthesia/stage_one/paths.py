"""Names and paths of what stage one writes.

- :func:`set_name` - the sidecar folder name of a generator: ``set_name`` or ``<name>-<modality>``;
- :func:`flag_field` - the sidecar field that marks a flagged sample (its latent is all zeros);
- :func:`source_dir`, :func:`latent_dir`, :func:`decoded_dir` - ``<out>/<dataset>/source/``,
  ``<out>/<dataset>/latents/<set>/`` and ``<out>/<dataset>/decoded/<set>/``;
- ``CACHE_KEY``, ``THROUGHPUT`` - the files beside a set's ``manifest.json`` that hold its cache key
  and the wall-clock timings of the run that wrote it.

Pure functions of the configuration: no I/O. ``out`` may be a local folder or an fsspec URL
(``s3://bucket/prefix``); a URL stays a URL (:func:`synesthesia.storage.as_path`), where ``Path()``
would collapse ``s3://b/x`` into the local ``s3:/b/x``.
"""

from __future__ import annotations

from pathlib import Path

from upath import UPath

from synesthesia.config import GeneratorConfig
from synesthesia.storage import as_path

CACHE_KEY = "cache_key.json"
THROUGHPUT = "throughput.json"


def set_name(gcfg: GeneratorConfig) -> str:
    """The sidecar folder name of a generator: ``set_name`` or ``<name>-<modality>``."""
    return gcfg.set_name or f"{gcfg.name}-{gcfg.modality}"


def flag_field(modality: str) -> str:
    """The sidecar field that marks a flagged sample (its latent is all zeros)."""
    return f"{modality}.flag.txt"


def source_dir(out: str | Path | UPath, dataset: str) -> Path | UPath:
    return as_path(out, "--out") / dataset / "source"


def latent_dir(out: str | Path | UPath, dataset: str, name: str) -> Path | UPath:
    return as_path(out, "--out") / dataset / "latents" / name


def decoded_dir(out: str | Path | UPath, dataset: str, name: str) -> Path | UPath:
    return as_path(out, "--out") / dataset / "decoded" / name
