"""Stage-two sets: which source set and sidecar sets a pipeline trains on, and reading them zipped.

:func:`resolve_data` finds ``<train.shards>/<dataset>/source`` and, for the
privileged source ``train.source`` (:data:`SOURCES`), one sidecar set per
modality of ``train.modalities`` (:func:`resolve_sidecar`, a :class:`Sidecar`
each): ``latents/<set>`` of the generator's ``generate`` mode for ``latent``,
of its ``encode`` mode for ``real`` (the true signal, encoded), and for
``decoded`` where ``train.decoded_from`` (:data:`DECODED_FROM`) says:

- ``sidecars`` (default): stage one's decoded sidecar set ``decoded/<set>/``
  (written with ``shard.decode: true``), read like any sidecar;
- ``latents``: the latent set ``train.source=latent`` reads (``latents/<set>/``,
  ``train.latent_sets`` honoured), decoded on the fly
  (:mod:`synesthesia.train.on_the_fly`).

The other sources ignore ``decoded_from`` (it says where decoded signals come
from, and they read none), so it can be set once for a whole ablation grid or
``synesthesia eval``. The result, a :class:`DataSpec`, carries what the models
need (classes, image size, the teacher's modality specs) and the split counts.
:func:`read_aligned` zips one source shard with its same-index sidecar shards.
Every set is checked against its manifest when it is resolved (``train.verify``:
:func:`check_set_shards`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synesthesia import UserError
from synesthesia.shards.reader import ErrorPolicy, ShardMismatchError, aligned_shards, iter_shard
from synesthesia.shards.schema import decode_npy, decoded_field, image_field, latent_field
from synesthesia.shards.verify import LEVELS, check_shards
from synesthesia.shards.writer import Manifest
from synesthesia.storage import as_path
from synesthesia.train.on_the_fly import build_decoder, decode_latents
from synesthesia.train.samples import augment_mode, decode_rgb

logger = logging.getLogger(__name__)

SOURCES = ("none", "latent", "decoded", "real")
DECODED_FROM = ("sidecars", "latents")
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


def check_verify(train) -> None:
    """``train.verify`` must be one of :data:`~synesthesia.shards.verify.LEVELS`."""
    if train.verify not in LEVELS:
        raise UserError(f"unknown train.verify {train.verify!r}; valid: {', '.join(LEVELS)}")


def check_set_shards(directory: Path, level: str) -> None:
    """Refuse a set whose shards disagree with its manifest: each must exist with its listed byte
    size and, at level ``full``, its sha256 and sample count (:func:`check_shards`)."""
    problems = check_shards(directory, Manifest.read(directory), level)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(
            f"{problems[0]}{more}: the set does not match its manifest; run synesthesia inspect --verify {directory}"
        )


def check_decoded_from(train) -> None:
    """``train.decoded_from`` must be one of :data:`DECODED_FROM` (whatever the source)."""
    if train.decoded_from not in DECODED_FROM:
        raise UserError(
            f"unknown train.decoded_from {train.decoded_from!r}; valid: {', '.join(DECODED_FROM)}"
        )


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
    check_verify(train)
    augment_mode(train.augment)
    root = as_path(train.shards, "train.shards") / cfg.dataset
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
    # a corrupt set never trains silently: missing or resized shards (and, verify=full, changed
    # bytes or counts) are refused here; counts are checked again as each shard is read
    for directory in [source_dir, *(s.directory for s in sidecars.values())]:
        check_set_shards(directory, train.verify)
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
