"""The procedural scenes dataset: RGB whose label only the other modalities can resolve.

Each sample is one target object (a sphere, box or cylinder) on a textured
ground plane among clutter, seen by a perspective camera and a LiDAR-like
scanner at the same pose, and struck once so that it rings. The label is
``<size>_<material>`` (3 sizes × 3 materials, 9 classes); the ambiguity knob
``scenes.ambiguity`` in [0, 1] sets how much of it RGB can see (``scene``).

The default ``a = 0.4`` was chosen on the val split (at 0.6 an RGB-only probe
was at 23 % val, too close to chance): on the demo splits a small CNN gets
42.6 % test top-1 from RGB alone and 98.2 % from RGB + depth + audio + LiDAR
(chance 11.1 %; ``benchmarks/probe_scenes.py``).

Everything is a pure function of ``(seed, split, index)``, so shards are
byte-identical across runs and worker counts.

Modules:

- ``scene``: the classes and the label of an index (``class_of``); drawing
  one random scene for a label (``sample_scene``), where the ambiguity knob acts.
- ``geometry``: vectorised ray casting against the analytic primitives.
- ``audio``: the impact sound by modal synthesis (``impact_sound``).
- ``render``: one sample: camera RGB and depth, LiDAR range and intensity,
  sound, metadata, encoded (``render_sample``).
- ``dataset``: every split into source shards and manifest, on a process pool
  (``render_dataset``, ``render_config``).
- ``preview``: a PNG grid of rendered samples (``write_preview``).
"""

from synesthesia.sources.scenes.dataset import (
    MODALITIES,
    check_config,
    is_rendered,
    render_config,
    render_dataset,
    source_dir,
    split_sizes,
)
from synesthesia.sources.scenes.preview import write_preview
from synesthesia.sources.scenes.render import render_camera, render_lidar, render_sample, sample_key
from synesthesia.sources.scenes.scene import (
    CLASS_NAMES,
    FRAMING,
    HFOV_DEG,
    MATERIAL_COLOUR,
    MATERIAL_REFLECTIVITY,
    MATERIALS,
    NUM_CLASSES,
    PITCH_DEG,
    REFERENCE_SIZE,
    SIZE_JITTER,
    SIZES,
    SPLIT_CODES,
    class_of,
    sample_scene,
)

__all__ = [
    "CLASS_NAMES",
    "FRAMING",
    "HFOV_DEG",
    "MATERIALS",
    "MATERIAL_COLOUR",
    "MATERIAL_REFLECTIVITY",
    "MODALITIES",
    "NUM_CLASSES",
    "PITCH_DEG",
    "REFERENCE_SIZE",
    "SIZES",
    "SIZE_JITTER",
    "SPLIT_CODES",
    "check_config",
    "class_of",
    "is_rendered",
    "render_camera",
    "render_config",
    "render_dataset",
    "render_lidar",
    "render_sample",
    "sample_key",
    "sample_scene",
    "source_dir",
    "split_sizes",
    "write_preview",
]
