import json

import pytest

from synesthesia import UserError
from synesthesia.config import (
    GeneratorConfig,
    PipelineConfig,
    config_hash,
    load_pipeline,
    replace,
    to_dict,
    write_resolved,
    written_config,
)


def write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_defaults_and_name_from_file(tmp_path):
    cfg = load_pipeline(write(tmp_path, "seed: 3\n"))
    assert isinstance(cfg, PipelineConfig)
    assert cfg.seed == 3 and cfg.name == "p"


def test_nested_lists_of_dataclasses_and_overrides(tmp_path):
    path = write(tmp_path, "shard:\n  generators:\n    - {name: tae, modality: depth}\n")
    cfg = load_pipeline(path, ["shard.generators.0.modality=audio", "train.lr=0.5", "stage=teacher"], "train")
    assert isinstance(cfg.shard.generators[0], GeneratorConfig)
    assert cfg.shard.generators[0].modality == "audio"
    assert cfg.train.lr == 0.5 and cfg.train.stage == "teacher"


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("trian: {}\n", [], "unknown key trian"),
        ("train: {lrr: 1}\n", [], "valid keys of train"),
        ("", ["train.epochs=abc"], "expected an integer"),
        ("", ["train.augment=3"], "expected a string"),
        ("", ["train.lr"], "key.sub=value"),
        ("- a\n", [], "mapping"),
        ("shard: {generators: []}\n", ["shard.generators.2.name=x"], "not an index"),
    ],
)
def test_mistakes_are_one_line_user_errors(tmp_path, text, overrides, message):
    with pytest.raises(UserError, match=message) as info:
        load_pipeline(write(tmp_path, text), overrides)
    assert "\n" not in str(info.value)


def test_hash_is_stable_and_sensitive():
    a = PipelineConfig()
    assert config_hash(a) == config_hash(PipelineConfig())
    assert config_hash(a) != config_hash(replace(a, ["train.lr=0.1"]))


def test_legacy_bool_augment_still_reads():
    """``train.augment`` was a bool: a run's written config with one still reads (train/samples.py
    takes true as rgb, false as none) and hashes unlike the new default, aligned."""
    written = to_dict(PipelineConfig())
    written["train"]["augment"] = True
    ran = written_config(written)
    assert ran is not None and ran.train.augment is True
    assert config_hash(ran) != config_hash(PipelineConfig())
    assert PipelineConfig().train.augment == "aligned"
    assert load_pipeline(None, ["train.augment=false"]).train.augment is False
    assert load_pipeline(None, ["train.augment=rgb"]).train.augment == "rgb"


def test_write_resolved(tmp_path):
    out = write_resolved(PipelineConfig(), tmp_path)
    data = json.loads(out.read_text())
    assert data["config"]["train"]["stage"] == "student"
    assert data["config_hash"] == config_hash(PipelineConfig())
    assert not list(tmp_path.glob("*.tmp"))
