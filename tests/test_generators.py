"""Stage-one generators: the shared contract for every registered one, plus per-generator checks.

Tiny models are built from configs, seeded, saved with ``save_pretrained`` into a
temporary folder and loaded back (no download); TAEF2 is the real pretrained
model from ../shared/weights/taef2.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from synesthesia import UserError
from synesthesia.config import GeneratorConfig
from synesthesia.generators import GENERATORS, create_generator, mappings
from synesthesia.generators.base import autocast_context, key_seed, psnr, resolve_precision
from synesthesia.shards.schema import SIGNAL_FIELDS, SchemaError, encode_json, encode_npy
from synesthesia.sources.signals import encode_flac, encode_png

RATE = 16000


def make_sample(key: str, seed: int) -> dict:
    """A source sample with every modality (32×32 rgb/depth, 0.25 s audio, 16×64 lidar)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    depth = (1.0 + 3.0 * yy + 0.5 * np.sin(6 * xx + seed)).astype(np.float32)
    rgb = (255 * np.stack([yy, xx, 0.5 + 0.5 * np.sin(3 * xx + seed)], -1)).astype(np.uint8)
    t = np.arange(int(0.25 * RATE)) / RATE
    wave = 0.4 * np.sin(2 * np.pi * (300 + 200 * seed) * t) + 0.02 * rng.standard_normal(t.size)
    elev = np.linspace(25, -25, 16)[:, None]
    rng_img = np.where(elev < 0, 1.5 / np.sin(np.radians(-elev) + 1e-3), 0.0) * np.ones((1, 64))
    rng_img = np.where(rng_img > 40, 0, rng_img + 0.01 * rng.standard_normal(rng_img.shape)).astype(
        np.float32
    )
    rng_img[rng_img < 0] = 0
    return {
        "__key__": key,
        "rgb.png": encode_png(rgb),
        "cls": b"1",
        "json": encode_json({"audio_rate": RATE}),
        "depth.npy": encode_npy(depth),
        "audio.flac": encode_flac(wave.astype(np.float32), RATE),
        "lidar.npy": encode_npy(rng_img),
        "lidar_intensity.npy": encode_npy(np.clip(rng_img / 10, 0, 1).astype(np.float32)),
    }


@pytest.fixture(scope="module")
def samples():
    return [make_sample(f"k{i}", i) for i in range(3)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random-init diffusers / transformers models saved to disk (seeded)."""
    from diffusers import AutoencoderKL, AutoencoderOobleck, AutoencoderTiny
    from transformers import EncodecConfig, EncodecModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.5,
        shift_factor=0.1,
    ).save_pretrained(root / "kl")
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).save_pretrained(root / "tiny")
    AutoencoderOobleck(
        encoder_hidden_size=8,
        downsampling_ratios=[2, 4],
        channel_multiples=[1, 2],
        decoder_channels=8,
        decoder_input_channels=4,
        audio_channels=2,
        sampling_rate=8000,
    ).save_pretrained(root / "oobleck" / "vae")
    cfg = EncodecConfig(
        target_bandwidths=[2.0, 4.0],
        sampling_rate=8000,
        hidden_size=16,
        num_filters=4,
        upsampling_ratios=[8, 5],
        codebook_size=1024,
        codebook_dim=16,
        num_lstm_layers=1,
    )
    codec = EncodecModel(cfg)
    for layer in codec.quantizer.layers:  # random-init codebooks are all zero: give them entries
        layer.codebook.embed.normal_()
    codec.save_pretrained(root / "encodec")
    return {k: str(root / k) for k in ("kl", "tiny", "oobleck", "encodec")}


def generator_config(name: str, models: dict, shared) -> GeneratorConfig | None:
    """A tiny config of each built-in generator (None: not buildable offline in this suite)."""
    if name == "tae":
        return GeneratorConfig(name="tae", modality="depth", options={"size": 32})
    if name == "diffusers-vae":
        return GeneratorConfig(
            name=name, modality="depth", weights=models["kl"], samples_per_input=2, seed=5,
            options={"size": 32, "stored_as": "sample"},
        )  # fmt: skip
    if name == "codes":
        return GeneratorConfig(
            name=name, modality="audio", weights=models["encodec"], options={"seconds": 0.25}
        )
    if name == "tokens":
        return GeneratorConfig(name=name, modality="lidar", options={"num_tokens": 16, "k": 8})
    return None


_BUILT: dict[str, object] = {}


def cached(cfg: GeneratorConfig):
    """Build each tiny generator once per test session (loading is the slow part)."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _BUILT:
        _BUILT[key] = create_generator(cfg).eval()
    return _BUILT[key]


def run(gen, samples):
    batch = gen.collate([gen.preprocess(s) for s in samples])
    with torch.no_grad():
        return gen(batch, [s["__key__"] for s in samples])


@pytest.mark.parametrize("name", GENERATORS.names())
def test_generator_contract(name, models, shared, samples):
    cfg = generator_config(name, models, shared)
    if cfg is None:
        pytest.skip(f"{name} needs a trained model folder (covered by its own tests, e.g. test_bootstrap.py)")
    gen = cached(cfg)
    spec = gen.latent_spec()
    # identity: JSON-serialisable, stable across constructions, sensitive to the config
    ident = gen.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert {"name", "class", "config"} <= set(ident) and ident["name"] == name
    assert create_generator(cfg).identity_hash() == gen.identity_hash()
    assert json.loads(json.dumps(spec.to_dict()))["kind"] == spec.kind
    # output shape/dtype follow the spec
    out = run(gen, samples)
    assert tuple(out.shape) == (len(samples), *spec.full_shape)
    if spec.kind == "codes":
        assert out.dtype == torch.int64
    else:
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert out.std() > 0  # not a constant
    stored = gen.to_storage(out)
    assert stored.dtype == np.dtype(spec.dtype) and stored.shape == tuple(out.shape)
    # deterministic, and a sample's latent does not depend on its batch
    assert torch.equal(run(gen, samples), out)
    single = run(gen, samples[1:2])
    torch.testing.assert_close(single[0], out[1], rtol=1e-4, atol=1e-4)
    # decode exists where claimed (the ablation), and gives float32 2-D signals
    if gen.has_decoder:
        back = gen.decode(torch.from_numpy(stored.astype(np.float32) if spec.kind != "codes" else stored))
        lead = out.shape[: out.ndim - len(spec.shape)]
        assert tuple(back.shape[: len(lead)]) == tuple(lead) and back.ndim == len(lead) + 2
        assert back.dtype == torch.float32 and torch.isfinite(back).all()
    else:
        with pytest.raises(NotImplementedError, match="no decoder"):
            gen.decode(out)
    # a sample without the modality's field is a SchemaError (skipped and counted by the runner)
    field = SIGNAL_FIELDS[cfg.modality]
    broken = {k: v for k, v in samples[0].items() if k != field}
    with pytest.raises(SchemaError):
        gen.preprocess(broken)


@pytest.mark.parametrize("name", ["tae", "codes", "tokens"])
def test_deterministic_generators_refuse_several_samples(name, models, shared):
    cfg = generator_config(name, models, shared)
    with pytest.raises(UserError, match="samples_per_input"):
        create_generator(dataclasses.replace(cfg, samples_per_input=3))


def test_unknown_option_is_a_user_error(shared):
    with pytest.raises(UserError, match="unknown depth mapping option 'nera'"):
        create_generator(GeneratorConfig(name="tae", modality="depth", options={"nera": 1.0}))
    with pytest.raises(UserError, match=r"unknown generator 'vae'; valid: codes, (\S+, )*diffusers-vae"):
        create_generator(GeneratorConfig(name="vae"))


# ----------------------------------------------------------------------------- tae


def test_taef2_loads_strictly_and_matches_the_key_list(shared):
    from safetensors.torch import load_file

    from synesthesia.generators.tae import TAEDecoder, TAEEncoder, load_taef2

    folder = shared / "weights" / "taef2"
    listed = [ln.split()[0] for ln in (folder / "KEYS.txt").read_text().splitlines() if ln and ln[0] != "#"]
    encoder, decoder = load_taef2(folder)
    assert sorted(listed) == sorted([*encoder.state_dict(), *decoder.state_dict()])
    assert sum(p.numel() for p in encoder.parameters()) == 1_338_528
    assert sum(p.numel() for p in decoder.parameters()) == 1_338_499
    with pytest.raises(RuntimeError):  # the decoder's tensors do not fit the encoder
        TAEEncoder().load_state_dict(load_file(folder / "taef2_decoder.safetensors"), strict=True)
    z = encoder(torch.rand(1, 3, 64, 48))
    assert z.shape == (1, 32, 8, 6) and TAEDecoder()(z).shape == (1, 3, 64, 48)


def test_tae_depth_round_trip_psnr(shared, fixtures):
    """NYU depth → 3 channels → TAEF2 → back: ~40 dB, a random-init autoencoder far worse."""
    from synesthesia.generators.tae import TAEDecoder, TAEEncoder, load_taef2

    depth = np.load(fixtures / "nyu" / "depth.npy")
    image = torch.from_numpy(mappings.to_three_channels("depth", depth))[None]
    encoder, decoder = load_taef2()
    with torch.no_grad():
        recon = decoder(encoder(image)).clamp(0, 1)
        torch.manual_seed(0)
        rand = TAEDecoder().eval()(TAEEncoder().eval()(image)).clamp(0, 1)
    good, bad = psnr(image, recon), psnr(image, rand)
    assert good > 37.0, good
    assert bad < 20.0 and good - bad > 15.0, (good, bad)
    metres = mappings.from_three_channels("depth", recon[0].numpy())
    rmse = float(np.sqrt(np.mean((metres - depth) ** 2)))
    assert rmse < 0.15, rmse  # centimetres over a 0.7–5.9 m room


def test_tae_speech_and_kitti_fidelity(shared, fixtures):
    """Real speech (log-mel) and a real KITTI scan (range) survive TAEF2; the lidar default layout
    (range ×3, no-returns filled) is far better than the 3-channel range/intensity/mask layout."""
    import soundfile as sf

    from synesthesia.generators.tae import load_taef2
    from synesthesia.generators.tokens import points_to_range_image

    encoder, decoder = load_taef2()

    def round_trip(x):
        with torch.no_grad():
            return decoder(encoder(torch.from_numpy(x)[None])).clamp(0, 1)[0].numpy()

    wave, _ = sf.read(fixtures / "speech" / "sample1_16kHz.wav", dtype="float32")
    x = mappings.to_three_channels("audio", wave, frames=256)
    assert psnr(x, round_trip(x)) > 27.0
    scan = np.fromfile(fixtures / "kitti" / "000008.bin", dtype=np.float32).reshape(-1, 4)
    r, inten = points_to_range_image(scan[:, :3], 64, 1024, (2.0, -24.8), (-180.0, 180.0), scan[:, 3])
    signal, valid = np.stack([r, inten])[:, :, 384:640], r[:, 384:640] > 0  # the camera's front view
    errors = {}
    for layout in ("range", "range-intensity-mask"):
        back = mappings.from_three_channels(
            "lidar", round_trip(mappings.to_three_channels("lidar", signal, channels=layout)), channels=layout
        )
        ok = valid & (back > 0)
        errors[layout] = float(np.median(np.abs(back[ok] - signal[0][ok]) / signal[0][ok]))
    assert errors["range"] < 0.08 and errors["range-intensity-mask"] > 2 * errors["range"], errors


def test_tae_generator_decode_is_the_ablation_signal(shared, fixtures):
    gen = create_generator(GeneratorConfig(name="tae", modality="depth", options={"size": 224}))
    depth = np.load(fixtures / "nyu" / "depth.npy")
    sample = {"__key__": "nyu", "depth.npy": encode_npy(depth)}
    z = gen(gen.collate([gen.preprocess(sample)]), ["nyu"])
    assert z.shape == (1, 32, 28, 28)
    back = gen.decode(torch.from_numpy(gen.to_storage(z).astype(np.float32)))  # through fp16 storage
    assert back.shape == (1, 224, 224)
    assert float(np.abs(back[0].numpy() - depth).mean()) < 0.1
    assert (
        gen.identity()["sha256"]["encoder"]
        == __import__("hashlib")
        .sha256((shared / "weights" / "taef2" / "taef2_encoder.safetensors").read_bytes())
        .hexdigest()
    )


def test_tae_rgb_audio_lidar(shared, samples):
    for modality, shape in (("rgb", (32, 4, 4)), ("audio", (32, 8, 8)), ("lidar", (32, 2, 8))):
        options = {"size": [16, 64]} if modality == "lidar" else {"size": 32} if modality == "rgb" else {}
        gen = create_generator(GeneratorConfig(name="tae", modality=modality, options=options))
        out = run(gen, samples[:2])
        assert tuple(out.shape[1:]) == shape == gen.latent_spec().shape
        assert gen.decode(out).shape[0] == 2


def test_tae_identity_does_not_depend_on_where_the_weights_are(shared, tmp_path):
    """Moving the weights folder keeps the cache key; different weights change it."""
    source = shared / "weights" / "taef2"
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("taef2_encoder.safetensors", "taef2_decoder.safetensors"):
        (moved / name).symlink_to(source / name)
    default = create_generator(GeneratorConfig(name="tae", modality="depth"))
    relocated = create_generator(GeneratorConfig(name="tae", modality="depth", weights=str(moved)))
    assert str(tmp_path) not in json.dumps(relocated.identity())
    assert relocated.identity() == default.identity()
    assert relocated.identity_hash() == default.identity_hash()
    relocated.weights_sha256 = {**relocated.weights_sha256, "encoder": "0" * 64}  # other weights
    assert relocated.identity_hash() != default.identity_hash()


def test_tae_missing_weights_is_one_line(tmp_path, monkeypatch):
    from synesthesia.generators.tae import load_taef2

    monkeypatch.setenv("SYNESTHESIA_SHARED", str(tmp_path))
    monkeypatch.delenv("SYNESTHESIA_TAEF2", raising=False)
    with pytest.raises(UserError) as err:
        load_taef2()
    msg = str(err.value)
    assert "\n" not in msg and "SYNESTHESIA_TAEF2" in msg and "shared/weights/taef2" in msg
    with pytest.raises(UserError, match="TAEF2 weights not found"):
        create_generator(GeneratorConfig(name="tae", weights=str(tmp_path)))


# ----------------------------------------------------------------------------- diffusers-vae


def test_diffusers_vae_scaling_and_stored_as(models, samples):
    from diffusers import AutoencoderKL

    def build(**options):
        return create_generator(
            GeneratorConfig(
                name="diffusers-vae", modality="depth", weights=models["kl"], options={"size": 32, **options}
            )
        )

    mode, moments, raw = build(), build(stored_as="moments"), build(apply_scaling=False)
    spec = mode.latent_spec()
    assert spec.kind == "spatial" and spec.shape == (4, 16, 16) and spec.scaling_factor == 0.5
    assert spec.shift_factor == 0.1 and spec.stored_as == "mode" and spec.scaling_applied
    z, m, u = run(mode, samples), run(moments, samples), run(raw, samples)
    assert moments.latent_spec().shape == (8, 16, 16)
    torch.testing.assert_close(m[:, :4], z)
    torch.testing.assert_close(z, (u - 0.1) * 0.5)
    # the mode is the posterior mean of the model itself
    vae = AutoencoderKL.from_pretrained(models["kl"]).eval()
    image = mode.collate([mode.preprocess(s) for s in samples])["image"]
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mean
    torch.testing.assert_close(u, mean, rtol=1e-4, atol=1e-5)
    assert raw.identity_hash() != mode.identity_hash()


def test_diffusers_vae_seeded_samples(models, samples):
    def build(seed):
        return create_generator(
            GeneratorConfig(name="diffusers-vae", modality="depth", weights=models["kl"], samples_per_input=3,
                            seed=seed, options={"size": 32, "stored_as": "sample"})
        )  # fmt: skip

    a, b = build(1), build(2)
    za, zb = run(a, samples), run(b, samples)
    assert za.shape == (3, 3, 4, 16, 16) and a.latent_spec().seed == 1
    assert not torch.equal(za[:, 0], za[:, 1]) and not torch.equal(za, zb)
    assert a.identity_hash() != b.identity_hash()
    with pytest.raises(UserError, match="needs stored_as=sample"):
        create_generator(GeneratorConfig(name="diffusers-vae", weights=models["kl"], samples_per_input=2))


def test_diffusers_vae_tiny_and_oobleck(models, samples):
    tiny = create_generator(
        GeneratorConfig(name="diffusers-vae", modality="rgb", weights=models["tiny"], options={"size": 32})
    )
    assert tiny.vae_class == "AutoencoderTiny" and run(tiny, samples).shape == (3, *tiny.latent_spec().shape)
    with pytest.raises(UserError, match="deterministic"):
        create_generator(
            GeneratorConfig(name="diffusers-vae", weights=models["tiny"], options={"stored_as": "sample"})
        )
    oob = create_generator(
        GeneratorConfig(name="diffusers-vae", modality="audio", weights=models["oobleck"],
                        options={"subfolder": "vae", "seconds": 0.1, "stored_as": "moments"})
    )  # fmt: skip
    spec = oob.latent_spec()
    assert spec.kind == "tokens" and spec.shape == (100, 8)  # 800 samples / hop 8; 2×4 moments channels
    out = run(oob, samples)
    assert out.shape == (3, 100, 8)
    assert oob.decode(out).shape == (3, 64, 64)  # log-mel of the decoded waveform
    with pytest.raises(UserError, match="encodes audio waveforms"):
        create_generator(
            GeneratorConfig(
                name="diffusers-vae",
                modality="depth",
                weights=models["oobleck"],
                options={"subfolder": "vae"},
            )
        )


def test_diffusers_vae_missing_model_is_one_line(tmp_path):
    for weights in ("nobody/no-such-vae", str(tmp_path / "absent"), None):
        with pytest.raises(UserError) as err:
            create_generator(GeneratorConfig(name="diffusers-vae", weights=weights))
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="hub id"):
        create_generator(GeneratorConfig(name="diffusers-vae", weights="nobody/no-such-vae"))


# ----------------------------------------------------------------------------- codes


def test_codes_bandwidth_decode_and_real_speech(models, samples, fixtures):
    def build(bw):
        cfg = GeneratorConfig(
            name="codes",
            modality="audio",
            weights=models["encodec"],
            options={"seconds": 0.25, "bandwidth": bw},
        )
        return cached(cfg) if bw == 4.0 else create_generator(cfg)

    low, high = build(2.0), build(4.0)
    assert low.latent_spec().shape == (1, 50) and high.latent_spec().shape == (2, 50)  # 200 frames/s
    codes = run(high, samples)
    assert codes.min() >= 0 and codes.max() < 1024 and len(codes.unique()) > 3
    # residual VQ: the first codebook is the same at every bandwidth
    torch.testing.assert_close(run(low, samples)[:, 0], codes[:, 0])
    assert high.decode_waveform(codes).shape == (3, 2000)
    speech = {"__key__": "speech", "audio.flac": (fixtures / "speech" / "sample2_16kHz.wav").read_bytes()}
    assert run(high, [speech]).shape == (1, 2, 50)
    bad = {"__key__": "bad", "audio.flac": (fixtures / "speech" / "invalid.wav").read_bytes()}
    with pytest.raises(SchemaError):
        high.preprocess(bad)
    with pytest.raises(UserError, match="bandwidth 3.0 not offered"):
        build(3.0)
    with pytest.raises(UserError, match="codes encodes audio"):
        create_generator(GeneratorConfig(name="codes", modality="depth", weights=models["encodec"]))
    with pytest.raises(UserError, match="codes needs weights"):
        create_generator(GeneratorConfig(name="codes", modality="audio"))


# ----------------------------------------------------------------------------- tokens


def test_tokens_from_kitti_scan(fixtures):
    from synesthesia.generators.tokens import FEATURES, points_to_range_image, range_image_to_points

    scan = np.fromfile(fixtures / "kitti" / "000008.bin", dtype=np.float32).reshape(-1, 4)
    view = {"elevation": [2.0, -24.8], "azimuth": [-180.0, 180.0]}
    rng_img, inten = points_to_range_image(scan[:, :3], 64, 1024, **view, intensity=scan[:, 3])
    assert (rng_img > 0).sum() > 5000 and rng_img.max() < 81
    points, _ = range_image_to_points(rng_img, **view)
    # back-projected points sit where the scan's points are (within the grid's angular step)
    r_back, _ = points_to_range_image(points, 64, 1024, **view)
    np.testing.assert_allclose(r_back[rng_img > 0], rng_img[rng_img > 0], rtol=1e-5)
    gen = create_generator(
        GeneratorConfig(name="tokens", modality="lidar", options={"num_tokens": 32, "k": 16, **view})
    )
    sample = {"__key__": "kitti", "lidar.npy": encode_npy(rng_img), "lidar_intensity.npy": encode_npy(inten)}
    tokens = run(gen, [sample])[0].numpy()
    assert tokens.shape == (32, len(FEATURES)) and np.all(tokens[:, -1] == 1)
    f = {name: tokens[:, i] for i, name in enumerate(FEATURES)}
    np.testing.assert_allclose(np.linalg.norm(tokens[:, :3], axis=1), f["range"], rtol=1e-3)
    assert np.all(f["sigma_1"] >= f["sigma_2"] - 1e-3) and np.all(f["sigma_2"] >= f["sigma_3"] - 1e-3)
    np.testing.assert_allclose(np.linalg.norm(tokens[:, 13:16], axis=1), 1.0, atol=1e-3)
    assert 0 < f["intensity_mean"].mean() < 1
    azimuth = np.arctan2(-f["y"], f["x"])
    assert np.all(np.diff(azimuth) >= -1e-3)  # ordered by azimuth
    # the road is a plane: most ground tokens (z below −1.2 m) are planar with vertical normals
    ground = f["z"] < -1.2
    assert ground.sum() >= 5 and np.median(np.abs(f["normal_z"][ground])) > 0.9


def test_tokens_padding_and_empty_scan():
    from synesthesia.generators.tokens import tokenize_points

    pts = np.random.default_rng(0).normal(size=(5, 3)) + [10, 0, 0]
    tokens = tokenize_points(pts, np.zeros(5), num_tokens=8, k=4)
    assert np.all(tokens[:5, -1] == 1) and np.all(tokens[5:] == 0)
    gen = create_generator(GeneratorConfig(name="tokens", modality="lidar"))
    with pytest.raises(SchemaError, match="no returns"):
        gen.preprocess({"__key__": "e", "lidar.npy": encode_npy(np.zeros((16, 64), np.float32))})
    with pytest.raises(UserError, match="takes no weights"):
        create_generator(GeneratorConfig(name="tokens", modality="lidar", weights="x"))


# ----------------------------------------------------------------------------- helpers


def test_precision_and_seeds():
    assert resolve_precision("cpu", "auto") == "fp32" and resolve_precision("cpu", "bf16") == "fp32"
    with pytest.raises(UserError):
        resolve_precision("cpu", "fp8")
    with autocast_context("cpu", "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert key_seed("a", 0) == key_seed("a", 0) != key_seed("a", 1) != key_seed("b", 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tae_gpu_autocast_matches_fp32(shared, samples):
    gen = create_generator(GeneratorConfig(name="tae", modality="depth", options={"size": 32}))
    ref = run(gen, samples)
    gen.setup("cuda", "auto")
    batch = gen.collate([gen.preprocess(s) for s in samples])
    out = gen.encode(batch, [s["__key__"] for s in samples]).cpu()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
