"""Existing webdataset tars: ``WebDatasetSource``.

A ``.tar`` path, a brace pattern (``data-{000..009}.tar``) or a folder of
tars. The image field is the first of ``rgb.png``, ``rgb.jpg``, ``png``,
``jpg``, ``jpeg``, ``image.png``, ``image.jpg``, ``img.png``, ``img.jpg`` (or
``ingest.image_field``), the label the first of ``cls``, ``label``, ``class``,
``target`` (or ``ingest.label_field``); paired signals are taken from
``depth.npy``, ``audio.flac``/``audio.wav``, ``lidar.npy``/``lidar.bin``
(and ``lidar_intensity.npy``). A tar whose name holds a split word
(``train-000.tar``) belongs to that split; a folder holding a ``manifest.json``
of ours names the classes its integer labels index.

Samples are held in memory from the single listing pass. Tars are read by
``synesthesia.shards.reader.iter_shard``: a truncated or corrupt tar (cut
inside a header or member, at a member boundary without its end-of-archive
marker, or not a regular file) loses the rest of that tar, the sample being
read included: one warning, counted as ``corrupt_tar`` in ``tar_errors``
(which the writer adds to ``skipped``). A member over ``items.MAX_FILE_BYTES``
is not read and its sample is counted as ``file_too_large``. A key repeated in
a tar is a duplicate key (the writer keeps the first sample of a key).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.shards.schema import SchemaError
from synesthesia.shards.writer import Manifest
from synesthesia.sources.ingest.items import MAX_FILE_BYTES, Item, _parse_label, sanitise_key, split_word

logger = logging.getLogger(__name__)

WDS_IMAGE_FIELDS = (
    "rgb.png",
    "rgb.jpg",
    "png",
    "jpg",
    "jpeg",
    "image.png",
    "image.jpg",
    "img.png",
    "img.jpg",
)
WDS_LABEL_FIELDS = ("cls", "label", "class", "target", "cls.txt", "label.txt")
WDS_SIGNAL_FIELDS = {
    "depth": ("depth.npy",),
    "audio": ("audio.flac", "audio.wav"),
    "lidar": ("lidar.npy", "lidar.bin"),
    "lidar_intensity": ("lidar_intensity.npy",),
}


class WebDatasetSource:
    """Existing webdataset tars: a path, a brace pattern or a folder of tars."""

    format = "webdataset"

    def __init__(self, spec: str, image_field: str = "auto", label_field: str = "auto"):
        from braceexpand import braceexpand

        path = Path(spec)
        if path.is_dir():
            urls = sorted(str(p) for p in path.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
            if not urls:
                raise UserError(f"no .tar files in {spec}")
        else:
            urls = list(braceexpand(spec))
            missing = [u for u in urls if not Path(u).is_file()]
            if missing:
                raise UserError(f"webdataset shard not found: {missing[0]}")
        self.urls = urls
        # A source set of ours names its classes in its manifest; labels are indices into them.
        self.class_names = None
        if path.is_dir() and (path / "manifest.json").is_file():
            try:
                self.class_names = Manifest.read(path).extra.get("class_names")
            except UserError:
                self.class_names = None
        self.image_field = image_field
        self.label_field = label_field

    def _pick(self, sample: dict[str, Any], configured: str, candidates: tuple[str, ...]) -> str | None:
        if configured != "auto":
            return configured if configured in sample else None
        return next((name for name in candidates if name in sample), None)

    def items(self, warn: bool = True) -> Iterator[Item]:
        from synesthesia.shards.reader import OversizedMemberError, iter_shard

        self.tar_errors: Counter[str] = Counter()
        for url in self.urls:
            split = split_word(Path(url).name) or "train"
            problems: list[BaseException] = []
            for sample in iter_shard(url, problems.append, max_member_bytes=MAX_FILE_BYTES):
                raw_key = sample["__key__"]
                origin = f"{Path(url).name}:{raw_key}"
                image_name = self._pick(sample, self.image_field, WDS_IMAGE_FIELDS)
                label_name = self._pick(sample, self.label_field, WDS_LABEL_FIELDS)
                if image_name is None:
                    err = SchemaError(
                        f"{origin}: no image field ({', '.join(k for k in sample if k[0] != '_')})",
                        "no_image",
                    )
                    yield Item(key="", split=split, label=None, origin=origin, error=err)
                    continue
                label = _parse_label(sample.get(label_name)) if label_name else None
                if label is None:
                    err = SchemaError(f"{origin}: no usable label field", "no_label")
                    yield Item(key="", split=split, label=None, origin=origin, error=err)
                    continue
                signals = {}
                for modality, names in WDS_SIGNAL_FIELDS.items():
                    for name in names:
                        if name in sample:
                            signals[modality] = (bytes(sample[name]), "." + name.rsplit(".", 1)[1])
                            break
                data = (bytes(sample[image_name]), signals)
                yield Item(
                    key=sanitise_key(raw_key),
                    split=split,
                    label=label,
                    origin=origin,
                    load=lambda data=data: data,
                )
            for problem in problems:
                if isinstance(problem, OversizedMemberError):
                    self.tar_errors["file_too_large"] += 1
                    if warn:
                        logger.warning("skipped a sample of %s", problem)
                else:
                    # a tar reader cannot resynchronise after a bad entry: the rest of this tar is lost
                    self.tar_errors["corrupt_tar"] += 1
                    if warn:
                        logger.warning("skipped the rest of %s: truncated or corrupt tar (%s)", url, problem)
