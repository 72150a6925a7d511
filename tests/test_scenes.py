"""The procedural scenes dataset: determinism, format, physics invariants, CLI and preview."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest

from synesthesia import UserError
from synesthesia.cli import main
from synesthesia.config import PipelineConfig, ScenesConfig, replace
from synesthesia.shards.reader import iter_aligned
from synesthesia.shards.schema import decode_json, decode_npy
from synesthesia.shards.verify import verify
from synesthesia.shards.writer import Manifest
from synesthesia.sources.scenes import (
    CLASS_NAMES,
    NUM_CLASSES,
    SIZES,
    class_of,
    render_dataset,
    render_sample,
    sample_scene,
    write_preview,
)
from synesthesia.sources.scenes.audio import impact_sound
from synesthesia.sources.scenes.geometry import Primitive, cast
from synesthesia.sources.signals import decode_audio, decode_image

TINY = [
    "scenes.num_train=18",
    "scenes.num_val=9",
    "scenes.num_test=9",
    "scenes.num_paired=5",
    "scenes.image_size=32",
    "scenes.lidar_beams=8",
    "scenes.lidar_azimuth=32",
    "scenes.audio_seconds=0.1",
    "scenes.shard_size=7",
]


def tiny_config(*extra: str) -> PipelineConfig:
    return replace(PipelineConfig(name="t", dataset="scenes"), [*TINY, *extra])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    directory, did = render_dataset(tiny_config(), out, workers=1)
    assert did
    return directory


def test_manifest_and_verify(rendered):
    m = Manifest.read(rendered)
    assert m.kind == "source" and m.dataset == "scenes"
    assert {s: m.count(s) for s in m.splits} == {"train": 18, "val": 9, "test": 9, "paired": 5}
    assert len(m.splits["train"]) == 3  # 7 + 7 + 4
    for key in ("modalities", "num_classes", "class_names", "audio_rate", "image_size", "lidar_shape"):
        assert key in m.extra
    assert m.extra["num_classes"] == NUM_CLASSES == len(m.extra["class_names"])
    assert m.extra["lidar_shape"] == [8, 32] and m.extra["image_size"] == [32, 32]
    assert verify(rendered) == []


def test_every_modality_present_and_finite(rendered):
    samples = list(iter_aligned(rendered, split="train"))
    assert len(samples) == 18
    for s in samples:
        assert "." not in s["__key__"]
        rgb = decode_image(s["rgb.png"])
        depth = decode_npy(s["depth.npy"], dtypes=("float32",), ndim=(2,), finite=True)
        lidar = decode_npy(s["lidar.npy"], dtypes=("float32",), ndim=(2,), finite=True)
        inten = decode_npy(s["lidar_intensity.npy"], dtypes=("float32",), ndim=(2,), finite=True)
        wave, rate = decode_audio(s["audio.flac"])
        meta = decode_json(s["json"])
        assert rgb.shape == (32, 32, 3) and depth.shape == (32, 32)
        assert lidar.shape == inten.shape == (8, 32)
        assert (depth >= 0).all() and (depth > 0).mean() > 0.5
        assert (lidar >= 0).all() and (lidar <= 80.0 + 1).all() and (lidar > 0).any()
        assert ((inten >= 0) & (inten <= 1)).all() and (inten[lidar == 0] == 0).all()
        assert rate == 16000 == meta["audio_rate"] and len(wave) == 1600
        assert np.abs(wave).max() > 0.1
        assert CLASS_NAMES[int(s["cls"])] == meta["class_name"]
        assert rgb.std() > 3  # not a blank image


def test_labels_balanced():
    counts = Counter(class_of(0, "train", i) for i in range(NUM_CLASSES * 20))
    assert sorted(counts) == list(range(NUM_CLASSES)) and set(counts.values()) == {20}
    assert [class_of(0, "train", i) for i in range(9)] != [class_of(1, "train", i) for i in range(9)]


def test_same_seed_same_bytes_any_worker_count(rendered, tmp_path):
    again, _ = render_dataset(tiny_config(), tmp_path / "two", workers=2)
    for name in sorted(p.name for p in rendered.glob("*.tar")):
        assert (rendered / name).read_bytes() == (again / name).read_bytes(), name
    assert (rendered / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()
    other = render_sample(1, "train", 0, tiny_config().scenes)
    assert other["rgb.png"] != render_sample(0, "train", 0, tiny_config().scenes)["rgb.png"]


def test_existing_render_is_kept_and_stale_shards_removed(rendered, tmp_path):
    cfg = tiny_config()
    directory, did = render_dataset(cfg, tmp_path, workers=1)
    assert did
    assert render_dataset(cfg, tmp_path, workers=1) == (directory, False)
    smaller = tiny_config("scenes.num_train=5")
    _, did = render_dataset(smaller, tmp_path, workers=1)
    assert did and sorted(p.name for p in directory.glob("train-*.tar")) == ["train-000000.tar"]
    assert verify(directory) == []


def test_metric_depth_matches_the_geometry():
    # A camera 5 m above the ground looking straight down sees z-depth 5 m everywhere.
    prim = Primitive("box", np.array([0.0, 0.0, 0.5]), (0.5, 0.5, 0.5))
    down = np.array([[0.0, 0.0, -1.0], [0.6, 0.0, -0.8]], dtype=np.float32)
    t, which = cast([prim], np.array([0.0, 0.0, 5.0], dtype=np.float32), down)
    assert which[0] == 0 and t[0] == pytest.approx(4.0, abs=1e-4)  # the box top at z = 1
    assert which[1] == -1 and t[1] * 0.8 == pytest.approx(5.0, abs=1e-4)  # the ground
    for shape, size in (("sphere", (0.5,)), ("cylinder", (0.5, 0.5))):
        t, which = cast(
            [Primitive(shape, np.array([0.0, 0.0, 0.5]), size)], np.array([0.0, 0.0, 5.0]), down[:1]
        )
        assert which[0] == 0 and t[0] == pytest.approx(4.0, abs=1e-4)


def test_true_size_is_hidden_from_the_camera_at_full_ambiguity():
    """At ambiguity 1 the world scales with the target: apparent size does not depend on the class."""
    cfg = ScenesConfig(ambiguity=1.0)
    ratios = {}
    for size in ("small", "large"):
        cls = CLASS_NAMES.index(f"{size}_metal")
        scenes = [sample_scene(np.random.default_rng(i), cls, cfg) for i in range(40)]
        ratios[size] = np.median([s["size"] / s["camera"]["distance"] for s in scenes])
        assert np.median([s["size"] for s in scenes]) == pytest.approx(SIZES[size], rel=0.15)
    assert ratios["small"] == pytest.approx(ratios["large"], rel=0.15)
    cfg0 = ScenesConfig(ambiguity=0.0)
    small = [sample_scene(np.random.default_rng(i), 1, cfg0)["camera"]["distance"] for i in range(40)]
    large = [sample_scene(np.random.default_rng(i), 7, cfg0)["camera"]["distance"] for i in range(40)]
    assert np.median(small) == pytest.approx(np.median(large), rel=0.15)  # fixed metric world


def test_impact_sound_pitch_falls_with_size_and_metal_rings_longer():
    def peak_and_tail(material, size):
        wave, params = impact_sound(np.random.default_rng(0), "box", material, size)
        spectrum = np.abs(np.fft.rfft(wave))
        peak = np.fft.rfftfreq(wave.size, 1 / 16000)[np.argmax(spectrum[20:]) + 20]
        return peak, np.abs(wave[-2000:]).mean() / np.abs(wave[:2000]).mean(), params

    small, _, p_small = peak_and_tail("metal", 0.3)
    large, tail_metal, p_large = peak_and_tail("metal", 1.2)
    assert p_small["freqs_hz"][0] == pytest.approx(4 * p_large["freqs_hz"][0], rel=0.05)
    assert small > large
    _, tail_rubber, _ = peak_and_tail("rubber", 1.2)
    assert tail_metal > 5 * tail_rubber  # rubber falls to the room noise floor


def test_bad_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="ambiguity"):
        render_dataset(tiny_config("scenes.ambiguity=1.5"), tmp_path)
    with pytest.raises(UserError, match="num_val"):
        render_dataset(tiny_config("scenes.num_val=-1"), tmp_path)


def test_cli_render_preview_and_inspect(tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: p\ndataset: scenes\n")
    preview = tmp_path / "preview.png"
    args = [o.removeprefix("scenes.") for o in TINY] + ["num_paired=0", "num_train=9"]
    code = main(
        ["render", str(pipeline), *args, "--out", str(tmp_path), "--workers", "1", "--preview", str(preview)]
    )
    assert code == 0
    assert preview.is_file() and preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(io.BytesIO(preview.read_bytes())) as im:
        assert im.width > 400 and im.height > 200
    assert main(["inspect", str(tmp_path / "scenes" / "source"), "--verify"]) == 0
    assert "verify: ok" in capsys.readouterr().out
    assert main(["render", str(pipeline), "ambiguity=2", "--out", str(tmp_path)]) == 2


def test_preview_needs_the_split(rendered, tmp_path):
    with pytest.raises(UserError, match="no nope split"):
        write_preview(rendered, tmp_path / "x.png", split="nope")
