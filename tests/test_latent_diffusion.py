"""The `latent-diffusion` generator on a tiny random-init Marigold saved with save_pretrained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synesthesia import UserError
from synesthesia.generators import GENERATORS
from synesthesia.sources.signals import encode_png


def save_tiny_marigold(folder, scheduler_name="DDIMScheduler"):
    """A Marigold depth checkpoint in the real layout, with tiny random weights."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.18215,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=4,
    )
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5, "ab</w>": 6}
    (folder / "tok-src").mkdir(parents=True)
    (folder / "tok-src" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tok-src" / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    tokenizer = CLIPTokenizer(
        vocab_file=str(folder / "tok-src" / "vocab.json"),
        merges_file=str(folder / "tok-src" / "merges.txt"),
        model_max_length=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = getattr(diffusers, scheduler_name)(
        num_train_timesteps=100, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    pipe = diffusers.MarigoldDepthPipeline(
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        prediction_type="depth",
        default_denoising_steps=2,
        default_processing_resolution=32,
    )
    pipe.save_pretrained(folder / "marigold", safe_serialization=True)
    return folder / "marigold", pipe


def rgb_sample(key, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return {"__key__": key, "rgb.png": encode_png(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))}


@pytest.fixture(scope="module")
def marigold(tmp_path_factory):
    return save_tiny_marigold(tmp_path_factory.mktemp("marigold"))


def make(folder, **kw):
    kw.setdefault("modality", "depth")
    return GENERATORS.get("latent-diffusion")(weights=str(folder), **kw)


def test_loads_real_marigold_layout_and_runs_to_the_latent(marigold):
    folder, _ = marigold
    gen = make(folder)
    spec = gen.latent_spec()
    assert (
        gen.mode == "generate" and spec.kind == "spatial" and spec.shape == (4, 16, 16)
    )  # 32×32 / 2 (two VAE blocks)
    assert spec.scaling_factor == pytest.approx(0.18215) and spec.stored_as == "sample"
    samples = [rgb_sample(f"k{i}", seed=i) for i in range(3)]
    batch = gen.collate([gen.preprocess(s) for s in samples])
    assert batch["rgb"].shape == (3, 3, 32, 32)  # resized to default_processing_resolution
    out = gen.encode(batch, ["k0", "k1", "k2"])
    assert out.shape == (3, 4, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    ident = gen.identity()
    assert ident["model_class"] == "MarigoldDepthPipeline" and len(ident["sha256"]) == 64


def test_matches_the_marigold_pipeline_loop(marigold):
    """Same image latent, noise and steps as MarigoldDepthPipeline: the same final latent, never decoded."""
    folder, pipe = marigold
    gen = make(folder, inference_steps=2)
    image = torch.rand(1, 3, 32, 32)
    got = gen.encode({"rgb": image}, ["key"])
    from synesthesia.generators.base import key_generators

    noise = torch.randn((4, 16, 16), generator=key_generators(["key"], 0)[0])[None]
    out = pipe(
        image,
        num_inference_steps=2,
        processing_resolution=0,
        latents=noise,
        output_latent=True,
        output_type="pt",
        match_input_resolution=False,
    )
    torch.testing.assert_close(got, out.latent.float(), rtol=1e-4, atol=1e-4)


def test_samples_seeded_per_key_and_deterministic(marigold):
    folder, _ = marigold
    gen = make(folder, samples_per_input=3, seed=7)
    rgb = torch.rand(2, 3, 32, 32)
    a = gen.encode({"rgb": rgb}, ["x", "y"])
    b = gen.encode({"rgb": rgb.flip(0)}, ["y", "x"])
    assert a.shape == (2, 3, 4, 16, 16) and gen.latent_spec().full_shape == (3, 4, 16, 16)
    torch.testing.assert_close(a[0], b[1], rtol=1e-5, atol=1e-5)  # a key's samples do not depend on its batch
    assert not torch.allclose(a[0, 0], a[0, 1])  # the S samples differ
    other = make(folder, samples_per_input=3, seed=8).encode({"rgb": rgb}, ["x", "y"])
    assert not torch.allclose(a, other)  # the run seed matters
    decoded = gen.decode(a)
    assert decoded.shape == (2, 3, 32, 32) and decoded.min() >= 0 and decoded.max() <= 1


def test_ensemble_averages_the_key_seeded_draws(marigold):
    """ensemble N: each written latent is the mean of N draws of the key's generator (Marigold ensembling)."""
    folder, _ = marigold
    rgb = torch.rand(2, 3, 32, 32)
    draws = make(folder, samples_per_input=4, seed=5).encode({"rgb": rgb}, ["x", "y"])
    assert make(folder).ensemble == 1  # Marigold folders: no ensembling unless asked
    ens = make(folder, samples_per_input=2, seed=5, ensemble=2)
    out = ens.encode({"rgb": rgb}, ["x", "y"])
    assert out.shape == (2, 2, 4, 16, 16) and ens.latent_spec().extra["ensemble"] == 2
    torch.testing.assert_close(out, draws.reshape(2, 2, 2, 4, 16, 16).mean(2), rtol=1e-5, atol=1e-5)
    one = make(folder, seed=5, ensemble=4).encode({"rgb": rgb}, ["x", "y"])
    torch.testing.assert_close(one, draws.mean(1), rtol=1e-5, atol=1e-5)
    assert ens.identity()["config"]["ensemble"] == 2


def test_lcm_scheduler_folder(tmp_path):
    folder, _ = save_tiny_marigold(tmp_path, "LCMScheduler")
    gen = make(folder, samples_per_input=2)
    rgb = torch.rand(1, 3, 32, 32)
    a, b = gen.encode({"rgb": rgb}, ["k"]), gen.encode({"rgb": rgb}, ["k"])
    assert torch.equal(a, b) and a.shape == (1, 2, 4, 16, 16)


def test_user_errors(marigold, tmp_path):
    folder, _ = marigold
    with pytest.raises(UserError, match="needs weights"):
        GENERATORS.get("latent-diffusion")(modality="depth")
    with pytest.raises(UserError, match="modality must be 'depth'"):
        make(folder, modality="audio")
    with pytest.raises(UserError, match="samples_per_input"):
        make(folder, samples_per_input=0)
    with pytest.raises(UserError, match="ensemble must be a positive integer"):
        make(folder, ensemble=0)
    with pytest.raises(UserError, match="not a multiple of 2"):
        make(folder, image_size=[33, 33])
    with pytest.raises(UserError, match="no model_index.json"):
        make(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler"})
    )
    with pytest.raises(UserError, match="not supported"):
        make(tmp_path)
