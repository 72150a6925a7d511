"""`synesthesia bootstrap` at tiny scale: paired shards → trained latent diffusion folders → stage-one generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synesthesia import UserError
from synesthesia.bootstrap import check_config, run_bootstrap
from synesthesia.config import BootstrapConfig, PipelineConfig, build, load_pipeline
from synesthesia.shards import Manifest, SplitWriter
from synesthesia.shards.schema import encode_json, encode_npy
from synesthesia.sources.signals import encode_flac, encode_png

N_PAIRS = 40
SIZE = 32


def make_paired_source(root, n=N_PAIRS, size=SIZE, rate=16000):
    """A paired split whose depth, audio and range image are functions of the RGB (so they are learnable)."""
    rng = np.random.default_rng(0)
    source = root / "toy" / "source"
    writer = SplitWriter(source, "paired", shard_size=16)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b = rng.uniform(0.2, 1.0, size=2)
        rgb = np.stack([a * xx, b * yy, 0.5 * (xx + yy) * a], axis=-1)
        depth = (1.0 + 6.0 * (a * xx + b * yy) / 2).astype(np.float32)
        t = np.arange(int(0.25 * rate)) / rate
        wave = 0.3 * np.sin(2 * np.pi * (200 + 800 * a) * t).astype(np.float32)
        lidar = np.full((16, 64), 2.0 + 20.0 * b, np.float32)
        lidar[:, : int(64 * a)] = 0.0
        writer.add(
            {
                "__key__": f"pair{i:04d}",
                "rgb.png": encode_png((rgb * 255).astype(np.uint8)),
                "cls": b"0",
                "json": encode_json({"audio_rate": rate}),
                "depth.npy": encode_npy(depth),
                "audio.flac": encode_flac(wave, rate),
                "lidar.npy": encode_npy(lidar),
            }
        )
    Manifest(kind="source", dataset="toy", splits={"paired": writer.close()}).write(source)
    return root


def tiny_pipeline(tmp_path, modalities, **overrides) -> PipelineConfig:
    bootstrap = {
        "modalities": modalities,
        "holdout": 8,
        "steps": 30,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 0,
        "block_channels": [16, 32],
        "norm_groups": 8,
        "inference_steps": 2,
        "encode_batch_size": 16,
        "work_dir": str(tmp_path / "runs"),
        "save_every": 10,
        "log_every": 10,
        "device": "cpu",
        "mapping": {
            m: v
            for m, v in {"audio": {"n_mels": 32, "frames": 32}, "lidar": {"size": [16, 64]}}.items()
            if m in modalities
        },
        **overrides,
    }
    return build(PipelineConfig, {"dataset": "toy", "bootstrap": bootstrap})


@pytest.fixture(scope="module")
def paired_root(tmp_path_factory):
    return make_paired_source(tmp_path_factory.mktemp("paired"))


@pytest.fixture(scope="module")
def trained(paired_root, tmp_path_factory, shared):
    tmp = tmp_path_factory.mktemp("models")
    cfg = tiny_pipeline(tmp, ["depth", "lidar"], ensemble=3)
    results = run_bootstrap(
        cfg, out=tmp / "models", shards=paired_root, command="synesthesia bootstrap tiny.yaml"
    )
    return cfg, tmp, results


def test_bootstrap_writes_marigold_layout_folders(trained):
    cfg, tmp, results = trained
    assert [r["name"] for r in results] == ["toy-depth", "toy-lidar"]
    for r in results:
        folder = tmp / "models" / r["name"]
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "SynesthesiaLatentDiffusion" and index["vae"] == "tae"
        assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (
            json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
            == "DDIMScheduler"
        )
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
        assert unet_cfg["in_channels"] == index["cond_shape"][0] + index["target_shape"][0] == 64
        quality = json.loads((folder / "quality.json").read_text())
        for key in (
            "latent_mse",
            "single_sample_latent_mse",
            "ensemble_latent_mse",
            "mean_latent_mse",
            "regression_latent_mse",
            "latent_cosine",
        ):
            assert np.isfinite(quality[key])
        # the headline is the 3-sample ensemble stage one writes; the one-sample number is kept
        assert index["ensemble"] == quality["ensemble"] == 3 and "mean of 3" in quality["latent_mse_is"]
        assert quality["latent_mse"] == quality["ensemble_latent_mse"] != quality["single_sample_latent_mse"]
        assert quality["beats_baselines"] == quality["ensemble_beats_baselines"]
        card = (folder / "README.md").read_text()
        assert "synesthesia bootstrap tiny.yaml" in card and "| latent MSE" in card
        assert "3-sample ensemble" in card and "1 sample" in card
        assert r["mb"] < 5.0 and not list(folder.rglob("*.bin"))
    depth = json.loads((tmp / "models" / "toy-depth" / "quality.json").read_text())
    assert 0 <= depth["delta1"] <= 1 and depth["abs_rel"] >= 0 and "vae_abs_rel" in depth
    lidar = json.loads((tmp / "models" / "toy-lidar" / "model_index.json").read_text())
    assert lidar["target_shape"] == [32, 2, 8] and lidar["cond_shape"] == [32, 4, 4]
    assert lidar["cond_resize"] == "bilinear"


def test_stage_one_generator_loads_bootstrap_model(trained, paired_root):
    from synesthesia.generators import GENERATORS
    from synesthesia.shards import iter_aligned

    _, tmp, _ = trained
    gen = GENERATORS.get("latent-diffusion")(
        modality="lidar", weights=str(tmp / "models" / "toy-lidar"), samples_per_input=2, seed=3
    )
    samples = list(iter_aligned(paired_root / "toy" / "source", split="paired"))[:3]
    batch = gen.collate([gen.preprocess(s) for s in samples])
    keys = [s["__key__"] for s in samples]
    out = gen.encode(batch, keys)
    assert out.shape == (3, 2, *gen.latent_spec().shape) == (3, 2, 32, 2, 8)
    assert not torch.equal(out[:, 0], out[:, 1])  # S samples differ
    single = gen.encode({"rgb": batch["rgb"][1:2]}, keys[1:2])
    torch.testing.assert_close(single[0], out[1], rtol=1e-4, atol=1e-4)  # independent of the batch
    decoded = gen.decode(out)
    assert decoded.shape == (3, 2, 16, 64) and decoded.dtype == torch.float32
    # ensemble N = 3 (the folder's default): output s is the mean of the key's draws 3s .. 3s+2
    assert gen.ensemble == 3 and gen.identity()["config"]["ensemble"] == 3
    plain = GENERATORS.get("latent-diffusion")(
        modality="lidar", weights=str(tmp / "models" / "toy-lidar"), samples_per_input=6, seed=3, ensemble=1
    ).encode(batch, keys)
    torch.testing.assert_close(out, plain.reshape(3, 2, 3, *plain.shape[2:]).mean(2), rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="generates 'lidar'"):
        GENERATORS.get("latent-diffusion")(modality="depth", weights=str(tmp / "models" / "toy-lidar"))


def test_quality_matches_what_stage_one_writes(trained, paired_root):
    """The report's held-out latents are exactly the generator's S=1 output: ensembled (default) and one draw."""
    from synesthesia.bootstrap import latent_metrics
    from synesthesia.generators import GENERATORS
    from synesthesia.generators.mappings import signal_from_sample, to_three_channels
    from synesthesia.generators.tae import load_taef2
    from synesthesia.shards import iter_aligned

    cfg, tmp, results = trained
    gen = GENERATORS.get("latent-diffusion")(modality="depth", weights=str(tmp / "models" / "toy-depth"))
    samples = list(iter_aligned(paired_root / "toy" / "source", split="paired"))[-cfg.bootstrap.holdout :]
    batch = gen.collate([gen.preprocess(s) for s in samples])
    pred = gen.encode(batch, [s["__key__"] for s in samples])
    encoder, _ = load_taef2()
    images = np.stack([to_three_channels("depth", signal_from_sample("depth", s)) for s in samples])
    true = encoder(torch.from_numpy(images))
    mse = latent_metrics(pred, true)["mse"]
    assert mse == pytest.approx(results[0]["latent_mse"], rel=1e-3)
    one = GENERATORS.get("latent-diffusion")(
        modality="depth", weights=str(tmp / "models" / "toy-depth"), ensemble=1
    ).encode(batch, [s["__key__"] for s in samples])
    mse = latent_metrics(one, true)["mse"]
    assert mse == pytest.approx(results[0]["single_sample_latent_mse"], rel=1e-3)


def test_resume_continues_exactly(paired_root, tmp_path, shared):
    """A run stopped after a checkpoint and resumed gives the same weights as one uninterrupted run,
    from checkpoints that hold no pickle and a resume that unpickles nothing."""
    from synesthesia.bootstrap import build_codec, encode_pairs, train_unet

    cfg = tiny_pipeline(tmp_path, ["depth"], steps=12, save_every=6).bootstrap
    codec = build_codec(cfg)
    pairs, _ = encode_pairs(paired_root / "toy" / "source", cfg, codec, torch.device("cpu"))
    idx = torch.arange(32)
    full, info = train_unet(cfg, pairs["depth"], idx, "diffusion", tmp_path / "run", 12, torch.device("cpu"))
    assert info["resumed_from"] == 0  # it left a checkpoint at step 6: rerunning resumes there
    saved = {p.suffix for p in (tmp_path / "run" / "checkpoints").rglob("*") if p.is_file()}
    assert saved <= {".safetensors", ".json"}, saved  # no pickle: a shared work_dir runs no code
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a resume must not unpickle")

    with pytest.MonkeyPatch.context() as patch:
        for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
            patch.setattr(target, name, refuse)
        resumed, info = train_unet(
            cfg, pairs["depth"], idx, "diffusion", tmp_path / "run", 12, torch.device("cpu")
        )
    assert info["resumed_from"] == 6
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_flow_matching_and_own_vae(paired_root, tmp_path):
    """Flow matching with a diffusers AutoencoderKL saved inside the folder (no TAEF2 needed)."""
    from diffusers import AutoencoderKL

    from synesthesia.generators import GENERATORS

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vae.save_pretrained(tmp_path / "vae")
    cfg = tiny_pipeline(
        tmp_path,
        ["audio"],
        vae=str(tmp_path / "vae"),
        scheduler="flow",
        steps=10,
        regression_steps=5,
        holdout=4,
    )
    (result,) = run_bootstrap(cfg, out=tmp_path / "models", shards=paired_root)
    folder = tmp_path / "models" / "toy-audio"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"] == "vae" and index["prediction_type"] == "flow" and index["target_shape"] == [4, 4, 4]
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    gen = GENERATORS.get("latent-diffusion")(modality="audio", weights=str(folder))
    rgb = torch.rand(2, 3, SIZE, SIZE)
    a = gen.encode({"rgb": rgb}, ["k1", "k2"])
    b = gen.encode({"rgb": rgb}, ["k1", "k2"])
    assert a.shape == (2, 4, 4, 4) and torch.equal(a, b)
    assert gen.decode(a).shape == (2, 32, 32)  # log-mel dB image


def test_config_errors():
    base = BootstrapConfig()
    check_config(base)
    bad = [
        ({"scheduler": "euler"}, "bootstrap.scheduler"),
        ({"modalities": ["rgb"]}, "cannot train a generator for 'rgb'"),
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"mapping": {"depth": {"nearr": 1}}}, "unknown depth mapping option"),
        ({"block_channels": [30, 64]}, "multiples of norm_groups"),
        ({"holdout": 0}, "holdout"),
        ({"ensemble": 0}, "bootstrap.ensemble"),
    ]
    for change, message in bad:
        cfg = build(BootstrapConfig, {**{k: getattr(base, k) for k in ("modalities",)}, **change})
        with pytest.raises(UserError, match=message):
            check_config(cfg)


def test_cli_reports_missing_source(tmp_path, capsys):
    from synesthesia.cli import main

    (tmp_path / "p.yaml").write_text("dataset: nothing\nbootstrap: {modalities: [depth]}\n")
    assert main(["bootstrap", str(tmp_path / "p.yaml"), "steps=5", "--shards", str(tmp_path)]) == 2
    assert "no source set" in capsys.readouterr().err


def test_repo_pipeline_file_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "pipelines" / "bootstrap-scenes.yaml"
    cfg = load_pipeline(path)
    check_config(cfg.bootstrap)
    assert cfg.dataset == "scenes" and cfg.bootstrap.split == "paired"


def test_committed_models_match_their_reports():
    """Each committed demo generator is ≤ 5 MB, loads in stage one and its report says it beats both baselines."""
    from pathlib import Path

    from synesthesia.generators import GENERATORS

    models = Path(__file__).resolve().parents[1] / "models"
    folders = sorted(p for p in models.iterdir() if (p / "model_index.json").is_file())
    assert folders, "no committed generators under models/"
    for folder in folders:
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
        index = json.loads((folder / "model_index.json").read_text())
        quality = json.loads((folder / "quality.json").read_text())
        assert size <= 5.0, folder
        assert quality["latent_mse"] < min(quality["regression_latent_mse"], quality["mean_latent_mse"])
        assert quality["beats_baselines"] and "single_sample_latent_mse" in quality
        assert "/tmp/" not in index["training"]["source"] and "/tmp/" not in index["training"]["command"]
        gen = GENERATORS.get("latent-diffusion")(modality=index["modality"], weights=str(folder))
        assert gen.ensemble == quality["ensemble"] and gen.latent_spec().shape == tuple(index["target_shape"])
