"""Teacher objectives (modalimmune, basis-realloc) trained through ``synesthesia train``.

Each trains a tiny teacher for a couple of optimizer steps through ``train()``:
finite losses, gradients reaching the teacher and the objective's own
parameters on the step where ``after_backward`` runs, the run folder beside the
plain teacher's, the robustness report and collapse diagnostics in
metrics.json, ``synesthesia eval`` through the objective's ``predict``, and a
student distilled from the objective's teacher.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.stage2_shards import TINY_TRAIN, write_tiny_dataset

from synesthesia import UserError
from synesthesia.cli import main
from synesthesia.config import load_pipeline
from synesthesia.methods.basis_realloc import BasisReallocation
from synesthesia.methods.modalimmune import ModalImmune
from synesthesia.train import run_dir, teacher_dir, train
from synesthesia.train.build import load_teacher, load_teacher_objective
from synesthesia.train.sidecars import resolve_data

TINY = [*TINY_TRAIN, "train.epochs=1", "train.log_with=jsonl"]
CONDITIONS = {
    "full",
    "removed/all",
    *(f"{kind}/{m}" for kind in ("removed", "corrupted", "shuffled") for m in ("depth", "audio")),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_dataset(
        tmp_path_factory.mktemp("shards"), counts={"train": 8, "val": 4, "test": 4}, shard_size=4
    )


def tiny(shards, *overrides):
    return load_pipeline(None, [*TINY, f"train.shards={shards}", *overrides])


def spy_after_backward(monkeypatch, cls) -> list[dict]:
    """Wrap ``cls.after_backward``: record, when the trainer calls it, which parameters hold gradients."""
    calls: list[dict] = []
    original = cls.after_backward

    def after_backward(self, teacher):
        def nonzero(module):
            return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

        calls.append({"teacher": nonzero(teacher), "method": nonzero(self)})
        return original(self, teacher)

    monkeypatch.setattr(cls, "after_backward", after_backward)
    return calls


def logged(run) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def check_report(metrics: dict) -> None:
    assert set(metrics["robustness"]) == CONDITIONS
    assert all(0.0 <= v <= 1.0 for v in metrics["robustness"].values())
    assert metrics["robustness"]["full"] == pytest.approx(metrics["test"]["accuracy"])
    diag = metrics["diagnostics"]
    assert {"contribution/depth", "contribution/audio", "fusion_stable_rank", "fusion_effective_rank"} <= set(
        diag
    )
    assert all(math.isfinite(v) for v in diag.values())


def test_modalimmune_trains_the_teacher(shards, tmp_path, monkeypatch):
    calls = spy_after_backward(monkeypatch, ModalImmune)
    options = "method.options={hyper_every: 2, meta_fraction: 0.5, mask_warmup: 1, power_iters: 1, neumann_terms: 1}"
    cfg = tiny(shards, "train.stage=teacher", "method.name=modalimmune", options)
    metrics = train(cfg, tmp_path)
    run = run_dir(cfg, tmp_path)
    assert run.name == "teacher-modalimmune-latent-s0" and metrics["method"] == "modalimmune"
    # after_backward ran on every optimizer step, with the teacher's gradients in place
    assert len(calls) == metrics["steps"] == 2
    for call in calls:
        assert any(n.startswith("blocks.") for n in call["teacher"]) and "head.weight" in call["teacher"]
        assert {"adapters.depth", "adapters.audio"} <= {".".join(n.split(".")[:2]) for n in call["teacher"]}
    steps = [r for r in logged(run) if "train/loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["train/loss"]) for r in steps)
    assert all("train/mask_fraction" in r and "train/collapse" in r for r in steps)
    assert "train/hypergrad" in steps[1]  # hyper_every=2: the Neumann hypergradient ran on step 2
    check_report(metrics)
    assert "lambda" in metrics["diagnostics"]
    # the objective's state (λ, controller scores) is saved beside the teacher and reloads
    teacher, method = load_teacher_objective(run)
    assert isinstance(method, ModalImmune) and int(method.step) == 2
    assert method.lam == pytest.approx(metrics["diagnostics"]["lambda"], rel=1e-5)


def test_basis_realloc_beside_the_plain_teacher_and_a_student_from_it(shards, tmp_path, monkeypatch, capsys):
    plain = train(tiny(shards, "train.stage=teacher"), tmp_path)
    assert "robustness" in plain and set(plain["robustness"]) == CONDITIONS
    calls = spy_after_backward(monkeypatch, BasisReallocation)
    cfg = tiny(shards, "train.stage=teacher", "method.name=basis-realloc")
    metrics = train(cfg, tmp_path)
    run = run_dir(cfg, tmp_path)
    assert run.name == "teacher-basis-realloc-latent-s0"
    assert (run.parent / "teacher-latent-s0" / "best" / "model.safetensors").is_file()  # both coexist
    # the fusion head, decoders, encoders and discriminator train with the teacher
    assert len(calls) == 2
    prefixes = {n.split(".")[0] for n in calls[0]["method"]}
    assert prefixes == {"encoders", "decoders", "discriminator", "fusion"}
    assert "head.weight" in calls[0]["teacher"]
    check_report(metrics)
    assert metrics["robustness_plain_teacher"] == plain["robustness"]
    assert {"fusion_head/weight_share/depth", "g_stable_rank/audio"} <= set(metrics["diagnostics"])
    # val/test go through the objective's predict (the fusion head); `synesthesia eval` agrees
    teacher, method = load_teacher_objective(run)
    assert isinstance(method, BasisReallocation)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: pipeline\n")
    assert main(["eval", str(pipeline), *TINY, f"train.shards={shards}", "--model", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert result["missing"] == pytest.approx(metrics["test_missing"])
    # a student picks this teacher by its run name; load_teacher reads the teacher alone
    student_cfg = tiny(shards, "method.name=kd", "train.teacher=teacher-basis-realloc-latent-s0")
    assert teacher_dir(student_cfg, tmp_path) == run
    frozen = load_teacher(run, resolve_data(student_cfg))
    assert all(
        torch.equal(a, b)
        for a, b in zip(frozen.state_dict().values(), teacher.state_dict().values(), strict=True)
    )
    student = train(student_cfg, tmp_path)
    assert math.isfinite(student["test"]["loss"]) and student["timing"]["teacher_forward_s_per_step"] > 0


def test_teacher_objective_stage_errors(shards, tmp_path):
    with pytest.raises(UserError, match="teacher objective"):
        train(tiny(shards, "method.name=modalimmune"), tmp_path)
