"""The CLI as its peers behave: string fields take what was typed, `synesthesia config` lists every
key, long verbs show n/N and an ETA (a bar on a terminal, log lines without ``\\r`` elsewhere),
and ``ablate --plan`` estimates on the device it names."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
from tests.stage2_shards import TINY_TRAIN, write_tiny_dataset
from tests.tiny_scenes import tiny_scenes

from synesthesia.cli import VERBS, main
from synesthesia.config import PipelineConfig, load_pipeline, replace
from synesthesia.progress import ENV_INTERVAL, ENV_MODE, LogProgress, progress

ROOT = Path(__file__).resolve().parents[1]
TINY_SCENES = tiny_scenes(audio_seconds=0.5)


@pytest.fixture
def log_mode(monkeypatch, caplog):
    """Progress as log lines, one per update (the environment is restored afterwards)."""
    monkeypatch.setenv(ENV_MODE, "log")
    monkeypatch.setenv(ENV_INTERVAL, "0")
    caplog.set_level(logging.INFO)
    return caplog


def _progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "synesthesia.progress"]


# ----------------------------------------------------------------------------- string fields


def test_string_fields_take_an_override_as_typed():
    """`train.run_name=2024` was an error and `yes` read as True: YAML 1.1 reads them as a number
    and a boolean. A str field takes the text; other fields keep YAML's reading."""
    cfg = load_pipeline(
        None,
        ["train.run_name=2024", "train.teacher=yes", "name=0x1F", "augment=no", "epochs=3", "lr=1e-3"],
        section="train",
    )
    assert cfg.train.run_name == "2024" and cfg.train.teacher == "yes" and cfg.name == "0x1F"
    assert cfg.train.augment is False  # str | bool: a boolean stays a boolean
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-3)
    assert replace(cfg, ["train.run_name=on"]).train.run_name == "on"
    assert load_pipeline(None, ["train.modalities=[2024, yes]"]).train.modalities == ["2024", "yes"]


def test_string_fields_in_a_file_keep_their_text(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: 2024\n"
        "train:\n"
        "  run_name: yes\n"
        "  augment: yes\n"
        "  latent_sets: {depth: 12}\n"
        "  epochs: 0x10\n"
        "method:\n"
        "  options: {flag: yes, 3: 1.5}\n"
        "  weight: 2\n"
    )
    cfg = load_pipeline(path)
    assert cfg.name == "2024" and cfg.train.run_name == "yes" and cfg.train.latent_sets == {"depth": "12"}
    assert cfg.train.augment is True and cfg.train.epochs == 16
    assert cfg.method.options == {"flag": True, "3": 1.5}  # free-form options: YAML's reading
    assert cfg.method.weight == 2.0
    with pytest.raises(Exception, match="expected an integer"):
        load_pipeline(path, ["train.epochs=yes"])


# ----------------------------------------------------------------------------- synesthesia config


def _keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):
            keys += _keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_config_verb_prints_every_key_value_default_and_comment(capsys):
    """`--help` listed no config keys: `synesthesia config` prints them all, resolved."""
    demo = str(ROOT / "pipelines" / "demo.yaml")
    assert main(["config", demo, "train.run_name=2024", "lr=0.5", "--section", "train"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_key = {line.split(" = ", 1)[0]: line for line in lines if " = " in line and not line.startswith("#")}
    missing = [k for k in _keys(PipelineConfig) if k not in by_key]
    assert not missing, missing
    assert by_key["train.run_name"].startswith('train.run_name = "2024"  (default: "")  # run folder under')
    assert by_key["train.lr"].startswith("train.lr = 0.5  (default: 0.001)")
    assert "# teacher | student" in by_key["train.stage"]
    # a comment block above a field is its comment too
    assert "How much of the label" in by_key["scenes.ambiguity"]
    # list entries that are sections are listed key by key
    assert by_key["shard.generators.0.name"].startswith('shard.generators.0.name = "latent-diffusion"')


@pytest.mark.parametrize("verb", ["render", "ingest", "shard", "train", "bootstrap", "ablate", "eval"])
def test_pipeline_verbs_help_points_at_the_config_verb(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "synesthesia config PIPELINE" in out and "--progress" in out


# ----------------------------------------------------------------------------- progress


def test_log_progress_has_n_of_total_and_eta_and_no_carriage_return(log_mode, capsys):
    items = list(progress(range(5), desc="work", unit="sample"))
    assert items == list(range(5))
    lines = _progress_lines(log_mode)
    assert lines[0].startswith("work: 1/5 sample (20%)") and "ETA" in lines[0]
    assert lines[-1].startswith("work: 5/5 sample (100%)") and "took" in lines[-1]
    counter = progress(total=3, desc="count", unit="step", initial=1)
    counter.update(2)
    counter.set_postfix(loss="0.5")
    counter.close()
    assert (
        _progress_lines(log_mode)[-1].startswith("count: 3/3 step")
        and "loss=0.5" in _progress_lines(log_mode)[-1]
    )
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out


def test_progress_modes(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv(ENV_MODE, "auto")  # pytest's stderr is no terminal: log lines
    assert isinstance(progress(total=2), LogProgress)
    monkeypatch.setenv(ENV_MODE, "bar")
    assert not isinstance(progress(total=2), LogProgress)
    monkeypatch.setenv(ENV_MODE, "none")
    list(progress(range(3), desc="quiet"))
    assert not _progress_lines(caplog)
    assert isinstance(progress(total=2, disable=True), LogProgress)


def test_progress_option_before_or_after_the_verb(monkeypatch, capsys):
    import os

    monkeypatch.setenv(ENV_MODE, "auto")
    demo = str(ROOT / "pipelines" / "demo.yaml")
    assert main(["--progress", "none", "config", demo]) == 0
    assert os.environ[ENV_MODE] == "none"
    assert main(["config", demo, "--progress", "log", "seed=1"]) == 0
    assert os.environ[ENV_MODE] == "log"
    capsys.readouterr()


def test_render_and_ingest_show_progress(tmp_path, log_mode, capsys):
    """`render` and `ingest` printed no progress."""
    out = tmp_path / "shards"
    assert main(["render", str(ROOT / "pipelines" / "demo.yaml"), *TINY_SCENES, "--out", str(out)]) == 0
    lines = _progress_lines(log_mode)
    assert any(line.startswith("render train: 4/4 sample") for line in lines), lines
    assert any(line.startswith("render val: 2/2 sample") for line in lines), lines
    # ingest the rendered set (a source set reingests) under another dataset name
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: p\n")
    source = out / "scenes" / "source"
    assert main(["ingest", str(pipeline), f"source={source}", "dataset=again", "--out", str(out)]) == 0
    lines = _progress_lines(log_mode)
    assert any(re.match(r"ingest: \d+/\d+ sample", line) for line in lines), lines
    captured = capsys.readouterr()
    assert "\r" not in captured.err


def test_train_progress_off_a_terminal_is_log_lines(tmp_path, monkeypatch, caplog, capsys):
    """`train`'s tqdm wrote `\\r` lines into Slurm logs: off a terminal (auto) it logs n/N instead."""
    monkeypatch.setenv(ENV_MODE, "auto")
    monkeypatch.setenv(ENV_INTERVAL, "0")
    caplog.set_level(logging.INFO)
    shards = write_tiny_dataset(tmp_path / "shards", counts={"train": 8, "val": 2, "test": 2}, shard_size=4)
    from synesthesia.train import train

    cfg = load_pipeline(
        None, [*TINY_TRAIN, f"train.shards={shards}", "train.stage=teacher", "train.epochs=1"]
    )
    metrics = train(cfg, tmp_path / "runs")
    assert "\r" not in capsys.readouterr().err
    steps = metrics["steps"]
    lines = _progress_lines(caplog)
    assert any(line.startswith(f"teacher-latent-s0: {steps}/{steps} step") for line in lines), lines


# ----------------------------------------------------------------------------- ablate --plan


def _plan(tmp_path, runs: Path):
    from synesthesia.ablate.runner import Ablation

    cfg = load_pipeline(ROOT / "pipelines" / "ablation-scenes-full.yaml")
    return Ablation(cfg, "p.yaml", shards=tmp_path / "shards", runs=runs, out=tmp_path / "out").plan()


def _fake_run(runs: Path, name: str, stage: str, speed: float, device: str) -> None:
    run = runs / "earlier" / name
    run.mkdir(parents=True)
    metrics = {"stage": stage, "train_samples_per_s": speed, "processes": 1, "timing": {"device": device}}
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_plan_names_the_device_and_uses_measured_speed(tmp_path, monkeypatch):
    """`ablate --plan` said "19066 min on a 2-core CPU" for the GPU pipeline, from constants."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    runs = tmp_path / "runs"
    constants = _plan(tmp_path, runs)
    estimate_line = constants.lines[-1]
    assert "on NVIDIA H200" in estimate_line and "2-core CPU" not in estimate_line
    assert "a constant measured on a 2-core CPU" in constants.lines[2]  # what it rests on, said
    _fake_run(runs, "a", "student", 4000.0, "cuda")
    _fake_run(runs, "b", "teacher", 3000.0, "cuda")
    _fake_run(runs, "c", "student", 1.0, "cpu")  # another device: not this plan's speed
    measured = _plan(tmp_path, runs)
    assert "students: 4000.0 samples/s, the median of 1 run(s)" in measured.lines[2]
    assert "teachers: 3000.0 samples/s" in measured.lines[2]
    assert measured.estimate_s < constants.estimate_s / 10


def test_plan_on_cpu_names_its_cores(tmp_path, monkeypatch):
    import os

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = _plan(tmp_path, tmp_path / "runs")
    assert f"on CPU, {len(os.sched_getaffinity(0))} cores" in plan.lines[-1]
    # pinned to fewer cores (taskset), it plans for those, as --jobs shares them
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert "on CPU, 1 cores" in _plan(tmp_path, tmp_path / "runs").lines[-1]


def test_every_long_verb_is_registered():
    assert {"render", "ingest", "shard", "train", "bootstrap", "ablate", "config"} <= set(VERBS)
