"""``train.decoded_from=latents``: the decoded privileged source decoded from the latent set on the fly.

The fixture runs the real stage one (``shard.decode: true``) with the toy
generator twice over one tiny source set: ``toy-s2`` (two samples per input, one
key's latent NaN, hence flagged) and ``toy-s1`` (one sample per input). Decoding
on the fly must give what stage one wrote to ``decoded/<set>/``, key by key and
for the drawn sample. With S > 1 both ways draw one of the S per sample and
epoch, as the latent source does, and with ``train.augment=aligned`` (the
default) both crop and flip the signal as the sample's RGB was, so they give
the same batches and a teacher trained one way loads the other way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.stage2_shards import TINY_DECODED_TEACHER, write_tiny_dataset

from stage_one_toy import ToyConv, make_source  # registers the toy-conv generator
from synesthesia import UserError
from synesthesia.config import PipelineConfig, build, load_pipeline, replace
from synesthesia.generators.base import key_seed
from synesthesia.shards.reader import ErrorPolicy, iter_shard
from synesthesia.shards.schema import decode_npy
from synesthesia.shards.writer import Manifest
from synesthesia.stage_one import run_stage_one
from synesthesia.train import default_run_name, teacher_dir, train
from synesthesia.train.build import load_teacher
from synesthesia.train.data import build_loader
from synesthesia.train.evaluate import evaluate_model
from synesthesia.train.samples import _rng, apply_geometry
from synesthesia.train.sidecars import resolve_data

FLAGGED = "train_00002"  # its toy-s2 latent is NaN: stage one stores zeros and flags it


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    make_source(root, shards={"train": (2, 4), "val": (1, 4), "test": (1, 4)})
    gens = [
        {
            "name": "toy-conv",
            "modality": "depth",
            "set_name": "toy-s2",
            "samples_per_input": 2,
            "seed": 3,
            "options": {"nan_keys": [FLAGGED]},
        },
        {"name": "toy-conv", "modality": "depth", "set_name": "toy-s1"},
    ]
    cfg = build(
        PipelineConfig,
        {"dataset": "toy", "shard": {"generators": gens, "splits": ["train", "val", "test"], "decode": True}},
    )
    assert run_stage_one(cfg, root, progress=False).ok
    return root


def config(shards, *overrides, set_name="toy-s2"):
    return load_pipeline(
        None,
        [
            "dataset=toy",
            f"train.shards={shards}",
            "train.modalities=[depth]",
            f"train.latent_sets={{depth: {set_name}}}",
            "train.source=decoded",
            "train.num_workers=0",
            "train.batch_size=3",
            "train.seed=5",
            *overrides,
        ],
    )


def stored(directory: Path, field: str) -> dict[str, np.ndarray]:
    """Every sample's ``field`` of a set, by key, read straight from its shards."""
    out = {}
    for path in sorted(directory.glob("*.tar")):
        for sample in iter_shard(path, ErrorPolicy("raise")):
            out[sample["__key__"]] = decode_npy(sample[field])
    return out


def drawn(key: str, seed: int, epoch: int, augment: bool, samples: int) -> int:
    """The S index the latent source draws for ``key`` (after the augmentation's draw, if any)."""
    rng = _rng(key_seed(key, seed), epoch)
    if augment:
        rng.integers(2**62)
    return int(rng.integers(samples))


def test_on_the_fly_equals_stage_one_decoded_set(shards):
    cfg = config(shards, "train.decoded_from=latents")
    spec = resolve_data(cfg)
    side = spec.sidecars["depth"]
    assert side.on_the_fly and side.kind == "decoded" and side.directory.parent.name == "latents"
    assert side.generator["name"] == "toy-conv" and side.generator["samples_per_input"] == 2
    assert spec.teacher_modalities() == {"depth": {"kind": "decoded", "shape": [32, 32]}}
    expected = stored(shards / "toy" / "decoded" / "toy-s2", "depth.decoded.npy")
    assert all(a.shape == (2, 32, 32) for a in expected.values())
    flagged = Manifest.read(shards / "toy" / "latents" / "toy-s2").extra["flagged"]
    assert [k for k, _ in flagged["train"]] == [FLAGGED]

    for split, augment in (("train", True), ("val", False)):
        for epoch in (0, 1):
            loader = build_loader(spec, split, cfg.train)
            calls = ToyConv.decode_calls
            seen, indices, moved = 0, set(), 0
            for batch in loader.epoch(epoch):
                assert "raw_latents" not in batch and batch["latents"] == {}
                decoded = batch["decoded"]["depth"]
                assert decoded.dtype == torch.float32 and decoded.shape[1:] == (32, 32)
                assert not decoded.is_inference()
                for row, key in enumerate(batch["keys"]):
                    seen += 1
                    if key == FLAGGED:  # present=False: zeros
                        assert not batch["present"]["depth"][row] and not decoded[row].any()
                        continue
                    assert batch["present"]["depth"][row]
                    s = drawn(key, cfg.train.seed, epoch, augment, 2)
                    indices.add(s)
                    # the stored decoding, cropped and flipped as this sample's RGB (train.augment=aligned)
                    geometry = batch["geometry"][row : row + 1]
                    moved += int(not torch.equal(geometry, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]])))
                    want = apply_geometry(torch.from_numpy(expected[key]), geometry.expand(2, 5)).numpy()
                    # fp16 latents decoded in fp32 either way: equal up to float rounding
                    np.testing.assert_allclose(decoded[row].numpy(), want[s], rtol=1e-4, atol=1e-4)
                    # the other sample differs: a wrong draw would fail the comparison above
                    assert np.abs(want[1 - s] - want[s]).max() > 1e-2
            assert seen == spec.counts[split] and indices == {0, 1}
            assert moved > 0 if augment else moved == 0  # eval on square images: exactly as stored
            # one decode call per batch, the generator built once for the loader
            assert ToyConv.decode_calls - calls == loader.steps_per_epoch
            assert list(loader.decoder.generators) == ["depth"] and loader.decode_s > 0


def test_decoded_sidecars_draw_one_of_the_samples_like_on_the_fly(shards):
    """The decoded sidecars (S=2) give one signal per sample, the one decoding on the fly gives."""
    sidecar_cfg = config(shards)
    fly_cfg = config(shards, "train.decoded_from=latents")
    side = resolve_data(sidecar_cfg)
    assert side.sidecars["depth"].samples_per_input == 2 and not side.sidecars["depth"].on_the_fly
    assert side.teacher_modalities() == resolve_data(fly_cfg).teacher_modalities()
    assert side.teacher_modalities() == {"depth": {"kind": "decoded", "shape": [32, 32]}}

    def by_key(cfg) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        rows, geometry = {}, {}
        for batch in build_loader(resolve_data(cfg), "train", cfg.train).epoch(2):
            assert batch["decoded"]["depth"].shape[1:] == (32, 32)
            rows.update(zip(batch["keys"], batch["decoded"]["depth"], strict=True))
            geometry.update(zip(batch["keys"], batch["geometry"], strict=True))
        return rows, geometry

    # cropped and flipped alike: in the workers (sidecars) and after decoding the batch (on the fly)
    (from_sidecars, boxes), (on_the_fly, fly_boxes) = by_key(sidecar_cfg), by_key(fly_cfg)
    assert sorted(from_sidecars) == sorted(on_the_fly)
    assert all(torch.equal(boxes[k], fly_boxes[k]) for k in boxes)
    assert any(g[4] == 1 for g in boxes.values()) and any((g[2:4] < 1).any() for g in boxes.values())
    for key in from_sidecars:
        if key != FLAGGED:  # flagged: the sidecar holds the decoded zero latent, on the fly gives zeros
            torch.testing.assert_close(from_sidecars[key], on_the_fly[key], rtol=1e-4, atol=1e-4)


def test_workers_give_the_same_decoded_batches(shards):
    """Workers read and draw, the main process decodes: the signal of each key does not depend on them."""
    cfg = config(shards, "train.decoded_from=latents")
    spec = resolve_data(cfg)

    def by_key(num_workers: int) -> dict[str, torch.Tensor]:
        loader = build_loader(spec, "train", replace(cfg, [f"train.num_workers={num_workers}"]).train)
        rows = {}
        for batch in loader.epoch(1):
            rows.update(zip(batch["keys"], batch["decoded"]["depth"], strict=True))
        return rows

    inline, workers = by_key(0), by_key(2)
    assert sorted(inline) == sorted(workers) and len(inline) == spec.counts["train"]
    assert all(torch.equal(inline[k], workers[k]) for k in inline)


def test_teacher_trains_on_the_fly_and_loads_either_way(shards, tmp_path):
    common = [*TINY_DECODED_TEACHER, "train.batch_size=4"]
    sidecars = config(shards, *common, set_name="toy-s1")
    latents = config(shards, *common, "train.decoded_from=latents", set_name="toy-s1")
    assert resolve_data(latents).teacher_modalities() == resolve_data(sidecars).teacher_modalities()
    runs = tmp_path / "runs"
    teacher = train(replace(latents, ["train.stage=teacher"]), runs)
    assert teacher["run"].endswith("teacher-decoded-latents-s5") and teacher["decoded_from"] == "latents"
    steps = [
        json.loads(line)
        for line in (Path(teacher["run"]) / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["train/loss"] for r in steps if "train/loss" in r]
    assert len(losses) == teacher["steps"] == 2 and all(np.isfinite(losses))
    assert np.isfinite(teacher["test"]["loss"]) and teacher["test"]["samples"] == 4
    timing = teacher["timing"]
    assert 0 < timing["decode_s_per_step"] <= timing["data_s_per_step"]
    model = json.loads((Path(teacher["run"]) / "best" / "model.json").read_text())
    assert model["model"]["modalities"] == {"depth": {"kind": "decoded", "shape": [32, 32]}}
    # `synesthesia eval`'s path: the teacher evaluates on the decoded sidecars and decoded on the fly alike
    on_the_fly = evaluate_model(latents, teacher["run"])
    from_sidecars = evaluate_model(sidecars, teacher["run"])
    assert on_the_fly["samples"] == from_sidecars["samples"] == 4
    assert on_the_fly["accuracy"] == pytest.approx(from_sidecars["accuracy"])
    # and on the S=2 decoded sidecars, which draw one sample as decoding on the fly does
    loaded = load_teacher(Path(teacher["run"]), resolve_data(config(shards)))
    assert loaded.modalities["depth"]["shape"] == [32, 32]
    # a student decoding on the fly distils from the teacher that did (its default teacher run)
    student_cfg = replace(latents, ["method.name=kd"])
    assert teacher_dir(student_cfg, runs) == Path(teacher["run"])
    student = train(student_cfg, runs)
    assert student["run"].endswith("kd-decoded-latents-s5") and np.isfinite(student["test"]["loss"])
    assert student["timing"]["decode_s_per_step"] > 0


def test_bad_values_and_other_sources(shards, tmp_path):
    with pytest.raises(UserError) as err:
        resolve_data(config(shards, "train.decoded_from=fly"))
    message = str(err.value)
    assert "\n" not in message and "train.decoded_from" in message and "sidecars, latents" in message
    with pytest.raises(UserError, match="sidecars, latents"):  # refused before anything is written
        train(config(shards, "train.stage=teacher", "train.decoded_from=fly"), tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    # other sources read no decoded signals: decoded_from is ignored (documented), the data are the same
    for source in ("latent", "none"):
        plain = resolve_data(config(shards, f"train.source={source}"))
        ignored = resolve_data(config(shards, f"train.source={source}", "train.decoded_from=latents"))
        assert ignored == plain
    assert default_run_name(config(shards, "train.stage=teacher")) == "teacher-decoded-s5"
    assert default_run_name(config(shards, "train.decoded_from=latents")) == "ce-decoded-latents-s5"
    assert (
        default_run_name(config(shards, "train.source=latent", "train.decoded_from=latents"))
        == "ce-latent-s5"
    )
    # a latent set without the generator config that decodes it (not written by stage one)
    tiny = write_tiny_dataset(tmp_path / "tiny", counts={"train": 4, "val": 2, "test": 2})
    cfg = load_pipeline(
        None,
        [
            "dataset=tiny",
            f"train.shards={tiny}",
            "train.modalities=[depth]",
            "train.latent_sets={depth: gen-depth}",
            "train.source=decoded",
            "train.decoded_from=latents",
        ],
    )
    with pytest.raises(UserError, match="records no config.generator") as err:
        resolve_data(cfg)
    assert "\n" not in str(err.value)
