"""Is the scenes label really ambiguous from RGB? Probe RGB alone vs. RGB + depth + audio + LiDAR.

Two small networks, trained with the same budget (epochs, batch size,
optimiser, schedule, seed) on the train split of a scenes render:

- ``rgb_only``: a 4-block CNN on the RGB image;
- ``all_modalities``: the same CNN on RGB + log-depth (4 channels), plus a CNN
  on the LiDAR range/intensity image and an MLP on the log-power spectrogram of
  the impact sound, concatenated before the classifier.

The epoch is chosen on the val split; the test split is read once, at that
epoch. Prints JSON with ``rgb_only_acc`` and ``all_modalities_acc`` (test
top-1) and a summary line. By default it renders (or reuses) the demo's splits
under ``shards/``; pass ``key=value`` overrides for the pipeline's ``scenes``
section, e.g. ``ambiguity=0.3``.

    python benchmarks/probe_scenes.py                      # the demo splits
    python benchmarks/probe_scenes.py ambiguity=1.0 --out /tmp/probe
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, parser  # noqa: E402
from synesthesia.config import load_pipeline  # noqa: E402
from synesthesia.shards.reader import iter_aligned  # noqa: E402
from synesthesia.shards.schema import decode_npy  # noqa: E402
from synesthesia.sources.scenes import NUM_CLASSES, render_dataset  # noqa: E402
from synesthesia.sources.signals import decode_audio, decode_image  # noqa: E402


def load_split(directory: Path, split: str) -> dict[str, np.ndarray]:
    """Decode one split into arrays: rgb, depth, lidar (2 channels), audio spectrogram, labels."""
    from scipy.signal import spectrogram

    rgb, depth, lidar, audio, labels = [], [], [], [], []
    for sample in iter_aligned(directory, split=split):
        rgb.append(decode_image(sample["rgb.png"]).transpose(2, 0, 1))
        d = decode_npy(sample["depth.npy"])
        depth.append(np.log1p(d)[None])
        r = decode_npy(sample["lidar.npy"])
        i = decode_npy(sample["lidar_intensity.npy"])
        lidar.append(np.stack([np.log1p(r), i]))
        wave, rate = decode_audio(sample["audio.flac"])
        _, _, sxx = spectrogram(wave, fs=rate, nperseg=512, noverlap=256)
        # 257 bins → 64 bands (mean of 4), log power: pitch and decay of the modes.
        bands = sxx[:256].reshape(64, 4, -1).mean(axis=1)
        audio.append(np.log10(bands + 1e-10) / 5 + 1)
        labels.append(int(sample["cls"]))
    return {
        "rgb": np.stack(rgb).astype(np.float32) / 255.0,
        "depth": np.stack(depth).astype(np.float32) / 3.0,
        "lidar": np.stack(lidar).astype(np.float32),
        "audio": np.stack(audio).astype(np.float32),
        "label": np.asarray(labels, dtype=np.int64),
    }


def build_models(torch, num_classes: int, audio_shape: tuple[int, int], width: int = 24):
    nn = torch.nn
    dim = 2 * width

    def cnn(in_ch: int) -> nn.Module:
        def block(i, o, stride):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)
            )

        return nn.Sequential(
            block(in_ch, width // 2, 2),
            block(width // 2, width, 2),
            block(width, 2 * width, 2),
            block(2 * width, 2 * width, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    class RGBOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.camera = cnn(3)
            self.head = nn.Linear(dim, num_classes)

        def forward(self, batch):
            return self.head(self.camera(batch["rgb"]))

    class AllModalities(nn.Module):
        def __init__(self):
            super().__init__()
            self.camera = cnn(4)
            # 32×256 scans: average 4 azimuth steps first (cheaper, and still 32×64).
            self.lidar = nn.Sequential(nn.AvgPool2d((1, 4)), cnn(2))
            self.audio = nn.Sequential(
                nn.Flatten(),
                nn.Linear(audio_shape[0] * audio_shape[1], 128),
                nn.ReLU(inplace=True),
                nn.Linear(128, dim),
            )
            self.head = nn.Linear(3 * dim, num_classes)

        def forward(self, batch):
            camera = self.camera(torch.cat([batch["rgb"], batch["depth"]], dim=1))
            return self.head(
                torch.cat([camera, self.lidar(batch["lidar"]), self.audio(batch["audio"])], dim=1)
            )

    return RGBOnly(), AllModalities()


def train_probe(torch, model, data: dict, epochs: int, batch_size: int, lr: float, seed: int) -> dict:
    """Train with AdamW + cosine schedule; pick the epoch on val; test accuracy at that epoch."""
    torch.manual_seed(seed)
    train = {k: torch.from_numpy(v) for k, v in data["train"].items()}
    n = train["label"].shape[0]
    steps = epochs * ((n + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)

    def accuracy(split: str) -> float:
        model.eval()
        tensors = {k: torch.from_numpy(v) for k, v in data[split].items()}
        correct = 0
        with torch.no_grad():
            for s in range(0, tensors["label"].shape[0], 256):
                batch = {k: v[s : s + 256] for k, v in tensors.items()}
                correct += int((model(batch).argmax(1) == batch["label"]).sum())
        return correct / tensors["label"].shape[0]

    best = {"val_acc": -1.0}
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            batch = {k: v[idx] for k, v in train.items()}
            loss = torch.nn.functional.cross_entropy(model(batch), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy("val")
        if val > best["val_acc"]:
            best = {
                "val_acc": val,
                "epoch": epoch + 1,
                "state": {k: v.clone() for k, v in model.state_dict().items()},
            }
    model.load_state_dict(best.pop("state"))
    best["test_acc"] = accuracy("test")
    return best


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides of the pipeline (scenes section)"
    )
    p.add_argument(
        "--pipeline", default="pipelines/demo.yaml", help="pipeline YAML (default: pipelines/demo.yaml)"
    )
    p.add_argument("--out", default="shards", help="render root; an existing verified render is reused")
    p.add_argument("--epochs", type=int, default=10, help="training epochs for both probes")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="training seed (the render seed is the pipeline's)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args()

    start = time.perf_counter()
    cfg = load_pipeline(args.pipeline, args.overrides, section="scenes")
    directory, _ = render_dataset(cfg, args.out)
    data = {split: load_split(directory, split) for split in ("train", "val", "test")}
    render_s = time.perf_counter() - start

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name, model in zip(
        ("rgb_only", "all_modalities"),
        build_models(torch, NUM_CLASSES, data["train"]["audio"].shape[1:]),
        strict=True,
    ):
        t0 = time.perf_counter()
        results[name] = train_probe(torch, model, data, args.epochs, args.batch_size, args.lr, args.seed)
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    rgb, full = results["rgb_only"]["test_acc"], results["all_modalities"]["test_acc"]
    command = "python benchmarks/probe_scenes.py " + " ".join(sys.argv[1:])
    emit(
        "probe_scenes",
        {
            "rgb_only_acc": round(rgb, 4),
            "all_modalities_acc": round(full, 4),
            "gap_points": round(100 * (full - rgb), 1),
            "chance_acc": round(1 / NUM_CLASSES, 4),
            "probes": results,
            "ambiguity": cfg.scenes.ambiguity,
            "splits": {s: int(d["label"].shape[0]) for s, d in data.items()},
            "epochs": args.epochs,
            "render_and_load_s": round(render_s, 1),
            "source": str(directory),
            "command": command.strip(),
        },
        f"test top-1 RGB only {100 * rgb:.1f}% vs all modalities {100 * full:.1f}% "
        f"(gap {100 * (full - rgb):.1f} points, chance {100 / NUM_CLASSES:.1f}%, ambiguity {cfg.scenes.ambiguity})",
        args.json_out,
    )


if __name__ == "__main__":
    main()
