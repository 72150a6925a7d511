"""Every registered method: finite loss, gradients reach the student (and heads), never the teacher."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from synesthesia import UserError
from synesthesia.config import MethodConfig, StudentConfig, TeacherConfig
from synesthesia.methods import METHODS, MethodContext, build_method
from synesthesia.methods.base import masked_mse, matched_teacher_layer, resolve_layers
from synesthesia.models import MultimodalTeacher, TeacherOutput, build_student

IMAGE = 32
CLASSES = 4
MODALITIES = {
    "depth": {"kind": "spatial", "shape": [4, 4, 4]},
    "audio": {"kind": "codes", "shape": [2, 6], "vocab": 9},
}
LATENT_DIMS = {"depth": 64}


def make_teacher() -> MultimodalTeacher:
    torch.manual_seed(0)
    cfg = TeacherConfig(dim=32, depth=2, heads=2, patch_size=8, tokens_per_modality=3)
    return MultimodalTeacher(cfg, CLASSES, IMAGE, MODALITIES).eval()


def make_batch(batch: int = 4) -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "rgb": torch.rand(batch, 3, IMAGE, IMAGE, generator=g),
        "label": torch.arange(batch) % CLASSES,
        "latents": {
            "depth": torch.randn(batch, 4, 4, 4, generator=g),
            "audio": torch.randint(0, 9, (batch, 2, 6), generator=g),
        },
        "keys": [f"k{i}" for i in range(batch)],
    }


def make_context(student, teacher, modalities=("depth", "audio")) -> MethodContext:
    return MethodContext(
        num_classes=CLASSES,
        student_dims=student.feature_dims,
        student_depth=student.depth,
        teacher_dim=teacher.dim,
        teacher_depth=teacher.depth,
        modalities=tuple(modalities),
        latent_dims=LATENT_DIMS,
    )


def run_method(method_cfg: MethodConfig, student_name: str = "vit_micro_test", modalities=("depth", "audio")):
    """One training step's forward and backward, as the trainer does it."""
    torch.manual_seed(0)
    teacher = make_teacher()
    student = build_student(StudentConfig(name=student_name), CLASSES, IMAGE).train()
    method = build_method(method_cfg, make_context(student, teacher, modalities))
    batch = make_batch()
    teacher_out = teacher(batch["rgb"], batch["latents"], drop=False) if method.needs_teacher else None
    student_out = student(batch["rgb"], layers=method.student_layers())
    terms = method(student_out, teacher_out, batch)
    terms["loss"].backward()
    return teacher, student, method, terms


CASES = [
    ("ce", {}),
    ("kd", {}),
    ("hallucination", {}),
    ("messy", {}),
    ("messy", {"target": "latent"}),
]


def test_methods_are_registered():
    assert {name for name, _ in CASES} <= set(METHODS.names())
    for name, options in CASES:
        cfg = MethodConfig(name=name, options=options)
        expected = name in ("kd", "hallucination") or (name == "messy" and not options)
        assert METHODS.get(name).needs_teacher_for(cfg) is expected


@pytest.mark.parametrize("student_name", ["vit_micro_test", "cnn_micro_test"])
@pytest.mark.parametrize(("name", "options"), CASES)
def test_method_loss_and_gradients(name, options, student_name):
    modalities = ("depth",) if options.get("target") == "latent" else ("depth", "audio")
    cfg = MethodConfig(name=name, options=options)
    teacher, student, method, terms = run_method(cfg, student_name, modalities)
    assert method.needs_teacher == type(method).needs_teacher_for(cfg)
    assert "loss" in terms and terms["loss"].ndim == 0
    for key, value in terms.items():
        assert value.ndim == 0 and torch.isfinite(value), key
    # Gradients reach the student's first and last parameters.
    grads = [p.grad for p in student.parameters()]
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[-1] is not None and grads[-1].abs().sum() > 0
    # The method's own parameters (heads) are trained too.
    for pname, param in method.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname
    # The frozen teacher receives nothing from a student objective.
    assert all(p.grad is None for p in teacher.parameters())
    # Exporting the student carries no method state.
    student_keys = set(student.state_dict())
    assert not student_keys & {f"heads.{k}" for k in method.state_dict()}
    assert not any("heads" in k or "projection" in k for k in student_keys)


def test_named_terms():
    _, student, method, terms = run_method(MethodConfig(name="messy"))
    layers = method.student_layers()
    assert layers == [student.depth - 3, student.depth - 2, student.depth - 1]
    expected = {"loss", "ce", "kd", "messy"} | {
        f"{term}/l{i}/{m}" for term in ("messy", "messy_r2") for i in layers for m in ("depth", "audio")
    }
    assert set(terms) == expected
    assert len(method.heads) == len(layers) * 2
    total = sum(terms[f"messy/l{i}/{m}"] for i in layers for m in ("depth", "audio"))
    torch.testing.assert_close(terms["messy"], total)
    torch.testing.assert_close(terms["loss"], 0.25 * terms["ce"] + 0.75 * terms["kd"] + 1.0 * terms["messy"])
    _, _, method, terms = run_method(MethodConfig(name="hallucination", layers=[-1]))
    assert set(terms) == {"loss", "ce", "hallucination", "hallucination/l2/depth", "hallucination/l2/audio"}
    torch.testing.assert_close(terms["loss"], terms["ce"] + 10.0 * terms["hallucination"])


def test_messy_heads_absent_from_student_export():
    _, student, method, _ = run_method(MethodConfig(name="messy"))
    fresh = build_student(StudentConfig(name="vit_micro_test"), CLASSES, IMAGE)
    assert set(student.state_dict()) == set(fresh.state_dict())
    assert sum(p.numel() for p in method.parameters()) > 0
    head = method.heads["l2_depth"]
    assert [type(m).__name__ for m in head] == ["Linear", "GELU", "Linear"]
    assert head[0].out_features == 512 and head[2].out_features == 32


def test_exported_student_has_no_heads(tmp_path):
    """The deployable export (train.export) is the plain student: no heads, same predictions."""
    from safetensors.torch import load_file

    from synesthesia.train.export import export_student, load_student

    _, student, method, _ = run_method(MethodConfig(name="messy"))
    folder = export_student(student.eval(), tmp_path / "export", {"method": "messy"})
    saved = load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(student.model.state_dict())  # the timm model's own keys
    head_shapes = {tuple(p.shape) for p in method.parameters()}
    assert (512, 32) in head_shapes and not any(k.startswith("heads.") for k in saved)
    loaded = load_student(folder)
    rgb = make_batch()["rgb"]
    torch.testing.assert_close(loaded(rgb).logits, student(rgb).logits)


def test_kd_matches_the_formula():
    teacher_logits = torch.randn(5, CLASSES)
    student_logits = torch.randn(5, CLASSES)
    from synesthesia.methods.base import distillation_kl

    T = 2.0
    p_t = F.softmax(teacher_logits / T, dim=-1)
    manual = (p_t * (p_t.log() - F.log_softmax(student_logits / T, dim=-1))).sum(-1).mean() * T**2
    torch.testing.assert_close(distillation_kl(student_logits, teacher_logits, T), manual)
    assert distillation_kl(teacher_logits, teacher_logits, T).abs() < 1e-6
    _, _, _, terms = run_method(MethodConfig(name="kd", alpha=1.0))
    torch.testing.assert_close(terms["loss"], terms["ce"])


def test_messy_latent_target_needs_no_teacher():
    teacher = make_teacher()
    student = build_student(StudentConfig(name="vit_micro_test"), CLASSES, IMAGE)
    cfg = MethodConfig(name="messy", options={"target": "latent"})
    method = build_method(cfg, make_context(student, teacher, ("depth",)))
    assert not method.needs_teacher
    assert build_method(MethodConfig(name="messy"), make_context(student, teacher)).needs_teacher
    assert method.heads["l2_depth"][2].out_features == LATENT_DIMS["depth"]
    batch = make_batch()
    terms = method(student(batch["rgb"], layers=method.student_layers()), None, batch)
    assert "kd" not in terms and math.isfinite(float(terms["loss"].detach()))
    codes_ctx = dataclasses.replace(make_context(student, teacher, ("audio",)), latent_dims={"audio": 12})
    codes = build_method(cfg, codes_ctx)
    with pytest.raises(UserError, match="integer codes"):
        codes(student(batch["rgb"], layers=codes.student_layers()), None, batch)


def test_messy_distils_on_a_fixed_batch():
    """A few optimiser steps on student and heads reduce the MESSy loss against fixed teacher outputs."""
    teacher = make_teacher()
    torch.manual_seed(0)
    student = build_student(StudentConfig(name="vit_micro_test"), CLASSES, IMAGE).train()
    method = build_method(MethodConfig(name="messy"), make_context(student, teacher))
    batch = make_batch(8)
    g = torch.Generator().manual_seed(5)
    # A confident teacher with unit-scale tokens (an untrained one is near-uniform and near-zero).
    teacher_out = TeacherOutput(
        logits=3 * torch.randn(8, CLASSES, generator=g),
        hidden_states=[
            torch.randn(8, teacher.num_tokens, teacher.dim, generator=g) for _ in range(teacher.depth)
        ],
        spans=teacher.spans(),
    )
    optimiser = torch.optim.AdamW([*student.parameters(), *method.parameters()], lr=1e-3)
    history = []
    for _ in range(20):
        terms = method(student(batch["rgb"], layers=method.student_layers()), teacher_out, batch)
        optimiser.zero_grad()
        terms["loss"].backward()
        optimiser.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    assert history[-1]["loss"] < 0.85 * history[0]["loss"]
    assert history[-1]["kd"] < history[0]["kd"] and history[-1]["messy"] < history[0]["messy"]


def test_hallucination_projection():
    teacher = make_teacher()
    cnn = build_student(StudentConfig(name="cnn_micro_test"), CLASSES, IMAGE)  # widths 8..32 vs teacher 32
    method = build_method(MethodConfig(name="hallucination", layers=[0, -1]), make_context(cnn, teacher))
    assert list(method.parameters()) == []  # nothing learned between the two feature spaces
    matrix = method.projection_l0
    assert matrix.shape == (8, 32)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(8))  # an isometry
    assert not hasattr(method, "projection_l3")  # equal widths: matched directly
    with pytest.raises(UserError, match="needs equal widths"):
        build_method(
            MethodConfig(name="hallucination", layers=[0], options={"projection": "none"}),
            make_context(cnn, teacher),
        )


def test_layer_mapping_and_helpers():
    assert [matched_teacher_layer(i, 12, 12) for i in range(12)] == list(range(12))
    assert [matched_teacher_layer(i, 6, 2) for i in range(6)] == [0, 0, 0, 0, 1, 1]
    assert matched_teacher_layer(2, 3, 12) == 11 and matched_teacher_layer(0, 4, 2) == 0
    assert resolve_layers([-3, -1, 5], 6) == [3, 5]
    with pytest.raises(UserError, match="layers 0..5"):
        resolve_layers([6], 6)
    pred = torch.zeros(3, 2, requires_grad=True)
    target = torch.tensor([[1.0, 1.0], [3.0, 3.0], [0.0, 0.0]])
    assert float(masked_mse(pred, target, torch.tensor([True, False, True])).detach()) == pytest.approx(0.5)
    empty = masked_mse(pred, target, torch.zeros(3, dtype=torch.bool))
    empty.backward()
    assert float(empty.detach()) == 0.0 and pred.grad is not None


def test_method_config_errors():
    teacher = make_teacher()
    student = build_student(StudentConfig(name="vit_micro_test"), CLASSES, IMAGE)
    ctx = make_context(student, teacher)
    with pytest.raises(UserError, match="unknown method 'nope'"):
        build_method(MethodConfig(name="nope"), ctx)
    with pytest.raises(UserError, match="no option 'targt'"):
        build_method(MethodConfig(name="messy", options={"targt": "latent"}), ctx)
    with pytest.raises(UserError, match="alpha"):
        build_method(MethodConfig(name="kd", alpha=1.5), ctx)
    with pytest.raises(UserError, match="needs a trained teacher"):
        build_method(MethodConfig(name="kd"), ctx)(student(make_batch()["rgb"]), None, make_batch())


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
def test_messy_under_bf16_autocast(device):
    """Mixed precision as accelerate runs it: fp16 latents from the shards, bf16 autocast, fp32 terms."""
    teacher = make_teacher().to(device)
    student = build_student(StudentConfig(name="vit_micro_test"), CLASSES, IMAGE).to(device).train()
    method = build_method(MethodConfig(name="messy"), make_context(student, teacher)).to(device)
    batch = make_batch()
    batch["rgb"], batch["label"] = batch["rgb"].to(device), batch["label"].to(device)
    batch["latents"] = {
        "depth": batch["latents"]["depth"].half().to(device),
        "audio": batch["latents"]["audio"].to(device),
    }
    with torch.autocast(device, dtype=torch.bfloat16):
        with torch.no_grad():
            teacher_out = teacher(batch["rgb"], batch["latents"])
        terms = method(student(batch["rgb"], layers=method.student_layers()), teacher_out, batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert all(p.grad is not None for p in method.parameters())


def test_messy_batch_r2():
    from synesthesia.methods.base import masked_mse
    from synesthesia.methods.messy import batch_r2

    target = torch.randn(64, 8)
    perfect = batch_r2(masked_mse(target, target), target, None)
    mean = batch_r2(masked_mse(target.mean(0).expand_as(target), target), target, None)
    noisy = target + 0.5 * torch.randn_like(target)
    partial = batch_r2(masked_mse(noisy, target), target, None)
    assert perfect.item() == pytest.approx(1.0) and mean.item() == pytest.approx(0.0, abs=1e-6)
    assert 0.5 < partial.item() < 0.9
    # masked samples count neither in the error nor in the spread
    mask = torch.arange(64) < 32
    garbage = torch.where(mask[:, None], target, torch.full_like(target, 100.0))
    assert batch_r2(masked_mse(garbage, target, mask), target, mask).item() == pytest.approx(1.0)
