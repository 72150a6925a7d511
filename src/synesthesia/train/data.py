"""Stage-two data: source shards zipped with their sidecars, split over ranks and workers.

One epoch is one pass over a split. Its order is a pure function of
``(seed, epoch)``: the shard order is permuted with that seed, the resulting
global sample sequence is cut into ``world`` contiguous blocks whose sizes
differ by at most one (rank ``r`` takes block ``r``; a block may start or end
inside a shard, whose other samples are read past but not decoded), and each
rank's block is split into pieces over its DataLoader workers. So every sample
is seen exactly once per epoch across ranks, whatever the shard count, and a
rank reads about ``1/world`` of the bytes.

Batching happens in the main process, after the workers' streams are merged,
so the number of batches per epoch is fixed and identical on every rank
(:meth:`ShardLoader.steps_per_epoch`, from the manifests' sample counts; a
rank with one sample fewer gets a last batch one smaller). Collective ops
therefore never wait on a rank that ran out. The DataLoader is kept out of
``accelerator.prepare``: accelerate's default for an iterable dataset
(``dispatch_batches``) would read everything on rank 0 and scatter it.

Per sample (in the workers): the RGB image is decoded, cropped and resized to
its view and normalised with the ImageNet statistics (:class:`RGBTransform`,
torchvision ``transforms.v2``); the view's geometry is the box of the source
image it shows and whether it was flipped. Eval images are resized and
centre-cropped; train images follow ``train.augment``:

- ``aligned`` (default): a random resized crop (scale 0.35-1) and a horizontal
  flip of the RGB, and the same box and flip for the spatial privileged inputs
  of the modalities on the image's grid (:data:`IMAGE_ALIGNED`: depth; audio's
  spectrogram and lidar's range image are spatial but not on it): a latent on
  its h×w grid, a decoded signal on its H×W, each resampled to its own grid
  (:func:`apply_geometry`), so the teacher fuses and MESSy predicts the content
  the RGB shows. In eval they take the centre box, which on a square image is
  the whole image (no resampling: they are exactly as stored);
- ``rgb``: the same crop and flip of the RGB only, the privileged inputs those
  of the whole unflipped image (the behaviour before ``aligned``; a legacy
  ``augment: true`` reads as ``rgb``);
- ``none``: train images get the eval view, the privileged inputs as stored (a
  legacy ``augment: false``).

Tokens and codes have no geometry and are never cropped. Each latent is
standardised per channel with its sidecar manifest's ``channel_stats``
(``(z - mean_c) / std_c``; before its crop), and when the generator wrote
``S`` samples per input one of them is drawn (for decoded sidecars too: their
S decodings are not stacked as channels, so the decoded and latent sources see
the same one generated sample per input and epoch). The augmentation (its
torch seed drawn first) and the S draw are seeded by ``(seed, epoch, key)``, so
they do not depend on which rank or worker reads the sample, and a resumed run
sees the same batches.

The decoded privileged source (``train.source=decoded``, the decode-encode loop
that DLA removes) comes from where ``train.decoded_from`` says:

- ``sidecars`` (default): stage one's decoded sidecar set ``decoded/<set>/``
  (written with ``shard.decode: true``), read like any sidecar;
- ``latents``: the latent set ``train.source=latent`` reads (``latents/<set>/``,
  ``train.latent_sets`` honoured), decoded on the fly. The workers pass the raw
  (not standardised) latent, one of its ``S`` samples drawn exactly as for the
  latent source; in the main process, after :func:`collate`,
  :class:`OnTheFlyDecoder` decodes the batch with the set's own generator
  (rebuilt from its manifest's ``config.generator``; built once per process,
  frozen, eval mode, ``torch.inference_mode``, the autocast precision stage one
  recorded) into ``batch["decoded"]`` and drops the raw latents. Flagged samples
  get zeros, as in the decoded sidecars. Each sample's geometry travels with the
  batch (``batch["geometry"]``, B×5) and is applied to the decoded signals of
  image-aligned modalities, as to a decoded sidecar's. The decode runs on the loader's
  ``device`` (:func:`build_loader`; the trainer passes the accelerator's, the
  CPU otherwise) and its seconds are counted in :attr:`ShardLoader.decode_s`
  (the trainer's ``timing.decode_s_per_step``, part of ``data_s_per_step``).

Either way the teacher sees ``{"kind": "decoded", "shape": [H, W]}`` (the
on-the-fly shape is found at resolve time by decoding one zero latent), so a
teacher trained one way evaluates and distils the other way. The other sources
ignore ``decoded_from`` (it says where decoded signals come from, and they read
none), so it can be set once for a whole ablation grid or ``synesthesia eval``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import roi_align
from torchvision.transforms import v2

from synesthesia import UserError
from synesthesia.generators.base import Generator, autocast_context, key_seed
from synesthesia.shards.reader import ErrorPolicy, ShardMismatchError, aligned_shards, iter_shard
from synesthesia.shards.schema import SchemaError, decode_npy, decoded_field, image_field, latent_field
from synesthesia.shards.writer import Manifest

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES = ("none", "latent", "decoded", "real")
DECODED_FROM = ("sidecars", "latents")
AUGMENT = ("aligned", "rgb", "none")  # train.augment; a legacy bool reads as rgb (true) or none (false)
# The modalities whose spatial inputs lie on the RGB image's grid: train.augment=aligned crops and
# flips them with the image. Audio (a spectrogram's latent) and lidar (a range image, beams x
# azimuth) are spatial too, but their axes are not the image's.
IMAGE_ALIGNED = ("depth",)
RAW_LATENTS = "raw_latents"  # sample/batch key of the latents to decode on the fly (dropped once decoded)
# Which generator mode feeds each privileged source when train.latent_sets does not say.
_SOURCE_MODE = {"latent": "generate", "decoded": "generate", "real": "encode"}


# ----------------------------------------------------------------------------- reading


def read_shard(path: Path, handler: ErrorPolicy) -> Iterator[dict[str, Any]]:
    """The raw samples of one tar shard, in order (the shards reader's :func:`iter_shard`:
    this rank and worker chose the shard, so no webdataset splitter runs)."""
    return iter_shard(path, handler)


def read_aligned(source: Path, sidecars: dict[str, Path], handler: ErrorPolicy) -> Iterator[dict[str, Any]]:
    """One source shard's samples with the same-index sidecar shards' fields merged in (keys checked)."""
    streams = {name: read_shard(path, handler) for name, path in sidecars.items()}
    for position, sample in enumerate(read_shard(source, handler)):
        merged = dict(sample)
        for name, stream in streams.items():
            other = next(stream, None)
            if other is None or other["__key__"] != sample["__key__"]:
                found = "nothing" if other is None else repr(other["__key__"])
                raise ShardMismatchError(
                    f"sidecar {name} shard {sidecars[name].name} sample {position}: {found}"
                    f" where the source has {sample['__key__']!r}"
                )
            merged.update((k, v) for k, v in other.items() if k != "__key__")
        yield merged
    for name, stream in streams.items():
        if next(stream, None) is not None:
            raise ShardMismatchError(
                f"sidecar {name} shard {sidecars[name].name} has more samples than its source"
            )


# ----------------------------------------------------------------------------- sets


@dataclass(frozen=True)
class Sidecar:
    """One privileged modality's sidecar set and what is needed to read it.

    ``kind`` is what the models get, ``latent`` or ``decoded``. A decoded sidecar
    read from stage one's decoded set (``train.decoded_from=sidecars``) has
    ``spec = {"shape": [H, W], "samples_per_input": S}`` (one signal's shape; each
    stored sample holds S of them). One decoded on the fly (``decoded_from=latents``,
    :attr:`on_the_fly`) reads the *latent* set ``directory`` and records what
    decodes it: ``generator``, the GeneratorConfig dict of the set's manifest
    (``config.generator``: name, modality, weights, options, samples_per_input,
    seed), and in ``spec`` the decoded ``shape``, the stored latent's
    ``latent_shape``, ``latent_kind`` and ``samples_per_input``, and the autocast
    ``precision`` stage one ran with (fp32 wherever the decode runs on the CPU).
    """

    modality: str
    directory: Path
    kind: str  # latent | decoded
    spec: dict[str, Any]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    generator: dict[str, Any] | None = None  # decoded_from=latents: the GeneratorConfig that decodes

    @property
    def on_the_fly(self) -> bool:
        """Decoded from the latent set while training (``train.decoded_from=latents``)."""
        return self.kind == "decoded" and self.generator is not None

    @property
    def field(self) -> str:
        if self.kind == "latent" or self.on_the_fly:
            return latent_field(self.modality)
        return decoded_field(self.modality)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of one stored sample (after the S draw): the latent's when decoding on the fly."""
        return tuple(self.spec["latent_shape" if self.on_the_fly else "shape"])

    @property
    def samples_per_input(self) -> int:
        return int(self.spec.get("samples_per_input", 1) or 1)

    def teacher_spec(self) -> dict[str, Any]:
        """What the teacher's adapter for this modality needs: kind, shape (and vocab for codes)."""
        if self.kind == "decoded":
            return {"kind": "decoded", "shape": list(self.spec["shape"])}
        out = {"kind": self.spec["kind"], "shape": list(self.spec["shape"])}
        vocab = self.spec.get("vocab") or (self.spec.get("extra") or {}).get("vocab")
        if vocab is not None:
            out["vocab"] = int(vocab)
        return out


@dataclass(frozen=True)
class DataSpec:
    """A source set, its sidecars for the privileged source, and what the models need to know."""

    source_dir: Path
    sidecars: dict[str, Sidecar]
    num_classes: int
    class_names: list[str]
    image_size: int
    counts: dict[str, int] = field(default_factory=dict)

    def teacher_modalities(self) -> dict[str, dict[str, Any]]:
        return {m: s.teacher_spec() for m, s in self.sidecars.items()}


def _generator_modality(manifest: Manifest) -> str | None:
    gen = manifest.generator or {}
    return gen.get("modality") or (gen.get("config") or {}).get("modality")


def _find_set(root: Path, kind_dir: str, modality: str, source: str) -> Path:
    """The only sidecar set under ``root/kind_dir`` for ``modality`` of the source's generator mode."""
    base = root / kind_dir
    candidates = []
    for manifest_path in sorted(base.glob("*/manifest.json")) if base.is_dir() else []:
        manifest = Manifest.read(manifest_path.parent)
        if _generator_modality(manifest) != modality:
            continue
        mode = (manifest.generator or {}).get("mode")
        if mode is not None and mode != _SOURCE_MODE[source]:
            continue
        candidates.append(manifest_path.parent)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UserError(
            f"no {kind_dir} sidecar set for {modality} ({_SOURCE_MODE[source]} mode) under {base}; "
            f"run `synesthesia shard` first or set train.latent_sets.{modality}"
        )
    names = ", ".join(p.name for p in candidates)
    raise UserError(
        f"several {kind_dir} sidecar sets for {modality} under {base} ({names}); set train.latent_sets.{modality}"
    )


def check_decoded_from(train) -> None:
    """``train.decoded_from`` must be one of :data:`DECODED_FROM` (whatever the source)."""
    if train.decoded_from not in DECODED_FROM:
        raise UserError(
            f"unknown train.decoded_from {train.decoded_from!r}; valid: {', '.join(DECODED_FROM)}"
        )


def augment_mode(augment: str | bool) -> str:
    """``train.augment`` as one of :data:`AUGMENT`: a legacy bool (written configs) reads as
    ``rgb`` (true, the RGB-only augmentation it meant) or ``none`` (false)."""
    if isinstance(augment, bool):
        return "rgb" if augment else "none"
    if augment not in AUGMENT:
        raise UserError(f"unknown train.augment {augment!r}; valid: {', '.join(AUGMENT)}")
    return augment


def build_decoder(
    gen: dict[str, Any], device: str | torch.device = "cpu", precision: str = "fp32"
) -> Generator:
    """The generator of a latent set's manifest (``config.generator``), frozen and in eval mode on
    ``device`` with ``precision`` autocast (fp32 on the CPU), to decode its latents.

    Built once per process for each (config, device, precision): resolving the data and each
    loader (train, val, test) share it, as decoding never changes it."""
    return _cached_decoder(json.dumps(gen, sort_keys=True), str(torch.device(device)), precision)


@functools.lru_cache(maxsize=4)
def _cached_decoder(gen_json: str, device: str, precision: str) -> Generator:
    from synesthesia.config import GeneratorConfig, build
    from synesthesia.stage_one import build_generator

    generator = build_generator(build(GeneratorConfig, json.loads(gen_json), "generator"))
    return generator.setup(device, precision)


def decode_latents(generator: Generator, latents: torch.Tensor) -> torch.Tensor:
    """Latents as stored (B, *latent shape) → raw signals (B, H, W) float32 (or B×C×H×W) on the CPU, as stage
    one decodes them for ``shard.decode: true`` (floats in float32, codes as integers; the
    generator's device and autocast precision; ``torch.inference_mode``)."""
    latents = latents.to(generator.device)
    if latents.is_floating_point():
        latents = latents.float()
    try:
        with torch.inference_mode(), autocast_context(generator.device, generator.precision):
            signal = generator.decode(latents)
    except NotImplementedError:
        raise UserError(
            f"generator {generator.name!r} has no decoder: train.decoded_from=latents cannot decode its latents"
        ) from None
    signal = signal.float().cpu()
    # a normal tensor, not an inference tensor: flagged rows are zeroed in place, and autograd may keep it
    return signal.clone() if signal.is_inference() else signal


def _on_the_fly_sidecar(directory: Path, modality: str, manifest: Manifest) -> Sidecar:
    """``decoded_from=latents``: the latent set ``directory`` and what decodes it (one zero latent
    is decoded, on the CPU, to find the decoded shape)."""
    latent = dict(manifest.latent_spec or {})
    if not latent.get("shape"):
        raise UserError(f"{directory}/manifest.json has no latent_spec.shape")
    config = manifest.config or {}
    gen = config.get("generator")
    if not isinstance(gen, dict) or not gen.get("name"):
        raise UserError(
            f"{directory}/manifest.json records no config.generator to decode with; "
            "train.decoded_from=latents needs a latent set written by `synesthesia shard`"
        )
    kind = latent.get("kind", "spatial")
    spec = {
        "latent_shape": [int(n) for n in latent["shape"]],
        "latent_kind": kind,
        "samples_per_input": int(latent.get("samples_per_input", 1) or 1),
        "precision": str((config.get("stage_one") or {}).get("precision") or "fp32"),
    }
    zero = torch.zeros((1, *spec["latent_shape"]), dtype=torch.int64 if kind == "codes" else torch.float32)
    signal = decode_latents(build_decoder(gen), zero)
    spec["shape"] = [int(n) for n in signal.shape[1:]]
    return Sidecar(modality, directory, "decoded", spec, generator=dict(gen))


def resolve_sidecar(
    root: Path, modality: str, source: str, set_name: str | None, decoded_from: str = "sidecars"
) -> Sidecar:
    """The sidecar feeding ``modality`` for privileged source ``source``.

    ``train.latent_sets[modality]`` names the set; without it, the one set whose
    generator has this modality and the source's mode (``generate`` for latent
    and decoded, ``encode`` for real) is used, e.g. ``latents/latent-diffusion-depth``
    for ``latent`` and ``latents/tae-depth`` for ``real``. With ``source=decoded``
    and ``decoded_from=latents`` that is the latent set (the one ``latent`` reads),
    decoded on the fly (:func:`_on_the_fly_sidecar`); other sources ignore ``decoded_from``.
    """
    on_the_fly = source == "decoded" and decoded_from == "latents"
    kind = "decoded" if source == "decoded" and not on_the_fly else "latent"
    kind_dir = "decoded" if kind == "decoded" else "latents"
    directory = root / kind_dir / set_name if set_name else _find_set(root, kind_dir, modality, source)
    manifest = Manifest.read(directory)
    if manifest.kind != kind:
        how = " (decoded_from=latents decodes a latent set)" if on_the_fly else ""
        raise UserError(
            f"{directory} is a {manifest.kind} set, train.source={source} needs a {kind} set{how}"
        )
    if on_the_fly:
        return _on_the_fly_sidecar(directory, modality, manifest)
    spec = dict(manifest.latent_spec or {})
    if kind == "decoded":
        # stage one decodes each of a generate set's S samples: a decoded sample is S×(signal);
        # one of the S is drawn per sample and epoch, as for the latent source (same rng)
        samples = int(spec.get("samples_per_input", 1) or 1)
        shape = list((manifest.extra or {}).get("shape") or spec.get("decoded_shape") or [])
        if samples > 1 and shape:
            if shape[0] != samples:
                raise UserError(
                    f"{directory}/manifest.json: decoded shape {shape} does not start with its "
                    f"{samples} samples per input"
                )
            shape = shape[1:]
        spec = {"shape": shape, "samples_per_input": samples}
    elif not spec.get("shape"):
        raise UserError(f"{directory}/manifest.json has no latent_spec.shape")
    mean = std = None
    stats = manifest.channel_stats
    if kind == "latent" and spec.get("kind") != "codes":
        if not stats or "mean" not in stats or "std" not in stats:
            raise UserError(f"{directory}/manifest.json has no channel_stats to standardise the latents with")
        mean = tuple(float(v) for v in stats["mean"])
        std = tuple(max(float(v), 1e-6) for v in stats["std"])
    return Sidecar(modality, directory, kind, spec, mean, std)


def _first_sample(source_dir: Path, sidecars: dict[str, Sidecar]) -> dict[str, Any]:
    pairs = aligned_shards(source_dir, {m: s.directory for m, s in sidecars.items()}, "train")
    if not pairs:
        raise UserError(f"{source_dir} has no train shards")
    source, side = pairs[0]
    return next(read_aligned(source, side, ErrorPolicy("raise")))


def resolve_data(cfg) -> DataSpec:
    """Find the source set and sidecars a pipeline config trains on (``<train.shards>/<dataset>/``)."""
    train = cfg.train
    if train.source not in SOURCES:
        raise UserError(f"unknown train.source {train.source!r}; valid: {', '.join(SOURCES)}")
    check_decoded_from(train)
    augment_mode(train.augment)
    root = Path(train.shards) / cfg.dataset
    source_dir = root / "source"
    if not (source_dir / "manifest.json").is_file():
        raise UserError(
            f"no source shards at {source_dir}; run `synesthesia render` or `synesthesia ingest` first"
        )
    manifest = Manifest.read(source_dir)
    extra = manifest.extra or {}
    if "num_classes" not in extra:
        raise UserError(f"{source_dir}/manifest.json has no extra.num_classes")
    sidecars: dict[str, Sidecar] = {}
    if train.source != "none":
        unknown = sorted(set(train.latent_sets) - set(train.modalities))
        if unknown:
            raise UserError(f"train.latent_sets names {unknown[0]}, which is not in train.modalities")
        for modality in train.modalities:
            sidecars[modality] = resolve_sidecar(
                root, modality, train.source, train.latent_sets.get(modality), train.decoded_from
            )
    probed = 0
    needs_probe = train.image_size <= 0 and not extra.get("image_size")
    needs_probe |= any(s.kind == "decoded" and not s.spec.get("shape") for s in sidecars.values())
    if needs_probe:
        sample = _first_sample(source_dir, sidecars)
        for m, s in list(sidecars.items()):
            if s.kind == "decoded" and not s.spec.get("shape"):
                shape = list(decode_npy(sample[s.field]).shape)
                if s.samples_per_input > 1:  # S×(signal), one drawn per sample
                    shape = shape[1:]
                sidecars[m] = dataclasses.replace(s, spec={**s.spec, "shape": shape})
        probed = min(decode_rgb(sample[image_field(sample)]).shape[1:])
    recorded = extra.get("image_size")
    if isinstance(recorded, list | tuple):  # [H, W] as the scenes renderer records it
        if len(set(recorded)) != 1:
            raise UserError(
                f"source images are {recorded[0]}x{recorded[1]}; set train.image_size for a square crop"
            )
        recorded = recorded[0]
    image_size = train.image_size if train.image_size > 0 else int(recorded or probed)
    num_classes = int(extra["num_classes"])
    names = list(extra.get("class_names") or [str(i) for i in range(num_classes)])
    counts = {split: manifest.count(split) for split in manifest.splits}
    return DataSpec(source_dir, sidecars, num_classes, names, image_size, counts)


# ----------------------------------------------------------------------------- epoch plan


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFF_FFFF_FFFF_FFFF for p in parts])


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in _rng(seed, epoch, 0x5EED).permutation(num_shards)]


def rank_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block [start, stop) of ``total`` samples; sizes differ by at most 1."""
    return (rank * total) // world, ((rank + 1) * total) // world


def rank_pieces(counts: list[int], order: list[int], rank: int, world: int) -> list[tuple[int, int, int]]:
    """The (shard index, first sample, stop sample) pieces of rank ``rank``'s block of an epoch."""
    start, stop = rank_bounds(sum(counts), rank, world)
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            pieces.append((shard, lo - offset, hi - offset))
        offset += counts[shard]
    return pieces


def worker_pieces(
    pieces: list[tuple[int, int, int]], worker: int, workers: int
) -> list[tuple[int, int, int]]:
    """Worker ``worker``'s share of a rank's pieces: whole pieces round-robin, or, when there
    are fewer pieces than workers, equal sample ranges of them."""
    if len(pieces) >= workers:
        return pieces[worker::workers]
    flat = [(shard, i) for shard, lo, hi in pieces for i in range(lo, hi)]
    lo, hi = rank_bounds(len(flat), worker, workers)
    mine = flat[lo:hi]
    out: list[tuple[int, int, int]] = []
    for shard, i in mine:
        if out and out[-1][0] == shard and out[-1][2] == i:
            out[-1] = (shard, out[-1][1], i + 1)
        else:
            out.append((shard, i, i + 1))
    return out


def batch_sizes(num_samples: int, steps: int, batch_size: int) -> list[int]:
    """``steps`` batch sizes summing to ``num_samples``: full batches, the shortfall taken from the end."""
    sizes = [batch_size] * steps
    deficit = steps * batch_size - num_samples
    i = steps - 1
    while deficit > 0 and i >= 0:
        take = min(deficit, sizes[i] - 1)
        sizes[i] -= take
        deficit -= take
        i -= 1
    return sizes


# ----------------------------------------------------------------------------- samples


class RGBTransform:
    """A uint8 3×H×W image → its normalised float 3×S×S view and that view's geometry.

    The geometry is a float32 tensor ``[top, left, height, width, flip]``: the box
    of the source image the view shows, as fractions of the source's height and
    width, and 1 where the view was then flipped horizontally (:func:`apply_geometry`
    applies it to other inputs on the image's grid). Train (``random``): a random
    resized crop (scale 0.35-1) and a horizontal flip, drawn from the global CPU
    generator exactly as ``v2.RandomResizedCrop`` and ``v2.RandomHorizontalFlip``
    draw them; eval: resize (shorter side S) and centre crop, whose box is the
    whole image when it is square.
    """

    def __init__(self, image_size: int, random: bool):
        self.size = image_size
        self.random = random
        self.crop = v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True)
        self.flip = v2.RandomHorizontalFlip()
        self.resize = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
        self.normalise = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        if self.random:
            box = self.crop.make_params([image])
            flip = bool(torch.rand(1) < self.flip.p)  # RandomHorizontalFlip skips when rand >= p
            image = self.crop.transform(image, box)
            if flip:
                image = self.flip.transform(image, {})
            geometry = [
                box["top"] / height,
                box["left"] / width,
                box["height"] / height,
                box["width"] / width,
            ]
        else:
            image = self.resize(image)
            geometry, flip = self._centre_box(height, width), False
        return self.normalise(image), torch.tensor([*geometry, float(flip)], dtype=torch.float32)

    def _centre_box(self, height: int, width: int) -> list[float]:
        """The eval view's box, as fractions: ``v2.Resize`` scales the shorter side to S (the
        longer to ``int(S * long / short)``), ``v2.CenterCrop`` takes S×S of that at
        ``round((side - S) / 2)``; exactly [0, 0, 1, 1] for a square image."""
        short, long = min(height, width), max(height, width)
        resized = (self.size, int(self.size * long / short))
        resized_h, resized_w = resized if height <= width else resized[::-1]
        top, left = round((resized_h - self.size) / 2), round((resized_w - self.size) / 2)
        return [top / resized_h, left / resized_w, self.size / resized_h, self.size / resized_w]


WHOLE = (0.0, 0.0, 1.0, 1.0)  # the geometry box of the whole image


def apply_geometry(x: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
    """Spatial inputs (B, ..., H, W) cropped and flipped as their images were (``geometry`` B×5,
    :class:`RGBTransform`'s): row b's box, taken in the input's own coordinates, is resampled
    bilinearly to the input's H×W grid (``torchvision.ops.roi_align``, aligned=True: pixel centres
    at +0.5, as ``v2.RandomResizedCrop`` resizes; at the box's edges it reads the pixels just
    beyond the box, where resizing a cut-out crop repeats its edge), then flipped along W where
    its flip is set.

    A row whose box is the whole input is not resampled, so a row with the whole box and no flip
    is exactly itself (eval on square images), and a whole-box flip is exact too.
    """
    if x.ndim < 3 or geometry.shape != (x.shape[0], 5):
        raise ValueError(f"apply_geometry: inputs {list(x.shape)} and geometry {list(geometry.shape)}")
    height, width = x.shape[-2:]
    geometry = geometry.to(x.device)
    box, flip = geometry[:, :4], geometry[:, 4] > 0.5
    crop = (box != torch.tensor(WHOLE, device=x.device)).any(dim=1)
    if not bool(crop.any()) and not bool(flip.any()):
        return x
    out = x.clone()
    if bool(crop.any()):
        rows = crop.nonzero().flatten()
        pixels = torch.tensor([height, width, height, width], dtype=torch.float64, device=x.device)
        top, left, box_h, box_w = (box[rows].double() * pixels).unbind(1)
        index = torch.arange(len(rows), dtype=torch.float64, device=x.device)
        rois = torch.stack([index, left, top, left + box_w, top + box_h], dim=1).float()
        planes = x[rows].reshape(len(rows), -1, height, width).float()
        resampled = roi_align(planes, rois, output_size=(height, width), aligned=True)
        out[rows] = resampled.reshape(x[rows].shape).to(x.dtype)
    if bool(flip.any()):
        out[flip] = out[flip].flip(-1)
    return out


def decode_rgb(data: bytes) -> torch.Tensor:
    """PNG/JPEG bytes → 3×H×W uint8 tensor, decoded by ``torchvision.io`` (libpng/libjpeg-turbo)
    straight into a tensor; unreadable images raise SchemaError."""
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise SchemaError(f"unreadable image ({exc.__class__.__name__})") from None


class SampleDecoder:
    """Raw merged sample (``field -> bytes``) → tensors; bad samples raise SchemaError.

    ``train`` samples are augmented as ``augment`` (:data:`AUGMENT`) says, eval
    ones get the eval geometry; with ``augment="aligned"`` the spatial latents and
    decoded signals of :attr:`aligned` modalities follow the RGB's geometry
    (returned under ``geometry``). A sidecar decoded on the fly gives its raw latent
    (as stored, in float32 or int64 for codes, S drawn, not standardised) under
    ``raw_latents``; the loader decodes it after batching (:class:`OnTheFlyDecoder`).
    """

    def __init__(
        self,
        sidecars: dict[str, Sidecar],
        image_size: int,
        seed: int,
        *,
        train: bool,
        augment: str = "aligned",
    ):
        mode = augment_mode(augment)
        self.sidecars = sidecars
        self.seed = seed
        self.random = train and mode != "none"
        self.transform = RGBTransform(image_size, self.random)
        # the modalities whose spatial inputs take the RGB's geometry
        self.aligned = (
            frozenset(m for m in sidecars if m in IMAGE_ALIGNED) if mode == "aligned" else frozenset()
        )
        self.stats = {
            m: (
                torch.tensor(s.mean, dtype=torch.float32),
                torch.tensor(s.std, dtype=torch.float32),
            )
            for m, s in sidecars.items()
            if s.mean is not None
        }

    def _standardise(self, sidecar: Sidecar, x: torch.Tensor) -> torch.Tensor:
        if sidecar.modality not in self.stats:
            return x
        mean, std = self.stats[sidecar.modality]
        if mean.numel() != x.shape[0 if sidecar.spec["kind"] == "spatial" else -1]:
            raise SchemaError(
                f"{sidecar.modality}: {mean.numel()} channel stats for a latent of shape {list(x.shape)}"
            )
        if sidecar.spec["kind"] == "spatial":  # C×h×w: channel first
            return (x - mean.view(-1, *([1] * (x.ndim - 1)))) / std.view(-1, *([1] * (x.ndim - 1)))
        return (x - mean) / std  # tokens T×C: channel last

    def _align(self, sidecar: Sidecar, x: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """``x`` cropped and flipped like the RGB when its modality is aligned and it is spatial
        (a C×h×w latent or a decoded signal; tokens have no geometry)."""
        spatial = sidecar.kind == "decoded" or sidecar.spec.get("kind") == "spatial"
        if sidecar.modality not in self.aligned or not spatial:
            return x
        return apply_geometry(x.unsqueeze(0), geometry.unsqueeze(0))[0]

    def __call__(self, raw: dict[str, Any], epoch: int) -> dict[str, Any]:
        key = raw["__key__"]
        rng = _rng(key_seed(key, self.seed), epoch)
        try:
            label = int(raw["cls"].decode().strip())
        except (KeyError, ValueError, AttributeError):
            raise SchemaError(f"sample {key!r}: missing or bad cls") from None
        image = decode_rgb(raw[image_field(raw)])
        if self.random:
            # transforms.v2 draws from the global CPU generator: seed it for this sample inside a
            # fork (state restored after). Seeding only the CPU generator, not torch.manual_seed,
            # leaves the CUDA generators alone and skips their lazy-seeding bookkeeping (~0.3 ms).
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(rng.integers(2**62)))
                rgb, geometry = self.transform(image)
        else:
            rgb, geometry = self.transform(image)
        latents, decoded, raw_latents, present = {}, {}, {}, {}
        for m, sidecar in self.sidecars.items():
            if sidecar.field not in raw:
                raise SchemaError(f"sample {key!r}: no {sidecar.field} in {sidecar.directory.name}")
            # stage one keeps a sample it could not process with a zero latent and a flag: the
            # modality is then missing for this sample (the teacher puts its null tokens there)
            present[m] = f"{m}.flag.txt" not in raw
            array = decode_npy(raw[sidecar.field], finite=True)
            shape = sidecar.stored_shape
            if sidecar.samples_per_input > 1:  # latent, decoded or to decode: one of the S drawn
                if array.ndim != len(shape) + 1:
                    raise SchemaError(f"sample {key!r}: {m} sample {array.shape} lacks the S dimension")
                array = array[int(rng.integers(array.shape[0]))]
            if shape and tuple(array.shape) != shape:
                raise SchemaError(
                    f"sample {key!r}: {m} has shape {list(array.shape)}, the manifest says {list(shape)}"
                )
            if sidecar.on_the_fly:  # decoded after batching, in the main process
                dtype = np.int64 if array.dtype.kind in "iu" else np.float32
                raw_latents[m] = torch.from_numpy(np.array(array, dtype=dtype))
            elif sidecar.kind == "decoded":
                decoded[m] = self._align(
                    sidecar, torch.from_numpy(np.array(array, dtype=np.float32)), geometry
                )
            elif sidecar.spec.get("kind") == "codes":
                latents[m] = torch.from_numpy(np.array(array, dtype=np.int64))
            elif present[m]:
                latent = self._standardise(sidecar, torch.from_numpy(np.array(array, dtype=np.float32)))
                latents[m] = self._align(sidecar, latent, geometry)
            else:
                latents[m] = torch.zeros(array.shape, dtype=torch.float32)
        return {
            "key": key,
            "rgb": rgb,
            "geometry": geometry,
            "label": label,
            "latents": latents,
            "decoded": decoded,
            RAW_LATENTS: raw_latents,
            "present": present,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Decoded samples → the batch the methods see: rgb, label, latents, decoded, keys, ``geometry``
    (B×5, :class:`RGBTransform`'s) and ``present`` {modality: (B,) bool}, False where stage one
    flagged the sample's latent."""
    batch: dict[str, Any] = {
        "rgb": torch.stack([s["rgb"] for s in samples]),
        "geometry": torch.stack([s["geometry"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "keys": [s["key"] for s in samples],
        "latents": {m: torch.stack([s["latents"][m] for s in samples]) for m in samples[0]["latents"]},
    }
    if samples[0]["decoded"]:
        batch["decoded"] = {m: torch.stack([s["decoded"][m] for s in samples]) for m in samples[0]["decoded"]}
    if samples[0].get(RAW_LATENTS):  # decoded on the fly by the loader (OnTheFlyDecoder), then dropped
        batch[RAW_LATENTS] = {
            m: torch.stack([s[RAW_LATENTS][m] for s in samples]) for m in samples[0][RAW_LATENTS]
        }
    if samples[0]["present"]:
        batch["present"] = {
            m: torch.tensor([s["present"][m] for s in samples]) for m in samples[0]["present"]
        }
    return batch


class OnTheFlyDecoder:
    """``train.decoded_from=latents``: a collated batch's raw latents → ``batch["decoded"]``.

    Runs in the main process (DataLoader workers only read and decode RGB and
    latents). Each modality's generator is taken on first use from
    :func:`build_decoder` (built once per process), frozen and in eval mode on ``device`` with the
    precision stage one recorded; a batch is decoded in one call per modality
    under ``torch.inference_mode``, to float32 (B, *shape) on the CPU, rows of
    flagged samples (``present`` False) set to zeros as in stage one's decoded
    sets. The signals of ``aligned`` modalities then take each sample's geometry
    (``batch["geometry"]``, :func:`apply_geometry`), as a decoded sidecar's do in
    :class:`SampleDecoder`. ``seconds`` sums the time spent here.
    """

    def __init__(
        self,
        sidecars: dict[str, Sidecar],
        device: str | torch.device | None = None,
        aligned: frozenset[str] = frozenset(),
    ):
        self.sidecars = {m: s for m, s in sidecars.items() if s.on_the_fly}
        self.aligned = aligned
        self.device = torch.device(device if device is not None else "cpu")
        self.generators: dict[str, Generator] = {}
        self.seconds = 0.0

    def generator(self, modality: str) -> Generator:
        if modality not in self.generators:
            sidecar = self.sidecars[modality]
            self.generators[modality] = build_decoder(
                sidecar.generator, self.device, sidecar.spec.get("precision", "fp32")
            )
        return self.generators[modality]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        raw = batch.pop(RAW_LATENTS)
        decoded = dict(batch.get("decoded") or {})
        for m, sidecar in self.sidecars.items():
            signal = decode_latents(self.generator(m), raw[m])
            if tuple(signal.shape[1:]) != tuple(sidecar.spec["shape"]):
                raise UserError(
                    f"{m}: the generator decoded a batch to {list(signal.shape[1:])}, "
                    f"not the {sidecar.spec['shape']} found when the data was resolved"
                )
            present = (batch.get("present") or {}).get(m)
            if present is not None and not bool(present.all()):
                signal[~present] = 0.0
            decoded[m] = apply_geometry(signal, batch["geometry"]) if m in self.aligned else signal
        batch["decoded"] = decoded
        self.seconds += time.perf_counter() - start
        return batch


# ----------------------------------------------------------------------------- dataset and loader


class ShardStream(IterableDataset):
    """The decoded samples of one rank's block of an epoch (this worker's share of it).

    Call :meth:`set_epoch` before creating the DataLoader iterator (workers copy
    the dataset when the iterator is created).
    """

    def __init__(
        self,
        spec: DataSpec,
        split: str,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        train: bool = True,
        augment: str = "aligned",
        shuffle_buffer: int = 1000,
        on_error: str = "warn",
    ):
        super().__init__()
        self.pairs = aligned_shards(
            spec.source_dir, {m: s.directory for m, s in spec.sidecars.items()}, split
        )
        self.counts = [
            Manifest.read(spec.source_dir).splits[split][i].samples for i in range(len(self.pairs))
        ]
        self.rank, self.world, self.seed = rank, world, seed
        self.train = train
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.on_error = on_error
        self.decoder = SampleDecoder(spec.sidecars, spec.image_size, seed, train=train, augment=augment)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def pieces(self, epoch: int) -> list[tuple[int, int, int]]:
        order = shard_order(len(self.counts), self.seed, epoch, self.train)
        return rank_pieces(self.counts, order, self.rank, self.world)

    def num_samples(self, rank: int | None = None) -> int:
        start, stop = rank_bounds(sum(self.counts), self.rank if rank is None else rank, self.world)
        return stop - start

    def _raw(self, pieces: list[tuple[int, int, int]], handler: ErrorPolicy) -> Iterator[dict[str, Any]]:
        for shard, lo, hi in pieces:
            source, sidecars = self.pairs[shard]
            for i, sample in enumerate(read_aligned(source, sidecars, handler)):
                if i >= hi:
                    break
                if i >= lo:
                    yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = worker_pieces(self.pieces(self.epoch), worker, workers)
        handler = ErrorPolicy(self.on_error)
        stream: Iterator[dict[str, Any]] = self._raw(mine, handler)
        if self.shuffle_buffer > 1:
            rng = random.Random(int(_rng(self.seed, self.epoch, self.rank, worker, 0xB0F).integers(2**62)))
            stream = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(stream)
        for raw in stream:
            try:
                yield self.decoder(raw, self.epoch)
            except SchemaError as exc:
                handler(exc)


class ShardLoader:
    """Fixed-length epochs of batches for one rank: ``for batch in loader.epoch(e): ...``.

    ``steps_per_epoch`` is the same on every rank: ``ceil(ceil(N / world) / batch_size)``.
    With ``pad`` (training), a batch left short by skipped bad samples is filled
    by repeating good ones (counted in ``padded``) so every rank still takes
    ``steps_per_epoch`` steps; without it (evaluation), nothing is repeated.
    With sidecars decoded on the fly (``train.decoded_from=latents``), each batch
    yielded is decoded on ``device`` first (:class:`OnTheFlyDecoder`; batches
    skipped on resume are not), its seconds summed in :attr:`decode_s`.
    """

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        pad: bool = True,
        device: str | torch.device | None = None,
    ):
        if batch_size < 1:
            raise UserError("train.batch_size must be at least 1")
        self.stream = stream
        self.pad = pad
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.padded = 0
        decoder = OnTheFlyDecoder(stream.decoder.sidecars, device, stream.decoder.aligned)
        self.decoder = decoder if decoder.sidecars else None

    @property
    def decode_s(self) -> float:
        """Seconds spent decoding latents on the fly so far (0 when nothing is decoded here)."""
        return self.decoder.seconds if self.decoder is not None else 0.0

    def _batch(self, chunk: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(chunk)
        return self.decoder(batch) if self.decoder is not None else batch

    @property
    def steps_per_epoch(self) -> int:
        largest = max(self.stream.num_samples(r) for r in range(self.stream.world))
        return math.ceil(largest / self.batch_size)

    def _samples(self, epoch: int) -> Iterator[dict[str, Any]]:
        self.stream.set_epoch(epoch)
        if self.num_workers == 0:
            yield from self.stream
            return
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=max(2, self.batch_size // self.num_workers),
            generator=torch.Generator().manual_seed(self.stream.seed + epoch),
        )
        yield from loader

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch``, the first ``skip`` of them left out (resuming mid-epoch)."""
        steps = self.steps_per_epoch
        sizes = batch_sizes(self.stream.num_samples(), steps, self.batch_size)
        samples = self._samples(epoch)
        last: list[dict[str, Any]] = []
        for step, size in enumerate(sizes):
            chunk = []
            for sample in samples:
                chunk.append(sample)
                if len(chunk) == size:
                    break
            if len(chunk) < size and not self.pad:  # evaluation: no collectives per batch, nothing repeated
                if chunk and step >= skip:
                    yield self._batch(chunk)
                continue
            if len(chunk) < size:  # bad samples were skipped: repeat good ones, all ranks take `steps` steps
                pool = chunk or last
                if not pool:
                    raise UserError(f"rank {self.stream.rank} has no readable samples in epoch {epoch}")
                logger.warning(
                    "epoch %d batch %d: %d samples short (bad samples), padded",
                    epoch,
                    step,
                    size - len(chunk),
                )
                self.padded += size - len(chunk)
                chunk = chunk + [pool[i % len(pool)] for i in range(size - len(chunk))]
            last = chunk
            if step >= skip:
                yield self._batch(chunk)

    def __len__(self) -> int:
        return self.steps_per_epoch


def build_loader(
    spec: DataSpec,
    split: str,
    train_cfg,
    *,
    rank: int = 0,
    world: int = 1,
    train: bool | None = None,
    device: str | torch.device | None = None,
) -> ShardLoader:
    """The loader of ``split`` for one rank, configured from ``TrainConfig``; ``device`` is where
    sidecars decoded on the fly are decoded (the CPU when None; batches come back on the CPU)."""
    is_train = split == "train" if train is None else train
    if spec.counts.get(split, 0) == 0:
        raise UserError(f"{spec.source_dir} has no {split} samples")
    stream = ShardStream(
        spec,
        split,
        rank=rank,
        world=world,
        seed=train_cfg.seed,
        train=is_train,
        augment=augment_mode(train_cfg.augment),
        shuffle_buffer=train_cfg.shuffle_buffer,
        on_error=train_cfg.on_error,
    )
    return ShardLoader(
        stream,
        train_cfg.batch_size,
        train_cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        pad=is_train,
        device=device,
    )
