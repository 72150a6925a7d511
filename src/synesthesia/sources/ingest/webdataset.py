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

Tars are read in their order, one sample at a time, by ``_read_tar`` (the one
place that opens a tar: ``synesthesia.shards.reader.iter_shard``). Ingest's
first pass keeps no bytes: an item's ``ref`` is (tar, position in the tar).
Its second pass needs the samples in a permuted order, which a tar (maybe
gzipped, maybe a stream) cannot give cheaply; ``open_reader`` therefore walks
the tars once more in order and spools the bytes of just the wanted samples
(this part's share) into one file in ingest's staging folder, inside
``--out``, indexed by ref, and reads them from there by offset; the file is
removed when the reader closes. Memory stays one sample plus a small index
entry per wanted sample; disk holds this part's share of the input once.
Tars are read by ``iter_shard``: a truncated or corrupt tar (cut
inside a header or member, at a member boundary without its end-of-archive
marker, or not a regular file) loses the rest of that tar, the sample being
read included: one warning, counted as ``corrupt_tar`` in ``tar_errors``
(which the writer adds to ``skipped``). A member over ``items.MAX_FILE_BYTES``
is not read and its sample is counted as ``file_too_large``. A key repeated in
a tar is a duplicate key (the writer keeps the first sample of a key).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.shards.schema import SchemaError
from synesthesia.shards.writer import Manifest
from synesthesia.sources.ingest.items import MAX_FILE_BYTES, Item, _parse_label, sanitise_key, split_word
from synesthesia.storage import as_path, expand_inputs, input_stamp, is_pipe, is_remote

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
        self.urls = expand_inputs(spec)  # local paths, fsspec URLs (s3://…), pipe: commands
        # A source set of ours names its classes in its manifest; labels are indices into them.
        self.class_names = None
        folder = None if is_pipe(spec) or "{" in spec else _as_folder(spec)
        if folder is not None and (folder / "manifest.json").is_file():
            try:
                self.class_names = Manifest.read(folder).extra.get("class_names")
            except UserError:
                self.class_names = None
        self.image_field = image_field
        self.label_field = label_field

    def _pick(self, sample: dict[str, Any], configured: str, candidates: tuple[str, ...]) -> str | None:
        if configured != "auto":
            return configured if configured in sample else None
        return next((name for name in candidates if name in sample), None)

    def _fields(self, sample: dict[str, Any]) -> tuple[bytes, dict[str, tuple[bytes, str]]]:
        """The image bytes and paired signals of a raw sample whose image field is known to be there."""
        image_name = self._pick(sample, self.image_field, WDS_IMAGE_FIELDS)
        signals = {}
        for modality, names in WDS_SIGNAL_FIELDS.items():
            for name in names:
                if name in sample:
                    signals[modality] = (bytes(sample[name]), "." + name.rsplit(".", 1)[1])
                    break
        return bytes(sample[image_name]), signals

    def stamp(self) -> str:
        """The tars' names, sizes and modification times (a changed input changes them)."""
        return "\n".join(f"{url} {input_stamp(url)}" for url in self.urls)

    def items(self, warn: bool = True) -> Iterator[Item]:
        from synesthesia.shards.reader import OversizedMemberError

        self.tar_errors: Counter[str] = Counter()
        for tar_index, url in enumerate(self.urls):
            name = url.rstrip("/").rsplit("/", 1)[-1]  # a path's, a URL's or a pipe command's last word
            split = split_word(name) or "train"
            problems: list[BaseException] = []
            for position, sample in enumerate(_read_tar(url, problems.append)):
                raw_key = sample["__key__"]
                origin = f"{name}:{raw_key}"
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
                yield Item(
                    key=sanitise_key(raw_key),
                    split=split,
                    label=label,
                    origin=origin,
                    load=lambda sample=sample: self._fields(sample),
                    ref=(tar_index, position),
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

    @contextmanager
    def open_reader(self, refs: list[Any], staging: Path) -> Iterator[Callable[[Any], Any]]:
        """A ``load(ref)`` for the wanted ``refs``, from a spool file in ``staging`` (see the module doc)."""
        wanted: dict[int, set[int]] = {}
        for tar_index, position in refs:
            wanted.setdefault(tar_index, set()).add(position)
        if is_remote(staging):  # a bucket cannot be read by offset: spool on this machine's disk
            fd, name = tempfile.mkstemp(prefix=".synesthesia-spool-", suffix=".tmp")
            os.close(fd)
            spool = Path(name)
        else:
            spool = staging / f".spool-{os.getpid()}.tmp"
        index: dict[tuple[int, int], tuple[int, int, list[tuple[str, str, int]]]] = {}
        try:
            with open(spool, "wb") as out:
                offset = 0
                for tar_index, url in enumerate(self.urls):
                    positions = wanted.pop(tar_index, None)
                    if not positions:
                        continue  # nothing of this part in this tar: not read
                    for position, sample in enumerate(_read_tar(url, lambda exc: None)):
                        if position not in positions:
                            continue
                        image, signals = self._fields(sample)
                        out.write(image)
                        parts = []
                        for modality, (data, suffix) in signals.items():
                            out.write(data)
                            parts.append((modality, suffix, len(data)))
                        index[(tar_index, position)] = (offset, len(image), parts)
                        offset += len(image) + sum(n for _, _, n in parts)
            with open(spool, "rb") as fh:

                def load(ref: Any) -> tuple[bytes, dict[str, tuple[bytes, str]]]:
                    if ref not in index:  # the tar changed between the passes
                        raise SchemaError(
                            f"sample {ref} is gone from its tar on a second read", "corrupt_tar"
                        )
                    start, size, parts = index[ref]
                    image = os.pread(fh.fileno(), size, start)
                    signals, at = {}, start + size
                    for modality, suffix, n in parts:
                        signals[modality] = (os.pread(fh.fileno(), n, at), suffix)
                        at += n
                    return image, signals

                yield load
        finally:
            spool.unlink(missing_ok=True)


def _as_folder(spec: str):
    """``spec`` as a folder path when it names one (local or in a bucket), else ``None``."""
    try:
        path = as_path(spec, "ingest.source")
    except UserError:
        return None  # http(s):// and the like: one input tar, not a folder
    return path if path.is_dir() else None


def _read_tar(url: str, handler: Callable[[BaseException], Any]) -> Iterator[dict[str, Any]]:
    """The raw samples of one tar of the source, in order (the one place a source tar is opened)."""
    from synesthesia.shards.reader import iter_shard

    return iter_shard(url, handler, max_member_bytes=MAX_FILE_BYTES)
