"""Stage-two samples: one raw merged sample (``field -> bytes``) → tensors, and a batch of them.

- :class:`RGBTransform`: the image's view (train: random resized crop and flip;
  eval: resize and centre crop), normalised with the ImageNet statistics, and
  that view's *geometry* ``[top, left, height, width, flip]`` (the box of the
  source image it shows);
- :func:`apply_geometry`: the same box and flip applied to inputs on the image's
  grid (``torchvision.ops.roi_align`` in the input's own coordinates);
- :class:`SampleDecoder`: RGB, label, the privileged latents (standardised per
  channel with the sidecar's ``channel_stats``, one of ``S`` samples per input
  drawn), decoded signals, or the raw latents to decode on the fly
  (:mod:`synesthesia.train.on_the_fly`); bad samples raise ``SchemaError``;
- :func:`collate`: decoded samples → the batch the methods see.

``train.augment`` (:data:`AUGMENT`, :func:`augment_mode`) decides the train view:

- ``aligned`` (default): a random resized crop (scale 0.35-1) and a horizontal
  flip of the RGB, and the same box and flip for the spatial privileged inputs
  of the modalities on the image's grid (:data:`IMAGE_ALIGNED`: depth; audio's
  spectrogram and lidar's range image are spatial but not on it): a latent on
  its h×w grid, a decoded signal on its H×W, each resampled to its own grid, so
  the teacher fuses and MESSy predicts the content the RGB shows. In eval they
  take the centre box, which on a square image is the whole image (no
  resampling: they are exactly as stored);
- ``rgb``: the same crop and flip of the RGB only, the privileged inputs those
  of the whole unflipped image (the behaviour before ``aligned``; a legacy
  ``augment: true`` reads as ``rgb``);
- ``none``: train images get the eval view, the privileged inputs as stored (a
  legacy ``augment: false``).

Tokens and codes have no geometry and are never cropped. The augmentation (its
torch seed drawn first) and the S draw are seeded by ``(seed, epoch, key)``
(:func:`_rng`), so they do not depend on which rank or worker reads the sample,
and a resumed run sees the same batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import roi_align
from torchvision.transforms import v2

from synesthesia import UserError
from synesthesia.generators.base import key_seed
from synesthesia.shards.schema import SchemaError, decode_npy, image_field

if TYPE_CHECKING:  # the sidecars module imports this one
    from synesthesia.train.sidecars import Sidecar

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENT = ("aligned", "rgb", "none")  # train.augment; a legacy bool reads as rgb (true) or none (false)
# The modalities whose spatial inputs lie on the RGB image's grid: train.augment=aligned crops and
# flips them with the image. Audio (a spectrogram's latent) and lidar (a range image, beams x
# azimuth) are spatial too, but their axes are not the image's.
IMAGE_ALIGNED = ("depth",)
RAW_LATENTS = "raw_latents"  # sample/batch key of the latents to decode on the fly (dropped once decoded)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFF_FFFF_FFFF_FFFF for p in parts])


def augment_mode(augment: str | bool) -> str:
    """``train.augment`` as one of :data:`AUGMENT`: a legacy bool (written configs) reads as
    ``rgb`` (true, the RGB-only augmentation it meant) or ``none`` (false)."""
    if isinstance(augment, bool):
        return "rgb" if augment else "none"
    if augment not in AUGMENT:
        raise UserError(f"unknown train.augment {augment!r}; valid: {', '.join(AUGMENT)}")
    return augment


class RGBTransform:
    """A uint8 3×H×W image → its normalised float 3×S×S view and that view's geometry.

    The geometry is a float32 tensor ``[top, left, height, width, flip]``: the box
    of the source image the view shows, as fractions of the source's height and
    width, and 1 where the view was then flipped horizontally (:func:`apply_geometry`
    applies it to other inputs on the image's grid). Train (``random``): a random
    resized crop (scale 0.35-1) and a horizontal flip, drawn from the global CPU
    generator exactly as ``v2.RandomResizedCrop`` and ``v2.RandomHorizontalFlip``
    draw them; eval: resize (shorter side S) and centre crop, whose box is the
    whole image when it is square.
    """

    def __init__(self, image_size: int, random: bool):
        self.size = image_size
        self.random = random
        self.crop = v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True)
        self.flip = v2.RandomHorizontalFlip()
        self.resize = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
        self.normalise = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        if self.random:
            box = self.crop.make_params([image])
            flip = bool(torch.rand(1) < self.flip.p)  # RandomHorizontalFlip skips when rand >= p
            image = self.crop.transform(image, box)
            if flip:
                image = self.flip.transform(image, {})
            geometry = [
                box["top"] / height,
                box["left"] / width,
                box["height"] / height,
                box["width"] / width,
            ]
        else:
            image = self.resize(image)
            geometry, flip = self._centre_box(height, width), False
        return self.normalise(image), torch.tensor([*geometry, float(flip)], dtype=torch.float32)

    def _centre_box(self, height: int, width: int) -> list[float]:
        """The eval view's box, as fractions: ``v2.Resize`` scales the shorter side to S (the
        longer to ``int(S * long / short)``), ``v2.CenterCrop`` takes S×S of that at
        ``round((side - S) / 2)``; exactly [0, 0, 1, 1] for a square image."""
        short, long = min(height, width), max(height, width)
        resized = (self.size, int(self.size * long / short))
        resized_h, resized_w = resized if height <= width else resized[::-1]
        top, left = round((resized_h - self.size) / 2), round((resized_w - self.size) / 2)
        return [top / resized_h, left / resized_w, self.size / resized_h, self.size / resized_w]


WHOLE = (0.0, 0.0, 1.0, 1.0)  # the geometry box of the whole image


def apply_geometry(x: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
    """Spatial inputs (B, ..., H, W) cropped and flipped as their images were (``geometry`` B×5,
    :class:`RGBTransform`'s): row b's box, taken in the input's own coordinates, is resampled
    bilinearly to the input's H×W grid (``torchvision.ops.roi_align``, aligned=True: pixel centres
    at +0.5, as ``v2.RandomResizedCrop`` resizes; at the box's edges it reads the pixels just
    beyond the box, where resizing a cut-out crop repeats its edge), then flipped along W where
    its flip is set.

    A row whose box is the whole input is not resampled, so a row with the whole box and no flip
    is exactly itself (eval on square images), and a whole-box flip is exact too.
    """
    if x.ndim < 3 or geometry.shape != (x.shape[0], 5):
        raise ValueError(f"apply_geometry: inputs {list(x.shape)} and geometry {list(geometry.shape)}")
    height, width = x.shape[-2:]
    geometry = geometry.to(x.device)
    box, flip = geometry[:, :4], geometry[:, 4] > 0.5
    crop = (box != torch.tensor(WHOLE, device=x.device)).any(dim=1)
    if not bool(crop.any()) and not bool(flip.any()):
        return x
    out = x.clone()
    if bool(crop.any()):
        rows = crop.nonzero().flatten()
        pixels = torch.tensor([height, width, height, width], dtype=torch.float64, device=x.device)
        top, left, box_h, box_w = (box[rows].double() * pixels).unbind(1)
        index = torch.arange(len(rows), dtype=torch.float64, device=x.device)
        rois = torch.stack([index, left, top, left + box_w, top + box_h], dim=1).float()
        planes = x[rows].reshape(len(rows), -1, height, width).float()
        resampled = roi_align(planes, rois, output_size=(height, width), aligned=True)
        out[rows] = resampled.reshape(x[rows].shape).to(x.dtype)
    if bool(flip.any()):
        out[flip] = out[flip].flip(-1)
    return out


def decode_rgb(data: bytes) -> torch.Tensor:
    """PNG/JPEG bytes → 3×H×W uint8 tensor, decoded by ``torchvision.io`` (libpng/libjpeg-turbo)
    straight into a tensor; unreadable images raise SchemaError."""
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise SchemaError(f"unreadable image ({exc.__class__.__name__})") from None


class SampleDecoder:
    """Raw merged sample (``field -> bytes``) → tensors; bad samples raise SchemaError.

    ``train`` samples are augmented as ``augment`` (:data:`AUGMENT`) says, eval
    ones get the eval geometry; with ``augment="aligned"`` the spatial latents and
    decoded signals of :attr:`aligned` modalities follow the RGB's geometry
    (returned under ``geometry``). A sidecar decoded on the fly gives its raw latent
    (as stored, in float32 or int64 for codes, S drawn, not standardised) under
    ``raw_latents``; the loader decodes it after batching (:class:`OnTheFlyDecoder`).
    """

    def __init__(
        self,
        sidecars: dict[str, Sidecar],
        image_size: int,
        seed: int,
        *,
        train: bool,
        augment: str = "aligned",
    ):
        mode = augment_mode(augment)
        self.sidecars = sidecars
        self.seed = seed
        self.random = train and mode != "none"
        self.transform = RGBTransform(image_size, self.random)
        # the modalities whose spatial inputs take the RGB's geometry
        self.aligned = (
            frozenset(m for m in sidecars if m in IMAGE_ALIGNED) if mode == "aligned" else frozenset()
        )
        self.stats = {
            m: (
                torch.tensor(s.mean, dtype=torch.float32),
                torch.tensor(s.std, dtype=torch.float32),
            )
            for m, s in sidecars.items()
            if s.mean is not None
        }

    def _standardise(self, sidecar: Sidecar, x: torch.Tensor) -> torch.Tensor:
        if sidecar.modality not in self.stats:
            return x
        mean, std = self.stats[sidecar.modality]
        if mean.numel() != x.shape[0 if sidecar.spec["kind"] == "spatial" else -1]:
            raise SchemaError(
                f"{sidecar.modality}: {mean.numel()} channel stats for a latent of shape {list(x.shape)}"
            )
        if sidecar.spec["kind"] == "spatial":  # C×h×w: channel first
            return (x - mean.view(-1, *([1] * (x.ndim - 1)))) / std.view(-1, *([1] * (x.ndim - 1)))
        return (x - mean) / std  # tokens T×C: channel last

    def _align(self, sidecar: Sidecar, x: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """``x`` cropped and flipped like the RGB when its modality is aligned and it is spatial
        (a C×h×w latent or a decoded signal; tokens have no geometry)."""
        spatial = sidecar.kind == "decoded" or sidecar.spec.get("kind") == "spatial"
        if sidecar.modality not in self.aligned or not spatial:
            return x
        return apply_geometry(x.unsqueeze(0), geometry.unsqueeze(0))[0]

    def __call__(self, raw: dict[str, Any], epoch: int) -> dict[str, Any]:
        key = raw["__key__"]
        rng = _rng(key_seed(key, self.seed), epoch)
        try:
            label = int(raw["cls"].decode().strip())
        except (KeyError, ValueError, AttributeError):
            raise SchemaError(f"sample {key!r}: missing or bad cls") from None
        image = decode_rgb(raw[image_field(raw)])
        if self.random:
            # transforms.v2 draws from the global CPU generator: seed it for this sample inside a
            # fork (state restored after). Seeding only the CPU generator, not torch.manual_seed,
            # leaves the CUDA generators alone and skips their lazy-seeding bookkeeping (~0.3 ms).
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(rng.integers(2**62)))
                rgb, geometry = self.transform(image)
        else:
            rgb, geometry = self.transform(image)
        latents, decoded, raw_latents, present = {}, {}, {}, {}
        for m, sidecar in self.sidecars.items():
            if sidecar.field not in raw:
                raise SchemaError(f"sample {key!r}: no {sidecar.field} in {sidecar.directory.name}")
            # stage one keeps a sample it could not process with a zero latent and a flag: the
            # modality is then missing for this sample (the teacher puts its null tokens there)
            present[m] = f"{m}.flag.txt" not in raw
            array = decode_npy(raw[sidecar.field], finite=True)
            shape = sidecar.stored_shape
            if sidecar.samples_per_input > 1:  # latent, decoded or to decode: one of the S drawn
                if array.ndim != len(shape) + 1:
                    raise SchemaError(f"sample {key!r}: {m} sample {array.shape} lacks the S dimension")
                array = array[int(rng.integers(array.shape[0]))]
            if shape and tuple(array.shape) != shape:
                raise SchemaError(
                    f"sample {key!r}: {m} has shape {list(array.shape)}, the manifest says {list(shape)}"
                )
            if sidecar.on_the_fly:  # decoded after batching, in the main process
                dtype = np.int64 if array.dtype.kind in "iu" else np.float32
                raw_latents[m] = torch.from_numpy(np.array(array, dtype=dtype))
            elif sidecar.kind == "decoded":
                decoded[m] = self._align(
                    sidecar, torch.from_numpy(np.array(array, dtype=np.float32)), geometry
                )
            elif sidecar.spec.get("kind") == "codes":
                latents[m] = torch.from_numpy(np.array(array, dtype=np.int64))
            elif present[m]:
                latent = self._standardise(sidecar, torch.from_numpy(np.array(array, dtype=np.float32)))
                latents[m] = self._align(sidecar, latent, geometry)
            else:
                latents[m] = torch.zeros(array.shape, dtype=torch.float32)
        return {
            "key": key,
            "rgb": rgb,
            "geometry": geometry,
            "label": label,
            "latents": latents,
            "decoded": decoded,
            RAW_LATENTS: raw_latents,
            "present": present,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Decoded samples → the batch the methods see: rgb, label, latents, decoded, keys, ``geometry``
    (B×5, :class:`RGBTransform`'s) and ``present`` {modality: (B,) bool}, False where stage one
    flagged the sample's latent."""
    batch: dict[str, Any] = {
        "rgb": torch.stack([s["rgb"] for s in samples]),
        "geometry": torch.stack([s["geometry"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "keys": [s["key"] for s in samples],
        "latents": {m: torch.stack([s["latents"][m] for s in samples]) for m in samples[0]["latents"]},
    }
    if samples[0]["decoded"]:
        batch["decoded"] = {m: torch.stack([s["decoded"][m] for s in samples]) for m in samples[0]["decoded"]}
    if samples[0].get(RAW_LATENTS):  # decoded on the fly by the loader (OnTheFlyDecoder), then dropped
        batch[RAW_LATENTS] = {
            m: torch.stack([s[RAW_LATENTS][m] for s in samples]) for m in samples[0][RAW_LATENTS]
        }
    if samples[0]["present"]:
        batch["present"] = {
            m: torch.tensor([s["present"][m] for s in samples]) for m in samples[0]["present"]
        }
    return batch
