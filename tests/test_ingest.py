"""`synesthesia ingest`: image folders (with paired signals), webdataset tars and HF datasets → source shards."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from synesthesia import UserError
from synesthesia.cli import main
from synesthesia.config import load_pipeline
from synesthesia.shards import Manifest, decode_npy, iter_aligned
from synesthesia.shards.schema import decode_json
from synesthesia.sources.ingest import detect_format, ingest, sanitise_key, split_word
from synesthesia.sources.lidar import parse_calibration, project_scan, read_velodyne_bin


def _png(seed: int, size: int = 16, fmt: str = "PNG") -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def _cfg(source, dataset: str = "t", *overrides: str):
    return load_pipeline(None, [f"dataset={dataset}", f"ingest.source={source}", *overrides])


def _image_folder(root: Path, classes: int = 3, per_class: int = 10, split: str | None = None) -> Path:
    for c in range(classes):
        folder = root / (split or "") / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"img{i:02d}.png").write_bytes(_png(c * 100 + i))
    return root


def _samples(directory: Path, split: str) -> list[dict]:
    return list(iter_aligned(directory, split=split)) if split in Manifest.read(directory).splits else []


def _tar_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


# ----------------------------------------------------------------------------- the real fixtures


@pytest.fixture
def fixture_folder(tmp_path, fixtures) -> Path:
    """NYU rgb+depth, KITTI image+Velodyne scan, speech paired with an image, and a few plain images."""
    root = tmp_path / "data"
    for rel, src in {
        "indoor/nyu.png": "nyu/rgb.png",
        "depth/indoor/nyu.npy": "nyu/depth.npy",
        "street/kitti_000008.png": "kitti/000008.png",
        "lidar/street/kitti_000008.bin": "kitti/000008.bin",
        "audio/indoor/nyu.wav": "speech/sample1_16kHz.wav",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fixtures / src, root / rel)
    for i in range(8):
        (root / ("indoor" if i % 2 else "street") / f"gen{i}.png").write_bytes(_png(i))
    return root


def test_ingest_real_fixtures_intact_and_reproducible(tmp_path, fixtures, fixture_folder):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("dataset: fx\nseed: 3\ningest:\n  shard_size: 4\n")
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    assert main(["ingest", str(pipeline), f"ingest.source={fixture_folder}", "--out", str(out1)]) == 0
    assert main(["inspect", str(out1), "--verify"]) == 0
    source = out1 / "fx" / "source"
    manifest = Manifest.read(source)
    assert manifest.kind == "source" and manifest.dataset == "fx"
    assert sum(manifest.count(s) for s in manifest.splits) == 10
    assert manifest.extra["class_names"] == ["indoor", "street"] and manifest.extra["num_classes"] == 2
    assert manifest.extra["modalities"] == ["audio", "depth", "lidar"]
    assert manifest.skipped == {}
    samples = {s["__key__"]: s for split in manifest.splits for s in _samples(source, split)}

    nyu = samples["indoor__nyu"]
    assert nyu["rgb.png"] == (fixtures / "nyu/rgb.png").read_bytes()  # never re-encoded
    assert nyu["cls"] == b"0"
    depth = decode_npy(nyu["depth.npy"], dtypes=("float32",), ndim=(2,))
    np.testing.assert_array_equal(depth, np.load(fixtures / "nyu/depth.npy").astype(np.float32))
    wave, rate = sf.read(io.BytesIO(nyu["audio.flac"]), dtype="int16")
    ref, ref_rate = sf.read(fixtures / "speech/sample1_16kHz.wav", dtype="int16")
    assert rate == ref_rate == 16000
    np.testing.assert_array_equal(wave, ref if ref.ndim == 1 else ref.mean(axis=1))  # lossless 16-bit
    meta = decode_json(nyu["json"])
    assert meta["audio_rate"] == 16000 and meta["class_name"] == "indoor" and meta["width"] == 224

    kitti = samples["street__kitti_000008"]
    assert kitti["rgb.png"] == (fixtures / "kitti/000008.png").read_bytes()
    expected = project_scan(read_velodyne_bin(fixtures / "kitti/000008.bin"), beams=64, azimuth=1024)
    lidar = decode_npy(kitti["lidar.npy"], dtypes=("float32",), ndim=(2,))
    assert lidar.shape == (64, 1024)
    np.testing.assert_array_equal(lidar, expected.range)
    np.testing.assert_array_equal(decode_npy(kitti["lidar_intensity.npy"]), expected.intensity)
    assert 0 < lidar.max() < 120 and (lidar > 0).sum() > 5000

    # ingesting again (elsewhere) gives byte-identical shards
    assert main(["ingest", str(pipeline), f"source={fixture_folder}", "--out", str(out2)]) == 0
    assert _tar_bytes(source) == _tar_bytes(out2 / "fx" / "source")
    # and a rerun in place replaces the set whole: same shards, no leftovers
    assert main(["ingest", str(pipeline), f"source={fixture_folder}", "--out", str(out1)]) == 0
    assert _tar_bytes(source) == _tar_bytes(out2 / "fx" / "source")
    assert sorted(p.name for p in (out1 / "fx").iterdir()) == ["README.md", "source"]  # + the card


def test_invalid_wav_fixture_is_skipped(tmp_path, fixtures, caplog):
    root = _image_folder(tmp_path / "data", classes=2, per_class=3)
    (root / "audio" / "class0").mkdir(parents=True)
    shutil.copyfile(fixtures / "speech/invalid.wav", root / "audio/class0/img01.wav")
    shutil.copyfile(fixtures / "speech/sample2_16kHz.wav", root / "audio/class0/img02.wav")
    with caplog.at_level(logging.WARNING):
        _, manifest = ingest(_cfg(root, "t", "ingest.audio_rate=8000"), tmp_path / "out")
    assert manifest.skipped == {"unreadable_audio": 1}
    assert sum(manifest.count(s) for s in manifest.splits) == 5
    assert sum("class0/img01.png" in r.getMessage() for r in caplog.records) == 1
    # the other wav was resampled to the configured rate
    sample = next(
        s for sp in manifest.splits for s in _samples(tmp_path / "out/t/source", sp) if "audio.flac" in s
    )
    wave, rate = sf.read(io.BytesIO(sample["audio.flac"]))
    ref, _ = sf.read(fixtures / "speech/sample2_16kHz.wav")
    assert rate == 8000 and abs(len(wave) - len(ref) / 2) <= 1


# ----------------------------------------------------------------------------- generated image folders


def test_seeded_split_and_kept_splits(tmp_path):
    root = _image_folder(tmp_path / "flat", classes=3, per_class=20)
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(_png(0))  # hidden folders and files are not data
    (root / "class0" / ".thumb.png").write_bytes(_png(1))
    _, m = ingest(_cfg(root, "a", "ingest.val_fraction=0.2", "ingest.test_fraction=0.1"), tmp_path / "o")
    assert {s: m.count(s) for s in m.splits} == {"train": 42, "val": 12, "test": 6}
    assert m.extra["class_names"] == ["class0", "class1", "class2"]
    keys = {s: [x["__key__"] for x in _samples(tmp_path / "o/a/source", s)] for s in m.splits}
    assert not set(keys["train"]) & set(keys["val"]) and not set(keys["val"]) & set(keys["test"])
    assert keys["test"][0].startswith("class")
    _, m2 = ingest(
        _cfg(root, "b", "ingest.val_fraction=0.2", "ingest.test_fraction=0.1", "seed=1"), tmp_path / "o"
    )
    keys2 = [x["__key__"] for x in _samples(tmp_path / "o/b/source", "test")]
    assert len(keys2) == 6 and keys2 != keys["test"]  # another seed, another split

    split_root = tmp_path / "splits"
    _image_folder(split_root, classes=2, per_class=5, split="train")
    _image_folder(split_root, classes=2, per_class=2, split="validation")
    _, m3 = ingest(_cfg(split_root, "c", "ingest.test_fraction=0.2"), tmp_path / "o")
    # val kept as given; test carved out of train
    assert {s: m3.count(s) for s in m3.splits} == {"train": 8, "val": 4, "test": 2}
    val_keys = [x["__key__"] for x in _samples(tmp_path / "o/c/source", "val")]
    assert all(k.startswith("validation__class") for k in val_keys)


def test_jpeg_kept_as_jpeg_and_sharding(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    for i in range(5):
        (root / "a" / f"{i}.jpg").write_bytes(_png(i, fmt="JPEG"))
        (root / "b" / f"{i}.jpeg").write_bytes(_png(i + 10, fmt="JPEG"))
    # a PNG with a .jpg name is stored after its real format
    (root / "b" / "fake.jpg").write_bytes(_png(99))
    _, m = ingest(
        _cfg(root, "j", "ingest.shard_size=3", "ingest.val_fraction=0", "ingest.test_fraction=0"), tmp_path
    )
    assert [s.samples for s in m.splits["train"]] == [3, 3, 3, 2]
    samples = {s["__key__"]: s for s in _samples(tmp_path / "j/source", "train")}
    assert samples["a__0"]["rgb.jpg"] == (root / "a/0.jpg").read_bytes()
    assert "rgb.png" in samples["b__fake"]


def test_bad_inputs_are_skipped_and_counted(tmp_path, caplog):
    root = _image_folder(tmp_path / "data", classes=2, per_class=4)
    good = _png(1)
    (root / "class0" / "truncated.png").write_bytes(good[: len(good) // 2])
    jpeg = _png(2, size=64, fmt="JPEG")
    (root / "class0" / "truncated_jpeg.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "class0" / "empty.png").write_bytes(b"")
    (root / "class0" / "garbage.png").write_bytes(b"this is not an image at all")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="GIF")
    (root / "class0" / "gif.png").write_bytes(buf.getvalue())
    # key collisions: a.b.png → key class1__a_b, the same as a_b.png
    (root / "class1" / "a.b.png").write_bytes(_png(3))
    (root / "class1" / "a_b.png").write_bytes(_png(4))
    # an image outside any class folder
    (root / "loose.png").write_bytes(_png(5))
    # paired signals that are bad
    depth = root / "depth" / "class1"
    depth.mkdir(parents=True)
    np.save(depth / "img00.npy", np.ones((16, 16), np.int32))  # wrong dtype
    np.save(depth / "img01.npy", np.ones(16, np.float32))  # wrong shape
    np.save(depth / "img02.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle inside
    nan = np.ones((16, 16), np.float32)
    nan[3, 3] = np.nan
    np.save(depth / "img03.npy", nan)
    lidar = root / "lidar" / "class0"
    lidar.mkdir(parents=True)
    (lidar / "img00.bin").write_bytes(b"\x00" * 10)  # not N×4 float32
    inf = np.ones((8, 32), np.float32)
    inf[0, 0] = np.inf
    np.save(lidar / "img01.npy", inf)
    (lidar / "img02.npy").write_bytes(b"")  # zero-byte
    names = [bytes(root / "class1") + b"/bad\xff\xfename.png"]
    try:
        with open(names[0], "wb") as fh:
            fh.write(_png(6))
        non_utf8 = 1
    except OSError:  # a file system that refuses non-UTF-8 names
        non_utf8 = 0

    with caplog.at_level(logging.WARNING):
        directory, m = ingest(_cfg(root, "bad"), tmp_path / "out")
    expected = {
        "unreadable_image": 3,
        "empty_file": 2,
        "unsupported_image": 1,
        "duplicate_key": 1,
        "no_class": 1,
        "bad_npy": 3,
        "non_finite": 2,
        "bad_lidar": 1,
    }
    if non_utf8:
        expected["non_utf8_name"] = 1
    assert m.skipped == dict(sorted(expected.items()))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert len(warnings) == sum(expected.values())  # one line each
    assert sum(m.count(s) for s in m.splits) == 8 - 7 + 1  # 8 images, 7 with bad signals, plus a.b.png
    assert main(["inspect", str(directory), "--verify"]) == 0


def test_config_mistakes_are_user_errors(tmp_path):
    root = _image_folder(tmp_path / "data", classes=1, per_class=2)
    cases = [
        (lambda: _cfg(""), "no ingest source"),
        (lambda: _cfg(tmp_path / "nowhere"), "not found"),
        (lambda: _cfg(root, "t", "ingest.format=zip"), "unknown ingest.format"),
        (lambda: _cfg(root, "t", "ingest.val_fraction=1.5"), "val_fraction"),
        (lambda: _cfg(root, "t", "ingest.val_fraction=0.6", "ingest.test_fraction=0.5"), "below 1"),
        (lambda: _cfg(root, "t", "ingest.shard_size=0"), "shard_size"),
        (lambda: _cfg(root, "../evil"), "dataset name"),
        (lambda: _cfg(tmp_path / "nowhere-{0..3}.tar"), "shard not found"),
    ]
    for make, match in cases:  # refused when the config is loaded or when ingest checks it
        with pytest.raises(UserError, match=match):
            ingest(make(), tmp_path / "out")
    mixed = _image_folder(tmp_path / "mixed", classes=1, per_class=1, split="train")
    (mixed / "cats").mkdir()
    with pytest.raises(UserError, match="mixes split folders"):
        ingest(_cfg(mixed), tmp_path / "out")
    only_bad = tmp_path / "only_bad" / "c"
    only_bad.mkdir(parents=True)
    (only_bad / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="no usable samples"):
        ingest(_cfg(only_bad.parent), tmp_path / "out")
    assert not (tmp_path / "out" / "t" / "source").exists()
    assert list((tmp_path / "out" / "t").iterdir()) == []  # no temporary folder left behind


def test_keys_and_split_words():
    assert sanitise_key(["train", "cat", "a.b c"]) == "train__cat__a_b_c"
    long = sanitise_key(["x" * 200])
    assert len(long) == 80 and long != sanitise_key(["x" * 199])
    assert split_word("imagenette-validation-0003.tar") == "val"
    assert split_word("shard-0001.tar") is None


# ----------------------------------------------------------------------------- webdataset and HF sources


def _write_wds(path: Path, n: int, offset: int = 0, with_depth: bool = False) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sample = {"__key__": f"dir/s{offset + i:03d}", "jpg": _png(offset + i, fmt="JPEG"), "cls": i % 2}
            if with_depth:
                sample["depth.npy"] = np.full((16, 16), i, np.float32)  # the image's H×W
            sink.write(sample)


def test_ingest_webdataset_tars(tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    _write_wds(tars / "train-000.tar", 10, with_depth=True)
    _write_wds(tars / "train-001.tar", 10, offset=10)
    _write_wds(tars / "test-000.tar", 4, offset=100)
    assert detect_format(str(tars)) == "webdataset"
    _, m = ingest(_cfg(tars, "w", "ingest.val_fraction=0.25"), tmp_path / "out")
    assert {s: m.count(s) for s in m.splits} == {"train": 15, "val": 5, "test": 4}
    assert m.extra["class_names"] == ["0", "1"] and m.extra["format"] == "webdataset"
    assert m.extra["modalities"] == ["depth"]
    test = {s["__key__"]: s for s in _samples(tmp_path / "out/w/source", "test")}  # written permuted
    assert sorted(test) == [f"dir__s{100 + i:03d}" for i in range(4)]
    assert [test[k]["cls"] for k in sorted(test)] == [b"0", b"1", b"0", b"1"]
    # a brace pattern over part of the tars
    _, m2 = ingest(_cfg(f"{tars}/train-{{000..001}}.tar", "w2", "ingest.test_fraction=0"), tmp_path / "out")
    assert sum(m2.count(s) for s in m2.splits) == 20 and "test" not in m2.splits


def test_corrupt_tar_entries_are_counted(tmp_path, caplog):
    tars = tmp_path / "tars"
    tars.mkdir()
    _write_wds(tars / "a-000.tar", 4)
    _write_wds(tars / "b-000.tar", 4, offset=10)
    data = (tars / "b-000.tar").read_bytes()
    (tars / "b-000.tar").write_bytes(data[: 512 * 3])  # cut inside the data of its second member
    with caplog.at_level(logging.WARNING):
        _, m = ingest(_cfg(tars, "c", "ingest.val_fraction=0", "ingest.test_fraction=0"), tmp_path / "out")
    assert m.skipped == {"corrupt_tar": 1}
    assert sum("b-000.tar" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING) == 1
    assert m.count("train") == 4


def test_source_shards_reingest_to_the_same_samples(tmp_path, fixture_folder):
    """Our own source shards are valid webdataset input; ingesting them again keeps every field."""
    first, m1 = ingest(_cfg(fixture_folder, "one"), tmp_path / "out")
    second, m2 = ingest(_cfg(first, "two"), tmp_path / "out")
    assert {s: m2.count(s) for s in m2.splits} == {s: m1.count(s) for s in m1.splits}
    for split in m1.splits:
        second_samples = {s["__key__"]: s for s in _samples(second, split)}  # written in another permutation
        assert len(second_samples) == m1.count(split)
        for a in _samples(first, split):
            b = second_samples[a["__key__"]]
            for field in set(a) - {"json"}:
                assert a[field] == b[field], field


def test_ingest_hf_saved_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine": datasets.ClassLabel(names=["ant", "bee", "cat"]),
            "depth": datasets.Array2D((16, 16), "float32"),  # the image's H×W
        }
    )

    def make(n, seed):
        return datasets.Dataset.from_dict(
            {
                "img": [{"bytes": _png(seed + i), "path": None} for i in range(n)],
                "fine": [i % 3 for i in range(n)],
                "depth": [np.full((16, 16), i, np.float32) for i in range(n)],
            },
            features=features,
        )

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": make(10, 0), "test": make(3, 50), "unlabeled": make(2, 80)}).save_to_disk(
        str(saved)
    )
    assert detect_format(str(saved)) == "hf"
    _, m = ingest(_cfg(saved, "h", "ingest.val_fraction=0.2"), tmp_path / "out")
    assert {s: m.count(s) for s in m.splits} == {"train": 8, "val": 2, "test": 3}
    assert m.extra["class_names"] == ["ant", "bee", "cat"] and m.extra["modalities"] == ["depth"]
    test = {s["__key__"]: s for s in _samples(tmp_path / "out/h/source", "test")}  # written permuted
    assert [test[f"test-{i:08d}"]["cls"] for i in range(3)] == [b"0", b"1", b"2"]
    assert test["test-00000001"]["rgb.png"] == _png(51)
    np.testing.assert_array_equal(
        decode_npy(test["test-00000002"]["depth.npy"]), np.full((16, 16), 2, np.float32)
    )

    pq = tmp_path / "pq"
    pq.mkdir()
    plain = make(6, 0).cast_column("fine", datasets.Value("int64")).remove_columns("depth")
    plain.to_parquet(str(pq / "train-00000.parquet"))
    make(2, 40).remove_columns("depth").to_parquet(str(pq / "validation-00000.parquet"))
    _, m2 = ingest(_cfg(pq, "p", "ingest.test_fraction=0", "ingest.label_field=fine"), tmp_path / "out")
    assert {s: m2.count(s) for s in m2.splits} == {"train": 6, "val": 2}
    with pytest.raises(UserError, match="no column 'nope'"):
        ingest(_cfg(pq, "p", "ingest.image_field=nope"), tmp_path / "out")


# ----------------------------------------------------------------------------- the ecosystem reads our shards


def test_shards_read_by_plain_webdataset_and_hf_datasets(tmp_path):
    root = _image_folder(tmp_path / "data", classes=2, per_class=5)
    directory, m = ingest(
        _cfg(root, "eco", "ingest.val_fraction=0", "ingest.test_fraction=0"), tmp_path / "out"
    )
    tars = sorted(str(p) for p in directory.glob("train-*.tar"))
    plain = list(wds.WebDataset(tars, shardshuffle=False).decode("rgb8").to_tuple("rgb.png", "cls", "json"))
    assert len(plain) == 10
    image, label, meta = plain[0]
    assert image.shape == (16, 16, 3) and label in (0, 1) and meta["class_name"] == f"class{label}"

    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(
        "webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert len(loaded) == 10
    row = next(r for r in loaded if r["__key__"] == "class0__img00")  # written permuted
    assert row["rgb.png"].size == (16, 16)
    assert int(row["cls"]) == 0 and row["json"]["class_name"] == "class0"


# ----------------------------------------------------------------------------- lidar projection


def test_project_scan_geometry():
    # straight ahead, level: middle column, row of pitch 0; behind: first/last column
    pts = np.array([[10, 0, 0, 0.5], [5, 0, 0, 0.9], [-3, 0.001, 0, 0.2], [0, 4, 0, 2.0]], np.float32)
    ri = project_scan(pts, beams=28, azimuth=360, fov_up=3.0, fov_down=-25.0)
    row = 3  # (1 - (0 + 25) / 28) * 28: one beam per degree, pitch 0 is 3 rows below +3°
    assert ri.range[row, 180] == 5.0 and ri.intensity[row, 180] == pytest.approx(0.9)  # the closest wins
    assert ri.range[row, 0] == pytest.approx(3.0, abs=1e-3)  # yaw ≈ +π
    assert (
        ri.range[row, 90] == 4.0 and ri.intensity[row, 90] == 1.0
    )  # +90° (left) → u = W/4, clipped intensity
    assert (ri.range > 0).sum() == 3 and ri.points_kept == 4
    # above the field of view: dropped
    assert project_scan(np.array([[1, 0, 5, 0]], np.float32)).points_kept == 0
    with pytest.raises(ValueError):
        project_scan(pts, fov_up=-30.0)


def test_calibration_and_camera_crop():
    kitti = "\n".join(
        [
            "P2: 700 0 600 0 0 700 180 0 0 0 1 0",
            "R0_rect: 1 0 0 0 1 0 0 0 1",
            "Tr_velo_to_cam: 0 -1 0 0 0 0 -1 0 1 0 0 0",
        ]
    )
    projection = parse_calibration(kitti)
    pts = np.array([[10, 0, 0, 1], [-10, 0, 0, 1], [10, 30, 0, 1]], np.float32)  # ahead, behind, far left
    ri = project_scan(pts, projection=projection, image_size=(1200, 360))
    assert ri.points_kept == 1
    bare = parse_calibration(" ".join(str(v) for v in projection.ravel()))
    np.testing.assert_allclose(bare, projection)
    with pytest.raises(ValueError):
        parse_calibration("1 2 3")


def test_read_velodyne_bin_rejects_bad_scans(fixtures):
    from synesthesia.shards import SchemaError

    points = read_velodyne_bin((fixtures / "kitti/000008.bin").read_bytes())
    assert points.shape[1] == 4 and points.dtype == np.float32
    for bad in (b"", b"\x00" * 15, np.array([[np.nan, 0, 0, 0]], np.float32).tobytes()):
        with pytest.raises(SchemaError):
            read_velodyne_bin(bad)


def test_manifest_records_config(tmp_path):
    root = _image_folder(tmp_path / "data", classes=1, per_class=3)
    directory, m = ingest(_cfg(root, "cfg"), tmp_path / "out")
    data = json.loads((directory / "manifest.json").read_text())
    assert data["config"]["ingest"]["source"] == str(root)
    assert len(data["config_hash"]) == 16 and data["kind"] == "source"
    assert os.path.isfile(directory / "train-000000.tar")
