"""Independent parts: `--part i/N` and Slurm arrays for shard and render, leases, `shard --finalize`.

Stage one runs as three concurrent independent processes and must write the same bytes as one
process, inferring every shard exactly once (the ``counting-toy`` generator of
``tests/counting_plugin.py`` logs each key it encodes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

import counting_plugin  # noqa: F401  (registers counting-toy)
from counting_plugin import LOG_ENV, encoded
from hostile import assert_refused
from synesthesia import UserError
from synesthesia.cli import main
from synesthesia.parts import CLI, SLURM_ARRAY, SLURM_TASKS, TORCH, Part, parse_part, resolve_part
from synesthesia.shards.writer import Manifest
from synesthesia.stage_one import latent_dir, source_dir
from synesthesia.stage_one.data import read_shard_samples
from synesthesia.stage_one.leases import lease_path
from tiny_scenes import DEFAULTS

TESTS = Path(__file__).resolve().parent
DATASET = "tiny"
SET = "counting-toy-depth"
SCENES = {**DEFAULTS, "num_train": 8}  # train 4 shards, val 1, test 1: six shards of two samples


def write_pipeline(path: Path) -> Path:
    data = {
        "dataset": DATASET,
        "scenes": SCENES,
        "shard": {
            "generators": [{"name": "counting-toy", "modality": "depth", "options": {"image_size": 16}}],
            "splits": ["train", "val", "test"],
            "batch_size": 2,
            "num_workers": 0,
        },
    }
    path.write_text(yaml.safe_dump(data))
    return path


def digests(root: Path, keep_timings: bool = False) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path → digest), the timings left out."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (keep_timings or p.name != "throughput.json")
    }


def all_keys(out: Path) -> list[str]:
    src = source_dir(out, DATASET)
    manifest = Manifest.read(src)
    return [
        s["__key__"]
        for split in ("train", "val", "test")
        for info in manifest.splits[split]
        for s in read_shard_samples(src / info.name)[0]
    ]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, Path]:
    """The pipeline file and a whole render of the tiny scenes set."""
    root = tmp_path_factory.mktemp("parts")
    pipeline = write_pipeline(root / "pipeline.yaml")
    assert main(["render", str(pipeline), "--out", str(root / "whole"), "--workers", "1"]) == 0
    return pipeline, root / "whole"


def fresh(rendered: tuple[Path, Path], out: Path) -> Path:
    """A copy of the rendered source set under ``out`` (nothing of stage one yet)."""
    shutil.copytree(source_dir(rendered[1], DATASET), source_dir(out, DATASET))
    return out


@pytest.fixture(scope="module")
def reference(rendered, tmp_path_factory) -> dict[str, str]:
    """The digests of one process's stage one."""
    out = fresh(rendered, tmp_path_factory.mktemp("single"))
    assert main(["shard", str(rendered[0]), "--out", str(out), "--no-progress"]) == 0
    return digests(out / DATASET)


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("WORLD_SIZE", "RANK")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _shard(pipeline: Path, out: Path, *extra: str) -> list[str]:
    code = "import counting_plugin; from synesthesia.cli import main; raise SystemExit(main())"
    return [sys.executable, "-c", code, "shard", str(pipeline), "--out", str(out), "--no-progress", *extra]


# ----------------------------------------------------------------------------- three concurrent parts


def _check_once_each(out: Path, reference: dict[str, str], log: Path, parts: int) -> None:
    """The parts wrote the reference bytes, inferred every key exactly once, and merged their reports."""
    assert digests(out / DATASET) == reference
    counts = Counter(key for _, key in encoded(log))
    assert sorted(counts) == sorted(all_keys(out)) and set(counts.values()) == {1}  # each shard once
    directory = latent_dir(out, DATASET, SET)
    assert not list(directory.glob(".*"))  # no lease or part report left
    timing = json.loads((directory / "throughput.json").read_text())
    assert timing["num_processes"] == parts and timing["total"]["shards"] == 6  # every report merged


def test_three_concurrent_independent_parts_equal_one_process_and_infer_each_shard_once(
    rendered, reference, tmp_path
):
    out = fresh(rendered, tmp_path / "out")
    log = tmp_path / "encoded.log"
    env = _env(**{LOG_ENV: str(log)})
    # parts 0, 1, 2 and a duplicate job of part 1 (a resubmitted array task): leases keep the two apart
    procs = [
        subprocess.Popen(
            _shard(rendered[0], out, "--part", f"{i}/3"), env=env, stderr=subprocess.PIPE, text=True
        )
        for i in (0, 1, 2, 1)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "part 1/3 (--part) takes 2 of 6 shards" in errs[1] and "part 2/3 (--part) takes 2" in errs[2]
    _check_once_each(out, reference, log, parts=3)
    assert len({pid for pid, _ in encoded(log)}) >= 3  # every part did its share


def test_a_slurm_array_gives_the_same_parts(rendered, reference, tmp_path, monkeypatch, caplog):
    """Tasks of ``--array=10-12``, one after the other (concurrency is the test above's)."""
    caplog.set_level(logging.INFO)
    out = fresh(rendered, tmp_path / "out")
    log = tmp_path / "encoded.log"
    monkeypatch.setenv(LOG_ENV, str(log))
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    for task in (12, 10, 11):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        assert main(["shard", str(rendered[0]), "--out", str(out), "--no-progress"]) == 0
    assert "part 2/3 (slurm-array) takes 2 of 6 shards, 0 already complete" in caplog.text
    _check_once_each(out, reference, log, parts=3)


# ----------------------------------------------------------------------------- finalize


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_parts_in_any_order_then_finalize_twice(rendered, reference, tmp_path, capsys, order):
    out = fresh(rendered, tmp_path / "out")
    pipeline = str(rendered[0])
    directory = latent_dir(out, DATASET, SET)
    first, second = order
    assert main(["shard", pipeline, "--out", str(out), "--part", f"{first}/2", "--no-progress"]) == 0
    assert not (directory / "manifest.json").exists()
    capsys.readouterr()

    line = assert_refused(
        capsys, ["shard", pipeline, "--out", out, "--finalize"], tmp_path, out, "3 of 6 shards"
    )
    assert f"run part(s) {second}/2" in line

    assert main(["shard", pipeline, "--out", str(out), "--part", f"{second}/2", "--no-progress"]) == 0
    assert digests(out / DATASET) == reference  # the last part wrote the manifest
    timing = json.loads((directory / "throughput.json").read_text())
    assert timing["num_processes"] == 2 and timing["total"]["samples"] == len(all_keys(out))

    done = digests(out / DATASET, keep_timings=True)
    for _ in range(2):
        assert main(["shard", pipeline, "--out", str(out), "--finalize"]) == 0
        assert digests(out / DATASET, keep_timings=True) == done  # throughput.json kept, not zeroed
    assert main(["shard", pipeline, "--out", str(out), "--part", f"{first}/2", "--no-progress"]) == 0
    assert digests(out / DATASET, keep_timings=True) == done  # a rerun of a finished part changes nothing


def test_finalize_checks_the_config_against_the_cache_key(rendered, tmp_path, capsys):
    out = fresh(rendered, tmp_path / "out")
    pipeline = str(rendered[0])
    assert_refused(
        capsys, ["shard", pipeline, "--out", out, "--finalize"], tmp_path, out, "never ran this set"
    )
    assert main(["shard", pipeline, "--out", str(out), "--no-progress"]) == 0
    args = ["shard", pipeline, "--out", out, "--finalize", "shard.batch_size=4"]
    assert_refused(capsys, args, tmp_path, out, "different shard.batch_size")
    args = ["shard", pipeline, "--out", out, "--finalize", "shard.generators.0.options.channels=8"]
    assert_refused(capsys, args, tmp_path, out, "different generator config")
    assert_refused(
        capsys, ["shard", pipeline, "--out", out, "--finalize", "--part", "0/2"], tmp_path, out, "alone"
    )


def test_overwrite_with_independent_parts_is_refused(rendered, tmp_path, capsys):
    out = fresh(rendered, tmp_path / "out")
    args = ["shard", rendered[0], "--out", out, "--part", "1/2", "--overwrite"]
    assert_refused(capsys, args, tmp_path, out, "--overwrite with independent parts")


def test_a_failed_source_shard_still_fails_its_part(rendered, tmp_path, capsys):
    out = fresh(rendered, tmp_path / "out")
    victim = source_dir(out, DATASET) / "train-000000.tar"  # position 0: part 0's
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[600:700] = bytes(255 - b for b in data[600:700])  # not its sha256 any more
    victim.write_bytes(bytes(data))
    code = main(["shard", str(rendered[0]), "--out", str(out), "--part", "0/2", "--no-progress"])
    assert code == 2 and "1 source shard(s) failed" in capsys.readouterr().err
    assert main(["shard", str(rendered[0]), "--out", str(out), "--part", "1/2", "--no-progress"]) == 0


# ----------------------------------------------------------------------------- leases in a real run


def _foreign_lease(path: Path, age_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = {"host": "elsewhere", "pid": 4242, "part": "part 0/1 (single)", "token": "feedface", "started": 0}
    path.write_text(json.dumps(owner))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_a_shard_leased_by_a_live_job_is_left_to_it_and_a_stale_lease_is_taken_over(
    rendered, reference, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    out = fresh(rendered, tmp_path / "out")
    log = tmp_path / "encoded.log"
    monkeypatch.setenv(LOG_ENV, str(log))
    directory = latent_dir(out, DATASET, SET)
    lease = lease_path(directory, "train-000001.tar")
    _foreign_lease(lease, age_s=5)  # fresh: another job is computing it
    held = {k for k in all_keys(out) if k.startswith("train_") and int(k.split("_")[1]) in (2, 3)}

    assert main(["shard", str(rendered[0]), "--out", str(out), "--no-progress"]) == 0
    assert not (directory / "train-000001.tar").exists() and not (directory / "manifest.json").exists()
    assert "leased by host elsewhere pid 4242" in caplog.text
    assert not held & {key for _, key in encoded(log)}

    _foreign_lease(lease, age_s=3600)  # that job died an hour ago
    log.unlink()
    assert main(["shard", str(rendered[0]), "--out", str(out), "--no-progress"]) == 0
    assert "taking over the lease of host elsewhere pid 4242" in caplog.text
    assert sorted(key for _, key in encoded(log)) == sorted(held)  # only the leased shard was left
    assert digests(out / DATASET) == reference and not lease.exists()


# ----------------------------------------------------------------------------- render parts


def test_render_parts_equal_a_whole_render(rendered, tmp_path, capsys):
    pipeline, whole = rendered
    out = tmp_path / "parts"
    assert main(["render", str(pipeline), "--out", str(out), "--part", "1/2", "--workers", "2"]) == 0
    assert not (source_dir(out, DATASET) / "manifest.json").exists()
    env = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}
    with pytest.MonkeyPatch.context() as m:
        for name, value in env.items():
            m.setenv(name, value)
        assert main(["render", str(pipeline), "--out", str(out), "--workers", "1"]) == 0
    assert digests(out) == digests(whole)  # shards, manifest and dataset card
    capsys.readouterr()
    assert_refused(
        capsys, ["render", pipeline, "--out", out, "--part", "0/2", "--force"], tmp_path, out, "--force"
    )


def test_render_parts_refuse_a_folder_of_another_render(rendered, tmp_path, capsys):
    pipeline, _ = rendered
    out = tmp_path / "parts"
    assert main(["render", str(pipeline), "--out", str(out), "--part", "1/2"]) == 0
    args = ["render", pipeline, "--out", out, "--part", "0/2", "seed=7"]
    assert_refused(capsys, args, tmp_path, out, "another render")


# ----------------------------------------------------------------------------- which part am I


def test_parse_part():
    assert parse_part("0/3") == (0, 3) and parse_part(" 2/3 ") == (2, 3)
    for bad in ("3/3", "-1/3", "a/b", "1", "0/0", "0/70000", "1/2/3", "", "1.0/2", "٣/٤x"):
        with pytest.raises(UserError, match="--part"):
            parse_part(bad)


@pytest.mark.parametrize(
    ("environ", "cli", "want"),
    [
        ({}, None, Part()),
        ({}, "0/1", Part()),
        ({}, "2/5", Part(2, 5, CLI)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "4",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            None,
            Part(2, 3, SLURM_ARRAY),
        ),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "1"}, None, Part()),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, None, Part(2, 4, SLURM_TASKS)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "1",
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_NTASKS": "2",
                "SLURM_PROCID": "1",
            },
            None,
            Part(3, 4, SLURM_ARRAY),
        ),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}, "0/3", Part(0, 3, CLI)),
        ({"WORLD_SIZE": "2", "RANK": "1"}, None, Part(1, 2, TORCH)),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "1/3", Part(3, 6, CLI)),
    ],
)
def test_resolve_part(environ, cli, want):
    assert resolve_part(cli, environ) == want


@pytest.mark.parametrize(
    "environ",
    [
        {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"},
        {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "99999999999"},
        {"SLURM_ARRAY_TASK_ID": "-1", "SLURM_ARRAY_TASK_COUNT": "3"},
        {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3"},
        {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_STEP": "2"},
        {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_STEP": "0"},
        {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "300", "SLURM_NTASKS": "300"},
        {"SLURM_NTASKS": "2", "SLURM_PROCID": "2"},
        {"SLURM_NTASKS": "1e3"},
        {"WORLD_SIZE": "2", "RANK": "2"},
        {"WORLD_SIZE": "0"},
        {"WORLD_SIZE": "2", "RANK": "0", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"},
    ],
)
def test_hostile_environment_is_one_line_error(environ):
    with pytest.raises(UserError) as info:
        resolve_part(None, environ)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_hostile_cli_part_is_one_line_error(tmp_path, capsys, rendered):
    out = tmp_path / "out"
    assert_refused(capsys, ["shard", rendered[0], "--out", out, "--part", "9/3"], tmp_path, out, "--part")
    assert_refused(capsys, ["render", rendered[0], "--out", out, "--part", "x"], tmp_path, out, "--part")
