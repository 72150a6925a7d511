"""``train.augment``: the RGB's crop and flip, and the image-aligned privileged inputs that follow them.

The image's pixels hold their own coordinates (R: column, G: row) and the
latents' channels the coordinates of their cells' centres, so after any crop
and flip the coordinate read from a latent cell can be compared with the one
read from the RGB pixels that cover it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from synesthesia import UserError
from synesthesia.generators.base import key_seed
from synesthesia.shards.schema import decoded_field, encode_npy, latent_field
from synesthesia.sources.signals import encode_png
from synesthesia.train.samples import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SampleDecoder,
    _rng,
    apply_geometry,
    augment_mode,
)
from synesthesia.train.sidecars import Sidecar

SIZE = 32  # the RGB view's side
SEED = 7
KEYS = [f"train_{i:05d}" for i in range(48)]


def coordinate_image(height: int, width: int) -> np.ndarray:
    """H×W×3 uint8 whose pixel (y, x) is (x, y, 0)."""
    ys, xs = np.mgrid[:height, :width]
    return np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)


def coordinate_latent(height: int, width: int) -> np.ndarray:
    """2×(H/8)×(W/8) float32: each cell's centre (x, y) in source pixels (pixel i spans [i, i+1))."""
    ys, xs = np.mgrid[: height // 8, : width // 8]
    return np.stack([(xs + 0.5) * 8, (ys + 0.5) * 8]).astype(np.float32)


def spatial(modality: str, shape, kind: str = "latent") -> Sidecar:
    """A sidecar whose standardisation is the identity (mean 0, std 1)."""
    if kind == "decoded":
        return Sidecar(modality, Path(modality), "decoded", {"shape": list(shape), "samples_per_input": 1})
    channels = shape[0]
    return Sidecar(
        modality,
        Path(modality),
        "latent",
        {"kind": "spatial", "shape": list(shape)},
        (0.0,) * channels,
        (1.0,) * channels,
    )


def raw_sample(key: str, image: np.ndarray, fields: dict[str, np.ndarray]) -> dict[str, bytes | str]:
    return {
        "__key__": key,
        "rgb.png": encode_png(image),
        "cls": b"0",
        **{k: encode_npy(v) for k, v in fields.items()},
    }


def rgb_coordinates(rgb: torch.Tensor) -> torch.Tensor:
    """A normalised 3×S×S view → 2×S×S: the (x, y) source coordinates its pixels show."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (rgb * std + mean)[:2] * 255 + 0.5


def old_transform(train: bool) -> v2.Compose:
    """The RGB transform before ``train.augment`` had modes (its ``true`` and eval)."""
    if train:
        geometry = [v2.RandomResizedCrop(SIZE, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(SIZE, antialias=True), v2.CenterCrop(SIZE)]
    return v2.Compose(
        [*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def old_rgb(key: str, image: np.ndarray, epoch: int) -> torch.Tensor:
    """The old train RGB of ``key``: the transform under the per-sample seed drawn first."""
    rng = _rng(key_seed(key, SEED), epoch)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(rng.integers(2**62)))
        return old_transform(True)(torch.from_numpy(image).permute(2, 0, 1).contiguous())


def misalignment(rgb: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Per latent cell, |latent coordinate - mean coordinate of the RGB pixels over the cell|, in cells
    (a cell spans 8 source pixels)."""
    h, w = latent.shape[-2:]
    seen = F.avg_pool2d(rgb_coordinates(rgb)[None], (SIZE // h, SIZE // w))[0]
    return ((latent - seen).abs() / 8).amax(dim=0)


@pytest.mark.parametrize("shape", [(64, 64), (64, 128)])
def test_aligned_latent_shows_what_the_rgb_shows(shape):
    """Over many crops and flips, each latent cell holds the coordinates of the RGB pixels covering it."""
    image, latent = coordinate_image(*shape), coordinate_latent(*shape)
    sidecars = {"depth": spatial("depth", latent.shape)}
    aligned = SampleDecoder(sidecars, SIZE, SEED, train=True, augment="aligned")
    legacy = SampleDecoder(sidecars, SIZE, SEED, train=True, augment="rgb")
    geometries, legacy_worst = [], 0.0
    for key in KEYS:
        raw = raw_sample(key, image, {latent_field("depth"): latent})
        out = aligned(raw, epoch=0)
        depth = out["latents"]["depth"]
        assert depth.shape == latent.shape and depth.dtype == torch.float32
        error = misalignment(out["rgb"], depth)
        assert error.max() < 1.0, f"{key}: {out['geometry'].tolist()}"
        assert error.mean() < 0.25  # off by up to half a cell only where the crop reaches the border
        geometries.append(out["geometry"])
        # rgb: the same RGB, the latent of the whole, unflipped image
        before = legacy(raw, epoch=0)
        assert torch.equal(before["rgb"], out["rgb"]) and torch.equal(before["geometry"], out["geometry"])
        assert torch.equal(before["latents"]["depth"], torch.from_numpy(latent))
        legacy_worst = max(legacy_worst, float(misalignment(before["rgb"], before["latents"]["depth"]).max()))
    geometry = torch.stack(geometries)
    assert 0 < geometry[:, 4].sum() < len(KEYS)  # some flipped, some not
    assert (geometry[:, 2] * geometry[:, 3]).min() < 0.6  # some small crops
    assert legacy_worst > 2.0  # the check above has teeth: the unaligned latent misses by cells


def test_rgb_mode_is_the_old_augmentation():
    for shape in [(64, 64), (48, 80), (20, 90)]:
        image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
        decoder = SampleDecoder({}, SIZE, SEED, train=True, augment="rgb")
        for epoch in (0, 3):
            for key in KEYS[:16]:
                out = decoder(raw_sample(key, image, {}), epoch)
                assert torch.equal(out["rgb"], old_rgb(key, image, epoch)), (shape, key, epoch)
    # a legacy `augment: true` is the same mode
    assert augment_mode(True) == "rgb" and augment_mode(False) == "none"
    legacy = SampleDecoder({}, SIZE, SEED, train=True, augment=True)
    assert torch.equal(legacy(raw_sample(KEYS[0], image, {}), 1)["rgb"], old_rgb(KEYS[0], image, 1))


def test_none_and_eval_give_the_centre_crop():
    for shape in [(64, 64), (64, 128)]:
        image, latent = coordinate_image(*shape), coordinate_latent(*shape)
        sidecars = {"depth": spatial("depth", latent.shape)}
        centre = old_transform(False)(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        raw = raw_sample(KEYS[0], image, {latent_field("depth"): latent})
        # train with none, and eval whatever the mode
        for mode, train in [("none", True), ("none", False), ("rgb", False), ("aligned", False)]:
            out = SampleDecoder(sidecars, SIZE, SEED, train=train, augment=mode)(raw, 0)
            assert torch.equal(out["rgb"], centre), (mode, train)
            assert out["geometry"][4] == 0
            depth = out["latents"]["depth"]
            if mode != "aligned" or shape[0] == shape[1]:  # untouched: exactly as stored
                assert torch.equal(depth, torch.from_numpy(latent))
            else:  # aligned, non-square: the centre box, resampled
                assert out["geometry"].tolist() == [0.0, 0.25, 1.0, 0.5, 0.0]
                assert misalignment(out["rgb"], depth).max() < 1.0
    square = SampleDecoder({}, SIZE, SEED, train=False)(raw_sample(KEYS[0], coordinate_image(64, 64), {}), 0)
    assert square["geometry"].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]


def test_only_spatial_inputs_of_image_aligned_modalities_move():
    image, coords = coordinate_image(64, 64), coordinate_latent(64, 64)
    codes = np.arange(64, dtype=np.int64).reshape(8, 8)
    tokens = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    sidecars = {
        "depth": Sidecar("depth", Path("d"), "latent", {"kind": "codes", "shape": [8, 8], "vocab": 64}),
        "audio": spatial("audio", coords.shape),  # a spectrogram's latent: not on the image grid
        "lidar": Sidecar(
            "lidar", Path("l"), "latent", {"kind": "tokens", "shape": [5, 3]}, (0.0,) * 3, (1.0,) * 3
        ),
    }
    fields = {latent_field("depth"): codes, latent_field("audio"): coords, latent_field("lidar"): tokens}
    decoder = SampleDecoder(sidecars, SIZE, SEED, train=True, augment="aligned")
    assert decoder.aligned == {"depth"}
    moved = 0
    for key in KEYS[:12]:
        out = decoder(raw_sample(key, image, fields), 0)
        moved += int(out["geometry"][:4].tolist() != [0.0, 0.0, 1.0, 1.0] or out["geometry"][4])
        assert torch.equal(out["latents"]["depth"], torch.from_numpy(codes))
        assert torch.equal(out["latents"]["audio"], torch.from_numpy(coords))
        assert torch.equal(out["latents"]["lidar"], torch.from_numpy(tokens))
    assert moved == 12
    # tokens of an image-aligned modality have no geometry either
    depth_tokens = {"depth": dataclasses.replace(sidecars["lidar"], modality="depth")}
    out = SampleDecoder(depth_tokens, SIZE, SEED, train=True)(
        raw_sample(KEYS[0], image, {latent_field("depth"): tokens}), 0
    )
    assert torch.equal(out["latents"]["depth"], torch.from_numpy(tokens))


@pytest.mark.parametrize("axis", [0, 1])
def test_decoded_signal_shows_what_the_rgb_shows(axis):
    """A decoded sidecar's H×W signal takes the geometry on its own grid (here the source's: 64×64)."""
    image = coordinate_image(64, 64)
    signal = np.mgrid[:64, :64][1 - axis].astype(np.float32) + 0.5  # each pixel's x (axis 0) or y centre
    sidecars = {"depth": spatial("depth", (64, 64), kind="decoded")}
    decoder = SampleDecoder(sidecars, SIZE, SEED, train=True, augment="aligned")
    for key in KEYS[:16]:
        out = decoder(raw_sample(key, image, {decoded_field("depth"): signal}), 0)
        depth = out["decoded"]["depth"]
        assert depth.shape == (64, 64)
        # the signal's 2×2 blocks cover the RGB's pixels: within a source pixel
        seen = rgb_coordinates(out["rgb"])[axis]
        error = (F.avg_pool2d(depth[None, None], 2)[0, 0] - seen).abs()
        assert error.max() < 1.0 and error.mean() < 0.5


def test_flagged_latent_stays_zero():
    image = coordinate_image(64, 64)
    raw = raw_sample(KEYS[1], image, {latent_field("depth"): np.zeros((2, 8, 8), np.float32)})
    raw["depth.flag.txt"] = b"bad_input"
    out = SampleDecoder({"depth": spatial("depth", (2, 8, 8))}, SIZE, SEED, train=True)(raw, 0)
    assert out["geometry"][:4].tolist() != [0.0, 0.0, 1.0, 1.0]
    assert not out["present"]["depth"] and not out["latents"]["depth"].any()


def test_apply_geometry():
    x = torch.rand(3, 2, 16, 20)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]] * 3)
    assert apply_geometry(x, whole) is x  # nothing resampled: eval on square images is exact
    flip = whole.clone()
    flip[1, 4] = 1
    flipped = apply_geometry(x, flip)
    assert torch.equal(flipped[1], x[1].flip(-1)) and torch.equal(flipped[[0, 2]], x[[0, 2]])
    # a pixel box: inside, the bilinear resize of that crop (at its edges, the pixels beyond it)
    top, left, height, width = 3, 5, 9, 11
    box = torch.tensor([[top / 16, left / 20, height / 16, width / 20, 0.0]] * 3)
    reference = TF.resized_crop(x, top, left, height, width, [16, 20], antialias=False)
    torch.testing.assert_close(apply_geometry(x, box)[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1])
    # batch-wise (on the fly) is row by row (in the workers); zeros stay zeros; H×W signals too
    mixed = torch.cat([box[:1], flip[1:2], whole[:1]])
    rows = torch.cat([apply_geometry(x[i : i + 1], mixed[i : i + 1]) for i in range(3)])
    assert torch.equal(apply_geometry(x, mixed), rows)
    assert not apply_geometry(torch.zeros(3, 16, 20), mixed).any()
    assert apply_geometry(x[:, 0], mixed).shape == (3, 16, 20)


def test_unknown_mode_is_a_one_line_error():
    with pytest.raises(UserError) as err:
        augment_mode("sideways")
    assert (
        "\n" not in str(err.value)
        and "train.augment" in str(err.value)
        and "aligned, rgb, none" in str(err.value)
    )
    with pytest.raises(UserError, match="aligned, rgb, none"):
        SampleDecoder({}, SIZE, SEED, train=True, augment="flip")
