"""Hostile shard sets: manifests, sidecar sets and shards that lie (issue 17).

A manifest is read as hostile input: its size and nesting are capped, every name in it
must be a plain shard name we would write, and every number in it is bounded; a set whose
shards disagree with it (missing, another size or sha256, another sample count) is refused
by ``train`` and failed by ``inspect --verify``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.hostile import assert_refused, run
from tests.stage2_shards import TINY_TRAIN, write_tiny_dataset

from stage_one_toy import make_source  # registers the toy generator
from synesthesia import UserError
from synesthesia.shards import schema
from synesthesia.shards.reader import iter_shard
from synesthesia.shards.writer import Manifest, write_shard

DEEP = 100_000


def _edit(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _shard_yaml(path: Path) -> Path:
    gen = {"name": "toy-conv", "modality": "depth"}
    data = {"dataset": "toy", "shard": {"generators": [gen], "splits": ["train", "val"], "batch_size": 2}}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def toy(tmp_path) -> Path:
    """``tmp_path/shards/toy/source``: 2 train shards of 3, 1 val shard of 2 (rgb + depth)."""
    make_source(tmp_path / "shards", shards={"train": (2, 3), "val": (1, 2)}, size=16)
    return tmp_path / "shards"


def _tiny(root: Path, **kw) -> Path:
    return write_tiny_dataset(root, counts={"train": 8, "val": 4}, shard_size=4, **kw)


def _train_args(tmp_path: Path, shards: Path, *overrides: str) -> list[str]:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: hostile\n")
    return [
        "train",
        pipeline,
        *TINY_TRAIN,
        f"train.shards={shards}",
        "train.stage=teacher",
        "train.epochs=1",
        "train.log_with=none",
        "--out",
        tmp_path / "runs",
        *overrides,
    ]


# ----------------------------------------------------------------------------- 1. size and nesting


@pytest.mark.parametrize("verb", ["inspect", "shard"])
def test_deeply_nested_manifest_is_one_line(toy, tmp_path, capsys, verb):
    source = toy / "toy" / "source"
    (source / "manifest.json").write_text('{"a": ' * DEEP + "1" + "}" * DEEP)
    args = ["inspect", source] if verb == "inspect" else ["shard", _shard_yaml(tmp_path / "p.yaml")]
    if verb == "shard":
        args += ["--out", toy, "--no-progress"]
    assert_refused(capsys, args, tmp_path, toy, "manifest.json")


def test_oversized_and_deep_json_files_are_refused(toy, tmp_path, monkeypatch, capsys):
    source = toy / "toy" / "source"
    monkeypatch.setattr(schema, "MAX_JSON_BYTES", 1000)
    assert_refused(capsys, ["inspect", source], tmp_path, toy, "larger than")
    monkeypatch.undo()
    # nested within Python's recursion limit but past the cap: refused as well
    _edit(source, lambda d: d["extra"].update(deep=json.loads("[" * 200 + "]" * 200)))
    assert_refused(capsys, ["inspect", source], tmp_path, toy, "nested deeper")
    # a sidecar set's cache_key.json is read by `shard` too
    make_source(toy, shards={"train": (2, 3), "val": (1, 2)}, size=16)
    key = toy / "toy" / "latents" / "toy-conv-depth" / "cache_key.json"
    key.parent.mkdir(parents=True)
    key.write_text("[" * DEEP + "]" * DEEP)
    args = ["shard", _shard_yaml(tmp_path / "p.yaml"), "--out", toy, "--no-progress"]
    assert_refused(capsys, args, tmp_path, toy, "cache_key.json")


# ----------------------------------------------------------------------------- 2. names and numbers


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["splits"]["train"][0].update(name="/etc/train-000000.tar"), "plain shard name"),
        (lambda d: d["splits"]["train"][0].update(name="../planted/train-000000.tar"), "plain shard name"),
        (lambda d: d["splits"]["train"][0].update(name="train-000001.tar"), "train-000000.tar"),
        (lambda d: d["splits"]["train"][0].update(name="val-000000.tar"), "train-000000.tar"),
        (lambda d: d["splits"].update({"../x": d["splits"]["val"]}), "split"),
        (lambda d: d["splits"]["train"][0].update(samples=-1), "samples"),
        (lambda d: d["splits"]["train"][0].update(samples=True), "samples"),
        (lambda d: d["splits"]["train"][0].update(samples=10**15), "samples"),
        (lambda d: d["splits"]["train"][0].update(bytes=2.5), "bytes"),
        (lambda d: d["splits"]["train"][0].update(sha256="../../x"), "sha256"),
        (lambda d: d["skipped"].update(bad=-3), "skipped"),
        (lambda d: d["extra"].update(num_classes=10**12), "num_classes"),
        (lambda d: d.update(dataset="../elsewhere"), "dataset"),
        (lambda d: d["extra"].update(mean=float("nan")), "unreadable manifest"),
        (lambda d: d.update(latent_spec={"shape": [1 << 20, 1 << 20]}), "latent_spec.shape"),
    ],
)
def test_manifest_names_and_numbers_are_checked_when_read(toy, edit, message):
    source = toy / "toy" / "source"
    _edit(source, edit)
    with pytest.raises(UserError, match=message) as info:
        Manifest.read(source)
    assert str(source / "manifest.json") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("verb", ["inspect", "shard", "train", "bootstrap"])
def test_absolute_shard_name_is_refused_by_every_verb(toy, tmp_path, capsys, verb):
    source = toy / "toy" / "source"
    _edit(source, lambda d: d["splits"]["train"][0].update(name=str(source / "train-000001.tar")))
    if verb == "inspect":
        args = ["inspect", source]
    elif verb == "train":
        student = ["train.stage=student", "method.name=ce", "train.source=none"]
        args = _train_args(tmp_path, toy, "dataset=toy", "train.modalities=[depth]", *student)
    else:
        pipeline = _shard_yaml(tmp_path / "p.yaml")
        args = [verb, pipeline, "--no-progress", "--out", toy]
        if verb == "bootstrap":
            args = [verb, pipeline, "--shards", toy, "--out", toy / "models", "bootstrap.split=train"]
    out = tmp_path / "runs" if verb == "train" else toy
    assert_refused(capsys, args, tmp_path, out, "plain shard name")


def test_planted_source_shard_name_writes_nothing_outside_out(toy, tmp_path, capsys):
    source = toy / "toy" / "source"
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "train-000000.tar").write_bytes((source / "train-000000.tar").read_bytes())
    depth = "../" * 4 + "planted/train-000000.tar"  # from <out>/toy/latents/<set>/ up to tmp_path
    _edit(source, lambda d: d["splits"]["train"][0].update(name=depth))
    args = ["shard", _shard_yaml(tmp_path / "p.yaml"), "--out", toy, "--no-progress"]
    before = sorted(p.name for p in planted.iterdir())
    assert_refused(capsys, args, tmp_path, toy, "plain shard name")
    assert sorted(p.name for p in planted.iterdir()) == before


# ----------------------------------------------------------------------------- 3. train on a corrupt set


def _corrupt(kind: str, shards: Path) -> None:
    """Make ``shards/tiny``'s source (or, ``sidecar-*``, its depth latents) disagree with its manifest."""
    base = shards / "tiny"
    directory = base / "latents" / "gen-depth" if kind.startswith("sidecar") else base / "source"
    shard = directory / "train-000001.tar"
    if kind.endswith("missing"):
        shard.unlink()
    elif kind.endswith("truncated"):
        shard.write_bytes(shard.read_bytes()[:1536])
    elif kind == "sha256":
        _edit(directory, lambda d: d["splits"]["train"][1].update(sha256="0" * 64))


@pytest.mark.parametrize("kind", ["missing", "truncated", "sidecar-missing", "sidecar-truncated"])
def test_train_refuses_a_set_whose_shards_disagree_with_its_manifest(tmp_path, capsys, kind):
    shards = _tiny(tmp_path / "shards")
    _corrupt(kind, shards)
    line = assert_refused(
        capsys, _train_args(tmp_path, shards), tmp_path, tmp_path / "runs", "train-000001.tar"
    )
    assert ("missing" if kind.endswith("missing") else "bytes") in line


def test_train_verify_full_checks_sha256(tmp_path, capsys):
    shards = _tiny(tmp_path / "shards")
    _corrupt("sha256", shards)
    args = _train_args(tmp_path, shards, "train.verify=full")
    assert "sha256" in assert_refused(capsys, args, tmp_path, tmp_path / "runs", "train-000001.tar")
    assert_refused(capsys, [*args[:-1], "train.verify=quick"], tmp_path, tmp_path / "runs", "train.verify")


@pytest.mark.parametrize("delta", [-1, 1])
def test_train_refuses_a_shard_with_another_sample_count(tmp_path, capsys, delta):
    """The bytes match the manifest (size and sha256) but its sample count lies: refused as the
    shard is read (default) or when the set is opened (``train.verify=full``)."""
    shards = _tiny(tmp_path / "shards")
    source = shards / "tiny" / "source"

    def edit(data):
        data["splits"]["train"][0]["samples"] += delta
        data["splits"]["train"][1]["samples"] -= delta  # the split's total stays the same

    _edit(source, edit)
    student = ["train.source=none", "train.stage=student", "method.name=ce", "train.shuffle_buffer=0"]
    code, err = run(capsys, _train_args(tmp_path, shards, *student))
    assert code == 2 and not any("Traceback" in line for line in err), err
    # (the error line may follow the progress bar's on one line: the bar is not closed first)
    line = next(line for line in err if "synesthesia train: error: " in line)
    assert "train-00000" in line and "its manifest lists" in line, err
    args = _train_args(tmp_path, shards, *student, "train.verify=full")
    assert "samples, manifest says" in assert_refused(
        capsys, args, tmp_path, tmp_path / "runs", "train-00000"
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_skipped_samples_are_recorded_in_metrics(tmp_path, capsys, workers):
    shards = _tiny(tmp_path / "shards")
    source = shards / "tiny" / "source"
    samples = list(iter_shard(source / "train-000000.tar"))
    samples[2]["rgb.png"] = b"not a png"
    info = write_shard(source / "train-000000.tar", samples)
    _edit(source, lambda d: d["splits"]["train"][0].update(bytes=info.bytes, sha256=info.sha256))
    student = ["train.source=none", "train.stage=student", "method.name=ce", f"train.num_workers={workers}"]
    code, err = run(capsys, _train_args(tmp_path, shards, *student, "train.epochs=2"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs" / "hostile" / "ce-none-s0" / "metrics.json").read_text())
    # the bad sample is skipped in each of the 2 epochs, and counted once as a sample
    assert metrics["skipped"]["train"]["samples"] == 1 and metrics["skipped"]["train"]["reads"] == 2
    assert metrics["skipped"]["train"]["keys"] == [samples[2]["__key__"]]
    assert metrics["skipped"]["val"]["samples"] == 0


# ----------------------------------------------------------------------------- 4. inspect --verify


def test_inspect_verify_fails_when_a_count_disagrees_with_its_shard(toy, capsys):
    source = toy / "toy" / "source"
    assert run(capsys, ["inspect", source, "--verify"])[0] == 0
    _edit(source, lambda d: d["splits"]["train"][0].update(samples=4))
    code, err = run(capsys, ["inspect", source, "--verify"])
    assert code != 0 and any("train-000000.tar" in line and "samples" in line for line in err), err


def test_train_verify_keeps_older_runs_reusable():
    """A run written before ``train.verify`` existed has the same training hash (ablate reuses it)."""
    from synesthesia.ablate.runner import training_hash
    from synesthesia.config import PipelineConfig, to_dict

    cfg = PipelineConfig()
    older = to_dict(cfg)
    del older["train"]["verify"]
    assert cfg.train.verify == "size" and training_hash(older) == training_hash(cfg)
