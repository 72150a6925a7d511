"""Label mixing across shards: ingest writes splits permuted; inspect and train warn on class-sorted sets."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from synesthesia.cli import main
from synesthesia.config import load_pipeline
from synesthesia.shards import Manifest, SplitWriter, iter_shard
from synesthesia.shards.mixing import (
    MIXING_THRESHOLD,
    class_sorted,
    entropy,
    expected_entropy,
    from_counts,
    split_mixing,
    warn_if_class_sorted,
)
from synesthesia.sources.ingest import ingest

CLASSES = 10


def _png(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory) -> Path:
    """ROOT/{train,val,test}/classN/imgMM.png, 20 per class in train, 4 in val and test; a few paired wavs."""
    root = tmp_path_factory.mktemp("mixing") / "data"
    for s, (split, per_class) in enumerate((("train", 20), ("val", 4), ("test", 4))):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"img{i:02d}.png").write_bytes(_png(s * 10_000 + c * 100 + i))
    wave = (0.1 * np.sin(np.linspace(0, 200, 800))).astype(np.float32)
    for c in range(3):
        folder = root / "audio" / "train" / f"class{c}"
        folder.mkdir(parents=True)
        sf.write(folder / "img00.wav", wave, 8000)
    return root


def _ingest(source: Path, out: Path) -> tuple[Path, Manifest]:
    cfg = load_pipeline(
        None, ["dataset=mix", f"ingest.source={source}", "ingest.shard_size=25", "ingest.audio_rate=8000"]
    )
    return ingest(cfg, out)


def _labels(path: Path) -> list[int]:
    return [int(s["cls"]) for s in iter_shard(path)]


@pytest.fixture(scope="module")
def ingested(class_folders, tmp_path_factory) -> Path:
    return _ingest(class_folders, tmp_path_factory.mktemp("out"))[0]


@pytest.fixture(scope="module")
def sorted_set(ingested, tmp_path_factory) -> Path:
    """The same samples written the old way: each split in sorted key (= class) order, no recorded label mix."""
    directory = tmp_path_factory.mktemp("old") / "source"
    manifest = Manifest.read(ingested)
    splits = {}
    for split, shards in manifest.splits.items():
        samples = sorted(
            (s for info in shards for s in iter_shard(ingested / info.name)), key=lambda s: s["__key__"]
        )
        writer = SplitWriter(directory, split, shard_size=25)
        for sample in samples:
            writer.add(sample)
        splits[split] = writer.close()
    extra = {k: v for k, v in manifest.extra.items() if k != "label_mix"}
    Manifest(kind="source", dataset="mix", splits=splits, extra=extra).write(directory)
    return directory


# ----------------------------------------------------------------------------- ingest


def test_ingest_mixes_classes_into_every_shard_reproducibly(class_folders, ingested, tmp_path):
    manifest = Manifest.read(ingested)
    assert {s: manifest.count(s) for s in manifest.splits} == {"train": 200, "val": 40, "test": 40}
    assert manifest.extra["modalities"] == ["audio"]
    for info in manifest.splits["train"]:
        assert len(set(_labels(ingested / info.name))) >= 0.8 * CLASSES, info.name
    # the recorded label mix is that of the shards
    mix = manifest.extra["label_mix"]
    assert set(mix) == {"train", "val", "test"}
    shard_classes = [len(set(_labels(ingested / info.name))) for info in manifest.splits["train"]]
    assert mix["train"]["shard_classes"] == shard_classes and mix["train"]["classes"] == CLASSES
    assert mix["train"]["mixing"] > 0.9
    assert mix["val"]["mixing"] == pytest.approx(1.0, abs=0.1)
    # paired audio still rides with its image
    audio = [
        s["__key__"]
        for info in manifest.splits["train"]
        for s in iter_shard(ingested / info.name)
        if "audio.flac" in s
    ]
    assert sorted(audio) == [f"train__class{c}__img00" for c in range(3)]

    again, manifest2 = _ingest(class_folders, tmp_path / "again")
    tars = sorted(p.name for p in ingested.glob("*.tar"))
    assert tars == sorted(p.name for p in again.glob("*.tar"))
    assert all((ingested / name).read_bytes() == (again / name).read_bytes() for name in tars)
    assert manifest2.extra["label_mix"] == mix


# ----------------------------------------------------------------------------- inspect


def test_inspect_warns_on_a_class_sorted_set_only(ingested, sorted_set, capsys):
    assert main(["inspect", str(sorted_set)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1  # train only: the one split read through a shuffle buffer
    assert "train split" in warnings[0] and "class-sorted" in warnings[0]
    assert "re-ingest" in warnings[0] and "train.shuffle_buffer to about the split size (200)" in warnings[0]
    assert "label mixing train: 0.2" in captured.out and "CLASS-SORTED" in captured.out

    assert main(["inspect", str(ingested)]) == 0
    captured = capsys.readouterr()
    assert "warning:" not in captured.err and "CLASS-SORTED" not in captured.out
    assert "label mixing train: " in captured.out and "manifest" in captured.out

    assert main(["inspect", str(sorted_set), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)[0]
    assert len(data["warnings"]) == 1 and captured.err.startswith("warning: ")
    train = data["label_mixing"]["train"]
    assert train["class_sorted"] and train["origin"] == "shards" and train["min_classes_per_shard"] == 2
    assert train["mixing"] < MIXING_THRESHOLD and train["classes"] == CLASSES


def test_mixing_read_from_shards_matches_the_recorded_one(ingested, tmp_path):
    manifest = Manifest.read(ingested)
    recorded = split_mixing(ingested, "train")
    manifest.extra.pop("label_mix")  # a set written before label_mix existed
    read = split_mixing(ingested, "train", manifest=manifest)
    assert recorded.origin == "manifest" and read.origin == "shards"
    assert read.mixing == pytest.approx(recorded.mixing, abs=1e-3)
    assert read.shard_classes == recorded.shard_classes and read.samples == recorded.samples == 200
    capped = split_mixing(ingested, "train", manifest=manifest, max_shards=3, max_samples=5)
    assert capped.shard_samples == [5, 5, 5]


def test_warn_if_class_sorted(ingested, sorted_set, caplog):
    log = logging.getLogger("synesthesia.test")
    with caplog.at_level(logging.WARNING):
        assert warn_if_class_sorted(sorted_set, logger=log)
        assert not warn_if_class_sorted(ingested, logger=log)
        assert not warn_if_class_sorted(sorted_set, split="nosuch")
    records = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 1 and records[0].name == "synesthesia.test"
    assert "class-sorted" in records[0].getMessage()


# ----------------------------------------------------------------------------- the score


def _shards(labels: np.ndarray, size: int) -> list[Counter[int]]:
    return [Counter(labels[i : i + size].tolist()) for i in range(0, len(labels), size)]


@pytest.mark.parametrize("classes, per_class, size", [(10, 20, 25), (10, 100, 64), (100, 30, 200)])
def test_mixing_score_sorted_vs_shuffled(classes, per_class, size):
    labels = np.repeat(np.arange(classes), per_class)
    ordered = from_counts("train", _shards(labels, size), "test")
    assert ordered.mixing < 0.5 and class_sorted(ordered)
    for seed in range(5):
        shuffled = from_counts(
            "train", _shards(np.random.default_rng(seed).permutation(labels), size), "test"
        )
        assert shuffled.mixing == pytest.approx(1.0, abs=0.08) and not class_sorted(shuffled)


def test_mixing_edge_cases():
    # one shard holding the whole split: exactly a random order
    whole = from_counts("val", [Counter({0: 5, 1: 3, 2: 2})], "test")
    assert whole.mixing == pytest.approx(1.0) and not class_sorted(whole)
    # one class: no score, no verdict
    single = from_counts("train", [Counter({0: 25})] * 4, "test")
    assert single.mixing is None and not class_sorted(single)
    # too few samples per shard for the score to mean anything
    tiny = from_counts("train", [Counter({i: 2}) for i in range(10)], "test")
    assert tiny.mixing < MIXING_THRESHOLD and not class_sorted(tiny)


def test_expected_entropy_is_exact():
    counts = [50, 30, 10, 5, 5]
    assert expected_entropy(counts, sum(counts)) == pytest.approx(entropy(counts))  # the whole split
    assert expected_entropy(counts, 1) == 0.0
    population = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(0)
    draws = [entropy(np.bincount(rng.permutation(population)[:20])) for _ in range(4000)]
    assert expected_entropy(counts, 20) == pytest.approx(
        np.mean(draws), abs=4 * np.std(draws) / np.sqrt(4000)
    )


def _class_png(cls: int, seed: int) -> bytes:
    """A 16×16 image whose colour tells its class (hue by class, a little noise)."""
    rng = np.random.default_rng(seed)
    hue = np.array([np.cos(2 * np.pi * cls / CLASSES), np.sin(2 * np.pi * cls / CLASSES), cls / CLASSES])
    base = (127 + 100 * hue[None, None, :]).clip(0, 255)
    rgb = (base + rng.normal(0, 12, (16, 16, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_a_ce_student_learns_on_an_ingested_class_folder_set(tmp_path, caplog):
    """The user's report: class folders, ingested, then trained with a shuffle buffer far below the
    split. Ingest's permutation puts every class in every shard, so the student learns (chance 10 %)."""
    root = tmp_path / "data"
    for s, (split, per_class) in enumerate((("train", 16), ("val", 4), ("test", 2))):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"img{i:02d}.png").write_bytes(_class_png(c, s * 10_000 + c * 100 + i))
    cfg = load_pipeline(None, ["dataset=folders", f"ingest.source={root}", "ingest.shard_size=20"])
    source, _ = ingest(cfg, tmp_path / "shards")
    assert split_mixing(source, "train").mixing > MIXING_THRESHOLD

    from synesthesia.train import train

    overrides = ["dataset=folders", f"train.shards={tmp_path / 'shards'}", "train.source=none"]
    overrides += [
        "method.name=ce",
        "student.name=vit_micro_test",
        "train.num_workers=0",
        "train.batch_size=16",
    ]
    overrides += ["train.epochs=4", "train.lr=0.003", "train.warmup_steps=2", "train.shuffle_buffer=8"]
    with caplog.at_level(logging.WARNING):
        metrics = train(load_pipeline(None, overrides), tmp_path / "runs")
    assert "class-sorted" not in caplog.text
    assert metrics["best"]["accuracy"] >= 0.7, metrics["history"]  # chance: 0.1


def test_train_warns_when_it_opens_a_class_sorted_set(sorted_set, tmp_path, caplog):
    """train checks the label mix of the set it opens (here the old, sorted order) and says so."""
    from synesthesia.train import train

    shards = tmp_path / "shards"
    (shards / "old").mkdir(parents=True)
    (shards / "old" / "source").symlink_to(sorted_set, target_is_directory=True)
    overrides = ["dataset=old", f"train.shards={shards}", "train.source=none", "method.name=ce"]
    overrides += [
        "student.name=vit_micro_test",
        "train.num_workers=0",
        "train.batch_size=50",
        "train.epochs=1",
    ]
    overrides += ["train.shuffle_buffer=8", "train.image_size=8"]
    with caplog.at_level(logging.WARNING):
        train(load_pipeline(None, overrides), tmp_path / "runs")
    assert "looks class-sorted" in caplog.text
