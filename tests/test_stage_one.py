"""Stage one (`synesthesia shard`): alignment, resume, cache key, bad input, kill-and-resume, two processes."""

from __future__ import annotations

import errno
import gc
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from stage_one_toy import ToyConv, make_source  # registers the toy generator
from synesthesia import UserError
from synesthesia.cli import main
from synesthesia.config import PipelineConfig, build
from synesthesia.generators.base import GENERATORS
from synesthesia.shards.reader import iter_aligned
from synesthesia.shards.schema import decode_npy
from synesthesia.shards.verify import verify
from synesthesia.shards.writer import Manifest
from synesthesia.stage_one import StageOneIncomplete, decoded_dir, latent_dir, run_stage_one
from synesthesia.stage_one.data import read_shard_samples

TESTS = Path(__file__).resolve().parent
SET = "toy-conv-depth"


def pipeline(**shard) -> PipelineConfig:
    gen = {"name": "toy-conv", "modality": "depth", **shard.pop("generator", {})}
    data = {
        "dataset": "toy",
        "shard": {"generators": [gen], "splits": ["train", "val"], "batch_size": 2, **shard},
    }
    return build(PipelineConfig, data)


def write_yaml(path: Path, **shard) -> Path:
    import yaml

    gen = {"name": "toy-conv", "modality": "depth", **shard.pop("generator", {})}
    data = {
        "dataset": "toy",
        "shard": {"generators": [gen], "splits": ["train", "val"], "batch_size": 2, **shard},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def files(directory: Path) -> dict[str, bytes]:
    """Every file of a set except the wall-clock timings."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "throughput.json"}


def source_keys(root: Path) -> list[str]:
    src = root / "toy" / "source"
    m = Manifest.read(src)
    return [
        s["__key__"]
        for split in ("train", "val")
        for info in m.splits[split]
        for s in read_shard_samples(src / info.name)[0]
    ]


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    make_source(tmp_path)
    return tmp_path


def test_sidecar_is_aligned_and_matches_a_direct_forward(source: Path):
    result = run_stage_one(pipeline(num_workers=1), source, progress=False)
    assert result.ok
    directory = latent_dir(source, "toy", SET)
    assert verify(directory) == []
    manifest = Manifest.read(directory)
    assert manifest.kind == "latent" and manifest.count("train") == 15 and manifest.count("val") == 3
    assert manifest.latent_spec["shape"] == [4, 8, 8] and manifest.latent_spec["dtype"] == "float16"
    assert manifest.generator["name"] == "toy-conv" and manifest.generator["weights_sha256"]
    assert len(manifest.channel_stats["mean"]) == 4 and all(s > 0 for s in manifest.channel_stats["std"])
    assert manifest.extra["throughput"] == "throughput.json"
    timing = json.loads((directory / "throughput.json").read_text())
    assert timing["total"]["samples"] == 18 and len(timing["shards"]) == 4
    assert {"read_s", "infer_s", "write_s", "samples_per_s"} <= set(timing["total"])

    gen = ToyConv()
    train = []
    for sample in iter_aligned(source / "toy" / "source", {SET: directory}, split="train"):
        latent = decode_npy(sample["depth.latent.npy"])
        x = torch.from_numpy(gen.preprocess(sample)["x"])[None]
        expected = gen({"x": x}, [sample["__key__"]])[0].to(torch.float16).numpy()
        np.testing.assert_array_equal(latent, expected)
        train.append(latent.astype(np.float64))
    stacked = np.stack(train)
    np.testing.assert_allclose(manifest.channel_stats["mean"], stacked.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(manifest.channel_stats["std"], stacked.std(axis=(0, 2, 3)), rtol=1e-9)


def test_rerun_skips_complete_shards_and_rewrites_the_same_manifest(source: Path):
    cfg = pipeline(num_workers=0)
    run_stage_one(cfg, source, progress=False)
    directory = latent_dir(source, "toy", SET)
    before = files(directory)
    timing = (directory / "throughput.json").read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in directory.glob("*.tar")}
    result = run_stage_one(cfg, source, progress=False)
    assert result.ok
    assert files(directory) == before
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("*.tar")} == mtimes
    assert result.sets[0].throughput["skipped_complete_shards"] == 4
    # the rerun wrote nothing, so the timing of the run that wrote the shards stays
    assert (directory / "throughput.json").read_text() == timing

    # a missing shard is the only one redone, with the same bytes
    (directory / "train-000001.tar").unlink()
    assert run_stage_one(cfg, source, progress=False).ok
    assert files(directory) == before


def test_changed_generator_changes_the_cache_key_and_needs_overwrite(source: Path):
    run_stage_one(pipeline(num_workers=0), source, progress=False)
    directory = latent_dir(source, "toy", SET)
    old_key = json.loads((directory / "cache_key.json").read_text())["cache_key"]
    changed = pipeline(num_workers=0, generator={"options": {"channels": 6}})
    with pytest.raises(UserError, match="--overwrite") as info:
        run_stage_one(changed, source, progress=False)
    assert "generator" in str(info.value)
    with pytest.raises(UserError, match="batch_size"):
        run_stage_one(pipeline(num_workers=0, batch_size=3), source, progress=False)
    assert run_stage_one(changed, source, overwrite=True, progress=False).ok
    assert json.loads((directory / "cache_key.json").read_text())["cache_key"] != old_key
    assert Manifest.read(directory).latent_spec["shape"] == [6, 8, 8]
    # shards of unknown origin are refused too
    (directory / "cache_key.json").unlink()
    with pytest.raises(UserError, match="unknown origin"):
        run_stage_one(changed, source, progress=False)


def test_dla_path_never_calls_a_decoder(source: Path, monkeypatch):
    def forbidden(self, latents):
        raise AssertionError("a decoder ran on the DLA path")

    with monkeypatch.context() as m:
        m.setattr(ToyConv, "decode", forbidden)
        m.setattr(torch.nn.ConvTranspose2d, "forward", forbidden)  # the toy decoder's only layer
        assert run_stage_one(pipeline(num_workers=0), source, progress=False).ok
        assert not decoded_dir(source, "toy", SET).exists()
        # the test can fail: the ablation path does decode
        with pytest.raises(AssertionError, match="decoder ran"):
            run_stage_one(pipeline(num_workers=0, decode=True), source, progress=False)


def test_decode_writes_the_ablation_sidecar(source: Path):
    ToyConv.decode_calls = 0
    assert run_stage_one(pipeline(num_workers=0, decode=True), source, progress=False).ok
    assert ToyConv.decode_calls > 0
    directory = decoded_dir(source, "toy", SET)
    assert verify(directory) == []
    manifest = Manifest.read(directory)
    assert manifest.kind == "decoded" and manifest.count("train") == 15
    assert manifest.extra["shape"] == [32, 32]  # what the stage-two reader sizes the adapter with
    sidecars = {SET: latent_dir(source, "toy", SET), "decoded": directory}
    sample = next(iter_aligned(source / "toy" / "source", sidecars, split="val"))
    decoded = decode_npy(sample["depth.decoded.npy"])
    assert decoded.dtype == np.float32 and decoded.shape == (32, 32)
    latent = torch.from_numpy(decode_npy(sample["depth.latent.npy"]).astype(np.float32))[None]
    np.testing.assert_allclose(decoded, ToyConv().decode(latent)[0].numpy(), rtol=1e-5, atol=1e-5)


def test_samples_per_input_and_float32_storage(source: Path):
    cfg = pipeline(num_workers=0, latent_dtype="float32", generator={"samples_per_input": 3, "seed": 7})
    assert run_stage_one(cfg, source, progress=False).ok
    directory = latent_dir(source, "toy", SET)
    manifest = Manifest.read(directory)
    assert len(manifest.channel_stats["mean"]) == 4 and manifest.latent_spec["dtype"] == "float32"
    sample = next(iter_aligned(source / "toy" / "source", {SET: directory}, split="train"))
    latent = decode_npy(sample["depth.latent.npy"])
    assert latent.dtype == np.float32 and latent.shape == (3, 4, 8, 8)
    assert not np.array_equal(latent[0], latent[1])


def test_nonfinite_latents_and_bad_inputs_are_flagged_not_dropped(source: Path):
    # replace one source sample's depth by bytes that are not an npy (a bad input)
    src = source / "toy" / "source"
    samples = read_shard_samples(src / "val-000000.tar")[0]
    samples[1]["depth.npy"] = b"not an npy"
    from synesthesia.shards.writer import write_shard

    manifest = Manifest.read(src)
    manifest.splits["val"] = [write_shard(src / "val-000000.tar", samples)]
    manifest.write(src)

    cfg = pipeline(num_workers=1, generator={"options": {"nan_keys": ["train_00003"]}})
    result = run_stage_one(cfg, source, progress=False)
    assert result.ok
    directory = latent_dir(source, "toy", SET)
    assert verify(directory) == []
    m = Manifest.read(directory)
    assert m.extra["flag_counts"] == {"bad_input": 1, "nonfinite_latent": 1}
    assert m.extra["flagged"] == {
        "train": [["train_00003", "nonfinite_latent"]],
        "val": [["val_00001", "bad_input"]],
    }
    seen = {}
    for split in ("train", "val"):
        for sample in iter_aligned(src, {SET: directory}, split=split):
            seen[sample["__key__"]] = sample
    assert len(seen) == 18  # every source key is still there
    for key, reason in (("train_00003", b"nonfinite_latent"), ("val_00001", b"bad_input")):
        assert seen[key]["depth.flag.txt"] == reason
        latent = decode_npy(seen[key]["depth.latent.npy"])
        assert latent.shape == (4, 8, 8) and not latent.any()
    assert "depth.flag.txt" not in seen["train_00004"]
    assert m.channel_stats["count"] == 14 * 8 * 8  # flagged samples are left out

    with pytest.raises(UserError, match="--overwrite"):  # different options: a different set
        run_stage_one(pipeline(num_workers=0, on_error="raise"), source, progress=False)
    shutil.rmtree(directory)
    with pytest.raises(StageOneIncomplete, match="val_00001") as info:
        run_stage_one(pipeline(num_workers=0, on_error="raise"), source, progress=False)
    assert not info.value.result.sets[0].complete


def test_corrupt_source_shard_fails_alone(source: Path, capsys, caplog):
    path = source / "toy" / "source" / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[700:900] = b"\xff" * 200
    path.write_bytes(bytes(data))
    yaml_path = write_yaml(source / "p.yaml", num_workers=1)
    rc = main(["shard", str(yaml_path), "--out", str(source), "--no-progress"])
    assert rc == 2
    assert "train-000001.tar" in caplog.text and "train-000001.tar" in capsys.readouterr().err
    directory = latent_dir(source, "toy", SET)
    assert sorted(p.name for p in directory.glob("*.tar")) == [
        "train-000000.tar",
        "train-000002.tar",
        "val-000000.tar",
    ]
    assert not (directory / "manifest.json").exists()
    assert not list(directory.glob(".*.tmp"))


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)  # the aborted TarWriter's __del__
def test_full_disk_leaves_no_partial_shard(source: Path, monkeypatch):
    calls = {"n": 0}
    original = wds.TarWriter.write

    def write(self, obj):
        calls["n"] += 1
        if calls["n"] == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", write)
    with pytest.raises(UserError, match="No space left"):
        run_stage_one(pipeline(num_workers=0, max_pending_writes=1), source, progress=False)
    directory = latent_dir(source, "toy", SET)
    for path in directory.glob("*.tar"):  # whatever exists is complete
        assert len(read_shard_samples(path)[0]) == 5
    assert not (directory / "train-000001.tar").exists()
    assert not list(directory.glob(".*.tmp")) and not (directory / "manifest.json").exists()
    gc.collect()  # the aborted TarWriter's stream warns when collected: do it under this test's filter
    monkeypatch.setattr(wds.TarWriter, "write", original)
    assert run_stage_one(pipeline(num_workers=0, max_pending_writes=1), source, progress=False).ok


def test_one_sidecar_set_per_generator(source: Path):
    gens = [
        {"name": "toy-conv", "modality": "depth", "set_name": "narrow"},
        {"name": "toy-conv", "modality": "depth", "set_name": "wide", "options": {"channels": 8}},
    ]
    cfg = build(
        PipelineConfig, {"dataset": "toy", "shard": {"generators": gens, "splits": ["val"], "num_workers": 0}}
    )
    result = run_stage_one(cfg, source, progress=False)
    assert [s.name for s in result.sets] == ["narrow", "wide"] and result.ok
    shapes = [Manifest.read(latent_dir(source, "toy", n)).latent_spec["shape"] for n in ("narrow", "wide")]
    assert shapes == [[4, 8, 8], [8, 8, 8]]
    assert list(Manifest.read(latent_dir(source, "toy", "wide")).splits) == ["val"]
    with pytest.raises(UserError, match="same set"):
        dupes = [gens[0], {**gens[1], "set_name": "narrow"}]
        run_stage_one(build(PipelineConfig, {"dataset": "toy", "shard": {"generators": dupes}}), source)


def test_config_mistakes_are_one_line_errors(source: Path):
    with pytest.raises(UserError, match="precision"):
        run_stage_one(pipeline(precision="fp8"), source)
    with pytest.raises(UserError, match="no generators"):
        run_stage_one(build(PipelineConfig, {"dataset": "toy"}), source)
    with pytest.raises(UserError, match="valid: .*toy-conv"):
        run_stage_one(pipeline(generator={"name": "nope"}), source)
    with pytest.raises(UserError, match="no source set"):
        run_stage_one(pipeline(), source / "elsewhere")


# ----------------------------------------------------------------------------- subprocesses


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _shard_cmd(yaml_path: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stage_one_toy",
        "shard",
        str(yaml_path),
        "--out",
        str(out),
        "--no-progress",
    ]


def test_sigkill_then_resume_is_byte_identical(tmp_path: Path):
    """A run SIGKILLed after its first shard, then rerun, equals an uninterrupted run byte for byte."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    make_source(killed)
    shutil.copytree(killed / "toy" / "source", clean / "toy" / "source")
    yaml_path = write_yaml(tmp_path / "p.yaml", num_workers=1, generator={"options": {"delay": 0.3}})
    env = _env()

    proc = subprocess.Popen(_shard_cmd(yaml_path, killed), env=env, stderr=subprocess.DEVNULL)
    directory = latent_dir(killed, "toy", SET)
    deadline = time.monotonic() + 240
    while not list(directory.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 1 <= len(list(directory.glob("*.tar"))) < 4 and not (directory / "manifest.json").exists()

    resumed = subprocess.run(
        _shard_cmd(yaml_path, killed), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = re.search(r"(\d+) shards to do \((\d+) complete\)", resumed.stderr)
    assert done and int(done.group(2)) >= 1  # the rerun kept what the killed run had finished
    reference = subprocess.run(
        _shard_cmd(yaml_path, clean), env=env, capture_output=True, text=True, timeout=300
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    got, want = files(directory), files(latent_dir(clean, "toy", SET))
    assert (
        sorted(got)
        == sorted(want)
        == sorted(
            ["cache_key.json", "manifest.json", *(f"train-00000{i}.tar" for i in range(3)), "val-000000.tar"]
        )
    )
    assert got == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_split_the_shards(tmp_path: Path):
    """torchrun with two CPU processes: each shard written once, the union of keys is the source."""
    make_source(tmp_path, shards={"train": (3, 4), "val": (2, 2)})
    yaml_path = write_yaml(tmp_path / "p.yaml", num_workers=0)
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "stage_one_toy",
        "shard",
        str(yaml_path),
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1 of 2" in proc.stderr
    directory = latent_dir(tmp_path, "toy", SET)
    assert verify(directory) == []
    timing = json.loads((directory / "throughput.json").read_text())
    assert timing["num_processes"] == 2 and [r["shards"] for r in timing["ranks"]] == [3, 2]
    names = [s["shard"] for s in timing["shards"]]
    assert len(names) == len(set(names)) == 5
    keys = []
    for path in sorted(directory.glob("*.tar")):
        keys += [s["__key__"] for s in read_shard_samples(path)[0]]
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(source_keys(tmp_path))


# ----------------------------------------------------------------------------- the real TAEF2


@pytest.mark.skipif(
    importlib.util.find_spec("synesthesia.generators.tae") is None, reason="tae generator not built"
)
def test_real_tae_generator_encodes_without_decoding(tmp_path: Path, shared: Path, monkeypatch):
    import synesthesia.generators.tae as tae

    def forbidden(*args, **kwargs):
        raise AssertionError("the TAEF2 decoder ran on the DLA path")

    monkeypatch.setattr(tae.TAEDecoder, "forward", forbidden)
    make_source(tmp_path, shards={"train": (1, 3), "val": (1, 2)})
    cfg = build(
        PipelineConfig,
        {
            "dataset": "toy",
            "shard": {
                "generators": [{"name": "tae", "modality": "depth"}],
                "splits": ["train", "val"],
                "batch_size": 2,
            },
        },
    )
    assert "tae" in GENERATORS
    assert run_stage_one(cfg, tmp_path, progress=False).ok
    directory = latent_dir(tmp_path, "toy", "tae-depth")
    manifest = Manifest.read(directory)
    assert manifest.latent_spec["kind"] == "spatial" and manifest.count("train") == 3
    sample = next(iter_aligned(tmp_path / "toy" / "source", {"tae": directory}, split="train"))
    latent = decode_npy(sample["depth.latent.npy"])
    assert latent.shape == (32, 8, 8) and np.isfinite(latent).all()  # tae maps depth to 64×64
    assert len(manifest.channel_stats["mean"]) == 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_path_matches_cpu_within_bf16_tolerance(tmp_path: Path):
    make_source(tmp_path)
    cpu, gpu = pipeline(num_workers=1, device="cpu"), pipeline(num_workers=1, device="cuda", precision="bf16")
    assert run_stage_one(cpu, tmp_path, progress=False).ok
    shutil.move(latent_dir(tmp_path, "toy", SET), tmp_path / "cpu-set")
    result = run_stage_one(gpu, tmp_path, progress=False)
    assert result.ok and result.sets[0].throughput["precision"] == "bf16"
    assert result.sets[0].throughput["channels_last"] is True
    for path in sorted((tmp_path / "cpu-set").glob("*.tar")):
        want = read_shard_samples(path)[0]
        got = read_shard_samples(latent_dir(tmp_path, "toy", SET) / path.name)[0]
        for a, b in zip(want, got, strict=True):
            assert a["__key__"] == b["__key__"]
            x, y = decode_npy(a["depth.latent.npy"]), decode_npy(b["depth.latent.npy"])
            np.testing.assert_allclose(y.astype(np.float32), x.astype(np.float32), rtol=0.05, atol=0.05)
