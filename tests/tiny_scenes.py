"""The procedural scenes at test size: ``synesthesia render`` overrides for a few tiny samples."""

from __future__ import annotations

DEFAULTS = {
    "num_train": 4,
    "num_val": 2,
    "num_test": 2,
    "num_paired": 0,
    "shard_size": 2,
    "image_size": 16,
    "lidar_beams": 4,
    "lidar_azimuth": 16,
    "audio_seconds": 0.1,
    "workers": 1,
}


def tiny_scenes(**changes) -> list[str]:
    """``scenes.<key>=<value>`` overrides: :data:`DEFAULTS` with ``changes`` applied."""
    return [f"scenes.{key}={value}" for key, value in {**DEFAULTS, **changes}.items()]
