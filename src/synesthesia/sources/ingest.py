"""Ingest an existing dataset into canonical source shards (`synesthesia ingest`).

Three kinds of source (``ingest.format``, ``auto`` picks by looking):

**Image folder** ::

    ROOT/[split/]class/.../stem.(png|jpg|jpeg)
    ROOT/depth/[split/]class/.../stem.npy           H×W float depth in metres
    ROOT/audio/[split/]class/.../stem.(wav|flac)     any rate; resampled, stored as 16-bit FLAC
    ROOT/lidar/[split/]class/.../stem.(npy|bin)      beams×azimuth range image, or a KITTI Velodyne scan

``split`` is ``train``, ``val`` (or ``validation``/``valid``) or ``test``; the
top-level folders ``depth``, ``audio`` and ``lidar`` hold the paired signals of
the image with the same relative path and stem (they are not classes). The
class is the first folder below the split; hidden files and folders are ignored. The sample key is the relative path
without extension, sanitised: ``/`` becomes ``__``, and every character that is
not an ASCII letter, digit, ``_`` or ``-`` (dots included) becomes ``_``. Keys
longer than 80 characters are shortened with a hash suffix.

**Webdataset tars**: a ``.tar`` path, a brace pattern (``data-{000..009}.tar``)
or a folder of tars. The image field is the first of ``rgb.png``, ``rgb.jpg``,
``png``, ``jpg``, ``jpeg``, ``image.png``, ``image.jpg``, ``img.png``,
``img.jpg`` (or ``ingest.image_field``), the label the first of ``cls``,
``label``, ``class``, ``target`` (or ``ingest.label_field``); paired signals are
taken from ``depth.npy``, ``audio.flac``/``audio.wav``, ``lidar.npy``/``lidar.bin``.
A tar whose name holds a split word (``train-000.tar``) belongs to that split.

**HF datasets saved locally**: a ``save_to_disk`` folder (``load_from_disk``) or
parquet files (a file or a folder; a split word in a file name gives its
split). The image column is the first ``Image`` feature (or one named
``image``/``img``, or ``ingest.image_field``), read undecoded; the label
column the first ``ClassLabel`` (or ``label``/``labels``/``cls``/``class``/
``target``/``fine_label``), whose names become the class names. Columns named
``depth``, ``audio`` (an ``Audio`` feature) and ``lidar`` become paired signals.

Splits present in the source are kept. A missing ``test`` (``val``) split is
carved out of train by a seeded permutation (pipeline ``seed``) of
``ingest.test_fraction`` (``ingest.val_fraction``) of its samples.

Image bytes are stored exactly as read (``rgb.png`` or ``rgb.jpg`` after the
actual format); they are decoded once, only to check them. Bad samples —
unreadable or truncated images, zero-byte files, other image formats, ``.npy``
files with a wrong dtype, rank or a pickle inside, NaN/inf in a signal,
non-UTF-8 names, duplicate keys, the rest of a truncated tar — are skipped with one warning line each and
counted by reason in the manifest's ``skipped``. Mistakes of configuration are
UserErrors. The source is listed once (keys and labels, to plan the splits;
folder and HF samples are then read lazily, webdataset samples are held from
the listing), and the first sample of a key wins.

Order: each split is written in a seeded global permutation of its sorted keys
(``np.random.default_rng([seed, i])``, ``i`` the index of the split in
train, val, test), never in source order — a class-folder source listed in
path order would otherwise give shards of one or two classes each, which
training's shard shuffle and bounded shuffle buffer cannot mix. The label mix
of every shard is recorded in the manifest's ``extra.label_mix`` (see
``synesthesia.shards.mixing``). The set is written to a temporary folder and
moved onto ``<out>/<dataset>/source`` only when complete, manifest last; the
same input and config always give byte-identical shards.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from synesthesia import UserError
from synesthesia.config import PipelineConfig, config_hash, to_dict
from synesthesia.shards.mixing import label_mix_entry
from synesthesia.shards.schema import MAX_KEY_LENGTH, SchemaError, encode_json, encode_npy
from synesthesia.shards.writer import Manifest, ShardInfo, SplitWriter
from synesthesia.sources.lidar import project_scan, read_velodyne_bin
from synesthesia.sources.signals import decode_audio, encode_flac
from synesthesia.utils import sha256_bytes

logger = logging.getLogger(__name__)

FORMATS = ("auto", "folder", "webdataset", "hf")
SPLITS = ("train", "val", "test")  # output splits; the index seeds each one's write order
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Paired-signal folders of the image-folder layout and the file suffixes each accepts.
SIGNAL_SUFFIXES = {"depth": (".npy",), "audio": (".wav", ".flac"), "lidar": (".npy", ".bin")}
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
HF_IMAGE_COLUMNS = ("image", "img", "rgb", "picture")
HF_LABEL_COLUMNS = ("label", "labels", "cls", "class", "target", "fine_label")
FLOAT_DTYPES = ("float16", "float32", "float64")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


# ----------------------------------------------------------------------------- items


@dataclass
class Item:
    """One candidate sample of a source, before checking.

    ``label`` is a class name (str) or index (int); ``load`` returns the image
    bytes and ``{modality: (bytes, suffix)}``, reading lazily. ``error`` marks an
    item known to be bad before loading (skipped and counted when written).
    """

    key: str
    split: str
    label: str | int | None
    origin: str
    load: Callable[[], tuple[bytes, dict[str, tuple[bytes, str]]]] | None = None
    error: SchemaError | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def sanitise_key(parts: list[str] | str) -> str:
    """A format-v1 key from path parts: ``/`` → ``__``, other bad characters (dots too) → ``_``."""
    if isinstance(parts, str):
        parts = [p for p in parts.split("/") if p]
    key = "__".join(_BAD_KEY_CHARS.sub("_", part) for part in parts) or "_"
    if len(key) > MAX_KEY_LENGTH:
        key = f"{key[: MAX_KEY_LENGTH - 17]}-{sha256_bytes(key.encode())[:16]}"
    return key


def split_word(name: str) -> str | None:
    """The canonical split a file or folder name refers to (``train-000.tar`` → train), if any."""
    for token in re.split(r"[-_.\s]+", name.lower()):
        if token in SPLIT_ALIASES:
            return SPLIT_ALIASES[token]
    return None


def _utf8(name: str, origin: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise SchemaError(f"{origin!r}: file name is not valid UTF-8", "non_utf8_name") from None


# ----------------------------------------------------------------------------- folder


class FolderSource:
    """``ROOT/[split/]class/.../stem.(png|jpg|jpeg)`` with paired signals in ``ROOT/<modality>/`` (see module doc)."""

    format = "folder"

    def __init__(self, root: Path):
        self.root = root
        tops = sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and p.name not in SIGNAL_SUFFIXES and not p.name.startswith(".")
        )
        split_dirs = [t for t in tops if t in SPLIT_ALIASES]
        if split_dirs and len(split_dirs) != len(tops):
            others = [t for t in tops if t not in SPLIT_ALIASES]
            raise UserError(
                f"{root} mixes split folders ({', '.join(split_dirs)}) with other folders ({', '.join(others[:3])});"
                " use ROOT/split/class/... or ROOT/class/..."
            )
        self.has_splits = bool(split_dirs)
        if not tops:
            raise UserError(f"{root} has no class folders; the layout is ROOT/[split/]class/image.png")

    def _images(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(relative path, its parts) of every image file, sorted, skipping the signal folders."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = Path(dirpath).relative_to(self.root)
            if rel_dir.parts and rel_dir.parts[0] in SIGNAL_SUFFIXES:
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                found.append(rel_dir.parts + (name,))
        for parts in sorted(found, key=lambda p: [os.fsencode(x) for x in p]):
            yield "/".join(parts), parts

    def items(self, warn: bool = True) -> Iterator[Item]:
        for rel, parts in self._images():
            split = SPLIT_ALIASES[parts[0]] if self.has_splits else "train"
            body = parts[1:] if self.has_splits else parts
            try:
                _utf8(rel, rel)
            except SchemaError as exc:
                yield Item(
                    key="", split=split, label=None, origin=rel.encode("utf-8", "replace").decode(), error=exc
                )
                continue
            if len(body) < 2:
                err = SchemaError(f"{rel}: an image must lie in a class folder", "no_class")
                yield Item(key="", split=split, label=None, origin=rel, error=err)
                continue
            stem_parts = [*parts[:-1], Path(parts[-1]).stem]
            yield Item(
                key=sanitise_key(stem_parts),
                split=split,
                label=body[0],
                origin=rel,
                load=lambda parts=parts: self._load(parts),
            )

    def _load(self, parts: tuple[str, ...]) -> tuple[bytes, dict[str, tuple[bytes, str]]]:
        image = (self.root.joinpath(*parts)).read_bytes()
        signals = {}
        stem = Path(parts[-1]).stem
        for modality, suffixes in SIGNAL_SUFFIXES.items():
            folder = self.root.joinpath(modality, *parts[:-1])
            for suffix in suffixes:
                candidate = folder / f"{stem}{suffix}"
                if candidate.is_file():
                    signals[modality] = (candidate.read_bytes(), suffix)
                    break
        return image, signals


# ----------------------------------------------------------------------------- webdataset


def _parse_label(value: Any) -> str | int | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        try:
            value = value.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        value = value.strip()
        if re.fullmatch(r"\d+", value):
            return int(value)
        return value or None
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    return None


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
        import webdataset as wds

        from synesthesia.shards.reader import ErrorPolicy

        self.tar_errors: Counter[str] = Counter()
        for url in self.urls:
            split = split_word(Path(url).name) or "train"
            policy = ErrorPolicy("skip")
            dataset = wds.WebDataset(url, shardshuffle=False, handler=policy, empty_check=False)
            for sample in dataset:
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
            if policy.counts:
                # a tar reader cannot resynchronise after a bad entry: the rest of this tar is lost
                self.tar_errors["corrupt_tar"] += 1
                if warn:
                    logger.warning("skipped the rest of %s: truncated or corrupt tar", url)


# ----------------------------------------------------------------------------- HF datasets


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
        self.image_column = self._image_column(features, image_field, spec)
        self.label_column = self._label_column(features, label_field, spec)
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
    def _image_column(features: Any, configured: str, spec: str) -> str:
        import datasets

        if configured != "auto":
            if configured not in features:
                raise UserError(f"{spec}: no column {configured!r}; columns: {', '.join(features)}")
            return configured
        for name, feature in features.items():
            if isinstance(feature, datasets.Image):
                return name
        for name in HF_IMAGE_COLUMNS:
            if name in features:
                return name
        raise UserError(
            f"{spec}: no image column found; set ingest.image_field (columns: {', '.join(features)})"
        )

    @staticmethod
    def _label_column(features: Any, configured: str, spec: str) -> str:
        import datasets

        if configured != "auto":
            if configured not in features:
                raise UserError(f"{spec}: no column {configured!r}; columns: {', '.join(features)}")
            return configured
        for name, feature in features.items():
            if isinstance(feature, datasets.ClassLabel):
                return name
        for name in HF_LABEL_COLUMNS:
            if name in features:
                return name
        raise UserError(
            f"{spec}: no label column found; set ingest.label_field (columns: {', '.join(features)})"
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
                )

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
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
    raise SchemaError(f"{what} has neither bytes nor a readable path", f"unreadable_{what}")


# ----------------------------------------------------------------------------- checking


def check_image(data: bytes) -> tuple[str, dict[str, Any]]:
    """(``rgb.png`` | ``rgb.jpg``, metadata) of image bytes, decoding them fully once to check them."""
    if not data:
        raise SchemaError("zero-byte image", "empty_file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in ("PNG", "JPEG"):
                raise SchemaError(f"image format {fmt} is not PNG or JPEG", "unsupported_image")
            im.load()
            im.convert("RGB")
            width, height = im.size
    except SchemaError:
        raise
    except Exception as exc:
        raise SchemaError(f"unreadable image ({exc.__class__.__name__})", "unreadable_image") from None
    return ("rgb.png" if fmt == "PNG" else "rgb.jpg"), {"width": width, "height": height, "image_format": fmt}


def check_depth(data: bytes) -> np.ndarray:
    """H×W float depth in metres (a singleton channel is squeezed) → float32; ≥ 0 and finite."""
    if not data:
        raise SchemaError("zero-byte depth file", "empty_file")
    from synesthesia.shards.schema import decode_npy

    depth = decode_npy(data, dtypes=FLOAT_DTYPES, ndim=(2, 3), finite=True)
    if depth.ndim == 3:
        if 1 not in (depth.shape[0], depth.shape[-1]):
            raise SchemaError(f"depth of shape {depth.shape} is not H×W", "bad_npy")
        depth = depth.reshape(depth.shape[1:] if depth.shape[0] == 1 else depth.shape[:-1])
    if depth.size == 0:
        raise SchemaError("empty depth map", "bad_npy")
    if (depth < 0).any():
        raise SchemaError("negative depth", "bad_signal")
    return depth.astype(np.float32)


def check_audio(data: bytes, rate: int) -> tuple[bytes, dict[str, Any]]:
    """WAV/FLAC bytes → mono 16-bit FLAC at ``rate`` (resampled with a polyphase filter)."""
    if not data:
        raise SchemaError("zero-byte audio file", "empty_file")
    try:
        wave, source_rate = decode_audio(data)
    except SchemaError as exc:
        raise SchemaError(str(exc), "unreadable_audio") from None
    if source_rate != rate:
        from scipy.signal import resample_poly

        g = math.gcd(source_rate, rate)
        wave = resample_poly(wave, rate // g, source_rate // g).astype(np.float32)
    return encode_flac(wave, rate), {"audio_rate": rate, "audio_samples": int(len(wave))}


def check_lidar(data: bytes, suffix: str, cfg: Any) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(range, intensity or None, metadata) from a ``.npy`` range image or a KITTI ``.bin`` scan."""
    if not data:
        raise SchemaError("zero-byte lidar file", "empty_file")
    if suffix == ".bin":
        projected = project_scan(
            read_velodyne_bin(data),
            beams=cfg.lidar_beams,
            azimuth=cfg.lidar_azimuth,
            fov_up=cfg.lidar_fov_up,
            fov_down=cfg.lidar_fov_down,
        )
        meta = {
            "lidar_source": "kitti_bin",
            "lidar_points": projected.points_in,
            "lidar_points_kept": projected.points_kept,
            "lidar_fov": [cfg.lidar_fov_up, cfg.lidar_fov_down],
        }
        return projected.range, projected.intensity, meta
    from synesthesia.shards.schema import decode_npy

    array = decode_npy(data, dtypes=FLOAT_DTYPES, ndim=(2, 3), finite=True)
    intensity = None
    if array.ndim == 3:
        if array.shape[0] != 2:
            raise SchemaError(
                f"lidar of shape {array.shape} is not beams×azimuth or 2×beams×azimuth", "bad_npy"
            )
        array, intensity = array[0], np.clip(array[1], 0.0, 1.0).astype(np.float32)
    if (array < 0).any():
        raise SchemaError("negative lidar range", "bad_signal")
    return array.astype(np.float32), intensity, {"lidar_source": "range_npy"}


def check_intensity(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A beams×azimuth intensity image matching the range image, clipped to [0, 1]."""
    from synesthesia.shards.schema import decode_npy

    intensity = decode_npy(data, dtypes=FLOAT_DTYPES, ndim=(2,), finite=True)
    if intensity.shape != tuple(shape):
        raise SchemaError(f"intensity shape {intensity.shape} != range shape {tuple(shape)}", "bad_npy")
    return np.clip(intensity, 0.0, 1.0).astype(np.float32)


def build_sample(item: Item, label: int, class_name: str, cfg: Any) -> dict[str, Any]:
    """The canonical source sample of a loaded item; raises SchemaError on anything bad."""
    try:
        image, signals = item.load()
    except SchemaError:
        raise
    except OSError as exc:
        raise SchemaError(f"unreadable file ({exc.__class__.__name__})", "unreadable_file") from None
    image_name, meta = check_image(image)
    sample: dict[str, Any] = {"__key__": item.key, image_name: image, "cls": str(label).encode()}
    meta.update({"class_name": class_name, "source": item.origin})
    for modality, (data, suffix) in sorted(signals.items()):
        if modality not in SIGNAL_SUFFIXES:
            continue  # companions (lidar_intensity) are read with their modality
        try:
            if modality == "depth":
                depth = check_depth(data)
                sample["depth.npy"] = encode_npy(depth)
                meta["depth_shape"] = list(depth.shape)
            elif modality == "audio":
                sample["audio.flac"], audio_meta = check_audio(data, cfg.audio_rate)
                meta.update(audio_meta)
            elif modality == "lidar":
                rng, intensity, lidar_meta = check_lidar(data, suffix, cfg)
                if intensity is None and "lidar_intensity" in signals:
                    intensity = check_intensity(signals["lidar_intensity"][0], rng.shape)
                sample["lidar.npy"] = encode_npy(rng)
                if intensity is not None:
                    sample["lidar_intensity.npy"] = encode_npy(intensity)
                meta.update(lidar_meta, lidar_shape=list(rng.shape))
        except SchemaError as exc:
            raise SchemaError(f"{modality}: {exc}", exc.reason) from None
    sample["json"] = encode_json(meta)
    return sample


# ----------------------------------------------------------------------------- the run


def detect_format(source: str) -> str:
    """``folder``, ``webdataset`` or ``hf`` for a source path or pattern."""
    path = Path(source)
    if "{" in source or source.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
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


def _check_config(cfg: Any) -> None:
    for name in ("val_fraction", "test_fraction"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise UserError(f"ingest.{name} must be in [0, 1), got {value}")
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
        raise UserError("ingest.val_fraction + ingest.test_fraction must be below 1")
    if cfg.shard_size < 1:
        raise UserError(f"ingest.shard_size must be at least 1, got {cfg.shard_size}")
    if cfg.audio_rate < 1000:
        raise UserError(f"ingest.audio_rate must be at least 1000 Hz, got {cfg.audio_rate}")
    if cfg.lidar_beams < 1 or cfg.lidar_azimuth < 1:
        raise UserError("ingest.lidar_beams and ingest.lidar_azimuth must be positive")
    if cfg.lidar_fov_up <= cfg.lidar_fov_down:
        raise UserError("ingest.lidar_fov_up must be above ingest.lidar_fov_down")


def plan(items: list[Item], cfg: Any, seed: int) -> tuple[dict[str, str], list[str]]:
    """(key → output split, class names) from the first pass over a source.

    Present splits are kept; a missing test / val split takes a seeded share of
    train (permutation of the sorted train keys). The first item of a key wins.
    """
    split_of: dict[str, str] = {}
    labels = []
    for item in items:
        if item.error is None and item.key not in split_of:
            split_of[item.key] = item.split
            labels.append(item.label)
    present = set(split_of.values())
    train = sorted(k for k, s in split_of.items() if s == "train")
    order = np.random.default_rng(seed).permutation(len(train))
    n_test = 0 if "test" in present else round(cfg.test_fraction * len(train))
    n_val = 0 if "val" in present else round(cfg.val_fraction * len(train))
    for rank, i in enumerate(order):
        if rank < n_test:
            split_of[train[i]] = "test"
        elif rank < n_test + n_val:
            split_of[train[i]] = "val"
    if labels and all(isinstance(label, int) for label in labels):
        class_names = [str(i) for i in range(max(labels) + 1)]
    else:
        class_names = sorted({str(label) for label in labels})
    return split_of, class_names


def ingest(cfg: PipelineConfig, out: str | Path = "shards") -> tuple[Path, Manifest]:
    """Ingest ``cfg.ingest.source`` into ``<out>/<cfg.dataset>/source``; (set folder, manifest).

    The set is built in a temporary folder beside the target and moved into
    place when complete, replacing an older set as a whole.
    """
    icfg = cfg.ingest
    _check_config(icfg)
    if not re.fullmatch(r"[A-Za-z0-9_\-.]+", cfg.dataset) or cfg.dataset.startswith("."):
        raise UserError(f"dataset name {cfg.dataset!r} must be letters, digits, '_', '-' or '.'")
    source = open_source(icfg)
    items = list(source.items())  # the only pass over the source: it warns about corrupt tars
    split_of, class_names = plan(items, icfg, cfg.seed)
    if not split_of:
        raise UserError(f"no images found in {icfg.source}")
    # Names given by the source (HF ClassLabel, our manifest) fix the label space,
    # classes with no sample included; integer labels index into them.
    given = getattr(source, "class_names", None)
    if given:
        class_names = list(given)
    index_of = {name: i for i, name in enumerate(class_names)}

    def resolve(label: str | int | None) -> tuple[int, str]:
        if isinstance(label, int) and given:
            if 0 <= label < len(class_names):
                return label, class_names[label]
            raise SchemaError(f"label {label} outside the {len(class_names)} named classes", "no_label")
        if str(label) not in index_of:
            raise SchemaError(f"label {label!r} is not a known class", "no_label")
        return index_of[str(label)], str(label)

    final = Path(out) / cfg.dataset / "source"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".source-", suffix=".tmp", dir=final.parent))
    try:
        skipped: Counter[str] = Counter()
        chosen: dict[str, Item] = {}  # key -> the first usable item of that key
        for item in items:
            try:
                if item.error is not None:
                    raise item.error
                if item.key in chosen:
                    raise SchemaError(f"duplicate key {item.key!r}", "duplicate_key")
            except SchemaError as exc:
                skipped[exc.reason] += 1
                logger.warning("skipped %s: %s", item.origin, exc)
                continue
            chosen[item.key] = item
        splits: dict[str, list[ShardInfo]] = {}
        label_mix: dict[str, Any] = {}
        modalities: set[str] = set()
        for index, split in enumerate(SPLITS):
            keys = sorted(k for k, s in split_of.items() if s == split)
            order = np.random.default_rng([cfg.seed, index]).permutation(len(keys))
            writer = SplitWriter(tmp, split, icfg.shard_size)
            labels: list[int] = []  # of the written samples, in order
            for i in order:
                item = chosen[keys[i]]
                try:
                    label, class_name = resolve(item.label)
                    sample = build_sample(item, label, class_name, icfg)
                    if not writer.add(sample):
                        continue  # (keys are unique here: duplicates were skipped above)
                except SchemaError as exc:
                    skipped[exc.reason] += 1
                    logger.warning("skipped %s: %s", item.origin, exc)
                    continue
                labels.append(label)
                modalities.update(
                    m
                    for m, f in (("depth", "depth.npy"), ("audio", "audio.flac"), ("lidar", "lidar.npy"))
                    if f in sample
                )
            infos = writer.close()
            if infos:
                splits[split] = infos
                size = icfg.shard_size  # SplitWriter cuts a shard every shard_size samples
                label_mix[split] = label_mix_entry(
                    [labels[j : j + size] for j in range(0, len(labels), size)]
                )
        kept = sum(info.samples for infos in splits.values() for info in infos)
        # Bad tar entries of a webdataset source (warned about by its error handler).
        skipped.update({k: v for k, v in getattr(source, "tar_errors", {}).items() if v})
        if kept == 0:
            summary = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
            raise UserError(f"no usable samples in {icfg.source} (skipped: {summary})")
        extra: dict[str, Any] = {
            "modalities": sorted(modalities),
            "num_classes": len(class_names),
            "class_names": class_names,
            "audio_rate": icfg.audio_rate,
            "format": source.format,
            "source": str(icfg.source),
            "label_mix": label_mix,
        }
        if "lidar" in modalities:
            extra["lidar"] = {
                "beams": icfg.lidar_beams,
                "azimuth": icfg.lidar_azimuth,
                "fov_up": icfg.lidar_fov_up,
                "fov_down": icfg.lidar_fov_down,
            }
        manifest = Manifest(
            kind="source",
            dataset=cfg.dataset,
            splits=splits,
            skipped=dict(sorted(skipped.items())),
            preprocessing={"images": "original bytes", "audio": f"mono 16-bit FLAC at {icfg.audio_rate} Hz"},
            config=to_dict(cfg),
            config_hash=config_hash(cfg),
            extra=extra,
        )
        manifest.write(tmp)
        _swap_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    counts = ", ".join(f"{s} {manifest.count(s)}" for s in manifest.splits)
    logger.info("ingested %s → %s: %s; skipped %d", icfg.source, final, counts, sum(skipped.values()))
    return final, manifest


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Move the finished set ``tmp`` onto ``final``, replacing an older set whole."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
