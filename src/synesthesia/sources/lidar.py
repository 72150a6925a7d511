"""KITTI Velodyne scans → range images by spherical projection.

A scan is an N×4 float32 array (x forward, y left, z up, in metres; reflectance
in [0, 1]), stored raw as ``.bin``. Each point is mapped to a pixel of a
``beams × azimuth`` image as in RangeNet++ (Milioto et al., IROS 2019)::

    r     = ||(x, y, z)||
    yaw   = atan2(y, x)                   pitch = asin(z / r)
    u     = ½ (1 − yaw / π) · W            v = (1 − (pitch − f_down) / (f_up − f_down)) · H

(``u`` column, ``v`` row, both floored and clipped to the image; f_up, f_down
the sensor's vertical field of view, +3° and −25° for the HDL-64E of KITTI).
Where several points fall into one pixel the closest wins; a pixel with no
point holds range 0 ("no return"). Intensity is the winning point's
reflectance clipped to [0, 1].

The camera calibration is optional: given a velodyne → image projection (a
KITTI ``calib`` file with ``P2``, ``R0_rect`` and ``Tr_velo_to_cam``, or a bare
3×4 / 4×4 matrix that already maps velodyne points to pixels) and the image
size, only points in front of the camera that project inside the image are
kept, so the range image sees what the camera sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synesthesia.shards.schema import SchemaError

# HDL-64E (KITTI): 64 beams from +3° to −25°.
KITTI_FOV_UP = 3.0
KITTI_FOV_DOWN = -25.0

MAX_LIDAR_RANGE = 2000.0
"""The farthest point accepted, in metres (also the largest coordinate).

Automotive sensors see up to ~300 m (the HDL-64E 120 m); a point at 1e30 m is
a corrupt scan, not a far object, and would be stored as a range of 1e30.
Scans holding one are refused (``bad_lidar``), as are NaN and inf (``non_finite``).
"""
MAX_LIDAR_POINTS = 4 * 2**20
"""The most points in one scan (a KITTI scan holds ~120k; 4 Mi points are 64 MiB as N×4 float32)."""


@dataclass(frozen=True)
class RangeImage:
    """A projected scan: ``range`` and ``intensity`` are beams×azimuth float32."""

    range: np.ndarray
    intensity: np.ndarray
    points_in: int
    points_kept: int


def read_velodyne_bin(data: bytes | str | Path) -> np.ndarray:
    """KITTI ``.bin`` bytes (or a path) → N×4 float32; a malformed scan raises SchemaError."""
    if isinstance(data, str | Path):
        data = Path(data).read_bytes()
    if len(data) == 0 or len(data) % 16:
        raise SchemaError(f"velodyne scan of {len(data)} bytes is not N×4 float32", "bad_lidar")
    if len(data) // 16 > MAX_LIDAR_POINTS:
        raise SchemaError(
            f"velodyne scan of {len(data) // 16} points (at most {MAX_LIDAR_POINTS})", "bad_lidar"
        )
    points = np.frombuffer(data, dtype="<f4").reshape(-1, 4)
    _check_points(points)
    return points


def _check_points(points: np.ndarray) -> None:
    """Refuse a scan with NaN/inf anywhere or a coordinate beyond ``MAX_LIDAR_RANGE`` (SchemaError)."""
    if len(points) > MAX_LIDAR_POINTS:
        raise SchemaError(f"scan of {len(points)} points (at most {MAX_LIDAR_POINTS})", "bad_lidar")
    if not np.isfinite(points).all():
        raise SchemaError("velodyne scan holds NaN or inf", "non_finite")
    if (np.abs(points[:, :3]) > MAX_LIDAR_RANGE).any():
        raise SchemaError(f"velodyne scan has a coordinate beyond {MAX_LIDAR_RANGE:.0f} m", "bad_lidar")


def parse_calibration(text: str) -> np.ndarray:
    """A velodyne → image 3×4 projection from calibration text.

    KITTI object/raw calib files (``P2:``, ``R0_rect:`` / ``R_rect_00:``,
    ``Tr_velo_to_cam:`` / ``Tr_velo_cam:``) give ``P2 · R0 · Tr``; a bare list of 12
    or 16 numbers is taken as the projection itself. Anything else raises ValueError.
    """
    entries: dict[str, np.ndarray] = {}
    bare: list[float] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if ":" in line:
            name, values = line.split(":", 1)
            entries[name.strip()] = np.array([float(v) for v in values.split()], dtype=np.float64)
        else:
            bare.extend(float(v) for v in line.split())
    if entries:
        p2 = entries.get("P2")
        r0 = entries.get("R0_rect", entries.get("R_rect_00"))
        tr = entries.get("Tr_velo_to_cam", entries.get("Tr_velo_cam"))
        if p2 is None or tr is None or p2.size != 12 or tr.size != 12:
            raise ValueError("calibration needs P2 (12 numbers) and Tr_velo_to_cam (12 numbers)")
        rect = np.eye(4)
        if r0 is not None:
            if r0.size != 9:
                raise ValueError("R0_rect must hold 9 numbers")
            rect[:3, :3] = r0.reshape(3, 3)
        velo = np.eye(4)
        velo[:3] = tr.reshape(3, 4)
        return p2.reshape(3, 4) @ rect @ velo
    if len(bare) in (12, 16):
        return np.array(bare, dtype=np.float64).reshape(-1, 4)[:3]
    raise ValueError(f"calibration has {len(bare)} numbers; expected KITTI keys or a 3×4 / 4×4 matrix")


def camera_fov_mask(points: np.ndarray, projection: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Which points lie in front of the camera and project inside a (width, height) image."""
    homo = np.concatenate([points[:, :3].astype(np.float64), np.ones((len(points), 1))], axis=1)
    pix = homo @ projection.T
    depth = pix[:, 2]
    in_front = depth > 1e-3
    safe = np.where(in_front, depth, 1.0)
    u, v = pix[:, 0] / safe, pix[:, 1] / safe
    width, height = image_size
    return in_front & (u >= 0) & (u < width) & (v >= 0) & (v < height)


def project_scan(
    points: np.ndarray,
    beams: int = 64,
    azimuth: int = 1024,
    fov_up: float = KITTI_FOV_UP,
    fov_down: float = KITTI_FOV_DOWN,
    projection: np.ndarray | None = None,
    image_size: tuple[int, int] | None = None,
    max_range: float | None = None,
) -> RangeImage:
    """Spherical projection of an N×(3|4) scan to a ``beams × azimuth`` range image (see module doc).

    Points outside the vertical field of view, beyond ``max_range`` or (with a
    ``projection`` and ``image_size``) outside the camera image are dropped. A
    scan with NaN/inf, a coordinate beyond ``MAX_LIDAR_RANGE`` or more than
    ``MAX_LIDAR_POINTS`` points raises SchemaError.
    """
    if beams < 1 or azimuth < 1:
        raise ValueError("beams and azimuth must be positive")
    if fov_up <= fov_down:
        raise ValueError(f"fov_up ({fov_up}) must be above fov_down ({fov_down})")
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] not in (3, 4):
        raise SchemaError(f"scan of shape {points.shape} is not N×3 or N×4", "bad_lidar")
    _check_points(points)
    xyz = points[:, :3].astype(np.float64)
    refl = points[:, 3] if points.shape[1] == 4 else np.zeros(len(points), dtype=np.float32)
    rng = np.linalg.norm(xyz, axis=1)
    keep = rng > 1e-3
    if max_range is not None:
        keep &= rng <= max_range
    if projection is not None:
        if image_size is None:
            raise ValueError("a camera projection needs the image size")
        keep &= camera_fov_mask(points, projection, image_size)
    pitch = np.arcsin(np.clip(xyz[:, 2] / np.maximum(rng, 1e-9), -1.0, 1.0))
    up, down = np.radians(fov_up), np.radians(fov_down)
    keep &= (pitch <= up) & (pitch >= down)
    xyz, refl, rng, pitch = xyz[keep], refl[keep], rng[keep], pitch[keep]
    yaw = np.arctan2(xyz[:, 1], xyz[:, 0])
    u = np.clip(np.floor(0.5 * (1.0 - yaw / np.pi) * azimuth), 0, azimuth - 1).astype(np.int64)
    v = np.clip(np.floor((1.0 - (pitch - down) / (up - down)) * beams), 0, beams - 1).astype(np.int64)
    # Write far points first so that the closest point of each pixel is written last and wins.
    order = np.argsort(-rng, kind="stable")
    range_image = np.zeros((beams, azimuth), dtype=np.float32)
    intensity = np.zeros((beams, azimuth), dtype=np.float32)
    range_image[v[order], u[order]] = rng[order]
    intensity[v[order], u[order]] = np.clip(refl[order], 0.0, 1.0)
    return RangeImage(
        range=range_image, intensity=intensity, points_in=len(points), points_kept=int(keep.sum())
    )
