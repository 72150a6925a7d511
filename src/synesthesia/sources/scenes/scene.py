"""The label of a scenes sample and the random scene drawn for it (``class_of``, ``sample_scene``).

**The label** is ``<size>_<material>``: three true sizes (largest dimension
0.3, 0.6 or 1.2 m, ±19 %) × three materials (metal, wood, rubber), 9 classes,
balanced in every block of 9 consecutive indices (``class_of``).

**A scene** is one target object (a sphere, box or cylinder, ``geometry``)
on a textured ground plane among clutter, a perspective camera framed on it,
a directional sun and a sky (``sample_scene``; ``render`` turns it into a sample).

**The ambiguity knob** ``a = ScenesConfig.ambiguity`` in [0, 1] sets how much of
the label RGB can see:

- *size*: the whole world except the target (camera distance and height,
  clutter sizes and positions, ground tile size) is scaled by
  ``w = (L / 0.6 m)^a``. Perspective projection is invariant to a global
  scale, so at ``a = 1`` a 1.2 m object photographed from twice as far looks
  exactly like a 0.6 m one (apparent size ∝ L^(1−a)); at ``a = 0`` the world
  has a fixed metric scale and apparent size, ground tiles and clutter tell
  the size. Metric depth, LiDAR range and the pitch of the impact sound
  resolve it at every ``a``.
- *material*: an object's colour is drawn around its material's hue,
  saturation and value, mixed with a draw shared by all materials in the
  proportion ``a`` (hue spread ±a/2 of the colour wheel). At ``a = 1`` the
  colour distributions of the three materials coincide; LiDAR intensity
  (reflectivity, ``MATERIAL_REFLECTIVITY``) and the sound's damping still
  tell the material.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np

from synesthesia.config import ScenesConfig
from synesthesia.sources.scenes.geometry import SHAPES, Primitive

SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "paired": 3}
SIZES = {"small": 0.3, "medium": 0.6, "large": 1.2}  # largest dimension, metres
REFERENCE_SIZE = 0.6
SIZE_JITTER = 0.25  # log2 half-width of the within-class size spread (±19 %)
MATERIALS = ("metal", "wood", "rubber")
# Material appearance: HSV colour centre and LiDAR reflectivity (diffuse, 905 nm).
MATERIAL_COLOUR = {"metal": (0.58, 0.15, 0.80), "wood": (0.08, 0.60, 0.62), "rubber": (0.33, 0.70, 0.35)}
MATERIAL_REFLECTIVITY = {"metal": 0.80, "wood": 0.50, "rubber": 0.10}
CLASS_NAMES = [f"{size}_{material}" for size in SIZES for material in MATERIALS]
NUM_CLASSES = len(CLASS_NAMES)
HFOV_DEG = 50.0
FRAMING = (3.6, 7.2)  # camera distance / (w · 0.6 m): the target spans ~9–18 % of the field of view
PITCH_DEG = (10.0, 35.0)


def class_of(seed: int, split: str, index: int) -> int:
    """The label of sample ``index``: a seeded permutation of the classes in every block of 9."""
    block, pos = divmod(index, NUM_CLASSES)
    perm = np.random.default_rng([seed, SPLIT_CODES[split], block, 7919]).permutation(NUM_CLASSES)
    return int(perm[pos])


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _colour(rng: np.random.Generator, material: str, ambiguity: float) -> np.ndarray:
    """Linear RGB albedo: the material's HSV centre mixed with a shared draw in proportion ``ambiguity``."""
    h0, s0, v0 = MATERIAL_COLOUR[material]
    h = (h0 + ambiguity * rng.uniform(-0.5, 0.5) + rng.normal(0, 0.02)) % 1.0
    s = (1 - ambiguity) * s0 + ambiguity * rng.uniform(0.1, 0.8) + rng.normal(0, 0.03)
    v = (1 - ambiguity) * v0 + ambiguity * rng.uniform(0.3, 0.9) + rng.normal(0, 0.03)
    srgb = np.array(colorsys.hsv_to_rgb(h, float(np.clip(s, 0, 1)), float(np.clip(v, 0.05, 1))))
    return (srgb**2.2).astype(np.float32)


def _make_object(rng: np.random.Generator, shape: str, size: float, x: float, y: float) -> Primitive:
    """A primitive of largest dimension ``size`` standing on the ground at (x, y)."""
    yaw = rng.uniform(0, np.pi)
    if shape == "sphere":
        r = size / 2
        return Primitive("sphere", np.array([x, y, r]), (r,))
    if shape == "box":
        half = size / 2 * np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)])
        half = rng.permutation(half)
        return Primitive("box", np.array([x, y, half[2]]), tuple(half), yaw)
    if rng.random() < 0.5:  # tall: the height is the largest dimension
        hz, r = size / 2, size / 2 * rng.uniform(0.4, 0.9)
    else:
        r, hz = size / 2, size / 2 * rng.uniform(0.4, 0.9)
    return Primitive("cylinder", np.array([x, y, hz]), (r, hz), yaw)


def _camera_basis(yaw: float, pitch: float) -> np.ndarray:
    """Rows: right, up, forward (world coordinates) of a camera heading ``yaw``, looking down by ``pitch``."""
    forward = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), -np.sin(pitch)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    up = np.cross(right, forward)
    return np.stack([right, up, forward]).astype(np.float32)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    s = np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(p - (a + s * ab)))


def sample_scene(rng: np.random.Generator, cls: int, cfg: ScenesConfig) -> dict[str, Any]:
    """Draw one scene (objects, camera, light, ground, sky) for label ``cls``."""
    a = cfg.ambiguity
    size_name, material = CLASS_NAMES[cls].split("_")
    size = SIZES[size_name] * 2 ** float(rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    world = (size / REFERENCE_SIZE) ** a  # the scale of everything but the target
    shape = SHAPES[rng.integers(len(SHAPES))]
    target = _make_object(rng, shape, size, 0.0, 0.0)

    # Camera: framed on the target from a distance proportional to the world scale.
    hfov = np.radians(HFOV_DEG)
    distance = world * REFERENCE_SIZE * _log_uniform(rng, *FRAMING)
    yaw = rng.uniform(0, 2 * np.pi)
    pitch = np.radians(rng.uniform(*PITCH_DEG))
    position = target.centre - distance * _camera_basis(yaw, pitch)[2]
    yaw += rng.uniform(-1, 1) * 0.2 * hfov / 2  # the target is not always centred
    pitch += rng.uniform(-1, 1) * 0.2 * hfov / 2

    objects = [(target, material, _colour(rng, material, a))]
    for _ in range(int(rng.integers(1, cfg.clutter + 1)) if cfg.clutter > 0 else 0):
        for _attempt in range(20):
            ang = yaw + rng.uniform(-0.5, 0.5) * hfov
            reach = distance * rng.uniform(0.5, 2.5)
            xy = position[:2] + reach * np.array([np.cos(ang), np.sin(ang)])
            prim = _make_object(
                rng, SHAPES[rng.integers(len(SHAPES))], world * _log_uniform(rng, 0.15, 0.9), *xy
            )
            clear = all(
                np.linalg.norm(xy - o.centre[:2]) > prim.bound + o.bound + 0.05 * world for o, _, _ in objects
            )
            hides = _segment_distance(xy, position[:2], target.centre[:2]) < prim.bound + target.bound
            if clear and not hides:
                m = MATERIALS[rng.integers(len(MATERIALS))]
                objects.append((prim, m, _colour(rng, m, a)))
                break

    sun_elev = np.radians(rng.uniform(25, 65))
    sun_azim = rng.uniform(0, 2 * np.pi)
    sun_dir = np.array(
        [np.cos(sun_elev) * np.cos(sun_azim), np.cos(sun_elev) * np.sin(sun_azim), np.sin(sun_elev)],
        dtype=np.float32,
    )
    sun = rng.uniform(0.8, 1.2) * np.array(
        [1.0, 1.0 - rng.uniform(0, 0.15), 1.0 - rng.uniform(0, 0.3)], dtype=np.float32
    )
    sky_zenith = (np.array([0.25, 0.4, 0.8]) * rng.uniform(0.7, 1.1, 3)).astype(np.float32)
    sky_horizon = (np.array([0.75, 0.8, 0.9]) * rng.uniform(0.8, 1.1, 3)).astype(np.float32)
    ground_hsv = (rng.uniform(0, 1), rng.uniform(0.0, 0.35), rng.uniform(0.35, 0.7))
    return {
        "size": size,
        "material": material,
        "shape": shape,
        "world": world,
        "objects": objects,
        "stripes": [
            (rng.uniform(0, 0.35), rng.uniform(1.5, 5.0), rng.integers(3), rng.uniform(0, 2 * np.pi))
            for _ in objects
        ],
        "camera": {"position": position, "yaw": yaw, "pitch": pitch, "distance": distance},
        "sun_dir": sun_dir,
        "sun": sun,
        "ambient": rng.uniform(0.2, 0.4) * (0.5 * sky_zenith + 0.5 * sky_horizon),
        "sky": (sky_zenith, sky_horizon),
        "ground": {
            "albedo": np.array(colorsys.hsv_to_rgb(*ground_hsv), dtype=np.float32) ** 2.2,
            "contrast": rng.uniform(0.05, 0.3),
            "tile": world * _log_uniform(rng, 0.4, 1.6),
            "wave": rng.uniform(0.5, 3.0) * world,
            "reflectivity": rng.uniform(0.15, 0.45),
        },
    }
