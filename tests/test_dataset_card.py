"""The dataset card (``<out>/<dataset>/README.md``): every shard set loads with ``datasets`` alone.

A tiny scenes render, sharded by the real TAEF2 (``tae``, depth) with its decoded ablation set,
then ``datasets.load_dataset(root, name=...)`` for each set and split, offline; the manifests'
software versions; ``inspect``'s weights digest of a real generator.
"""

from __future__ import annotations

import io
import json
import shlex
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import soundfile
from huggingface_hub import DatasetCard
from tests.tiny_scenes import tiny_scenes

from synesthesia import UserError
from synesthesia.cli import main
from synesthesia.shards import Manifest, iter_shard
from synesthesia.shards.card import CARD, LICENSE_PLACEHOLDER, write_dataset_card
from synesthesia.shards.schema import MANIFEST, decode_npy
from synesthesia.shards.verify import describe
from synesthesia.sources.ingest import ingest

datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_scenes(
    num_train=6,
    num_val=3,
    num_test=3,
    num_paired=2,
    image_size=32,
    lidar_beams=8,
    lidar_azimuth=32,
    shard_size=4,
)
SHARD = [
    "shard.generators=[{name: tae, modality: depth}]",
    "shard.splits=[train, val, test, paired]",
    "shard.batch_size=8",
    "shard.decode=true",
]
PACKAGES = ("synesthesia", "torch", "diffusers", "transformers", "timm", "accelerate", "webdataset")
CONFIGS = ("source", "latents-tae-depth", "decoded-tae-depth")
FOLDERS = {
    "source": "source",
    "latents-tae-depth": "latents/tae-depth",
    "decoded-tae-depth": "decoded/tae-depth",
}
COLUMNS = {
    "source": [
        "__key__",
        "rgb.png",
        "cls",
        "json",
        "depth.npy",
        "audio.flac",
        "lidar.npy",
        "lidar_intensity.npy",
    ],
    "latents-tae-depth": ["__key__", "depth.latent.npy", "depth.flag.txt"],
    "decoded-tae-depth": ["__key__", "depth.decoded.npy", "depth.flag.txt"],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory, shared) -> Path:
    """``<out>/scenes`` holding a source set, the tae latents and their decodings (real TAEF2)."""
    out = tmp_path_factory.mktemp("card")
    pipeline = str(REPO / "pipelines" / "demo.yaml")
    assert main(["render", "--out", str(out), pipeline, *TINY]) == 0
    assert main(["shard", "--out", str(out), pipeline, *TINY, *SHARD]) == 0
    return out / "scenes"


def _load(root: Path, name: str, cache: Path):
    return datasets.load_dataset(str(root), name=name, cache_dir=str(cache))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_set_loads_with_load_dataset_alone(root, name, tmp_path):
    manifest = Manifest.read(root / FOLDERS[name])
    loaded = _load(root, name, tmp_path / "cache")
    # every split of the set, paired included, each with the manifest's count and every column
    assert sorted(loaded) == sorted(manifest.splits) == ["paired", "test", "train", "val"]
    for split, rows in loaded.items():
        assert rows.num_rows == manifest.count(split)
        assert rows.column_names == COLUMNS[name]
    # rows align with the source by key, split for split
    source = _load(root, "source", tmp_path / "cache")
    for split in loaded:
        assert loaded[split]["__key__"] == source[split]["__key__"]
    row = loaded["paired"][0]
    shard = root / FOLDERS[name] / manifest.splits["paired"][0].name
    stored = next(iter(iter_shard(shard)))
    assert row["__key__"] == stored["__key__"]
    if name == "source":
        assert row["rgb.png"].size == (32, 32) and 0 <= row["cls"] < manifest.extra["num_classes"]
        assert isinstance(row["json"], dict)
        assert np.array_equal(np.asarray(row["depth.npy"], np.float32), decode_npy(stored["depth.npy"]))
        assert np.asarray(row["lidar.npy"]).shape == (8, 32)
        # audio is the FLAC bytes, readable without torchcodec
        wave, rate = soundfile.read(io.BytesIO(row["audio.flac"]))
        assert rate == manifest.extra["audio_rate"] and wave.shape == (round(rate * 0.1),)
    else:
        field = manifest.extra["field"]
        array = loaded["paired"].with_format("numpy")[:][field]
        assert array.shape == (2, *decode_npy(stored[field]).shape)
        assert np.array_equal(array[0], decode_npy(stored[field]))
        assert row[manifest.extra["flag_field"]] is None  # nothing flagged


def test_card_says_what_each_set_is(root):
    card = DatasetCard.load(root / CARD)
    data = card.data.to_dict()
    assert data["license"] == LICENSE_PLACEHOLDER
    assert [c["config_name"] for c in data["configs"]] == list(CONFIGS)
    assert [i["config_name"] for i in data["dataset_info"]] == list(CONFIGS)
    assert data["configs"][0]["default"] is True
    latent = Manifest.read(root / "latents" / "tae-depth")
    assert latent.generator["sha256"]["encoder"] in card.text  # the generator's weights, by digest
    assert f"torch {metadata.version('torch')}" in card.text
    assert "soundfile.read" in card.text  # how to decode the audio bytes


def test_card_render_command_makes_the_same_set(root, tmp_path):
    """The card's `synesthesia render` line, with any pipeline file, gives the same render config."""
    text = (root / CARD).read_text()
    line = next(x.strip() for x in text.splitlines() if x.strip().startswith("synesthesia render"))
    args = shlex.split(line)[1:]
    args[args.index("OUT")] = str(tmp_path)
    args[args.index("PIPELINE.yaml")] = str(REPO / "pipelines" / "demo.yaml")
    assert main(args) == 0
    again = Manifest.read(tmp_path / "scenes" / "source")
    assert again.config_hash == Manifest.read(root / "source").config_hash


def test_card_keeps_the_users_license_and_leaves_a_foreign_readme(root, tmp_path):
    path = root / CARD
    original = path.read_text()
    try:
        path.write_text(original.replace(f"license: {LICENSE_PLACEHOLDER}", "license: cc-by-4.0", 1))
        assert write_dataset_card(root) == path
        assert DatasetCard.load(path).data.license == "cc-by-4.0"
        assert "`cc-by-4.0`." in path.read_text()
    finally:
        path.write_text(original)
    other = tmp_path / "ds"
    (other / "source").mkdir(parents=True)
    (other / "source" / MANIFEST).write_bytes((root / "source" / MANIFEST).read_bytes())
    (other / CARD).write_text("# my own notes\n")
    assert write_dataset_card(other) is None
    assert (other / CARD).read_text() == "# my own notes\n"
    assert write_dataset_card(tmp_path / "empty") is None


def test_manifests_record_software_versions(root, tmp_path):
    for folder in FOLDERS.values():
        software = Manifest.read(root / folder).software
        for package in PACKAGES:
            assert software[package] == metadata.version(package), (folder, package)
    # a manifest written before versions were recorded still reads (software None) ...
    data = json.loads((root / "source" / MANIFEST).read_text())
    data.pop("software")
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    assert Manifest.read(tmp_path).software is None
    # ... and one whose software is not a mapping of names to versions is refused
    for bad in (["torch"], {"torch": 2}, {"torch": "x" * 100}):
        (tmp_path / MANIFEST).write_text(json.dumps({**data, "software": bad}))
        with pytest.raises(UserError, match="software"):
            Manifest.read(tmp_path)


def test_inspect_shows_the_weights_digest_of_a_real_generator(root, capsys):
    latent = root / "latents" / "tae-depth"
    digest = Manifest.read(latent).generator["sha256"]
    assert digest and describe(latent)["generator"]["weights_sha256"] == digest
    assert main(["inspect", str(latent)]) == 0
    out = capsys.readouterr().out
    assert digest["encoder"] in out and f"synesthesia {metadata.version('synesthesia')}" in out


def test_ingested_set_has_a_card_with_its_own_image_field(tmp_path):
    from test_ingest import _cfg, _image_folder

    folder = _image_folder(tmp_path / "data", classes=2, per_class=4)
    directory, _ = ingest(_cfg(folder, "mine"), tmp_path / "out")
    loaded = _load(directory.parent, "source", tmp_path / "cache")
    assert loaded["train"].column_names == ["__key__", "rgb.png", "cls", "json"]
    assert sum(rows.num_rows for rows in loaded.values()) == 8
    assert loaded["train"].features["cls"].names == ["class0", "class1"]
