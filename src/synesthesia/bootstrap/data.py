"""The paired split, read once and encoded by the frozen autoencoder.

* :class:`PairedLatents`: one modality's encoded pairs — RGB latents ``c = E(rgb)``,
  target latents ``x₀ = E(map(signal))`` (the signal mapped to a 3-channel image
  in [0, 1] by :mod:`synesthesia.generators.mappings`) and, for depth, the true
  signals the depth metrics need;
* :func:`encode_pairs`: read ``<source>/<split>`` (skipping bad samples, per
  modality where only the signal is bad) and encode RGB and every target
  modality in batches; the autoencoder stays frozen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synesthesia import UserError
from synesthesia.config import BootstrapConfig
from synesthesia.generators.latent_diffusion import LatentCodec

logger = logging.getLogger(__name__)


@dataclass
class PairedLatents:
    """Encoded pairs of one modality: RGB latents, target latents and (depth) the true signals."""

    keys: list[str]
    cond: torch.Tensor  # N×C×h_rgb×w_rgb
    target: torch.Tensor  # N×C×h×w
    signal: np.ndarray | None  # N×H×W: the 2-D signal, for depth metrics (None otherwise)
    rgb_size: tuple[int, int]
    signal_shape: tuple[int, ...]


@torch.no_grad()
def _encode(
    codec: LatentCodec, images: list[np.ndarray], batch_size: int, device: torch.device
) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.stack(images[i : i + batch_size])).to(device)
        out.append(codec.encode(batch).float().cpu())
    return torch.cat(out)


def encode_pairs(
    source_dir: Path, cfg: BootstrapConfig, codec: LatentCodec, device: torch.device
) -> tuple[dict[str, PairedLatents], dict[str, int]]:
    """Read the paired split once and encode RGB and every target modality (frozen autoencoder).

    A sample whose RGB is bad is skipped for all modalities; one whose signal of
    a modality is bad or missing is skipped for that modality. Returns the pairs
    per modality and the skip counts.
    """
    from synesthesia.generators.mappings import mapping_params, signal_from_sample, to_2d, to_three_channels
    from synesthesia.shards import ErrorPolicy, SchemaError, iter_aligned
    from synesthesia.sources.signals import decode_image

    params = {m: mapping_params(m, **cfg.mapping.get(m, {})) for m in cfg.modalities}
    keys: list[str] = []
    rgbs: list[np.ndarray] = []
    targets: dict[str, list[tuple[int, np.ndarray, np.ndarray | None]]] = {m: [] for m in cfg.modalities}
    skipped: dict[str, int] = {}
    rgb_size: tuple[int, int] | None = None
    handler = ErrorPolicy("warn")
    for sample in iter_aligned(source_dir, split=cfg.split, handler=handler):
        if cfg.max_pairs and len(keys) >= cfg.max_pairs:
            break
        try:
            from synesthesia.shards.schema import image_field

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
            targets[modality].append((index, image3, truth))
        keys.append(sample["__key__"])
        rgbs.append(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0)
    for name, count in handler.counts.items():
        skipped[name] = skipped.get(name, 0) + count
    if not keys:
        raise UserError(f"no usable {cfg.split} pairs in {source_dir}")
    logger.info("encoding %d RGB images of %s/%s", len(keys), source_dir, cfg.split)
    cond_all = _encode(codec, rgbs, cfg.encode_batch_size, device)
    pairs = {}
    for modality, items in targets.items():
        if len(items) <= cfg.holdout:
            raise UserError(
                f"{len(items)} usable {modality} pairs in {cfg.split}: need more than bootstrap.holdout={cfg.holdout}"
            )
        logger.info("encoding %d %s targets", len(items), modality)
        index = torch.tensor([i for i, _, _ in items])
        target = _encode(codec, [im for _, im, _ in items], cfg.encode_batch_size, device)
        signal = np.stack([t for _, _, t in items]) if modality == "depth" else None
        pairs[modality] = PairedLatents(
            keys=[keys[i] for i in index.tolist()],
            cond=cond_all[index],
            target=target,
            signal=signal,
            rgb_size=tuple(rgb_size),
            signal_shape=tuple(items[0][1].shape[-2:]),
        )
    return pairs, skipped
