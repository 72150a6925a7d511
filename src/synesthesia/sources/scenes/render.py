"""Rendering one scenes sample (``render_sample``): camera, LiDAR and impact sound of a scene.

Per sample: ``rgb.png`` (H×W), ``depth.npy`` (H×W float32 z-depth in metres,
0 where a pixel sees the sky), ``lidar.npy`` (beams×azimuth float32 range in
metres along each beam, 0 = no return), ``lidar_intensity.npy`` (beams×azimuth
float32 in [0, 1]), ``audio.flac`` (16-bit mono), ``cls`` and ``json``.

The camera and the LiDAR-like scanner share the camera's pose and field of
view. Rendered with vectorised numpy ray casting (``geometry``): Lambertian
shading under a directional sun with cast shadows (one shadow ray per visible
point) and a sky ambient term (``render_camera``); range and reflectivity ×
incidence with noise and dropout (``render_lidar``); modal-synthesis audio
(``audio``).

A sample is a pure function of ``(seed, split, index)``: the scene, the
LiDAR noise and the sound each draw from their own child of
``SeedSequence([seed, split code, index])``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from synesthesia.config import ScenesConfig
from synesthesia.shards.schema import encode_json, encode_npy
from synesthesia.sources.scenes.audio import impact_sound
from synesthesia.sources.scenes.geometry import cast, occluded
from synesthesia.sources.scenes.scene import (
    CLASS_NAMES,
    HFOV_DEG,
    MATERIAL_REFLECTIVITY,
    SPLIT_CODES,
    _camera_basis,
    class_of,
    sample_scene,
)
from synesthesia.sources.signals import encode_flac, encode_png


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:07d}"


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
