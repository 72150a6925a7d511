"""Stage two: teacher → student → export → eval; exact resume; two CPU processes (torchrun, gloo)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from tests.stage2_shards import TINY_DECODED_TEACHER, TINY_TRAIN, write_tiny_dataset

from synesthesia import UserError
from synesthesia.cli import main
from synesthesia.config import load_pipeline
from synesthesia.models.students import build_student
from synesthesia.models.teacher import MultimodalTeacher
from synesthesia.train import load_student, run_dir, train
from synesthesia.train.checkpoint import state_digest
from synesthesia.train.loop import early_stop_due

TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_dataset(
        tmp_path_factory.mktemp("shards"), counts={"train": 16, "val": 4, "test": 4}, shard_size=3
    )


def tiny(shards, *overrides):
    return load_pipeline(None, [*TINY, f"train.shards={shards}", *overrides])


def test_teacher_student_export_and_eval(shards, tmp_path, capsys):
    out = tmp_path / "runs"
    # teacher.epochs sets the teacher's training length (train.epochs is the students')
    teacher = train(tiny(shards, "train.stage=teacher", "train.epochs=3", "teacher.epochs=1"), out)
    assert set(teacher["test_missing"]) == {"all", "without_depth", "without_audio", "rgb_only"}
    assert teacher["test"]["samples"] == 4 and len(teacher["history"]) == 1
    cfg = tiny(shards, "train.stage=student", "method.name=messy", "train.epochs=1")
    metrics = train(cfg, out)
    run = run_dir(cfg, out)
    assert run.name == "messy-latent-s0" and json.loads((run / "metrics.json").read_text())["steps"] == 4
    assert (run / "logs" / "metrics.jsonl").is_file() and (run / "export" / "README.md").is_file()
    # MESSy's heads are kept beside the selected student (for analysis), never in the export
    heads = load_file(str(run / "best" / "method.safetensors"))
    assert heads and all(k.startswith("heads.") for k in heads)
    assert not (run / "export" / "method.safetensors").exists()
    # the export is the plain student: same parameter count, no heads, same outputs as the selected weights
    model = load_student(run / "export")
    plain = build_student(cfg.student, 3, 32)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert not any(
        "method" in k or "head_" in k for k in load_file(str(run / "export" / "model.safetensors"))
    )
    plain.load_state_dict(load_file(str(run / "best" / "model.safetensors")))
    rgb = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(rgb).logits, plain.eval()(rgb).logits)
    # and it is a plain timm model: timm alone loads it, with the run's classes and normalisation
    timm_model = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    torch.testing.assert_close(timm_model(rgb), plain(rgb).logits)
    assert len(timm_model.pretrained_cfg["label_names"]) == 3 and timm_model.pretrained_cfg["crop_pct"] == 1.0
    # synesthesia eval agrees with the test figure in metrics.json
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: pipeline\n")
    assert main(["eval", str(pipeline), *TINY, f"train.shards={shards}", "--model", str(run / "export")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 4 and result["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    # and for the teacher run: every modality, each one missing, RGB only
    teacher_run = run_dir(tiny(shards, "train.stage=teacher"), out)
    assert main(["eval", str(pipeline), *TINY, f"train.shards={shards}", "--model", str(teacher_run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(teacher["test"]["accuracy"])
    assert result["missing"] == pytest.approx(teacher["test_missing"])


def test_resume_gives_the_same_final_weights(shards, tmp_path):
    # 8 micro-batches of 2 per epoch, 2 per update: 4 updates per epoch; step 3 is mid-epoch 0
    overrides = ["train.stage=teacher", "train.epochs=2", "train.batch_size=2", "train.grad_accum=2"]
    overrides += ["train.save_every=3", "train.keep_checkpoints=0", "teacher.adapter_dropout=0.2"]
    whole = tiny(shards, *overrides)
    train(whole, tmp_path / "a")
    first = run_dir(whole, tmp_path / "a")
    final = first / "checkpoints" / "step-8"
    assert (first / "checkpoints" / "latest").read_text().strip() == "step-8"
    resumed_cfg = tiny(shards, *overrides)
    resumed = train(resumed_cfg, tmp_path / "b", resume=str(first / "checkpoints" / "step-3"))
    second = run_dir(resumed_cfg, tmp_path / "b")
    a, b = (
        load_file(str(final / "model.safetensors")),
        load_file(str(second / "checkpoints/step-8/model.safetensors")),
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == json.loads((first / "metrics.json").read_text())["history"]
    # a different seed gives different weights (the comparison can fail)
    other = tiny(shards, *overrides, "train.seed=1", "train.save_every=0")
    train(other, tmp_path / "c")
    c = load_file(str(run_dir(other, tmp_path / "c") / "checkpoints/step-8/model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_see_each_sample_once_and_agree(tmp_path):
    # 17 train samples in 4 shards of 5/5/5/2: neither the shard nor the sample count divides by 2
    shards = write_tiny_dataset(tmp_path / "shards", counts={"train": 17, "val": 3, "test": 3}, shard_size=5)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: two\n")
    out = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    cmd += [
        "-m",
        "synesthesia",
        "train",
        str(pipeline),
        *TINY,
        f"train.shards={shards}",
        "train.stage=teacher",
    ]
    cmd += ["train.epochs=2", "train.record_keys=true", "train.log_with=none", "--out", str(out)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    run = out / "two" / "teacher-latent-s0"
    per_epoch: dict[int, list[list[str]]] = {0: [], 1: []}
    for rank in (0, 1):
        for line in (run / "keys" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            per_epoch[record["epoch"]].append(record["keys"])
    for epoch, ranks in per_epoch.items():
        assert len(ranks) == 2
        assert sorted(ranks[0] + ranks[1]) == [f"train_{i:05d}" for i in range(17)], epoch
        assert abs(len(ranks[0]) - len(ranks[1])) <= 1
    assert per_epoch[0][0] != per_epoch[1][0]  # the order changes with the epoch
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["test"]["samples"] == 3
    # both ranks end with the same weights (DDP kept them in sync), those of the final checkpoint
    digests = metrics["final_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    checkpoint = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    teacher = MultimodalTeacher.from_config_dict(
        json.loads((run / "best" / "model.json").read_text())["model"]
    )
    teacher.load_state_dict(
        {k.removeprefix("teacher."): v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    )
    assert state_digest(teacher) == digests[0]


def test_cotrain_trains_on_token_features_and_exports_the_rgb_branch(shards, tmp_path, monkeypatch):
    from synesthesia.methods.cotrain import CoTrain

    seen = []
    original = CoTrain.multimodal

    def multimodal(self, student, batch):  # what the trainer hands the branch: token sequences
        seen.append({layer: tuple(t.shape) for layer, t in student.tokens.items()})
        return original(self, student, batch)

    monkeypatch.setattr(CoTrain, "multimodal", multimodal)
    cfg = tiny(shards, "method.name=cotrain", "train.epochs=1", "method.options={heads: 2, shared_layer: 1}")
    metrics = train(cfg, tmp_path)
    run = run_dir(cfg, tmp_path)
    # vit_micro_test at 32×32, patch 8: 16 patch tokens of width 32 after the shared block 1
    assert seen and all(s == {1: (4, 16, 32)} for s in seen)
    steps = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "train/ce_mm" in r]
    assert len(steps) == metrics["steps"] == 4
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in steps)
    # the export is the RGB branch alone: the plain student's parameters, and its outputs
    model = load_student(run / "export")
    plain = build_student(cfg.student, 3, 32)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    exported = load_file(str(run / "export" / "model.safetensors"))
    assert set(exported) == set(plain.model.state_dict())  # the timm model's own keys
    plain.load_state_dict(load_file(str(run / "best" / "model.safetensors")))
    rgb = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(rgb).logits, plain.eval()(rgb).logits)


def test_decoded_source_end_to_end(tmp_path):
    """Stage one with shard.decode: true → a teacher on the decoded sidecar → a KD student from it."""
    from stage_one_toy import make_source  # registers the toy-conv generator
    from synesthesia.config import PipelineConfig, build
    from synesthesia.stage_one import run_stage_one

    make_source(tmp_path / "shards", shards={"train": (2, 4), "val": (1, 4), "test": (1, 4)})
    gen = {"name": "toy-conv", "modality": "depth"}
    shard_cfg = build(
        PipelineConfig,
        {
            "dataset": "toy",
            "shard": {"generators": [gen], "splits": ["train", "val", "test"], "decode": True},
        },
    )
    assert run_stage_one(shard_cfg, tmp_path / "shards", progress=False).ok
    common = [
        "dataset=toy",
        f"train.shards={tmp_path / 'shards'}",
        "train.modalities=[depth]",
        "train.latent_sets={depth: toy-conv-depth}",
        "train.source=decoded",
        "train.num_workers=0",
        "train.batch_size=4",
        *TINY_DECODED_TEACHER,
    ]
    teacher = train(load_pipeline(None, [*common, "train.stage=teacher"]), tmp_path / "runs")
    assert teacher["run"].endswith("teacher-decoded-s0") and teacher["source"] == "decoded"
    config = json.loads((Path(teacher["run"]) / "best" / "model.json").read_text())
    assert config["model"]["modalities"] == {"depth": {"kind": "decoded", "shape": [32, 32]}}
    assert set(teacher["robustness"]) >= {"full", "removed/depth", "corrupted/depth", "shuffled/depth"}
    student = train(load_pipeline(None, [*common, "method.name=kd"]), tmp_path / "runs")
    assert student["run"].endswith("kd-decoded-s0") and student["test"]["samples"] == 4
    timing = student["timing"]
    assert (
        timing["data_s_per_step"] > 0
        and timing["teacher_forward_s_per_step"] > 0
        and timing["step_s_per_step"] > 0
    )


def test_early_stop_rule():
    history = [{"epoch": e} for e in range(5)]
    assert not early_stop_due(history, {"epoch": 4}, 2)
    assert not early_stop_due(history, {"epoch": 3}, 2)
    assert early_stop_due(history, {"epoch": 2}, 2)
    assert not early_stop_due(history, {"epoch": 0}, 0)  # 0: never
    assert not early_stop_due([], {}, 3)
    # a minimum of epochs: epoch 4 is the 5th trained, so 5 lets the patience end it and 6 does not
    assert early_stop_due(history, {"epoch": 2}, 2, min_epochs=5)
    assert not early_stop_due(history, {"epoch": 2}, 2, min_epochs=6)
    assert not early_stop_due(history, {"epoch": 0}, 2, min_epochs=6)


def test_early_stopping_on_val_keeps_the_best_and_resumes_no_further(shards, tmp_path, caplog):
    # lr 0: val accuracy never beats epoch 0, so patience 2 ends the run after epoch 2 of 6
    overrides = ["train.source=none", "train.epochs=6", "train.lr=0", "train.early_stop_patience=2"]
    cfg = tiny(shards, "train.stage=student", "method.name=ce", *overrides)
    metrics = train(cfg, tmp_path)
    assert metrics["stopped_early"] and metrics["epochs_trained"] == 3 and len(metrics["history"]) == 3
    assert metrics["best"]["epoch"] == 0 and metrics["epochs"] == 6
    steps = metrics["steps"]
    # the stopped run is finished: nothing more is trained; its config.json lacks an option added
    # since (read with its default), which is the same config: no "differs" warning
    config_json = metrics["run"] + "/config.json"
    written = json.loads(Path(config_json).read_text())
    del written["config"]["train"]["verify"]
    written["config_hash"] = "from-an-older-version"
    Path(config_json).write_text(json.dumps(written))
    with caplog.at_level(logging.WARNING, logger="synesthesia"):
        again = train(cfg, tmp_path, resume="latest")
    assert again["steps"] == steps and again["stopped_early"]
    assert "differs from its config.json" not in caplog.text
    # only what training depends on counts: another ablate section (an ablation resuming the run
    # under other ablate.* overrides) is the same run; another learning rate is not
    with caplog.at_level(logging.WARNING, logger="synesthesia"):
        train(
            tiny(shards, "train.stage=student", "method.name=ce", *overrides, "ablate.seeds=[7]"),
            tmp_path,
            resume="latest",
        )
    assert "differs from its config.json" not in caplog.text
    moved = [o.replace("train.lr=0", "train.lr=0.5") for o in overrides]
    with caplog.at_level(logging.WARNING, logger="synesthesia"):
        train(tiny(shards, "train.stage=student", "method.name=ce", *moved), tmp_path, resume="latest")
    assert "differs from its config.json" in caplog.text
    with pytest.raises(UserError, match="early_stop_patience"):
        train(tiny(shards, "train.early_stop_patience=-1"), tmp_path)
    # with a minimum of 5 epochs the same flat run trains 5 of its 6, then stops
    late = tiny(shards, "train.stage=student", "method.name=ce", *overrides, "train.early_stop_min_epochs=5")
    metrics = train(late, tmp_path / "late")
    assert metrics["stopped_early"] and metrics["epochs_trained"] == 5 and metrics["best"]["epoch"] == 0
    assert metrics["early_stop_min_epochs"] == 5
    with pytest.raises(UserError, match="early_stop_min_epochs"):
        train(tiny(shards, "train.early_stop_min_epochs=-1"), tmp_path)


def test_messy_heads_r2_probe(shards, tmp_path, capsys):
    """synesthesia eval --heads scores a MESSy run's heads on val: one R² per layer and modality,
    equal to 1 − mse ÷ target variance, and never above 1."""
    out = tmp_path / "runs"
    train(tiny(shards, "train.stage=teacher", "teacher.epochs=1"), out)
    cfg = tiny(shards, "train.stage=student", "method.name=messy", "train.epochs=2")
    train(cfg, out)
    run = run_dir(cfg, out)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: pipeline\n")
    assert main(["eval", str(pipeline), "--model", str(run), "--heads", "--split", "val"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["target"] == "teacher"
    layers = [f"l{i}/{m}" for i in (0, 1, 2) for m in ("depth", "audio")]
    assert sorted(result["heads"]) == sorted(layers)
    for head in result["heads"].values():
        assert head["samples"] == 4 and head["r2"] <= 1.0
        assert head["r2"] == pytest.approx(1.0 - head["mse"] / head["target_var"])
    with pytest.raises(UserError, match="not a MESSy student run"):
        from synesthesia.train.probe import messy_head_r2

        messy_head_r2(run_dir(tiny(shards, "train.stage=teacher"), out))
