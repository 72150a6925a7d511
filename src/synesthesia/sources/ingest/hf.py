"""HF datasets saved locally: ``HFSource``.

A ``save_to_disk`` folder (``load_from_disk``) or parquet files (a file or a
folder; a split word in a file name gives its split). The image column is the
first ``Image`` feature (or one named ``image``/``img``, or
``ingest.image_field``), read undecoded; the label column the first
``ClassLabel`` (or ``label``/``labels``/``cls``/``class``/``target``/
``fine_label``), whose names become the class names. Columns named ``depth``,
``audio`` (an ``Audio`` feature) and ``lidar`` become paired signals. Splits
other than train/val/test (after ``SPLIT_ALIASES``) are ignored with a
warning. Rows are read lazily, when written (an item's ``ref`` is its split
and row).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from synesthesia import UserError
from synesthesia.shards.schema import SchemaError, encode_npy
from synesthesia.sources.ingest.items import (
    SIGNAL_SUFFIXES,
    SPLIT_ALIASES,
    Item,
    _parse_label,
    direct_reader,
    read_regular,
    sanitise_key,
    split_word,
)

logger = logging.getLogger(__name__)

HF_IMAGE_COLUMNS = ("image", "img", "rgb", "picture")
HF_LABEL_COLUMNS = ("label", "labels", "cls", "class", "target", "fine_label")


class HFSource:
    """An HF dataset saved with ``save_to_disk``, or parquet files."""

    format = "hf"

    def __init__(self, spec: str, image_field: str = "auto", label_field: str = "auto"):
        import datasets

        path = Path(spec)
        if path.is_dir() and any(
            (path / n).is_file() for n in ("dataset_dict.json", "dataset_info.json", "state.json")
        ):
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as exc:
                raise UserError(
                    f"{spec}: cannot load the saved HF dataset ({exc.__class__.__name__})"
                ) from None
        else:
            files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
            if not files:
                raise UserError(f"{spec}: neither a saved HF dataset nor parquet files")
            data_files: dict[str, list[str]] = {}
            for f in files:
                data_files.setdefault(split_word(f.name) or "train", []).append(str(f))
            try:
                loaded = datasets.load_dataset("parquet", data_files=data_files)
            except Exception as exc:
                raise UserError(f"{spec}: cannot read the parquet files ({exc.__class__.__name__})") from None
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({"train": loaded})
        self.splits: dict[str, Any] = {}
        for name, ds in loaded.items():
            canonical = SPLIT_ALIASES.get(name.lower())
            if canonical is None:
                logger.warning("ignoring split %r of %s (not train/val/test)", name, spec)
                continue
            if canonical in self.splits:
                raise UserError(f"{spec}: two splits map to {canonical!r}")
            self.splits[canonical] = ds
        if not self.splits:
            raise UserError(f"{spec}: no train/val/test split")
        features = next(iter(self.splits.values())).features
        self.image_column = self._find_column(
            features, image_field, spec, datasets.Image, HF_IMAGE_COLUMNS, "image_field"
        )
        self.label_column = self._find_column(
            features, label_field, spec, datasets.ClassLabel, HF_LABEL_COLUMNS, "label_field"
        )
        label_feature = features[self.label_column]
        self.class_names = (
            list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
        )
        self.signal_columns = {m: m for m in SIGNAL_SUFFIXES if m in features}
        for name, ds in self.splits.items():
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
            if "audio" in self.signal_columns and isinstance(features["audio"], datasets.Audio):
                ds = ds.cast_column("audio", datasets.Audio(decode=False))
            self.splits[name] = ds

    @staticmethod
    def _find_column(
        features: Any, configured: str, spec: str, feature_type: type, names, option: str
    ) -> str:
        """The configured column, else the first of ``feature_type`` (``datasets.Image`` or
        ``ClassLabel``), else the first of the usual ``names``."""
        if configured != "auto":
            if configured not in features:
                raise UserError(f"{spec}: no column {configured!r}; columns: {', '.join(features)}")
            return configured
        for name, feature in features.items():
            if isinstance(feature, feature_type):
                return name
        for name in names:
            if name in features:
                return name
        what = option.split("_")[0]
        raise UserError(
            f"{spec}: no {what} column found; set ingest.{option} (columns: {', '.join(features)})"
        )

    def items(self, warn: bool = True) -> Iterator[Item]:
        for split, ds in self.splits.items():
            labels = ds[self.label_column]
            keys = ds["__key__"] if "__key__" in ds.column_names else None
            for index, label in enumerate(labels):
                raw_key = str(keys[index]) if keys is not None else f"{split}-{index:08d}"
                if isinstance(label, str) and self.class_names is None:
                    parsed: str | int | None = label
                else:
                    parsed = _parse_label(label)
                    if isinstance(parsed, int) and self.class_names is not None:
                        parsed = self.class_names[parsed] if 0 <= parsed < len(self.class_names) else None
                origin = f"{split}[{index}]"
                if parsed is None:
                    err = SchemaError(f"{origin}: no usable label ({label!r})", "no_label")
                    yield Item(key="", split=split, label=None, origin=origin, error=err)
                    continue
                yield Item(
                    key=sanitise_key(raw_key),
                    split=split,
                    label=parsed,
                    origin=origin,
                    load=lambda ds=ds, index=index: self._load(ds, index),
                    ref=(split, index),
                )

    def stamp(self) -> str:
        """The datasets' fingerprints (they change with the data files)."""
        return " ".join(f"{name}:{getattr(ds, '_fingerprint', '')}" for name, ds in self.splits.items())

    def open_reader(self, refs: list[Any], staging: Path) -> AbstractContextManager:
        """Rows are read again by (split, row), in any order."""
        return direct_reader(lambda ref: self._load(self.splits[ref[0]], ref[1]))

    def _load(self, ds: Any, index: int) -> tuple[bytes, dict[str, tuple[bytes, str]]]:
        row = ds[index]
        image = _hf_bytes(row[self.image_column], "image")
        signals = {}
        for modality, column in self.signal_columns.items():
            value = row[column]
            if value is None:
                continue
            if isinstance(value, dict):
                suffix = Path(value.get("path") or "x.wav").suffix.lower() or ".wav"
                signals[modality] = (_hf_bytes(value, modality), suffix)
            else:
                try:
                    array = np.asarray(value)
                except Exception:
                    raise SchemaError(f"{modality} column is not an array", "bad_npy") from None
                if array.dtype == object:
                    raise SchemaError(f"{modality} column is a ragged array", "bad_npy")
                signals[modality] = (encode_npy(array), ".npy")
        return image, signals


def _hf_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path") and os.path.lexists(value["path"]):
            return read_regular(value["path"])
    raise SchemaError(f"{what} has neither bytes nor a readable path", f"unreadable_{what}")
