"""A tiny test-only generator and source-set maker for tests/test_stage_one.py.

Importable by the subprocesses those tests start (``PYTHONPATH=tests``):
``python -m stage_one_toy shard …`` is ``synesthesia shard …`` with the toy
generator registered. Not part of the package.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from synesthesia.generators.base import GENERATORS, Generator, LatentSpec, key_seed
from synesthesia.shards.schema import SchemaError, decode_npy, encode_json, encode_npy
from synesthesia.shards.writer import Manifest, SplitWriter
from synesthesia.utils import sha256_bytes


@GENERATORS.register("toy-conv")
class ToyConv(Generator):
    """A fixed random 4×4/stride-4 conv over (gray RGB, normalised depth): 2×H×W → C×H/4×W/4.

    ``delay`` sleeps per batch (to kill a run mid-way), ``nan_keys`` makes the
    latents of those keys NaN, ``decode_calls`` counts decoder calls in this process.
    """

    name = "toy-conv"
    mode = "encode"
    decode_calls = 0

    def __init__(
        self,
        modality: str = "depth",
        weights: str | None = None,
        samples_per_input: int = 1,
        seed: int = 0,
        channels: int = 4,
        image_size: int = 32,
        delay: float = 0.0,
        nan_keys: list[str] | None = None,
    ):
        super().__init__()
        if modality != "depth":
            raise ValueError("toy-conv encodes depth only")
        self.modality = modality
        self.samples_per_input = samples_per_input
        self.seed = seed
        self.channels = channels
        self.image_size = image_size
        self.delay = delay
        self.nan_keys = set(nan_keys or [])
        gen = torch.Generator().manual_seed(1234)
        self.encoder = nn.Conv2d(2, channels, 4, stride=4)
        self.decoder = nn.ConvTranspose2d(channels, 1, 4, stride=4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def latent_spec(self) -> LatentSpec:
        side = self.image_size // 4
        return LatentSpec(
            kind="spatial",
            shape=(self.channels, side, side),
            samples_per_input=self.samples_per_input,
            seed=self.seed if self.samples_per_input > 1 else None,
        )

    def identity(self) -> dict:
        blob = b"".join(p.detach().cpu().numpy().tobytes() for p in self.parameters())
        return {
            "class": "stage_one_toy.ToyConv",
            "weights": "seeded:1234",
            "weights_sha256": sha256_bytes(blob),
            "config": {"channels": self.channels, "image_size": self.image_size},
        }

    def preprocess(self, sample: dict) -> dict[str, np.ndarray]:
        try:
            with Image.open(io.BytesIO(sample["rgb.png"])) as im:
                gray = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        except Exception as exc:
            raise SchemaError(f"unreadable image ({exc.__class__.__name__})") from None
        if "depth.npy" not in sample:
            raise SchemaError("no depth.npy")
        depth = decode_npy(sample["depth.npy"], dtypes=("float32",), ndim=(2,))
        if gray.shape != (self.image_size, self.image_size) or depth.shape != gray.shape:
            raise SchemaError(f"expected {self.image_size}x{self.image_size} inputs")
        return {"x": np.stack([gray, np.log1p(np.maximum(depth, 0.0))]).astype(np.float32)}

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        z = self.encoder(batch["x"])
        if self.samples_per_input > 1:
            noise = []
            for key in keys:
                g = torch.Generator().manual_seed(key_seed(key, self.seed))
                noise.append(torch.randn((self.samples_per_input, *z.shape[1:]), generator=g))
            z = z[:, None] + 0.1 * torch.stack(noise).to(z.device, z.dtype)
        for i, key in enumerate(keys):
            if key in self.nan_keys:
                z[i] = float("nan")
        return z

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        type(self).decode_calls += 1
        lead = latents.shape[: latents.ndim - 3]  # B or B×S
        signal = self.decoder(latents.float().reshape(-1, *latents.shape[-3:]))[:, 0]
        return signal.reshape(*lead, *signal.shape[1:])


def make_source(
    out: str | Path,
    dataset: str = "toy",
    shards: dict[str, tuple[int, int]] | None = None,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """A tiny source set: per split (number of shards, samples per shard) of rgb.png + depth.npy."""
    from synesthesia.sources.signals import encode_png

    shards = shards or {"train": (3, 5), "val": (1, 3)}
    directory = Path(out) / dataset / "source"
    rng = np.random.default_rng(seed)
    infos = {}
    for split, (n_shards, per_shard) in shards.items():
        writer = SplitWriter(directory, split, per_shard)
        for i in range(n_shards * per_shard):
            rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            depth = rng.uniform(0.5, 10.0, (size, size)).astype(np.float32)
            label = int(rng.integers(0, 3))
            writer.add(
                {
                    "__key__": f"{split}_{i:05d}",
                    "rgb.png": encode_png(rgb),
                    "depth.npy": encode_npy(depth),
                    "cls": str(label).encode(),
                    "json": encode_json({"index": i}),
                }
            )
        infos[split] = writer.close()
    Manifest(
        kind="source",
        dataset=dataset,
        splits=infos,
        extra={"modalities": ["depth"], "num_classes": 3, "class_names": ["a", "b", "c"]},
    ).write(directory)
    return directory


if __name__ == "__main__":
    from synesthesia.cli import main

    sys.exit(main())
