"""``tokens``: a deterministic point-group tokenizer of LiDAR scans (latent kind ``tokens``, T×C).

No learned weights: the scan is turned into T tokens the way point-cloud
transformers (Point-BERT, Yu et al. 2022; Point-MAE, Pang et al. 2022) group
points, with hand-defined group features in place of a learned mini-PointNet:

1. **Back-projection.** The range image (beams×azimuth, metres, 0 = no return)
   becomes points. Row i looks at elevation ``linspace(elevation[0],
   elevation[1], beams)[i]``, column j at azimuth ``linspace(azimuth[0],
   azimuth[1], columns)[j]`` (degrees; positive azimuth = to the right). A
   return at range r along (elevation e, azimuth a) is the point
   ``r·(cos e cos a, −cos e sin a, sin e)`` in the sensor frame x forward,
   y left, z up. The defaults are the procedural scenes' scanner (±25°, both
   axes, the camera's field of view).
2. **Centres.** Farthest-point sampling of T centres, started deterministically
   at the point farthest from the centroid.
3. **Groups.** The k nearest points of each centre (the centre included).
4. **Features** (C = 21, in this order, see ``FEATURES``): centre xyz (m);
   centre range (m); mean offset of the group from its centre (3, m); square
   roots of the eigenvalues λ1 ≥ λ2 ≥ λ3 of the group covariance (3, m);
   linearity (λ1−λ2)/λ1, planarity (λ2−λ3)/λ1, scattering λ3/λ1 (Demantké et
   al. 2011); the normal (eigenvector of λ3, turned to face the sensor, 3);
   group radius (m); log point density ``log(k / (4/3·π·r³))``; mean and
   standard deviation of intensity (0 without intensity); valid (1, or 0 for
   the all-zero padding tokens of a scan with fewer than T returns).
5. **Order.** Tokens are sorted by azimuth then elevation of their centre
   (``order="azimuth"``, so a token's position has a meaning) or kept in
   sampling order (``order="fps"``).

The whole computation is vectorised numpy and runs in ``preprocess`` (in the
DataLoader workers); ``forward`` only batches. There is no decoder.
:func:`points_to_range_image` is the inverse projection (points → range image),
for ingesting point clouds such as KITTI's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from synesthesia import UserError
from synesthesia.generators import mappings
from synesthesia.generators.base import GENERATORS, Generator, LatentSpec, check_common
from synesthesia.shards.schema import SchemaError

FEATURES = (
    "x", "y", "z", "range",
    "offset_x", "offset_y", "offset_z",
    "sigma_1", "sigma_2", "sigma_3",
    "linearity", "planarity", "scattering",
    "normal_x", "normal_y", "normal_z",
    "radius", "log_density",
    "intensity_mean", "intensity_std",
    "valid",
)  # fmt: skip


def beam_angles(beams: int, columns: int, elevation: tuple[float, float], azimuth: tuple[float, float]):
    """(elevation per row, azimuth per column) in radians (inclusive linspace over the given degrees)."""
    return np.radians(np.linspace(*elevation, beams)), np.radians(np.linspace(*azimuth, columns))


def range_image_to_points(
    rng_img: np.ndarray,
    elevation: tuple[float, float] = (25.0, -25.0),
    azimuth: tuple[float, float] = (-25.0, 25.0),
    intensity: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Range image B×A → (points P×3 in x forward / y left / z up, intensity P) of the returns."""
    elev, azim = beam_angles(*rng_img.shape, elevation, azimuth)
    e, a = np.meshgrid(elev, azim, indexing="ij")
    dirs = np.stack([np.cos(e) * np.cos(a), -np.cos(e) * np.sin(a), np.sin(e)], axis=-1)
    valid = rng_img > 0
    points = (dirs[valid] * rng_img[valid][:, None]).astype(np.float32)
    inten = intensity[valid] if intensity is not None else np.zeros(len(points), np.float32)
    return points, inten.astype(np.float32)


def points_to_range_image(
    points: np.ndarray,
    beams: int,
    columns: int,
    elevation: tuple[float, float] = (25.0, -25.0),
    azimuth: tuple[float, float] = (-25.0, 25.0),
    intensity: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Project points N×3 (x forward, y left, z up) to (range, intensity) images beams×columns.

    Each point goes to the nearest row/column of the :func:`beam_angles` grid;
    points outside the field of view are dropped; where several land in one
    pixel the nearest wins. Pixels with no point read 0 (no return).
    """
    pts = np.asarray(points, dtype=np.float64)[:, :3]
    r = np.linalg.norm(pts, axis=1)
    keep = r > 0
    pts, r = pts[keep], r[keep]
    inten = np.zeros(len(r)) if intensity is None else np.asarray(intensity, dtype=np.float64)[keep]
    e = np.degrees(np.arcsin(pts[:, 2] / r))
    a = np.degrees(np.arctan2(-pts[:, 1], pts[:, 0]))
    row = np.round((e - elevation[0]) / (elevation[1] - elevation[0]) * (beams - 1)).astype(np.int64)
    col = np.round((a - azimuth[0]) / (azimuth[1] - azimuth[0]) * (columns - 1)).astype(np.int64)
    ok = (row >= 0) & (row < beams) & (col >= 0) & (col < columns)
    row, col, r, inten = row[ok], col[ok], r[ok], inten[ok]
    order = np.argsort(-r)  # far first, so the nearest point is written last and wins
    rng_img = np.zeros((beams, columns), np.float32)
    int_img = np.zeros((beams, columns), np.float32)
    rng_img[row[order], col[order]] = r[order]
    int_img[row[order], col[order]] = inten[order]
    return rng_img, int_img


def farthest_point_sample(points: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``min(n, P)`` farthest-point-sampled points, started at the point farthest from
    the centroid (deterministic)."""
    p = len(points)
    n = min(n, p)
    chosen = np.empty(n, dtype=np.int64)
    chosen[0] = int(np.argmax(((points - points.mean(0)) ** 2).sum(1)))
    dist = ((points - points[chosen[0]]) ** 2).sum(1)
    for i in range(1, n):
        chosen[i] = int(np.argmax(dist))
        dist = np.minimum(dist, ((points - points[chosen[i]]) ** 2).sum(1))
    return chosen


def tokenize_points(
    points: np.ndarray, intensity: np.ndarray, num_tokens: int = 64, k: int = 16, order: str = "azimuth"
) -> np.ndarray:
    """Points P×3 (+ intensity P) → tokens num_tokens×21 (see ``FEATURES`` and the module doc)."""
    if len(points) == 0:
        raise SchemaError("the LiDAR scan has no returns")
    points = points.astype(np.float64)
    idx = farthest_point_sample(points, num_tokens)
    centres = points[idx]  # T×3
    kk = min(k, len(points))
    d2 = ((centres[:, None, :] - points[None, :, :]) ** 2).sum(-1)  # T×P
    nn_idx = np.argpartition(d2, kk - 1, axis=1)[:, :kk]  # T×k
    group = points[nn_idx]  # T×k×3
    offsets = group - centres[:, None, :]
    mean_off = offsets.mean(1)
    centred = group - group.mean(1, keepdims=True)
    cov = np.einsum("tki,tkj->tij", centred, centred) / kk
    evals, evecs = np.linalg.eigh(cov)  # ascending
    evals = np.clip(evals[:, ::-1], 0.0, None)  # λ1 ≥ λ2 ≥ λ3
    l1 = np.maximum(evals[:, 0], 1e-12)
    shape = np.stack(
        [(evals[:, 0] - evals[:, 1]) / l1, (evals[:, 1] - evals[:, 2]) / l1, evals[:, 2] / l1], 1
    )
    normal = evecs[:, :, 0]
    normal = np.where(((normal * centres).sum(1) > 0)[:, None], -normal, normal)  # face the sensor
    radius = np.sqrt(np.take_along_axis(d2, nn_idx, 1).max(1))
    density = np.log(kk / (4.0 / 3.0 * np.pi * np.maximum(radius, 1e-3) ** 3))
    g_int = intensity.astype(np.float64)[nn_idx]
    feats = np.concatenate(
        [
            centres,
            np.linalg.norm(centres, axis=1, keepdims=True),
            mean_off,
            np.sqrt(evals),
            shape,
            normal,
            radius[:, None],
            density[:, None],
            g_int.mean(1, keepdims=True),
            g_int.std(1, keepdims=True),
            np.ones((len(centres), 1)),
        ],
        axis=1,
    )
    if order == "azimuth":
        az = np.arctan2(-centres[:, 1], centres[:, 0])
        el = np.arctan2(centres[:, 2], np.hypot(centres[:, 0], centres[:, 1]))
        feats = feats[np.lexsort((-el, az))]
    out = np.zeros((num_tokens, len(FEATURES)), dtype=np.float32)
    out[: len(feats)] = feats
    return out


@GENERATORS.register("tokens")
class LidarTokenizer(Generator):
    """LiDAR range image → T×C point-group tokens (deterministic, no weights, no decoder).

    Options: ``num_tokens`` (T, default 64), ``k`` (points per group, 16),
    ``elevation`` ([top, bottom] degrees, [25, −25]), ``azimuth`` ([left, right]
    degrees, [−25, 25]), ``order`` (azimuth | fps), ``dtype`` (float16 | float32).
    """

    name = "tokens"
    mode = "encode"
    has_decoder = False

    def __init__(
        self,
        modality: str = "lidar",
        weights: str | None = None,
        samples_per_input: int = 1,
        seed: int = 0,
        num_tokens: int = 64,
        k: int = 16,
        elevation: list[float] | tuple[float, float] = (25.0, -25.0),
        azimuth: list[float] | tuple[float, float] = (-25.0, 25.0),
        order: str = "azimuth",
        dtype: str = "float16",
    ):
        super().__init__()
        check_common(self.name, samples_per_input=samples_per_input, seed=seed, max_samples=1)
        if modality != "lidar":
            raise UserError(f"tokens tokenizes lidar scans, not {modality!r}")
        if weights:
            raise UserError("tokens is a fixed tokenizer and takes no weights")
        if int(num_tokens) < 1 or int(k) < 1:
            raise UserError("tokens: num_tokens and k must be positive")
        if order not in ("azimuth", "fps"):
            raise UserError(f"tokens: order must be 'azimuth' or 'fps', got {order!r}")
        if dtype not in ("float16", "float32"):
            raise UserError(f"tokens: dtype must be float16 or float32, got {dtype!r}")
        for name, pair in (("elevation", elevation), ("azimuth", azimuth)):
            if len(pair) != 2 or pair[0] == pair[1]:
                raise UserError(f"tokens: {name} must be two different angles in degrees, got {pair!r}")
        self.modality, self.seed, self.dtype, self.order = modality, seed, dtype, order
        self.num_tokens, self.k = int(num_tokens), int(k)
        self.elevation = tuple(float(v) for v in elevation)
        self.azimuth = tuple(float(v) for v in azimuth)

    def latent_spec(self) -> LatentSpec:
        return LatentSpec(
            kind="tokens",
            shape=(self.num_tokens, len(FEATURES)),
            dtype=self.dtype,
            scaling_applied=False,
            stored_as="mode",
            samples_per_input=1,
            extra={"features": list(FEATURES), "frame": "x forward, y left, z up (metres)"},
        )

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": self.class_path(),
            "weights": None,
            "sha256": None,
            "config": {
                "modality": self.modality,
                "num_tokens": self.num_tokens,
                "k": self.k,
                "elevation": list(self.elevation),
                "azimuth": list(self.azimuth),
                "order": self.order,
                "dtype": self.dtype,
                "features": list(FEATURES),
            },
            "preprocessing": {
                "signal": "lidar range image (+ intensity) back-projected to points",
                "elevation": list(self.elevation),
                "azimuth": list(self.azimuth),
                "frame": "x forward, y left, z up (metres)",
            },
        }

    def preprocess(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        scan = mappings.signal_from_sample("lidar", sample)
        rng_img, inten = (scan[0], scan[1]) if scan.ndim == 3 else (scan, None)
        points, intensity = range_image_to_points(rng_img, self.elevation, self.azimuth, inten)
        return {"tokens": tokenize_points(points, intensity, self.num_tokens, self.k, self.order)}

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        return batch["tokens"].float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "the tokens generator has no decoder: its point-group features cannot be turned back into a "
            "range image (use tae or diffusers-vae for the decoded ablation)"
        )
