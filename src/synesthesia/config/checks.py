"""Bounds on every number of a pipeline config, and the names that become folders under ``--out``.

A number read from a file or an override is hostile until bounded: :func:`check_pipeline`
(called by :func:`~synesthesia.config.loading.load_pipeline` and
:func:`~synesthesia.config.loading.replace`) refuses, in one line naming the key and its
range, any value outside :data:`BOUNDS` (every int and float field of every section, and
each item of their lists), any non-finite float anywhere (``options`` and ``mapping``
included), any string holding a NUL, and a dataset, pipeline, run or set name that is not
one plain folder name (:func:`synesthesia.utils.check_name`). Seeds are 0 ≤ seed < 2**32.
Checks that need more than one field (``val_fraction + test_fraction``, ``dim % heads``)
stay with the verb that reads the section.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from synesthesia import UserError
from synesthesia.config import sections


@dataclass(frozen=True)
class Range:
    """A closed interval, or open at an end where ``low_open`` / ``high_open``."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    label: str = ""  # how errors write it, when not as [low, high]

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.label:
            return self.label
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


def closed(low: float, high: float) -> Range:
    return Range(low, high)


def above(low: float, high: float) -> Range:
    """(low, high]: e.g. a learning-rate-like quantity that must be positive."""
    return Range(low, high, low_open=True)


def below(low: float, high: float) -> Range:
    """[low, high): e.g. a probability that must stay under 1."""
    return Range(low, high, high_open=True)


SEED = Range(0, 2**32, high_open=True, label="[0, 2**32)")  # what numpy and torch seed with
STEPS = closed(0, 10**9)  # optimizer steps, step intervals
SAMPLES = closed(0, 10**8)  # sample counts
BATCH = closed(1, 65536)
WORKERS = closed(0, 256)
LR = closed(0, 10)  # 0 is allowed: a run that only evaluates its initial weights
WEIGHT_DECAY = closed(0, 10)
CLIP = closed(0, 10**6)  # 0: no clipping
PROBABILITY_BELOW_ONE = below(0, 1)
FRACTION = closed(0, 1)
EPOCHS = closed(1, 10**6)
SHARD_SIZE = closed(1, 10**6)
LIDAR_BEAMS = closed(1, 512)
LIDAR_AZIMUTH = closed(1, 8192)

# Every int and float field of every section: its range (for a list, each item's).
BOUNDS: dict[type, dict[str, Range]] = {
    sections.PipelineConfig: {"seed": SEED},
    sections.ScenesConfig: {
        "num_train": SAMPLES,
        "num_val": SAMPLES,
        "num_test": SAMPLES,
        "num_paired": SAMPLES,
        "image_size": closed(8, 1024),
        "lidar_beams": LIDAR_BEAMS,
        "lidar_azimuth": LIDAR_AZIMUTH,
        "audio_rate": closed(4000, 96000),
        "audio_seconds": above(0.05, 30),
        "ambiguity": FRACTION,
        "clutter": closed(0, 32),
        "lidar_dropout": Range(0, 1 / 3, high_open=True, label="[0, 1/3)"),
        "lidar_noise": closed(0, 10),
        "lidar_max_range": above(0, 10000),
        "shard_size": SHARD_SIZE,
        "workers": closed(0, 1024),
    },
    sections.IngestConfig: {
        "val_fraction": PROBABILITY_BELOW_ONE,
        "test_fraction": PROBABILITY_BELOW_ONE,
        "shard_size": SHARD_SIZE,
        "audio_rate": closed(1000, 192000),
        "lidar_beams": LIDAR_BEAMS,
        "lidar_azimuth": LIDAR_AZIMUTH,
        "lidar_fov_up": closed(-90, 90),
        "lidar_fov_down": closed(-90, 90),
    },
    sections.GeneratorConfig: {"samples_per_input": closed(1, 1024), "seed": SEED},
    sections.ShardConfig: {
        "batch_size": BATCH,
        "num_workers": WORKERS,
        "max_pending_writes": closed(1, 64),
        "lease_timeout_s": closed(1, 7 * 24 * 3600),  # one second to a week
    },
    sections.BootstrapConfig: {
        "holdout": closed(1, 10**8),
        "max_pairs": SAMPLES,
        "num_train_timesteps": closed(1, 10**5),
        "inference_steps": closed(1, 10**5),
        "ensemble": closed(1, 1024),
        "steps": closed(1, 10**9),
        "regression_steps": closed(-1, 10**9),
        "batch_size": BATCH,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "warmup_steps": STEPS,
        "clip_grad": CLIP,
        "block_channels": closed(1, 4096),
        "layers_per_block": closed(1, 16),
        "norm_groups": closed(1, 1024),
        "encode_batch_size": BATCH,
        "save_every": STEPS,
        "log_every": closed(1, 10**9),
        "max_model_mb": above(0, 10**6),
        "seed": SEED,
    },
    sections.TeacherConfig: {
        "dim": closed(1, 8192),
        "depth": closed(1, 128),
        "heads": closed(1, 128),
        "mlp_ratio": above(0, 64),
        "patch_size": closed(1, 1024),
        "tokens_per_modality": closed(1, 4096),
        "modality_dropout": FRACTION,
        "adapter_dropout": PROBABILITY_BELOW_ONE,
        "drop_path": PROBABILITY_BELOW_ONE,
        "latent_patch_size": closed(1, 1024),
        "resampler_depth": closed(0, 64),
        "resampler_mlp_ratio": above(0, 64),
        "decoded_max_tokens": closed(1, 65536),
        "epochs": closed(0, 10**6),
    },
    sections.StudentConfig: {"drop_path": PROBABILITY_BELOW_ONE},
    sections.MethodConfig: {
        "alpha": FRACTION,
        "temperature": above(0, 1000),
        "weight": closed(0, 10**6),
        "layers": closed(-1024, 1023),
    },
    sections.TrainConfig: {
        "epochs": EPOCHS,
        "early_stop_patience": closed(0, 10**6),
        "early_stop_min_epochs": closed(0, 10**6),
        "batch_size": BATCH,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "warmup_steps": STEPS,
        "grad_accum": closed(1, 65536),
        "clip_grad": CLIP,
        "num_workers": WORKERS,
        "shuffle_buffer": closed(0, 10**7),
        "save_every": STEPS,
        "keep_checkpoints": closed(0, 10**6),
        "seed": SEED,
        "image_size": closed(0, 4096),
    },
    sections.AblateConfig: {
        "seeds": SEED,
        "kd_alphas": FRACTION,
        "kd_temperatures": above(0, 1000),
        # every value of a tuned method field is in [0, 10**6]; check_pipeline then bounds each
        # by its own field's range (alpha in [0, 1], temperature in (0, 1000])
        "tune": closed(0, 10**6),
        "tune_seed": SEED,
    },
}

MAX_OPTION_INT = 2**63 - 1  # an int in ``options`` or ``mapping``: at most what int64 holds


def check_pipeline(cfg: sections.PipelineConfig) -> sections.PipelineConfig:
    """Every number of ``cfg`` finite and in its range, every output name a plain folder name."""
    from synesthesia.utils import check_name

    check_section(cfg)
    check_name(cfg.name, "pipeline name (name)")
    check_name(cfg.dataset, "dataset name")
    if cfg.train.run_name:
        check_name(cfg.train.run_name, "train.run_name")
    if cfg.bootstrap.name:
        check_name(cfg.bootstrap.name, "bootstrap.name")
    method_bounds = BOUNDS[sections.MethodConfig]
    for method, fields in cfg.ablate.tune.items():
        for key, values in fields.items():
            _check_value(values, f"ablate.tune.{method}.{key}", method_bounds.get(key))
    generators = [(f"shard.generators.{i}", g) for i, g in enumerate(cfg.shard.generators)]
    for source, gens in cfg.ablate.generators.items():
        generators += [(f"ablate.generators.{source}.{i}", g) for i, g in enumerate(gens)]
    for where, g in generators:  # the sidecar folder: set_name, or <name>-<modality>
        if g.set_name is not None:
            check_name(g.set_name, f"{where}.set_name")
        check_name(g.name, f"{where}.name")
        check_name(g.modality, f"{where}.modality")
    return cfg


def check_section(section: Any, where: str = "") -> None:
    """Bounds, finiteness and no NUL in strings, for one config dataclass and what it nests."""
    bounds = BOUNDS.get(type(section), {})
    for f in dataclasses.fields(section):
        key = f"{where}.{f.name}" if where else f.name
        _check_value(getattr(section, f.name), key, bounds.get(f.name))


def _check_value(value: Any, key: str, bound: Range | None) -> None:
    if dataclasses.is_dataclass(value):
        check_section(value, key)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(item, f"{key}.{i}", bound)
    elif isinstance(value, dict):
        for k, item in value.items():
            _check_value(item, f"{key}.{k}", bound)
    elif isinstance(value, str):
        if "\x00" in value:
            raise UserError(f"{key} holds a NUL character")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}={value} is not a finite number")
        if bound is not None and value not in bound:
            raise UserError(f"{key}={_short(value)} is outside {bound}")
        if bound is None and isinstance(value, int) and abs(value) > MAX_OPTION_INT:
            raise UserError(f"{key}={_short(value)} is outside [-2**63, 2**63)")


def _short(value: float) -> str:
    if isinstance(value, int) and abs(value) > 10**30:  # repr of a huge int is slow, or refused
        return f"<an integer of about {int(value.bit_length() * math.log10(2))} digits>"
    return repr(value)
