"""Bootstrap encodes as the pairs stream by and keeps the latents on disk (``RowFile``)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from synesthesia.bootstrap import build_codec, encode_pairs
from synesthesia.bootstrap.data import RowFile
from synesthesia.shards import Manifest, iter_aligned
from synesthesia.shards.schema import image_field
from synesthesia.sources.signals import decode_image
from test_bootstrap import make_paired_source, tiny_pipeline


def test_rowfile_round_trip(tmp_path):
    rows = RowFile((2, 3), np.float32, tmp_path)
    data = np.arange(5 * 6, dtype=np.float32).reshape(5, 2, 3)
    assert rows.append(data[:2]) == range(0, 2)
    assert rows.append(torch.from_numpy(data[2:])) == range(2, 5)
    assert rows.shape == (5, 2, 3) and len(rows) == 5
    np.testing.assert_array_equal(rows.read([4, 0, 2]), data[[4, 0, 2]])
    assert torch.equal(rows[torch.tensor([1, 3])], torch.from_numpy(data[[1, 3]]))
    torch.testing.assert_close(
        rows.mean(range(5), chunk=2), torch.from_numpy(data.mean(axis=0, keepdims=True))
    )
    with pytest.raises(IndexError):
        rows.read([5])
    with pytest.raises(ValueError, match="shape"):
        rows.append(np.zeros((1, 3, 2), np.float32))
    assert list(tmp_path.iterdir()) == []  # an unnamed file: nothing to clean up, even after a kill
    rows.close()


@pytest.mark.usefixtures("shared")  # the default codec is the real TAEF2
def test_encode_pairs_streams_to_disk(tmp_path, monkeypatch):
    n = 32
    root = make_paired_source(tmp_path / "src", n=n)
    cfg = tiny_pipeline(tmp_path, ["depth"], encode_batch_size=2, holdout=4).bootstrap
    codec = build_codec(cfg)
    source = root / "toy" / "source"
    warm = tiny_pipeline(tmp_path, ["depth"], max_pairs=2, holdout=0).bootstrap
    encode_pairs(source, warm, codec, torch.device("cpu"), folder=tmp_path)  # imports, caches
    manifest = Manifest.read(source)  # read apart: a manifest read reserves its 64 MiB cap up front
    monkeypatch.setattr(Manifest, "read", classmethod(lambda cls, directory: manifest))
    tracemalloc.start()
    try:
        pairs, skipped = encode_pairs(source, cfg, codec, torch.device("cpu"), folder=tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    depth = pairs["depth"]
    assert skipped == {} and depth.target.shape[0] == n and isinstance(depth.cond, RowFile)
    image_bytes = 2 * n * 3 * 32 * 32 * 4  # RGB and mapped depth as float32: what the old pass held
    assert peak < image_bytes / 3, f"peak {peak} bytes; the images alone are {image_bytes}"
    # the latents on disk are the codec's, encoded in batches of encode_batch_size as before
    rgbs = [decode_image(s[image_field(s)]) for s in iter_aligned(source, split="paired")][:2]
    batch = torch.from_numpy(np.stack([r.transpose(2, 0, 1).astype(np.float32) / 255.0 for r in rgbs]))
    with torch.no_grad():
        expected = codec.encode(batch).float()
    torch.testing.assert_close(depth.cond[range(2)], expected, rtol=1e-4, atol=1e-5)
    assert list(tmp_path.glob("tmp*")) == []  # unnamed files only
    depth.close()


def _drop_lidar(source, every: int) -> None:
    """Rewrite a paired split without the LiDAR of every ``every``-th sample."""
    from synesthesia.shards import Manifest, SplitWriter

    samples = list(iter_aligned(source, split="paired"))
    for path in source.glob("*.tar"):
        path.unlink()
    writer = SplitWriter(source, "paired", shard_size=16)
    for i, sample in enumerate(samples):
        if i % every == 0:
            sample.pop("lidar.npy")
        writer.add(sample)
    Manifest(kind="source", dataset="toy", splits={"paired": writer.close()}).write(source)


@pytest.mark.usefixtures("shared")
def test_a_modality_with_skipped_signals_gets_its_own_rows(tmp_path):
    """Pairs without LiDAR are skipped for LiDAR only; its RGB rows are those of the kept pairs."""
    root = make_paired_source(tmp_path / "src", n=12)
    source = root / "toy" / "source"
    _drop_lidar(source, every=3)
    cfg = tiny_pipeline(tmp_path, ["depth", "lidar"], holdout=4).bootstrap
    codec = build_codec(cfg)
    pairs, skipped = encode_pairs(source, cfg, codec, torch.device("cpu"), folder=tmp_path)
    depth, lidar = pairs["depth"], pairs["lidar"]
    assert skipped == {"lidar": 4}
    assert len(depth.keys) == 12 and lidar.keys == [k for i, k in enumerate(depth.keys) if i % 3]
    assert lidar.cond.shape[0] == lidar.target.shape[0] == 8
    kept = [i for i in range(12) if i % 3]
    assert torch.equal(lidar.cond[range(8)], depth.cond[kept])
    assert depth.signal is not None and depth.signal.shape[0] == 12 and lidar.signal is None
    for p in pairs.values():
        p.close()
