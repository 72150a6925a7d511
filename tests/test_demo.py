"""`synesthesia demo` at tiny scale: the whole flow, its table, reuse of finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synesthesia.cli import main
from synesthesia.train import loop

TINY = [
    "scenes.num_train=16",
    "scenes.num_val=8",
    "scenes.num_test=8",
    "scenes.num_paired=0",
    "scenes.image_size=32",
    "scenes.lidar_beams=8",
    "scenes.lidar_azimuth=32",
    "scenes.audio_seconds=0.1",
    "scenes.shard_size=8",
    "shard.generators=[{name: tae, modality: depth}]",
    "shard.batch_size=8",
    "teacher.dim=16",
    "teacher.depth=2",
    "teacher.heads=2",
    "teacher.tokens_per_modality=2",
    "teacher.epochs=2",
    "student.name=vit_micro_test",
    "train.epochs=1",
    "train.batch_size=8",
    "train.num_workers=0",
    "train.warmup_steps=1",
]


@pytest.mark.usefixtures("shared")  # the tae generator loads the real TAEF2 weights
def test_demo_end_to_end_then_reuses_finished_runs(tmp_path, monkeypatch, capsys):
    root = Path(__file__).resolve().parents[1]
    dirs = [
        "--shards",
        str(tmp_path / "shards"),
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "res"),
    ]
    args = ["demo", str(root / "pipelines" / "demo.yaml"), *TINY, *dirs, "--methods", "ce,kd"]
    calls = []
    real_train = loop.train
    monkeypatch.setattr(
        loop, "train", lambda cfg, *a, **k: calls.append(cfg.train.stage) or real_train(cfg, *a, **k)
    )

    assert main(args) == 0
    summary = (tmp_path / "res" / "demo" / "summary.md").read_text()
    assert summary in capsys.readouterr().out
    # tae on the real paired depth: the teacher's privileged source is `real`; ce sees none
    assert "privileged source `real`" in summary
    assert "method.name=ce train.source=none" in summary and "method.name=kd train.source=real" in summary
    results = json.loads((tmp_path / "res" / "demo" / "results.json").read_text())
    assert [r["method"] for r in results["students"]] == ["ce", "kd"]
    assert all(0.0 <= r["test"] <= 1.0 for r in results["students"])
    teacher = json.loads((tmp_path / "runs" / "demo" / "teacher-real-s0" / "metrics.json").read_text())
    assert teacher["epochs"] == 2 and len(teacher["history"]) == 2  # teacher.epochs, not train.epochs
    assert calls == ["teacher", "student", "student"]

    # a second demo keeps every finished run
    calls.clear()
    assert main(args) == 0
    assert calls == []
    # a run finished under another config (its config.json hash) is trained again
    assert main([*args[:2], *TINY, "train.lr=0.002", *args[2 + len(TINY) :]]) == 0
    assert calls == ["teacher", "student", "student"]
