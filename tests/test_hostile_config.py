"""Hostile configs and pipeline files (issue 17): refused in one line, nothing written outside --out.

Every number of a config is bounded (``synesthesia.config.BOUNDS``), seeds are 0 ≤ seed < 2**32,
a scenes sample too large to render is refused before it is allocated, a pipeline file that is
not a small UTF-8 YAML mapping is refused (aliases and nesting included), and every config
string that names a folder under ``--out`` is one plain folder name.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
import typing

import pytest

from hostile import assert_refused
from synesthesia import UserError
from synesthesia.config import BOUNDS, GeneratorConfig, PipelineConfig, load_pipeline, replace
from synesthesia.sources.scenes.dataset import MAX_SAMPLE_BYTES, check_config, sample_bytes
from synesthesia.utils import check_name

# a bare pipeline with one generator, so shard.generators.0.* can be overridden
PIPELINE = "name: p\ndataset: scenes\nshard:\n  generators:\n    - {name: tae, modality: depth}\n"


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A scratch root, also the working directory: a stray relative write lands where it is seen."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(PIPELINE)
    return tmp_path


def refused(capsys, root, verb, *args, message="", pipeline=None):
    out = root / "out"
    pipeline = pipeline or root / "p.yaml"
    extra = ["--shards", out / "shards", "--runs", out / "runs"] if verb == "ablate" else []
    return assert_refused(capsys, [verb, "--out", out, *extra, pipeline, *args], root, out, message)


# ----------------------------------------------------------------------------- 1. numbers


@pytest.mark.parametrize(
    "verb, override, key",
    [
        ("train", "train.lr=-1", "train.lr"),
        ("train", "train.lr=.nan", "train.lr"),
        ("train", "train.lr=nan", "train.lr"),
        ("train", "train.lr=inf", "train.lr"),
        ("train", "train.lr=1e400", "train.lr"),
        ("train", "train.weight_decay=-0.1", "train.weight_decay"),
        ("train", "train.clip_grad=-inf", "train.clip_grad"),
        ("train", "train.warmup_steps=-5", "train.warmup_steps"),
        ("train", "train.batch_size=0", "train.batch_size"),
        ("train", "train.batch_size=1000000000000", "train.batch_size"),
        ("train", "train.epochs=0", "train.epochs"),
        ("train", "train.num_workers=-1", "train.num_workers"),
        ("train", "train.shuffle_buffer=-1", "train.shuffle_buffer"),
        ("train", "train.grad_accum=0", "train.grad_accum"),
        ("train", f"train.save_every={10**40}", "train.save_every"),
        ("train", "teacher.dim=0", "teacher.dim"),
        ("train", "teacher.modality_dropout=1.5", "teacher.modality_dropout"),
        ("train", "teacher.epochs=-1", "teacher.epochs"),
        ("train", "student.drop_path=nan", "student.drop_path"),
        ("train", "method.temperature=0", "method.temperature"),
        ("train", "method.alpha=-0.5", "method.alpha"),
        ("train", "method.weight=inf", "method.weight"),
        ("train", "method.options={alphas: [0.3, .nan]}", "method.options.alphas.1"),
        ("shard", "shard.batch_size=0", "shard.batch_size"),
        ("shard", "shard.num_workers=100000", "shard.num_workers"),
        ("shard", "shard.generators.0.samples_per_input=0", "shard.generators.0.samples_per_input"),
        ("bootstrap", "bootstrap.lr=inf", "bootstrap.lr"),
        ("bootstrap", "bootstrap.steps=0", "bootstrap.steps"),
        ("ablate", "ablate.kd_alphas=[0.1, .nan]", "ablate.kd_alphas.1"),
        ("ablate", "ablate.kd_temperatures=[-1]", "ablate.kd_temperatures.0"),
        ("ablate", 'ablate.tune={"messy": {"weight": [0.1, -1]}}', "ablate.tune.messy.weight.1"),
        ("ablate", 'ablate.tune={"messy": {"alpha": [0.5, 2.0]}}', "ablate.tune.messy.alpha.1"),
        ("ablate", 'ablate.tune={"messy": {"temperature": [0]}}', "ablate.tune.messy.temperature.0"),
        ("ingest", "ingest.val_fraction=-0.1", "ingest.val_fraction"),
        ("ingest", "ingest.lidar_fov_up=1e9", "ingest.lidar_fov_up"),
    ],
)
def test_absurd_numbers_are_refused(capsys, root, verb, override, key):
    line = refused(capsys, root, verb, override, message=key)
    assert "is outside" in line or "is not a finite number" in line


def _sections() -> dict[type, str]:
    """Each config dataclass → a dotted path to one instance of it in PIPELINE."""
    default = PipelineConfig()
    paths = {PipelineConfig: ""}
    for f in dataclasses.fields(default):
        if dataclasses.is_dataclass(getattr(default, f.name)):
            paths[type(getattr(default, f.name))] = f.name
    paths[GeneratorConfig] = "shard.generators.0"
    return paths


def _numeric(tp) -> bool:
    return any(t in (int, float) or _numeric(t) for t in typing.get_args(tp)) or tp in (int, float)


def test_every_number_of_every_section_has_a_bound():
    for cls in _sections():
        hints = typing.get_type_hints(cls)
        numeric = {f.name for f in dataclasses.fields(cls) if _numeric(hints[f.name])}
        assert numeric == set(BOUNDS.get(cls, {})), (cls.__name__, numeric ^ set(BOUNDS.get(cls, {})))


def _outside(rng) -> list:
    """Values just outside ``rng`` (and far outside, and non-finite)."""
    values = [rng.high * 10 + 1 if rng.high > 0 else rng.high + 1, float("nan"), float("inf")]
    values.append(rng.low if rng.low_open else rng.low - 1)
    if rng.high_open:
        values.append(rng.high)
    return values


@pytest.mark.parametrize(
    "cls, key, rng",
    [
        pytest.param(cls, f"{path}.{name}".lstrip("."), rng, id=f"{path}.{name}".lstrip("."))
        for cls, path in _sections().items()
        for name, rng in BOUNDS[cls].items()
    ],
)
def test_every_bound_is_enforced_by_load_pipeline(tmp_path, cls, key, rng):
    (tmp_path / "p.yaml").write_text(PIPELINE)
    listed = typing.get_origin(typing.get_type_hints(cls)[key.rsplit(".", 1)[-1]]) is list
    for value in _outside(rng):
        text = repr(value).replace("nan", ".nan").replace("inf", ".inf")
        with pytest.raises(UserError, match=key.replace(".", r"\.")) as info:
            load_pipeline(tmp_path / "p.yaml", [f"{key}=[{text}]" if listed else f"{key}={text}"])
        assert "\n" not in str(info.value)


def test_tiny_legitimate_values_still_load():
    """What the suite's tiny configs use (lr 0 evaluates the initial weights) is in range."""
    cfg = load_pipeline(
        None,
        [
            "train.lr=0",
            "train.epochs=1",
            "train.batch_size=2",
            "train.num_workers=0",
            "train.clip_grad=0",
            "scenes.image_size=16",
            "teacher.dim=16",
            "teacher.depth=1",
            "seed=4294967295",
        ],
    )
    assert cfg.train.lr == 0 and cfg.seed == 2**32 - 1
    assert replace(cfg, ["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(UserError, match="train.lr"):
        replace(cfg, ["train.lr=-1"])


# ----------------------------------------------------------------------------- 2. seeds


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        ("seed: -1\n", [], "seed"),
        ("", ["seed=4294967296"], "seed"),
        ("", ["train.seed=-1"], "train.seed"),
        ("", ["bootstrap.seed=99999999999999999999"], "bootstrap.seed"),
        ("", ["seed=" + "9" * 40], "seed=<an integer of about"),
        ("", ["shard.generators.0.seed=-3"], "shard.generators.0.seed"),
        ("", ["ablate.seeds=[0, -1]"], "ablate.seeds.1"),
        ("", ["ablate.tune_seed=-1"], "ablate.tune_seed"),
    ],
)
def test_seeds_are_below_2_to_the_32(capsys, root, text, overrides, key):
    (root / "p.yaml").write_text(PIPELINE + text)
    line = refused(capsys, root, "train", *overrides, message=key if "=" in key else f"{key}=")
    assert line.endswith("is outside [0, 2**32)")


# ----------------------------------------------------------------------------- 3. scenes sizes


@pytest.mark.parametrize(
    "override, message",
    [
        ("scenes.image_size=100000", "scenes.image_size=100000 is outside [8, 1024]"),
        ("image_size=100000", "scenes.image_size"),  # a bare key goes to render's section
        ("scenes.audio_seconds=1e9", "scenes.audio_seconds"),
        ("scenes.audio_seconds=.inf", "scenes.audio_seconds=inf is not a finite number"),
        ("scenes.audio_rate=1000000000", "scenes.audio_rate"),
        ("scenes.lidar_azimuth=10000000", "scenes.lidar_azimuth"),
        ("scenes.lidar_beams=0", "scenes.lidar_beams"),
        ("scenes.num_train=1000000000000", "scenes.num_train"),
        ("scenes.shard_size=0", "scenes.shard_size"),
        ("scenes.workers=-1", "scenes.workers"),
        ("scenes.clutter=100000", "scenes.clutter"),
        ("scenes.lidar_dropout=0.5", "scenes.lidar_dropout=0.5 is outside [0, 1/3)"),
        ("scenes.lidar_max_range=nan", "scenes.lidar_max_range"),
    ],
)
def test_render_refuses_absurd_sizes_before_allocating(capsys, root, override, message):
    start = time.perf_counter()
    refused(capsys, root, "render", override, message=message)
    assert time.perf_counter() - start < 5


def test_render_refuses_a_sample_too_large_in_memory(capsys, root):
    """Each size within its bound, together over MAX_SAMPLE_BYTES: refused before rendering."""
    sizes = [
        "scenes.image_size=1024",
        "scenes.lidar_beams=256",
        "scenes.lidar_azimuth=8192",
        "scenes.audio_rate=96000",
        "scenes.audio_seconds=30",
    ]
    cfg = load_pipeline(None, sizes)
    assert sample_bytes(cfg.scenes) > MAX_SAMPLE_BYTES
    with pytest.raises(UserError, match="MiB"):
        check_config(cfg.scenes)
    refused(capsys, root, "render", *sizes, message="one scenes sample would need about")


def test_the_default_and_tiny_scenes_fit():
    check_config(PipelineConfig().scenes)
    assert sample_bytes(load_pipeline(None, ["scenes.image_size=16"]).scenes) < MAX_SAMPLE_BYTES


# ----------------------------------------------------------------------------- 4. pipeline files


def _laughs(levels: int = 12) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + f"\ntrain: {{modalities: *a{levels - 1}}}\n"


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"name: caf\xe9\n", "not UTF-8"),
        (random.Random(17).randbytes(4096), "not UTF-8"),
        (PNG, "not UTF-8"),
        (b"- train\n- shard\n", "must be a mapping of sections, got a list"),
        (b"42\n", "must be a mapping of sections, got a number"),
        (b"just a sentence\n", "must be a mapping of sections, got a string"),
        (b"# padding\n" * 120_000, "at most 1 MB"),
        (_laughs().encode(), "100000 values (aliases expanded)"),
        (b"[" + b"a," * 500_000 + b"]", "100000 values"),
        (b"a: &a [*a]\n", "holds itself"),
        (b"[" * 200_000, "nest"),  # libyaml: "nesting depth"
        (b"train:\n" + b"".join(b"  " * i + b"x:\n" for i in range(1, 600)), "nest"),
        (b"seed: 1" + b"0" * 5000 + b"\n", "4300 digits"),
        (b"1: 2\nnone: 3\n", "unknown key 1"),  # keys of two types: sorting them failed
        (b"name: p\x00\n", "not valid YAML"),
        (b"train: {lr: [1, 2\n", "not valid YAML"),
        (b"? [a, b]\n: c\n", "not valid YAML"),
        (b"when: 2001-12-14\n", "unknown key when"),
        (b"\xef\xbb\xbfname: p\nseed: -1\n", "seed"),  # a UTF-8 BOM reads; the seed is refused
    ],
    ids=[
        "latin-1",
        "urandom",
        "png",
        "list",
        "int",
        "str",
        "huge",
        "billion-laughs",
        "wide",
        "cycle",
        "deep-flow",
        "deep-block",
        "huge-int",
        "int-key",
        "nul",
        "unclosed",
        "list-key",
        "date-key",
        "bom",
    ],
)
def test_hostile_pipeline_files_are_one_line_errors(capsys, root, content, message):
    (root / "bad.yaml").write_bytes(content)
    start = time.perf_counter()
    refused(capsys, root, "train", message=message, pipeline=root / "bad.yaml")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.modalities=" + _laughs().split("\ntrain:")[0].replace("\n", ", ").join("{}"),
            "aliases expanded",
        ),
        ("train.modalities=" + "[" * 100_000, "nest"),
        ("train.seed=1" + "0" * 5000, "train.seed"),
        ("shard.generators." + "9" * 5000 + ".seed=1", "not an index"),
        ("shard.generators.\u00b2.seed=1", "not an index"),
    ],
    ids=["billion-laughs", "deep", "huge-int", "huge-index", "unicode-digit"],
)
def test_hostile_overrides_are_one_line_errors(capsys, root, override, message):
    refused(capsys, root, "train", override, message=message)


@pytest.mark.parametrize("text", ["[" * 200_000, "a: &a [*a]\n", _laughs()], ids=["deep", "cycle", "laughs"])
def test_limits_hold_without_libyaml(monkeypatch, tmp_path, text):
    """The pure-Python loader (no libyaml) is held to the same limits, as fast."""
    import yaml

    from synesthesia.config import loading

    monkeypatch.setattr(loading, "_LOADER", yaml.SafeLoader)
    (tmp_path / "p.yaml").write_text(text)
    start = time.perf_counter()
    with pytest.raises(UserError, match="nested deeper|holds itself|aliases expanded"):
        load_pipeline(tmp_path / "p.yaml")
    assert time.perf_counter() - start < 5


def test_pipeline_paths_that_are_not_files(capsys, root):
    (root / "folder.yaml").mkdir()
    refused(capsys, root, "train", message="not a regular file", pipeline=root / "folder.yaml")
    refused(capsys, root, "train", message="not found", pipeline=root / "missing.yaml")
    if hasattr(os, "mkfifo"):  # reading a FIFO would block forever
        os.mkfifo(root / "fifo.yaml")
        refused(capsys, root, "train", message="not a regular file", pipeline=root / "fifo.yaml")


# ----------------------------------------------------------------------------- 5. names under --out


@pytest.mark.parametrize(
    "verb, top, overrides, message",
    [
        ("render", "dataset: ../outside", [], "dataset name '../outside'"),
        ("render", "", ["dataset=ABS"], "dataset name"),
        ("render", "", ["dataset=.."], "dataset name '..'"),
        ("render", "", ["dataset=''"], "dataset name '' is empty"),
        ("render", "name: ../x", [], "pipeline name"),
        ("train", "", ["train.run_name=../x"], "train.run_name '../x'"),
        ("train", "", ["train.run_name=ABS"], "train.run_name"),
        ("train", "", ["train.run_name=a\\b"], "train.run_name"),
        ("train", "", ["train.run_name=-rf"], "starts with '-'"),
        ("train", "", ["train.run_name=" + "x" * 300], "bytes long"),
        ("train", "", ['train.run_name="a\\nb"'], "control character"),
        ("train", "name: ..", [], "pipeline name"),
        ("shard", "", ["shard.generators.0.set_name=../../planted"], "shard.generators.0.set_name"),
        ("shard", "", ["shard.generators.0.modality=../../x"], "shard.generators.0.modality"),
        ("bootstrap", "", ["bootstrap.name=../x"], "bootstrap.name"),
        ("ablate", "", ["name=../x"], "pipeline name"),
        ("ingest", "", ["ingest.source=a\x00b"], "ingest.source holds a NUL"),
    ],
)
def test_names_cannot_leave_out(capsys, root, verb, top, overrides, message):
    key = top.split(":")[0]
    text = "".join(line + "\n" for line in PIPELINE.splitlines() if not (key and line.startswith(key + ":")))
    (root / "p.yaml").write_text(f"{top}\n{text}" if top else text)
    overrides = [o.replace("ABS", str(root / "abs")) for o in overrides]
    refused(capsys, root, verb, *overrides, message=message)
    assert not (root / "abs").exists() and not (root.parent / "outside").exists()


@pytest.mark.parametrize(
    "name", ["teacher-latent-s0", "kd-latent-s0-a0.3-T2.0", "my pipeline (v2)", "ünïcode", "...", "a.b"]
)
def test_plain_names_pass(name):
    assert check_name(name, "x") == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "a\\b", "a\x00b", "a\nb", "-x", "é" * 101])
def test_check_name_refuses(name):
    with pytest.raises(UserError, match="^x ") as info:
        check_name(name, "x")
    assert "\n" not in str(info.value)


def test_a_teacher_folder_path_stays_a_read(tmp_path):
    """train.teacher may be a path (a read of an existing run); only output names are checked."""
    cfg = load_pipeline(None, [f"train.teacher={tmp_path / 'runs' / 'p' / 'teacher-latent-s0'}"])
    assert cfg.train.teacher.endswith("teacher-latent-s0")
