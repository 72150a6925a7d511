"""The paired split, read once and encoded by the frozen autoencoder.

* :class:`PairedLatents`: one modality's encoded pairs — RGB latents ``c = E(rgb)``,
  target latents ``x₀ = E(map(signal))`` (the signal mapped to a 3-channel image
  in [0, 1] by :mod:`synesthesia.generators.mappings`) and, for depth, the true
  signals the depth metrics need;
* :func:`encode_pairs`: read ``<source>/<split>`` (skipping bad samples, per
  modality where only the signal is bad) and encode RGB and every target
  modality in batches as the samples stream by; the autoencoder stays frozen.
* :class:`RowFile`: where the encoded pairs live — float32 rows of one shape
  appended to an unnamed temporary file (in the bootstrap's work folder; gone
  when closed, or when the process dies) and read back by row. Only one batch
  of images and one batch of latents are in memory at a time, so RAM does not
  grow with the paired set; training gathers each batch's rows from the file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synesthesia import UserError
from synesthesia.config import BootstrapConfig
from synesthesia.generators.latent_diffusion import LatentCodec

logger = logging.getLogger(__name__)


class RowFile:
    """Rows of one shape and dtype appended to an unnamed temporary file in ``folder``, read back by row."""

    def __init__(self, row_shape: tuple[int, ...], dtype: Any = np.float32, folder: Path | None = None):
        self.row_shape = tuple(int(d) for d in row_shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.rows = 0
        self._fh = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - lives as long as the pairs

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.row_shape)

    def __len__(self) -> int:
        return self.rows

    def append(self, batch: np.ndarray | torch.Tensor) -> range:
        """Append rows (k × row_shape); returns their row numbers."""
        array = batch.numpy() if isinstance(batch, torch.Tensor) else batch
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if tuple(array.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {array.shape[1:]} appended to a file of {self.row_shape}")
        os.pwrite(self._fh.fileno(), array.tobytes(), self.rows * self.row_bytes)
        start, self.rows = self.rows, self.rows + array.shape[0]
        return range(start, self.rows)

    def read(self, rows: Any) -> np.ndarray:
        """The rows at ``rows`` (indices, a tensor of indices, or a range), in that order."""
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        rows = list(rows)
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for i, row in enumerate(rows):
            if not 0 <= row < self.rows:
                raise IndexError(f"row {row} of {self.rows}")
            flat[i] = np.frombuffer(
                os.pread(self._fh.fileno(), self.row_bytes, row * self.row_bytes), np.uint8
            )
        return out

    def __getitem__(self, rows: Any) -> torch.Tensor:
        return torch.from_numpy(self.read(rows))

    def mean(self, rows: Any, chunk: int = 4096) -> torch.Tensor:
        """The mean of the rows at ``rows`` (1 × row_shape), summed ``chunk`` rows at a time in float64."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        total = np.zeros(self.row_shape, np.float64)
        for start in range(0, len(rows), chunk):
            total += self.read(rows[start : start + chunk]).sum(axis=0, dtype=np.float64)
        return torch.from_numpy((total / max(1, len(rows))).astype(self.dtype)[None])

    def close(self) -> None:
        self._fh.close()


@dataclass
class PairedLatents:
    """Encoded pairs of one modality: RGB latents, target latents and (depth) the true signals, on disk."""

    keys: list[str]
    cond: RowFile  # N×C×h_rgb×w_rgb
    target: RowFile  # N×C×h×w
    signal: RowFile | None  # N×H×W: the 2-D signal, for depth metrics (None otherwise)
    rgb_size: tuple[int, int]
    signal_shape: tuple[int, ...]

    def close(self) -> None:
        for rows in (self.cond, self.target, self.signal):
            if rows is not None:
                rows.close()


@torch.no_grad()
def _encode(codec: LatentCodec, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """One batch of images → latents (float32, on the CPU)."""
    batch = torch.from_numpy(np.stack(images)).to(device)
    return codec.encode(batch).float().cpu()


class _Batches:
    """Images queued for the encoder, encoded ``batch_size`` at a time into a RowFile (created with
    the first batch, whose shape it takes)."""

    def __init__(self, codec: LatentCodec, batch_size: int, device: torch.device, folder: Path | None):
        self.codec, self.batch_size, self.device, self.folder = codec, batch_size, device, folder
        self.queue: list[np.ndarray] = []
        self.rows: RowFile | None = None

    def add(self, image: np.ndarray) -> None:
        self.queue.append(image)
        if len(self.queue) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.queue:
            return
        latents = _encode(self.codec, self.queue, self.device)
        self.queue = []
        if self.rows is None:
            self.rows = RowFile(tuple(latents.shape[1:]), np.float32, self.folder)
        self.rows.append(latents)


def encode_pairs(
    source_dir: Path,
    cfg: BootstrapConfig,
    codec: LatentCodec,
    device: torch.device,
    folder: Path | None = None,
) -> tuple[dict[str, PairedLatents], dict[str, int]]:
    """Read the paired split once and encode RGB and every target modality (frozen autoencoder).

    A sample whose RGB is bad is skipped for all modalities; one whose signal of
    a modality is bad or missing is skipped for that modality. Images are
    encoded in batches of ``encode_batch_size`` as they are read, and the
    latents kept in :class:`RowFile` s in ``folder`` (the system's temporary
    folder when None). Returns the pairs per modality and the skip counts.
    """
    from synesthesia.generators.mappings import mapping_params, signal_from_sample, to_2d, to_three_channels
    from synesthesia.shards import ErrorPolicy, SchemaError, iter_aligned
    from synesthesia.shards.schema import image_field
    from synesthesia.sources.signals import decode_image

    params = {m: mapping_params(m, **cfg.mapping.get(m, {})) for m in cfg.modalities}
    keys: list[str] = []
    rgbs = _Batches(codec, cfg.encode_batch_size, device, folder)
    targets = {m: _Batches(codec, cfg.encode_batch_size, device, folder) for m in cfg.modalities}
    kept: dict[str, list[int]] = {m: [] for m in cfg.modalities}  # per modality: its pairs' sample numbers
    truths: RowFile | None = None  # depth's true 2-D signals
    skipped: dict[str, int] = {}
    rgb_size: tuple[int, int] | None = None
    signal_shape: dict[str, tuple[int, ...]] = {}
    handler = ErrorPolicy("warn")
    for sample in iter_aligned(source_dir, split=cfg.split, handler=handler):
        if cfg.max_pairs and len(keys) >= cfg.max_pairs:
            break
        try:
            rgb = decode_image(sample[image_field(sample)])
        except SchemaError as exc:
            skipped["rgb"] = skipped.get("rgb", 0) + 1
            logger.warning("skipped %s: %s", sample.get("__key__"), exc)
            continue
        if rgb_size is None:
            rgb_size = rgb.shape[:2]
            if rgb_size[0] % codec.downscale or rgb_size[1] % codec.downscale:
                raise UserError(
                    f"RGB of {source_dir} is {rgb_size}; bootstrap needs multiples of {codec.downscale}"
                )
        if rgb.shape[:2] != rgb_size:
            skipped["rgb_size"] = skipped.get("rgb_size", 0) + 1
            continue
        index = len(keys)
        for modality in cfg.modalities:
            p = params[modality]
            try:
                rate = {"sample_rate": p["sample_rate"]} if modality == "audio" else {}
                signal = signal_from_sample(modality, sample, **rate)
                image3 = to_three_channels(modality, signal, **cfg.mapping.get(modality, {}))
                truth = (
                    to_2d(modality, signal, **cfg.mapping.get(modality, {})) if modality == "depth" else None
                )
            except SchemaError as exc:
                skipped[modality] = skipped.get(modality, 0) + 1
                logger.debug("skipped %s for %s: %s", sample.get("__key__"), modality, exc)
                continue
            if truth is not None:
                if truths is None:
                    truths = RowFile(truth.shape, truth.dtype, folder)
                truths.append(truth[None])
            signal_shape.setdefault(modality, tuple(image3.shape[-2:]))
            targets[modality].add(image3)
            kept[modality].append(index)
        keys.append(sample["__key__"])
        rgbs.add(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0)
    for name, count in handler.counts.items():
        skipped[name] = skipped.get(name, 0) + count
    if not keys:
        raise UserError(f"no usable {cfg.split} pairs in {source_dir}")
    rgbs.flush()
    logger.info("encoded %d RGB images of %s/%s", len(keys), source_dir, cfg.split)
    pairs = {}
    for modality, batches in targets.items():
        index = kept[modality]
        if len(index) <= cfg.holdout:
            raise UserError(
                f"{len(index)} usable {modality} pairs in {cfg.split}: need more than bootstrap.holdout={cfg.holdout}"
            )
        batches.flush()
        logger.info("encoded %d %s targets", len(index), modality)
        cond = rgbs.rows
        if len(index) != len(keys):  # this modality's own copy of the RGB latents of its pairs
            cond = RowFile(rgbs.rows.row_shape, np.float32, folder)
            for start in range(0, len(index), 4096):
                cond.append(rgbs.rows.read(index[start : start + 4096]))
        pairs[modality] = PairedLatents(
            keys=[keys[i] for i in index],
            cond=cond,
            target=batches.rows,
            signal=truths if modality == "depth" else None,
            rgb_size=tuple(rgb_size),
            signal_shape=signal_shape[modality],
        )
    return pairs, skipped
