"""Tiny source + latent sidecar shard sets for the stage-two tests (written with the real writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synesthesia.shards.schema import decoded_field, encode_json, encode_npy, latent_field
from synesthesia.shards.writer import Manifest, SplitWriter
from synesthesia.sources.signals import encode_png

# The tiny dataset's stage-two overrides: a 2-block teacher and the micro student, a few CPU steps.
TINY_TRAIN = [
    "dataset=tiny",
    "train.modalities=[depth, audio]",
    "train.num_workers=0",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.lr=0.003",
    "teacher.dim=16",
    "teacher.depth=2",
    "teacher.heads=2",
    "teacher.tokens_per_modality=2",
    "student.name=vit_micro_test",
]

# A teacher small enough for a few CPU steps on decoded 32×32 signals (and the micro student).
TINY_DECODED_TEACHER = [
    "train.epochs=1",
    "train.warmup_steps=1",
    "teacher.dim=16",
    "teacher.depth=2",
    "teacher.heads=2",
    "teacher.tokens_per_modality=2",
    "teacher.decoded_max_tokens=16",
    "student.name=vit_micro_test",
]
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230]], dtype=np.uint8)


def write_tiny_dataset(
    root: Path,
    *,
    dataset: str = "tiny",
    counts: dict[str, int] | None = None,
    shard_size: int = 5,
    modalities: tuple[str, ...] = ("depth", "audio"),
    samples_per_input: int = 2,
    image_size: int = 32,
    latent_shape: tuple[int, ...] = (4, 4, 4),
    seed: int = 0,
    decoded: bool = False,
) -> Path:
    """Write ``root/<dataset>/source`` and ``root/<dataset>/latents/gen-<m>`` (generate mode); returns root.

    With ``decoded``, also ``root/<dataset>/decoded/gen-<m>``: 16×16 float32 signals (the ablation's input).

    Class c is a noisy colour c; each latent's channels carry the class plus noise,
    so a teacher can learn from either input.
    """
    counts = counts or {"train": 24, "val": 6, "test": 6}
    rng = np.random.default_rng(seed)
    base = Path(root) / dataset
    src_manifest = Manifest(kind="source", dataset=dataset)
    side_manifests = {m: Manifest(kind="latent", dataset=dataset) for m in modalities}
    dec_manifests = {m: Manifest(kind="decoded", dataset=dataset) for m in modalities}
    all_latents: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    for split, n in counts.items():
        writer = SplitWriter(base / "source", split, shard_size)
        sides = {m: SplitWriter(base / "latents" / f"gen-{m}", split, shard_size) for m in modalities}
        decs = {m: SplitWriter(base / "decoded" / f"gen-{m}", split, shard_size) for m in modalities}
        for i in range(n):
            key = f"{split}_{i:05d}"
            label = int(rng.integers(len(COLOURS)))
            noise = rng.normal(0, 25, (image_size, image_size, 3))
            rgb = np.clip(COLOURS[label][None, None] + noise, 0, 255).astype(np.uint8)
            writer.add(
                {
                    "__key__": key,
                    "rgb.png": encode_png(rgb),
                    "cls": str(label).encode(),
                    "json": encode_json({"i": i}),
                }
            )
            for m in modalities:
                shape = ((samples_per_input,) if samples_per_input > 1 else ()) + tuple(latent_shape)
                z = rng.normal(label, 1.0, shape).astype(np.float16)
                if split == "train":
                    all_latents[m].append(z.reshape(-1, *latent_shape).astype(np.float32))
                sides[m].add({"__key__": key, latent_field(m): encode_npy(z)})
                if decoded:
                    signal = (rng.random((16, 16)) * 10 + label).astype(np.float32)
                    decs[m].add({"__key__": key, decoded_field(m): encode_npy(signal)})
        src_manifest.splits[split] = writer.close()
        for m in modalities:
            side_manifests[m].splits[split] = sides[m].close()
            dec_manifests[m].splits[split] = decs[m].close()
    src_manifest.extra = {
        "modalities": list(modalities),
        "num_classes": len(COLOURS),
        "class_names": ["red", "green", "blue"],
        "image_size": image_size,
    }
    src_manifest.write(base / "source")
    for m in modalities:
        stacked = np.concatenate(all_latents[m])  # (N·S, C, h, w)
        side = side_manifests[m]
        side.generator = {"name": "gen", "class": "Test", "modality": m, "mode": "generate"}
        side.latent_spec = {
            "kind": "spatial",
            "shape": list(latent_shape),
            "samples_per_input": samples_per_input,
        }
        side.channel_stats = {
            "mean": stacked.mean(axis=(0, 2, 3)).tolist(),
            "std": stacked.std(axis=(0, 2, 3)).tolist(),
        }
        side.write(base / "latents" / f"gen-{m}")
        if decoded:
            dec_manifests[m].generator = side.generator
            dec_manifests[m].write(base / "decoded" / f"gen-{m}")
    return Path(root)
