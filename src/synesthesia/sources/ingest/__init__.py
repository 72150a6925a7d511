"""Ingest an existing dataset into canonical source shards (`synesthesia ingest`).

Three kinds of source (``ingest.format``, ``auto`` picks by looking), one
module each:

- ``folder``: image folders, ``ROOT/[split/]class/.../stem.(png|jpg|jpeg)``,
  with paired signals in ``ROOT/depth/``, ``ROOT/audio/`` and ``ROOT/lidar/``
  under the same relative path and stem (``FolderSource``).
- ``webdataset``: existing webdataset tars: a ``.tar`` path, a brace pattern
  or a folder of tars (``WebDatasetSource``).
- ``hf``: HF datasets saved locally, a ``save_to_disk`` folder or parquet
  files (``HFSource``).

The rest of the package:

- ``items``: ``Item`` (what every reader yields) and the rules the readers
  share: keys (``sanitise_key``), split words (``split_word``), labels.
- ``formats``: ``detect_format`` (what ``auto`` picks) and ``open_source``.
- ``checks``: checking images and decoding paired signals (depth, audio,
  LiDAR) into a canonical sample (``build_sample``); bad samples raise
  ``SchemaError`` with a reason.
- ``layout``: pass one, ``list_source`` (keys, labels, splits and small
  locators, no bytes), ``plan`` (present splits kept, missing val/test carved
  out of train by a seeded permutation) and ``Layout`` (each split in a seeded
  permutation of its keys, cut into one chunk per output shard).
- ``staging``: pass two, each chunk built and written into a staging folder,
  and the finished set published onto ``<out>/<dataset>/source``, manifest last.
- ``writer``: the run, ``ingest``, whole or as one part of ``--part i/N``.

Bad samples are skipped with one warning line each and counted by reason in
the manifest's ``skipped``; mistakes of configuration are UserErrors. The same
input and config always give byte-identical shards.
"""

from synesthesia.sources.ingest.checks import (
    FLOAT_DTYPES,
    build_sample,
    check_audio,
    check_depth,
    check_image,
    check_intensity,
    check_lidar,
)
from synesthesia.sources.ingest.folder import IMAGE_SUFFIXES, FolderSource
from synesthesia.sources.ingest.formats import FORMATS, detect_format, open_source
from synesthesia.sources.ingest.hf import HF_IMAGE_COLUMNS, HF_LABEL_COLUMNS, HFSource
from synesthesia.sources.ingest.items import SIGNAL_SUFFIXES, SPLIT_ALIASES, Item, sanitise_key, split_word
from synesthesia.sources.ingest.webdataset import (
    WDS_IMAGE_FIELDS,
    WDS_LABEL_FIELDS,
    WDS_SIGNAL_FIELDS,
    WebDatasetSource,
)
from synesthesia.sources.ingest.writer import SPLITS, ingest, plan

__all__ = [
    "FLOAT_DTYPES",
    "FORMATS",
    "HF_IMAGE_COLUMNS",
    "HF_LABEL_COLUMNS",
    "IMAGE_SUFFIXES",
    "SIGNAL_SUFFIXES",
    "SPLITS",
    "SPLIT_ALIASES",
    "WDS_IMAGE_FIELDS",
    "WDS_LABEL_FIELDS",
    "WDS_SIGNAL_FIELDS",
    "FolderSource",
    "HFSource",
    "Item",
    "WebDatasetSource",
    "build_sample",
    "check_audio",
    "check_depth",
    "check_image",
    "check_intensity",
    "check_lidar",
    "detect_format",
    "ingest",
    "open_source",
    "plan",
    "sanitise_key",
    "split_word",
]
