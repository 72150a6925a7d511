"""The multimodal teacher (spans, null tokens, modality dropout, checkpoints) and the timm students."""

from __future__ import annotations

import json

import pytest
import torch

from synesthesia import UserError
from synesthesia.config import MethodConfig, StudentConfig, TeacherConfig
from synesthesia.methods import MethodContext, build_method
from synesthesia.models import MultimodalTeacher, Student, build_student

IMAGE = 32
CLASSES = 5
MODALITIES = {
    "depth": {"kind": "spatial", "shape": [8, 4, 4]},
    "points": {"kind": "tokens", "shape": [6, 5]},
    "audio": {"kind": "codes", "shape": [2, 5], "vocab": 11},
    "lidar": {"kind": "decoded", "shape": [16, 32]},
}


def tiny_teacher(**overrides) -> MultimodalTeacher:
    cfg = TeacherConfig(dim=32, depth=2, heads=2, patch_size=8, tokens_per_modality=4, **overrides)
    torch.manual_seed(0)
    return MultimodalTeacher(cfg, CLASSES, IMAGE, MODALITIES)


def tiny_inputs(batch: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    rgb = torch.rand(batch, 3, IMAGE, IMAGE, generator=g)
    inputs = {
        "depth": torch.randn(batch, 8, 4, 4, generator=g),
        "points": torch.randn(batch, 6, 5, generator=g),
        "audio": torch.randint(0, 11, (batch, 2, 5), generator=g),
        "lidar": torch.rand(batch, 16, 32, generator=g) * 40.0,  # metres, far from unit scale
    }
    return rgb, inputs


# ----------------------------------------------------------------------------- teacher


def test_teacher_shapes_and_spans():
    teacher = tiny_teacher().eval()
    rgb, inputs = tiny_inputs()
    out = teacher(rgb, inputs)
    assert out.logits.shape == (3, CLASSES)
    assert len(out.hidden_states) == 2
    num_patches = (IMAGE // 8) ** 2
    expected_tokens = 1 + num_patches + len(MODALITIES) * (1 + 4)
    assert teacher.num_tokens == expected_tokens
    for hidden in out.hidden_states:
        assert hidden.shape == (3, expected_tokens, 32)
    assert out.spans["rgb"] == (1, 1 + num_patches)
    previous_end = out.spans["rgb"][1]
    for name in MODALITIES:  # in declaration order, each after its separator
        start, end = out.spans[name]
        assert start == previous_end + 1 and end - start == 4
        previous_end = end
    assert previous_end == expected_tokens
    assert out.modality_tokens(-1, "audio").shape == (3, 4, 32)
    assert out.modality_feature(0, "lidar").shape == (3, 32)
    assert all(mask.all() for mask in out.present.values())


def test_adapter_token_counts():
    teacher = tiny_teacher()
    counts = {name: adapter.num_tokens for name, adapter in teacher.adapters.items()}
    assert counts["depth"] == 16  # 4×4 latent, patch 1
    assert counts["points"] == 6
    assert counts["audio"] == 5  # one token per time step, codebooks summed
    assert counts["lidar"] <= teacher.cfg.decoded_max_tokens
    assert tiny_teacher(latent_patch_size=2).adapters["depth"].num_tokens == 4


def test_missing_modality_uses_its_null_tokens():
    teacher = tiny_teacher().eval()
    rgb, inputs = tiny_inputs()
    partial = {k: v for k, v in inputs.items() if k != "points"}
    out_missing = teacher(rgb, partial)
    assert not out_missing.present["points"].any()
    assert out_missing.present["depth"].all()
    # Given but marked absent for every sample: the same null tokens stand in.
    out_masked = teacher(rgb, inputs, present={"points": torch.zeros(3, dtype=torch.bool)})
    torch.testing.assert_close(out_missing.logits, out_masked.logits)
    # The real tokens differ from the nulls, and the nulls are what is used when missing.
    assert not torch.allclose(teacher(rgb, inputs).logits, out_missing.logits)
    with torch.no_grad():
        teacher.null_tokens["points"].add_(torch.randn(1, 4, 32))
    assert not torch.allclose(teacher(rgb, partial).logits, out_missing.logits)
    # Nothing given at all: RGB plus every modality's nulls.
    assert teacher(rgb, {}).logits.shape == (3, CLASSES)


def test_modality_dropout_only_in_training_mode():
    teacher = tiny_teacher(modality_dropout=1.0, adapter_dropout=0.0)
    rgb, inputs = tiny_inputs()
    teacher.train()
    assert not any(mask.any() for mask in teacher(rgb, inputs).present.values())
    assert all(mask.all() for mask in teacher(rgb, inputs, drop=False).present.values())
    teacher.eval()
    assert all(mask.all() for mask in teacher(rgb, inputs).present.values())
    assert not any(mask.any() for mask in teacher(rgb, inputs, drop=True).present.values())
    # Training with every modality dropped equals evaluation with none given.
    torch.testing.assert_close(teacher(rgb, inputs, drop=True).logits, teacher(rgb, {}).logits)


def test_modality_dropout_is_per_sample():
    teacher = tiny_teacher(modality_dropout=0.5).train()
    torch.manual_seed(0)
    rgb, inputs = tiny_inputs(batch=24)
    kept = teacher(rgb, inputs).present["depth"]
    assert 0 < int(kept.sum()) < 24


def test_teacher_gradients_reach_every_adapter():
    teacher = tiny_teacher().train()
    rgb, inputs = tiny_inputs()
    out = teacher(rgb, inputs, drop=False)
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2])).backward()
    for name in MODALITIES:
        grads = [p.grad for p in teacher.adapters[name].parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert teacher.null_tokens["depth"].grad is None or teacher.null_tokens["depth"].grad.abs().sum() == 0


def test_teacher_rejects_bad_inputs():
    teacher = tiny_teacher().eval()
    rgb, inputs = tiny_inputs()
    with pytest.raises(UserError, match="no modality 'radar'"):
        teacher(rgb, {"radar": torch.zeros(3, 4)})
    with pytest.raises(UserError, match="expected shape"):
        teacher(rgb, {"depth": torch.zeros(3, 8, 5, 4)})
    with pytest.raises(UserError, match="integers"):
        teacher(rgb, {"audio": inputs["audio"].float()})
    with pytest.raises(UserError, match="unknown kind"):
        MultimodalTeacher(
            TeacherConfig(dim=32, depth=1, heads=2), 2, IMAGE, {"x": {"kind": "voxels", "shape": [1]}}
        )
    with pytest.raises(UserError, match="vocab"):
        MultimodalTeacher(
            TeacherConfig(dim=32, depth=1, heads=2), 2, IMAGE, {"x": {"kind": "codes", "shape": [2, 3]}}
        )
    with pytest.raises(UserError, match="divisible"):
        MultimodalTeacher(TeacherConfig(dim=30, depth=1, heads=4), 2, IMAGE, {})


def test_teacher_config_round_trip(tmp_path):
    teacher = tiny_teacher().eval()
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps(teacher.config_dict()))
    rebuilt = MultimodalTeacher.from_config_dict(json.loads(path.read_text())).eval()
    rebuilt.load_state_dict(teacher.state_dict())
    rgb, inputs = tiny_inputs()
    torch.testing.assert_close(rebuilt(rgb, inputs).logits, teacher(rgb, inputs).logits)


# ----------------------------------------------------------------------------- students


@pytest.mark.parametrize(
    "name", ["vit_micro_test", "cnn_micro_test", "resnet_scenes", "test_vit", "test_resnet"]
)
def test_student_forward_with_layers(name):
    torch.manual_seed(0)
    student = build_student(StudentConfig(name=name), CLASSES, IMAGE).eval()
    rgb = torch.rand(2, 3, IMAGE, IMAGE)
    assert student.depth == len(student.feature_dims) >= 2
    out = student(rgb, layers=[0, -1])
    assert out.logits.shape == (2, CLASSES)
    assert sorted(out.features) == [0, student.depth - 1]
    for layer, feature in out.features.items():
        assert feature.shape == (2, student.feature_dims[layer])
    # the same layers as token sequences (B, N, D_l), from the same forward_intermediates call
    assert sorted(out.tokens) == [0, student.depth - 1]
    for layer, tokens in out.tokens.items():
        assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[2] == student.feature_dims[layer]
    plain = student(rgb)
    assert plain.features == {} and plain.tokens == {}
    torch.testing.assert_close(plain.logits, out.logits)


def test_student_tokens_are_patch_tokens_and_flattened_maps():
    rgb = torch.rand(2, 3, IMAGE, IMAGE)
    vit = build_student(StudentConfig(name="vit_micro_test"), CLASSES, IMAGE).eval()
    captured = {}
    vit.model.blocks[0].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    out = vit(rgb, layers=[0])
    prefix = vit.model.num_prefix_tokens
    assert out.tokens[0].shape == (2, (IMAGE // 8) ** 2, 32)  # CLS excluded
    torch.testing.assert_close(out.tokens[0], captured["x"][:, prefix:])
    cnn = build_student(StudentConfig(name="cnn_micro_test"), CLASSES, IMAGE).eval()
    _, maps = cnn.model.forward_intermediates(rgb, indices=[1])
    out = cnn(rgb, layers=[1])
    torch.testing.assert_close(out.tokens[1], maps[0].flatten(2).transpose(1, 2))
    torch.testing.assert_close(out.features[1], out.tokens[1].mean(dim=1))


def test_vit_student_features_are_the_cls_token():
    student = build_student(StudentConfig(name="vit_micro_test"), CLASSES, IMAGE).eval()
    rgb = torch.rand(2, 3, IMAGE, IMAGE)
    captured = {}
    student.model.blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    out = student(rgb, layers=[1])
    torch.testing.assert_close(out.features[1], captured["x"][:, 0])


def test_student_config_round_trip_and_errors():
    student = build_student(StudentConfig(name="cnn_micro_test"), CLASSES, IMAGE).eval()
    rebuilt = Student.from_config_dict(json.loads(json.dumps(student.config_dict()))).eval()
    rebuilt.load_state_dict(student.state_dict())
    rgb = torch.rand(2, 3, IMAGE, IMAGE)
    torch.testing.assert_close(rebuilt(rgb).logits, student(rgb).logits)
    with pytest.raises(UserError, match="unknown student 'no_such_net'"):
        build_student(StudentConfig(name="no_such_net"), CLASSES, IMAGE)
    with pytest.raises(UserError, match="no pretrained weights"):
        build_student(StudentConfig(name="vit_micro_test", pretrained=True), CLASSES, IMAGE)
    with pytest.raises(UserError, match="has layers 0..2"):
        build_student(StudentConfig(name="vit_micro_test"), CLASSES, IMAGE)(rgb, layers=[3])


def test_vit_tiny_scenes_shape():
    student = build_student(StudentConfig(name="vit_tiny_scenes"), 10, 64)
    assert student.depth == 6 and set(student.feature_dims.values()) == {192}
    assert student.model.patch_embed.num_patches == 64


def test_teacher_layers_keeps_only_the_requested_hidden_states():
    cfg = TeacherConfig(dim=32, depth=3, heads=2, tokens_per_modality=4)
    teacher = MultimodalTeacher(cfg, 5, 32, {"depth": {"kind": "spatial", "shape": [4, 4, 4]}}).eval()
    rgb, inputs = torch.randn(2, 3, 32, 32), {"depth": torch.randn(2, 4, 4, 4)}
    full = teacher(rgb, inputs)
    some = teacher(rgb, inputs, layers=[-1, 0])
    assert [h is None for h in some.hidden_states] == [False, True, False]
    torch.testing.assert_close(some.logits, full.logits)
    torch.testing.assert_close(some.modality_feature(-1, "depth"), full.modality_feature(-1, "depth"))
    torch.testing.assert_close(some.hidden_states[0], full.hidden_states[0])
    with pytest.raises(UserError, match="out of range"):
        teacher(rgb, inputs, layers=[3])


def test_messy_names_the_teacher_layers_it_reads():
    ctx = MethodContext(
        num_classes=5,
        student_dims={0: 8, 1: 8, 2: 8},
        student_depth=3,
        teacher_dim=32,
        teacher_depth=6,
        modalities=("depth",),
    )
    messy = build_method(MethodConfig(name="messy"), ctx)
    assert messy.teacher_layers() == [1, 3, 5]
    latent = build_method(
        MethodConfig(name="messy", options={"target": "latent"}),
        MethodContext(**{**ctx.__dict__, "latent_dims": {"depth": 16}}),
    )
    assert latent.teacher_layers() == []
