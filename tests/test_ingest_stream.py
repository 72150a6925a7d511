"""Ingest streams: two passes over the source, no list of samples or bytes, the same shards as before."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synesthesia.config import load_pipeline
from synesthesia.shards import Manifest
from synesthesia.shards.reader import iter_shard
from synesthesia.sources.ingest import ingest
from synesthesia.sources.ingest.webdataset import WebDatasetSource


def _noise_png(seed: int, size: int) -> bytes:
    """A PNG of noise: it does not compress, so its bytes are about 3·size² (the payload we track)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for name, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _cfg(source: Path, *overrides: str):
    return load_pipeline(None, ["dataset=s", f"ingest.source={source}", *overrides])


def test_webdataset_ingest_never_holds_the_whole_input(tmp_path, monkeypatch):
    """Peak Python allocations of the two passes stay well below the input's bytes (the old single
    pass kept every sample's bytes until the end), and the spool is gone afterwards."""
    from synesthesia.sources.ingest import writer

    peaks: list[int] = []
    card = writer.write_dataset_card  # measured apart: it reads manifests through a 64 MiB-capped read

    def peak_then_card(*args, **kwargs):
        peaks.append(tracemalloc.get_traced_memory()[1])
        return card(*args, **kwargs)

    monkeypatch.setattr(writer, "write_dataset_card", peak_then_card)
    src = tmp_path / "tars"
    src.mkdir()
    n, per_tar = 48, 16
    for t in range(n // per_tar):
        samples = [
            (f"k{t}_{i:03d}", {"png": _noise_png(t * 100 + i, 160), "cls": str(i % 3).encode()})
            for i in range(per_tar)
        ]
        _write_tar(src / f"train-{t:03d}.tar", samples)
    total = sum(p.stat().st_size for p in src.glob("*.tar"))
    cfg = _cfg(src, "ingest.shard_size=4", "ingest.val_fraction=0", "ingest.test_fraction=0")
    ingest(cfg, tmp_path / "warm")  # imports and caches outside the measurement
    tracemalloc.start()
    try:
        final, manifest = ingest(cfg, tmp_path / "out")
    finally:
        tracemalloc.stop()
    assert manifest.count("train") == n
    assert peaks[-1] < total / 3, f"peak {peaks[-1]} bytes for an input of {total}"
    assert sorted(p.name for p in final.parent.iterdir()) == ["README.md", "source"]  # no staging left


def test_listing_keeps_refs_not_bytes(tmp_path):
    """Pass one's items carry a (tar, position) ref; the reader spools and returns exactly their bytes."""
    src = tmp_path / "tars"
    src.mkdir()
    images = {f"k{i}": _noise_png(i, 8) for i in range(5)}
    depth = io.BytesIO()
    np.save(depth, np.ones((8, 8), np.float32))
    samples = [(key, {"png": img, "cls": b"1"}) for key, img in images.items()]
    samples[2][1]["depth.npy"] = depth.getvalue()
    _write_tar(src / "a.tar", samples[:3])
    _write_tar(src / "b.tar", samples[3:])
    source = WebDatasetSource(str(src))
    items = list(source.items())
    assert [item.ref for item in items] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    staging = tmp_path / "staging"
    staging.mkdir()
    wanted = [items[4].ref, items[2].ref]
    with source.open_reader(wanted, staging) as load:
        image, signals = load(items[2].ref)
        assert image == images["k2"] and signals == {"depth": (depth.getvalue(), ".npy")}
        assert load(items[4].ref) == (images["k4"], {})
        assert len(list(staging.iterdir())) == 1  # the spool, inside the staging folder
    assert list(staging.iterdir()) == []


def test_a_sample_failing_its_checks_leaves_its_shard_short(tmp_path):
    """Shards are cut at planned positions: a bad image costs its own shard one sample, never moves
    another shard's samples (what lets parts write shards alone)."""
    root = tmp_path / "data"
    for i in range(12):
        path = root / f"c{i % 2}" / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_noise_png(i, 8))
    args = ("ingest.shard_size=4", "ingest.val_fraction=0", "ingest.test_fraction=0")
    _, clean = ingest(_cfg(root, *args), tmp_path / "clean")
    (root / "c1" / "img05.png").write_bytes(b"not a png")
    final, bad = ingest(_cfg(root, *args), tmp_path / "bad")
    assert [s.samples for s in clean.splits["train"]] == [4, 4, 4]
    assert sorted(s.samples for s in bad.splits["train"]) == [3, 4, 4]
    assert bad.skipped == {"unreadable_image": 1}
    same = [a.sha256 == b.sha256 for a, b in zip(clean.splits["train"], bad.splits["train"], strict=True)]
    assert same.count(True) == 2  # the two shards without the bad sample are byte-identical
    keys = [s["__key__"] for info in bad.splits["train"] for s in iter_shard(final / info.name)]
    assert len(keys) == 11 and "c1__img05" not in keys


@pytest.mark.parametrize("every_bad", [False, True])
def test_a_shard_of_only_bad_samples_is_dropped_and_names_stay_contiguous(tmp_path, every_bad):
    root = tmp_path / "data"
    for i in range(8):
        path = root / "c" / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_noise_png(i, 8))
    args = ("ingest.shard_size=2", "ingest.val_fraction=0", "ingest.test_fraction=0", "seed=1")
    _, clean = ingest(_cfg(root, *args), tmp_path / "clean")
    first = [s["__key__"] for s in iter_shard(tmp_path / "clean" / "s" / "source" / "train-000000.tar")]
    bad = first if every_bad else first[:1]
    for key in bad:
        (root / "c" / f"{key.split('__')[1]}.png").write_bytes(b"")
    final, manifest = ingest(_cfg(root, *args), tmp_path / "out")
    names = [s.name for s in manifest.splits["train"]]
    assert names == [f"train-{i:06d}.tar" for i in range(len(names))]
    assert len(names) == (3 if every_bad else 4)
    assert manifest.skipped == {"empty_file": len(bad)}
    assert Manifest.read(final).splits == manifest.splits
