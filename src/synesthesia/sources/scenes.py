"""The procedural scenes dataset: RGB whose label only the other modalities can resolve.

Each sample is one target object (a sphere, box or cylinder) on a textured
ground plane among clutter, seen by a perspective camera and a LiDAR-like
scanner at the same pose, and struck once so that it rings. Rendered with
vectorised numpy ray casting (``scenes_geometry``): Lambertian shading under a
directional sun with cast shadows (one shadow ray per visible point) and a sky
ambient term; modal-synthesis audio (``scenes_audio``).

Per sample: ``rgb.png`` (H×W), ``depth.npy`` (H×W float32 z-depth in metres,
0 where a pixel sees the sky), ``lidar.npy`` (beams×azimuth float32 range in
metres along each beam, 0 = no return), ``lidar_intensity.npy`` (beams×azimuth
float32 in [0, 1]), ``audio.flac`` (16-bit mono), ``cls`` and ``json``.

**The label** is ``<size>_<material>``: three true sizes (largest dimension
0.3, 0.6 or 1.2 m, ±19 %) × three materials (metal, wood, rubber), 9 classes,
balanced in every block of 9 consecutive indices.

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
  (reflectivity) and the sound's damping still tell the material.

The default ``a = 0.4`` was chosen on the val split (at 0.6 an RGB-only probe
was at 23 % val, too close to chance): on the demo splits a small CNN gets
42.6 % test top-1 from RGB alone and 98.2 % from RGB + depth + audio + LiDAR
(chance 11.1 %; ``benchmarks/probe_scenes.py``).

Everything is a pure function of ``(seed, split, index)``, so shards are
byte-identical across runs and worker counts.
"""

from __future__ import annotations

import colorsys
import logging
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from synesthesia import UserError
from synesthesia.config import PipelineConfig, ScenesConfig, config_hash
from synesthesia.shards.schema import MANIFEST, encode_json, encode_npy
from synesthesia.shards.verify import verify
from synesthesia.shards.writer import Manifest, SplitWriter
from synesthesia.sources.scenes_audio import impact_sound
from synesthesia.sources.scenes_geometry import SHAPES, Primitive, cast, occluded
from synesthesia.sources.signals import encode_flac, encode_png

logger = logging.getLogger(__name__)

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
MODALITIES = ["rgb", "depth", "audio", "lidar"]
HFOV_DEG = 50.0
FRAMING = (3.6, 7.2)  # camera distance / (w · 0.6 m): the target spans ~9–18 % of the field of view
PITCH_DEG = (10.0, 35.0)


def class_of(seed: int, split: str, index: int) -> int:
    """The label of sample ``index``: a seeded permutation of the classes in every block of 9."""
    block, pos = divmod(index, NUM_CLASSES)
    perm = np.random.default_rng([seed, SPLIT_CODES[split], block, 7919]).permutation(NUM_CLASSES)
    return int(perm[pos])


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:07d}"


# ----------------------------------------------------------------------------- scene sampling


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


# ----------------------------------------------------------------------------- sensors


@lru_cache(maxsize=8)
def _pixel_rays(size: int) -> np.ndarray:
    """Unit camera-frame directions (x right, y up, z forward) through the pixel centres, row-major."""
    tan = np.tan(np.radians(HFOV_DEG) / 2)
    c = ((np.arange(size) + 0.5) / size * 2 - 1) * tan
    x, y = np.meshgrid(c, -c)
    d = np.stack([x, y, np.ones_like(x)], axis=-1).reshape(-1, 3)
    return (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=8)
def _beam_rays(beams: int, azimuth: int) -> np.ndarray:
    """Camera-frame directions of a scanner over the camera's field of view: rows top→bottom, columns left→right."""
    half = np.radians(HFOV_DEG) / 2
    elev = np.linspace(half, -half, beams)
    azim = np.linspace(-half, half, azimuth)
    e, z = np.meshgrid(elev, azim, indexing="ij")
    d = np.stack([np.cos(e) * np.sin(z), np.sin(e), np.cos(e) * np.cos(z)], axis=-1)
    return d.reshape(-1, 3).astype(np.float32)


def _surface(
    scene: dict, points: np.ndarray, which: np.ndarray, albedo: bool = True
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Normals, linear albedo (when asked) and LiDAR reflectivity at hit points (``which`` ≥ −1)."""
    normals = np.zeros_like(points)
    normals[:, 2] = 1.0
    g = scene["ground"]
    colours = None
    if albedo:
        x, y = points[:, 0], points[:, 1]
        checker = (np.floor(x / g["tile"]) + np.floor(y / g["tile"])) % 2
        wave = 0.08 * np.sin(x / g["wave"]) * np.cos(y / (1.3 * g["wave"]))
        colours = g["albedo"][None, :] * (1 - g["contrast"] * checker + wave)[:, None]
    reflect = np.full(points.shape[0], g["reflectivity"])
    for i, (prim, material, colour) in enumerate(scene["objects"]):
        mask = which == i
        if not mask.any():
            continue
        pts = points[mask]
        normals[mask] = prim.normal(pts)
        reflect[mask] = MATERIAL_REFLECTIVITY[material]
        if albedo:
            contrast, freq, axis, phase = scene["stripes"][i]
            coord = prim.local(pts)[:, axis] / (2 * prim.bound)
            stripes = 1 - contrast * (0.5 + 0.5 * np.sin(2 * np.pi * freq * coord + phase))
            colours[mask] = colour[None, :] * stripes[:, None]
    return normals, colours, reflect


@lru_cache(maxsize=1)
def _srgb_lut() -> np.ndarray:
    """Linear [0, 1] in 4096 steps → 8-bit sRGB-like gamma (x^(1/2.2))."""
    return np.round((np.arange(4096) / 4095) ** (1 / 2.2) * 255).astype(np.uint8)


def render_camera(scene: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB (H×W×3 uint8, sRGB) and z-depth (H×W float32 metres, 0 for sky)."""
    cam = scene["camera"]
    basis = _camera_basis(cam["yaw"], cam["pitch"])
    local = _pixel_rays(size)
    dirs = local @ basis
    prims = [o for o, _, _ in scene["objects"]]
    t, which = cast(prims, cam["position"], dirs)
    hit = which >= -1
    zenith, horizon = scene["sky"]
    up = np.clip(dirs[:, 2:3] * 2.5, 0, 1)
    colour = horizon + up * (zenith - horizon)  # the sky, where nothing is hit
    idx = np.flatnonzero(hit)
    points = cam["position"] + t[idx, None] * dirs[idx]
    normals, albedo, _ = _surface(scene, points, which[idx])
    lambert = np.maximum(normals @ scene["sun_dir"], 0)
    lit = np.flatnonzero(lambert > 0)
    sun_dirs = np.broadcast_to(scene["sun_dir"], (lit.size, 3))
    shadow = occluded(prims, points[lit] + 1e-3 * normals[lit], sun_dirs)
    lambert[lit[shadow]] = 0  # cast shadows
    colour[idx] = albedo * (scene["ambient"] + lambert[:, None] * scene["sun"])
    rgb = _srgb_lut()[(np.clip(colour, 0, 1) * 4095).astype(np.int32)].reshape(size, size, 3)
    depth = np.zeros(size * size, dtype=np.float32)
    depth[idx] = t[idx] * local[idx, 2]
    return rgb, depth.reshape(size, size)


def render_lidar(
    scene: dict, rng: np.random.Generator, beams: int, azimuth: int, cfg: ScenesConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Range (metres, 0 = no return) and intensity images, beams×azimuth float32.

    Intensity is the surface's diffuse reflectivity times the cosine of the
    incidence angle, plus noise; range noise is ``σ = lidar_noise + 0.2 %``
    of the range; a return is dropped with probability ``lidar_dropout``
    (more for dark surfaces) or when it is beyond ``lidar_max_range``.
    """
    cam = scene["camera"]
    dirs = _beam_rays(beams, azimuth) @ _camera_basis(cam["yaw"], cam["pitch"])
    prims = [o for o, _, _ in scene["objects"]]
    t, which = cast(prims, cam["position"], dirs)
    hit = (which >= -1) & (t <= cfg.lidar_max_range)
    idx = np.flatnonzero(hit)
    points = cam["position"] + t[idx, None] * dirs[idx]
    normals, _, reflect = _surface(scene, points, which[idx], albedo=False)
    cosine = np.abs(np.einsum("ij,ij->i", normals, dirs[idx]))
    inten = np.clip(reflect * cosine + rng.normal(0, 0.02, idx.size), 0, 1)
    rng_noise = rng.normal(0, 1, idx.size) * (cfg.lidar_noise + 0.002 * t[idx])
    keep = rng.random(idx.size) >= cfg.lidar_dropout * (1 + 2 * (inten < 0.05))
    rng_img = np.zeros(beams * azimuth, dtype=np.float32)
    int_img = np.zeros(beams * azimuth, dtype=np.float32)
    rng_img[idx[keep]] = np.maximum(t[idx] + rng_noise, 0.05)[keep]
    int_img[idx[keep]] = inten[keep]
    return rng_img.reshape(beams, azimuth), int_img.reshape(beams, azimuth)


def _rounded(x: Any, nd: int = 4) -> Any:
    if isinstance(x, np.ndarray | list | tuple):
        return [_rounded(v, nd) for v in x]
    return round(float(x), nd)


def render_sample(seed: int, split: str, index: int, cfg: ScenesConfig) -> dict[str, bytes | str]:
    """One source sample (``__key__`` plus encoded fields), a pure function of (seed, split, index)."""
    cls = class_of(seed, split, index)
    scene_ss, lidar_ss, audio_ss = np.random.SeedSequence([seed, SPLIT_CODES[split], index]).spawn(3)
    scene = sample_scene(np.random.default_rng(scene_ss), cls, cfg)
    rgb, depth = render_camera(scene, cfg.image_size)
    lidar, intensity = render_lidar(
        scene, np.random.default_rng(lidar_ss), cfg.lidar_beams, cfg.lidar_azimuth, cfg
    )
    wave, audio = impact_sound(
        np.random.default_rng(audio_ss),
        scene["shape"],
        scene["material"],
        scene["size"],
        cfg.audio_rate,
        cfg.audio_seconds,
    )
    target = scene["objects"][0][0]
    cam = scene["camera"]
    meta = {
        "index": index,
        "split": split,
        "class_name": CLASS_NAMES[cls],
        "size_m": _rounded(scene["size"]),
        "material": scene["material"],
        "shape": scene["shape"],
        "target": {
            "centre": _rounded(target.centre),
            "dims": _rounded(target.size),
            "yaw": _rounded(target.yaw),
        },
        "clutter": [
            {"shape": o.shape, "material": m, "centre": _rounded(o.centre), "dims": _rounded(o.size)}
            for o, m, _ in scene["objects"][1:]
        ],
        "world_scale": _rounded(scene["world"]),
        "ambiguity": cfg.ambiguity,
        "camera": {
            "position": _rounded(cam["position"]),
            "height_m": _rounded(cam["position"][2]),
            "distance_m": _rounded(cam["distance"]),
            "yaw_deg": _rounded(np.degrees(cam["yaw"]), 2),
            "pitch_deg": _rounded(np.degrees(cam["pitch"]), 2),
            "hfov_deg": HFOV_DEG,
        },
        "sun_dir": _rounded(scene["sun_dir"]),
        "audio_rate": cfg.audio_rate,
        "audio": audio,
    }
    return {
        "__key__": sample_key(split, index),
        "rgb.png": encode_png(rgb),
        "cls": str(cls).encode(),
        "json": encode_json(meta),
        "depth.npy": encode_npy(depth),
        "audio.flac": encode_flac(wave, cfg.audio_rate),
        "lidar.npy": encode_npy(lidar),
        "lidar_intensity.npy": encode_npy(intensity),
    }


def _render_chunk(job: tuple[int, str, int, int, ScenesConfig]) -> list[dict]:
    seed, split, start, stop, cfg = job
    return [render_sample(seed, split, i, cfg) for i in range(start, stop)]


# ----------------------------------------------------------------------------- the dataset


def split_sizes(cfg: ScenesConfig) -> dict[str, int]:
    return {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test, "paired": cfg.num_paired}


def check_config(cfg: ScenesConfig) -> None:
    if not 0.0 <= cfg.ambiguity <= 1.0:
        raise UserError(f"scenes.ambiguity must lie in [0, 1], got {cfg.ambiguity}")
    if cfg.image_size < 8:
        raise UserError(f"scenes.image_size must be at least 8, got {cfg.image_size}")
    if cfg.lidar_beams < 1 or cfg.lidar_azimuth < 1:
        raise UserError("scenes.lidar_beams and scenes.lidar_azimuth must be positive")
    if cfg.audio_rate < 4000 or cfg.audio_seconds <= 0.05:
        raise UserError("scenes.audio_rate must be ≥ 4000 and scenes.audio_seconds > 0.05")
    if not 0.0 <= cfg.lidar_dropout < 1.0 / 3 or cfg.lidar_noise < 0 or cfg.lidar_max_range <= 0:
        raise UserError("scenes.lidar_dropout must lie in [0, 1/3), lidar_noise ≥ 0 and lidar_max_range > 0")
    if cfg.shard_size < 1 or cfg.clutter < 0 or cfg.workers < 0:
        raise UserError("scenes.shard_size must be ≥ 1, scenes.clutter and scenes.workers ≥ 0")
    for split, n in split_sizes(cfg).items():
        if n < 0:
            raise UserError(f"scenes.num_{split} must be ≥ 0, got {n}")


def render_config(cfg: PipelineConfig) -> dict[str, Any]:
    """What the shards depend on (not the worker count): recorded and hashed in the manifest."""
    scenes = asdict(cfg.scenes)
    scenes.pop("workers")
    return {"seed": cfg.seed, "scenes": scenes}


def source_dir(cfg: PipelineConfig, out: str | Path) -> Path:
    return Path(out) / cfg.dataset / "source"


def is_rendered(directory: Path, cfg: PipelineConfig) -> bool:
    """Whether ``directory`` already holds a verified render of this exact config."""
    if not (directory / MANIFEST).is_file():
        return False
    try:
        manifest = Manifest.read(directory)
    except (UserError, ValueError, TypeError):
        return False
    return manifest.config_hash == config_hash(render_config(cfg)) and not verify(directory)


def render_dataset(
    cfg: PipelineConfig, out: str | Path, *, workers: int | None = None, force: bool = False
) -> tuple[Path, bool]:
    """Render every split into ``<out>/<dataset>/source``; returns (folder, whether it rendered).

    An existing, verified render of the same config is kept unless ``force``.
    """
    sc = cfg.scenes
    check_config(sc)
    directory = source_dir(cfg, out)
    if not force and is_rendered(directory, cfg):
        logger.info(
            "%s already holds this render (config %s); kept", directory, config_hash(render_config(cfg))
        )
        return directory, False
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    for split in SPLIT_CODES:
        for stale in directory.glob(f"{split}-*.tar"):
            stale.unlink()
    workers = workers if workers is not None else sc.workers
    workers = workers or os.cpu_count() or 1
    chunk = 32
    splits = {}
    with _worker_pool(workers) as pool:
        for split, count in split_sizes(sc).items():
            if count == 0:
                continue
            writer = SplitWriter(directory, split, sc.shard_size)
            jobs = [(cfg.seed, split, s, min(s + chunk, count), sc) for s in range(0, count, chunk)]
            results = pool.imap(_render_chunk, jobs) if pool is not None else map(_render_chunk, jobs)
            for samples in results:
                for sample in samples:
                    writer.add(sample)
            splits[split] = writer.close()
            logger.info("rendered %s: %d samples in %d shards", split, count, len(splits[split]))
    manifest = Manifest(
        kind="source",
        dataset=cfg.dataset,
        splits=splits,
        config=render_config(cfg),
        config_hash=config_hash(render_config(cfg)),
        extra={
            "generator": "synesthesia.sources.scenes",
            "modalities": MODALITIES,
            "num_classes": NUM_CLASSES,
            "class_names": CLASS_NAMES,
            "audio_rate": sc.audio_rate,
            "audio_seconds": sc.audio_seconds,
            "image_size": [sc.image_size, sc.image_size],
            "lidar_shape": [sc.lidar_beams, sc.lidar_azimuth],
            "lidar_fields": ["lidar.npy", "lidar_intensity.npy"],
            "lidar_max_range": sc.lidar_max_range,
            "hfov_deg": HFOV_DEG,
            "depth": "z-depth in metres, 0 where the pixel sees the sky",
            "ambiguity": sc.ambiguity,
        },
    )
    manifest.write(directory)
    return directory, True


@contextmanager
def _worker_pool(workers: int) -> Iterator[Any]:
    """A process pool, or ``None`` for one worker.

    Forked where the platform can (workers start at once with the modules
    already imported; rendering is numpy only and starts no threads), spawned
    elsewhere. Results come back in order, so the shards do not depend on it.
    """
    if workers <= 1:
        yield None
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers)
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


# ----------------------------------------------------------------------------- preview


def write_preview(directory: str | Path, path: str | Path, split: str = "train", count: int = 8) -> Path:
    """A PNG grid of ``count`` samples: RGB, depth, LiDAR range and intensity, and a spectrogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.signal import spectrogram

    from synesthesia.shards.reader import iter_shard, shard_paths
    from synesthesia.shards.schema import decode_json, decode_npy
    from synesthesia.sources.signals import decode_audio, decode_image

    shards = shard_paths(directory, split)
    if not shards:
        raise UserError(f"{directory} has no {split} split to preview")
    samples = []
    for shard in shards:
        for sample in iter_shard(shard):
            samples.append(sample)
            if len(samples) == count:
                break
        if len(samples) == count:
            break
    columns = ["RGB", "depth (m)", "LiDAR range (m)", "LiDAR intensity", "impact sound (dB)"]
    fig, axes = plt.subplots(len(samples), 5, figsize=(15, 2.1 * len(samples)), squeeze=False)
    for row, sample in zip(axes, samples, strict=True):
        meta = decode_json(sample["json"])
        depth = decode_npy(sample["depth.npy"])
        lidar = decode_npy(sample["lidar.npy"])
        inten = decode_npy(sample["lidar_intensity.npy"])
        wave, rate = decode_audio(sample["audio.flac"])
        f, t, sxx = spectrogram(wave, fs=rate, nperseg=256, noverlap=192)
        row[0].imshow(decode_image(sample["rgb.png"]))
        row[0].set_ylabel(f"{meta['class_name']}\n{meta['shape']} {meta['size_m']:.2f} m", fontsize=8)
        row[1].imshow(np.ma.masked_equal(depth, 0), cmap="viridis_r", norm=matplotlib.colors.LogNorm())
        row[2].imshow(
            np.ma.masked_equal(lidar, 0), cmap="viridis_r", aspect="auto", norm=matplotlib.colors.LogNorm()
        )
        row[3].imshow(inten, cmap="gray", aspect="auto", vmin=0, vmax=1)
        row[4].pcolormesh(t, f, 10 * np.log10(sxx + 1e-12), shading="auto", vmin=-110, vmax=-20)
        row[4].set_yscale("symlog", linthresh=200)
        row[4].set_ylim(20, rate / 2)
        for ax in row[:4]:
            ax.set_xticks([])
            ax.set_yticks([])
        row[4].tick_params(labelsize=6)
    for ax, title in zip(axes[0], columns, strict=True):
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


__all__ = [
    "CLASS_NAMES",
    "MODALITIES",
    "NUM_CLASSES",
    "class_of",
    "render_dataset",
    "render_sample",
    "sample_scene",
    "write_preview",
]
