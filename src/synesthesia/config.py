"""Typed pipeline configuration: YAML (safe_load) → frozen dataclasses, with key=value overrides.

A pipeline file is a YAML mapping whose top-level keys are the sections below.
Every section is a frozen dataclass; unknown keys are errors that name the valid
ones, and values are type-checked. Overrides use dotted paths
(``train.lr=1e-3``, ``shard.generators.0.batch_size=8``); a bare key is looked up
in the section of the verb being run (``synesthesia train p.yaml stage=teacher``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from synesthesia import UserError

# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ScenesConfig:
    """The procedural scenes dataset (`synesthesia render`)."""

    num_train: int = 2000
    num_val: int = 400
    num_test: int = 400
    num_paired: int = 2000
    image_size: int = 64
    lidar_beams: int = 32
    lidar_azimuth: int = 256
    audio_rate: int = 16000
    audio_seconds: float = 0.5
    # 0: colour tells the material; 1: colour distributions of materials fully overlap.
    ambiguity: float = 0.8
    shard_size: int = 500
    workers: int = 0  # 0: one process per core


@dataclass(frozen=True)
class IngestConfig:
    """Importing an existing dataset (`synesthesia ingest`)."""

    source: str = ""
    format: str = "auto"  # auto | folder | webdataset | hf
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    shard_size: int = 1000
    audio_rate: int = 16000


@dataclass(frozen=True)
class GeneratorConfig:
    """One frozen generator run by stage one; ``options`` go to its constructor."""

    name: str = "tae"
    modality: str = "depth"
    weights: str | None = None
    set_name: str | None = None  # sidecar folder name; default "<name>-<modality>"
    samples_per_input: int = 1
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardConfig:
    """Stage one (`synesthesia shard`): source shards → latent sidecars."""

    generators: list[GeneratorConfig] = field(default_factory=list)
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    batch_size: int = 32
    num_workers: int = 1
    decode: bool = False
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    latent_dtype: str = "float16"
    on_error: str = "skip"  # skip | raise


@dataclass(frozen=True)
class BootstrapConfig:
    """Training small image-conditioned latent diffusion generators (`synesthesia bootstrap`)."""

    modalities: list[str] = field(default_factory=lambda: ["depth", "audio", "lidar"])
    out: str = "models"
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    block_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    prediction_type: str = "sample"
    num_train_timesteps: int = 1000
    inference_steps: int = 2
    holdout: int = 200
    seed: int = 0


@dataclass(frozen=True)
class TeacherConfig:
    """The multimodal ViT over RGB patches and latent tokens."""

    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    patch_size: int = 8
    tokens_per_modality: int = 16
    modality_dropout: float = 0.5
    adapter_dropout: float = 0.1
    drop_path: float = 0.0


@dataclass(frozen=True)
class StudentConfig:
    """An RGB-only timm backbone."""

    name: str = "vit_tiny_scenes"
    pretrained: bool = False
    drop_path: float = 0.0


@dataclass(frozen=True)
class MethodConfig:
    """A training objective from the methods registry; ``options`` go to its constructor."""

    name: str = "ce"
    alpha: float = 0.25
    temperature: float = 2.0
    weight: float = 1.0
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1])
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Stage two (`synesthesia train`): the accelerate loop."""

    stage: str = "student"  # teacher | student
    modalities: list[str] = field(default_factory=lambda: ["depth", "audio", "lidar"])
    source: str = "latent"  # none | latent | decoded | real
    latent_sets: dict[str, str] = field(default_factory=dict)  # modality -> sidecar set name
    teacher: str | None = None  # path of a trained teacher run (student stage)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_accum: int = 1
    clip_grad: float = 1.0
    precision: str = "no"  # no | bf16 | fp16
    num_workers: int = 1
    shuffle_buffer: int = 1000
    save_every: int = 0  # steps; 0: only at the end
    log_with: str = "tensorboard"
    augment: bool = True
    seed: int = 0


@dataclass(frozen=True)
class AblateConfig:
    """The ablation grid (`synesthesia ablate`)."""

    methods: list[str] = field(default_factory=lambda: ["ce", "kd", "messy"])
    sources: list[str] = field(default_factory=lambda: ["none", "decoded", "latent", "real"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass(frozen=True)
class PipelineConfig:
    """A whole pipeline: every verb reads the sections it needs."""

    name: str = "pipeline"
    dataset: str = "scenes"
    seed: int = 0
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0] if args else Any, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    raise UserError(f"{where}: unsupported type {_type_name(tp)}")


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are UserErrors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(
            f"unknown key {prefix}{unknown[0]}; valid keys{' of ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-JSON form of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_hash(data: Any) -> str:
    """A short stable hash of any JSON-able config (dataclass or mapping)."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.0.c=value`` → (["a", "b", "0", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any, full: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override {full}: {part!r} is not an index of a list of {len(node)}")
            node = node[int(part)]
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict | list):
            raise UserError(f"override {full}: {'.'.join(path[: i + 1])} is not a section")
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"override {full}: {last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(data: dict[str, Any], overrides: list[str], section: str | None = None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a plain mapping (in place, and returned).

    A bare key that is not a top-level field is taken from ``section`` when given.
    """
    top = {f.name for f in dataclasses.fields(PipelineConfig)}
    for text in overrides:
        path, value = parse_override(text)
        if section and len(path) == 1 and path[0] not in top:
            path = [section, *path]
        _set_path(data, path, value, text)
    return data


# ----------------------------------------------------------------------------- loading


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a pipeline file must be a mapping of sections")
    return data


def load_pipeline(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), section: str | None = None
) -> PipelineConfig:
    """Load a pipeline YAML file (or the defaults when ``path`` is None) with overrides."""
    data = load_yaml(path) if path is not None else {}
    if path is not None and "name" not in data:
        data["name"] = Path(path).stem
    apply_overrides(data, list(overrides), section)
    return build(PipelineConfig, data)


def replace(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A copy of ``cfg`` with overrides applied (type-checked like a file)."""
    data = apply_overrides(to_dict(cfg), overrides)
    return build(PipelineConfig, data)


def write_resolved(cfg: Any, out_dir: str | Path, name: str = "config.json") -> Path:
    """Write the resolved config as JSON beside an output (atomically)."""
    from synesthesia.utils import atomic_write_text

    out = Path(out_dir) / name
    payload = {"config": to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "config_hash": config_hash(cfg)}
    atomic_write_text(out, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return out
