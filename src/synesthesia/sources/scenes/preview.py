"""A PNG grid of rendered samples for a quick look (``write_preview``, ``synesthesia render --preview``).

One row per sample: RGB, depth, LiDAR range and intensity, and a spectrogram of
the impact sound, read back from the shards of one split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synesthesia import UserError


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
