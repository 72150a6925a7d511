"""The student export: plain timm weights and config (timm alone rebuilds it, exactly), the Hub
(save/from/push, the model card), ONNX (`synesthesia export --onnx`) and `torch.export`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors.torch import load_file, save_file

from synesthesia import UserError
from synesthesia.cli import main
from synesthesia.config import StudentConfig
from synesthesia.models.students import STUDENTS, Student, build_student
from synesthesia.train.export import export_student, load_student, push_to_hub
from synesthesia.train.samples import IMAGENET_MEAN, IMAGENET_STD

CLASSES, IMAGE = 3, 32
README = Path(__file__).resolve().parents[1] / "README.md"
INFO = {
    "dataset": "scenes",
    "class_names": ["street", "forest", "kitchen"],
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "method": "messy",
    "source": "latent",
    "modalities": ["depth", "audio"],
    "seed": 0,
    "val_accuracy": 0.75,
    "test_accuracy": 0.5,
}


def student(name: str = "vit_micro_test", seed: int = 0) -> Student:
    torch.manual_seed(seed)
    return build_student(StudentConfig(name=name), CLASSES, IMAGE).eval()


def rgb(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = student()
    return model, export_student(model, tmp_path_factory.mktemp("export") / "export", INFO)


@pytest.mark.parametrize("name", [*STUDENTS.names(), "test_vit", "test_resnet"])
def test_timm_alone_rebuilds_every_student_exactly(name, tmp_path):
    """architecture + model_args rebuild the backbone; both timm loading paths give its logits."""
    model = student(name)
    folder = export_student(model, tmp_path / "export", INFO)
    config = json.loads((folder / "config.json").read_text())
    weights = str(folder / "model.safetensors")
    arch, args = config["architecture"], config["model_args"]
    expected = model(rgb()).logits
    overlay = dict(config["pretrained_cfg"], file=weights)
    from_file = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **args).eval()
    torch.testing.assert_close(from_file(rgb()), expected)
    from_checkpoint = timm.create_model(arch, checkpoint_path=weights, **args).eval()
    torch.testing.assert_close(from_checkpoint(rgb()), expected)
    from_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    torch.testing.assert_close(from_folder(rgb()), expected)
    assert from_folder.pretrained_cfg["label_names"] == INFO["class_names"]
    assert tuple(from_folder.pretrained_cfg["mean"]) == IMAGENET_MEAN


def test_weights_are_the_timm_models_own_keys(exported):
    model, folder = exported
    saved = load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(model.model.state_dict())
    assert not any(key.startswith("model.") for key in saved)
    fresh = student(seed=1)
    timm.models.load_checkpoint(fresh.model, str(folder / "model.safetensors"), strict=True)
    torch.testing.assert_close(fresh(rgb()).logits, model(rgb()).logits)


def test_config_is_timms_with_the_preprocessing(exported):
    model, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["patch_size"] == 8 and config["model_args"]["depth"] == 3
    assert config["num_classes"] == CLASSES and config["label_names"] == INFO["class_names"]
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, IMAGE, IMAGE] and pcfg["num_classes"] == CLASSES
    assert pcfg["mean"] == list(IMAGENET_MEAN) and pcfg["std"] == list(IMAGENET_STD)
    assert pcfg["interpolation"] == "bilinear" and pcfg["crop_pct"] == 1.0
    # nothing of timm's own ImageNet weights for the architecture leaks in
    assert not {"tag", "hf_hub_id", "url", "license", "origin_url"} & set(pcfg)
    record = config["synesthesia"]
    assert record["student"] == model.config_dict() and record["test_accuracy"] == 0.5


def test_load_student_returns_the_student_and_it_exports(exported, tmp_path):
    """What load_student returns goes through torch.export: StudentOutput, or plain logits from .model."""
    model, folder = exported
    loaded = load_student(folder)
    expected = model(rgb()).logits
    torch.testing.assert_close(loaded(rgb()).logits, expected)
    program = torch.export.export(loaded, (rgb(),))
    torch.testing.assert_close(program.module()(rgb()).logits, expected)
    plain = torch.export.export(loaded.model, (rgb(),))
    torch.testing.assert_close(plain.module()(rgb()), expected)


def test_exports_from_before_the_timm_format_still_load(tmp_path):
    model = student()
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"student": model.config_dict(), "synesthesia_version": "0.1.0", "method": "ce"}
    (folder / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(load_student(folder)(rgb()).logits, model(rgb()).logits)
    # `synesthesia export` rewrites it in the timm format, which timm then loads
    assert main(["export", str(folder)]) == 0
    timm_model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    torch.testing.assert_close(timm_model(rgb()), model(rgb()).logits)


def test_save_and_from_pretrained_round_trip_locally_and_from_the_hub(exported, tmp_path, monkeypatch):
    model, folder = exported
    loaded = Student.from_pretrained(folder)
    again = loaded.save_pretrained(tmp_path / "again")  # keeps what it was loaded with
    assert json.loads((again / "config.json").read_text())["synesthesia"]["method"] == "messy"
    asked = []

    def snapshot_download(repo_id, revision=None, token=None):
        asked.append((repo_id, revision))
        return str(again)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    from_hub = Student.from_pretrained("user/scenes-student", revision="v1")
    assert asked == [("user/scenes-student", "v1")]
    torch.testing.assert_close(from_hub(rgb()).logits, model(rgb()).logits)
    with pytest.raises(UserError, match="not an exported student"):
        load_student(tmp_path)


def test_model_card(exported):
    _, folder = exported
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.license == "apache-2.0" and data.library_name == "timm"
    assert data.pipeline_tag == "image-classification"
    assert data.datasets == ["scenes"] and data.metrics == ["accuracy"]
    results = {r.dataset_split: r.metric_value for r in data.eval_results}
    assert results == {"validation": 0.75, "test": 0.5}
    assert f'timm.create_model("local-dir:{folder}"' in card.text
    assert "import synesthesia" not in card.text


def _run_snippet(code: str, folder: Path, source: str, where: Path) -> dict:
    """Run a usage snippet (timm only) against ``folder`` on a flat grey scene.png in ``where``."""
    Image.new("RGB", (2 * IMAGE, IMAGE), (128, 64, 32)).save(where / "scene.png")
    code = code.replace(source, f"local-dir:{folder}").replace('"scene.png"', repr(str(where / "scene.png")))
    namespace: dict = {}
    exec(compile(code, "snippet", "exec"), namespace)  # noqa: S102 - the documented code, as a user runs it
    return namespace


def _check_snippet_result(namespace: dict, model: Student) -> None:
    # a flat image: resizing and cropping keep it flat, so the input is exactly the normalised colour
    colour = torch.tensor([128, 64, 32]) / 255
    value = (colour - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    expected_input = value[None, :, None, None].expand(1, 3, IMAGE, IMAGE)
    torch.testing.assert_close(namespace["logits"], model(expected_input).logits)


def test_model_card_snippet_runs_with_timm_alone(exported, tmp_path, capsys):
    model, folder = exported
    text = (folder / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = _run_snippet(code, folder, f"local-dir:{folder}", tmp_path)
    _check_snippet_result(namespace, model)
    assert namespace["label"] in INFO["class_names"]


def test_readme_quick_start_snippet_runs(exported, tmp_path, capsys):
    model, folder = exported
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "local-dir:" in b)
    source = re.search(r'"(local-dir:[^"]+)"', code).group(1)
    _check_snippet_result(_run_snippet(code, folder, source, tmp_path), model)
    assert capsys.readouterr().out.strip() in INFO["class_names"]


def test_push_to_hub_uploads_the_export_with_a_hub_card(exported, tmp_path, monkeypatch):
    """Everything up to the upload: the repo, the files it is given, a card that loads hf-hub:<repo>."""
    model, folder = exported
    (folder / "notes.txt").write_text("not part of the model")
    calls = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None, **kwargs):
        files = {p.name: p for p in Path(folder_path).iterdir()}
        calls["upload_folder"] = {"repo_id": repo_id, "files": sorted(files), "message": commit_message}
        card = ModelCard.load(files["README.md"])
        assert 'timm.create_model("hf-hub:user/scenes-student", pretrained=True)' in card.text
        assert card.data.library_name == "timm"
        uploaded = timm.create_model(f"local-dir:{folder_path}", pretrained=True).eval()
        torch.testing.assert_close(uploaded(rgb()), model(rgb()).logits)
        return SimpleNamespace(commit_url="https://huggingface.co/user/scenes-student/commit/abc")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    commit = push_to_hub(folder, "user/scenes-student", private=True)
    assert commit.commit_url.endswith("/commit/abc")
    assert calls["create_repo"] == {"repo_id": "user/scenes-student", "private": True, "exist_ok": True}
    assert calls["upload_folder"]["files"] == ["README.md", "config.json", "model.safetensors"]
    # the folder's own card still points at the folder
    assert f"local-dir:{folder}" in (folder / "README.md").read_text()
    # and from a Student, through a temporary export
    calls.clear()
    load_student(folder).push_to_hub("user/scenes-student")
    assert calls["upload_folder"]["repo_id"] == "user/scenes-student"


@pytest.mark.parametrize("name", ["vit_micro_test", "cnn_micro_test"])
def test_cli_export_onnx_matches_torch(name, tmp_path, capsys):
    """`synesthesia export RUN --onnx`: model.onnx, logits only, any batch size, torch's outputs."""
    import onnxruntime

    model = student(name)
    run = tmp_path / "run"
    export_student(model, run / "export", INFO)
    assert main(["export", str(run), "--onnx"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["onnx_max_abs_diff"] < 1e-4 and "model.onnx" in result["files"]
    session = onnxruntime.InferenceSession(str(run / "export" / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 5):
        (logits,) = session.run(["logits"], {"pixel_values": rgb(batch).numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), model(rgb(batch)).logits, atol=1e-4, rtol=1e-4)


def test_cli_export_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("synesthesia export: error: ")
