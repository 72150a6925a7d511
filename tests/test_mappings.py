"""Signal ↔ 3-channel image mappings and source-sample decoding (generators.mappings)."""

from __future__ import annotations

import numpy as np
import pytest

from synesthesia import UserError
from synesthesia.generators import mappings
from synesthesia.shards.schema import SchemaError, encode_npy
from synesthesia.sources.signals import encode_flac, encode_png


def _depth(h=24, w=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.6, 9.0, size=(h, w)).astype(np.float32)


def test_depth_round_trip_is_exact_inside_range():
    d = _depth(32, 48)
    x = mappings.to_three_channels("depth", d)
    assert x.shape == (3, 32, 48) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2])  # replicated (Marigold)
    np.testing.assert_allclose(mappings.from_three_channels("depth", x), d, rtol=1e-5)


def test_depth_log_scale_clips_and_missing_maps_to_near():
    d = np.array([[0.0, 0.25, 0.5, np.sqrt(5.0)], [10.0, 40.0, 1.0, 2.0]] * 4, dtype=np.float32)
    x = mappings.to_three_channels("depth", d, near=0.5, far=10.0)
    assert x[0, 0, 0] == 0 and x[0, 0, 1] == 0 and x[0, 1, 1] == 1
    np.testing.assert_allclose(x[0, 0, 3], 0.5, atol=1e-6)  # geometric midpoint of [0.5, 10]
    back = mappings.from_three_channels("depth", x, near=0.5, far=10.0)
    np.testing.assert_allclose(back[0, :2], 0.5, rtol=1e-6)
    np.testing.assert_allclose(back[1, 1], 10.0, rtol=1e-6)


def test_padding_to_multiple_of_eight_and_crop_back():
    d = _depth(21, 30)
    x = mappings.to_three_channels("depth", d)
    assert x.shape == (3, 24, 32)
    back = mappings.from_three_channels("depth", x, shape=(21, 30))
    np.testing.assert_allclose(back, d, rtol=1e-5)


def test_resize_and_bad_sizes():
    x = mappings.to_three_channels("depth", _depth(50, 70), size=[32, 64])
    assert x.shape == (3, 32, 64)
    with pytest.raises(UserError, match="multiples of 8"):
        mappings.mapping_params("depth", size=30)
    with pytest.raises(UserError, match="unknown depth mapping option 'nearr'"):
        mappings.mapping_params("depth", nearr=1.0)
    with pytest.raises(UserError, match="near < far"):
        mappings.mapping_params("lidar", near=5.0, far=1.0)
    with pytest.raises(UserError, match="unknown modality"):
        mappings.to_three_channels("smell", _depth())


def test_nyu_fixture_depth(fixtures):
    d = np.load(fixtures / "nyu" / "depth.npy")
    x = mappings.to_three_channels("depth", d)
    assert x.shape == (3, 224, 224)
    assert 0.05 < x.min() < x.max() < 0.95  # 0.72–5.87 m sits well inside [0.5, 10]
    np.testing.assert_allclose(mappings.from_three_channels("depth", x), d, rtol=1e-5)


def _tone(seconds=0.5, rate=16000, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_audio_log_mel_image_and_inverse():
    wave = _tone()
    x = mappings.to_three_channels("audio", wave)
    assert x.shape == (3, 64, 64) and x.min() >= 0 and x.max() <= 1
    mel = mappings.log_mel(wave)
    back = mappings.from_three_channels("audio", x)
    assert back.shape == (64, 64)
    np.testing.assert_allclose(back, mel, atol=1e-3)
    # 0.5 s at hop 160 gives 51 frames: the rest is padded with silence (db_min)
    assert np.all(back[:, 52:] == mappings.DEFAULTS["audio"]["db_min"])
    # the energy of a 440 Hz tone sits in the low mel bands
    assert mel[:20, 10:40].mean() > mel[40:, 10:40].mean() + 20


def test_audio_deltas_channels_share_the_mel():
    wave = _tone(freq=1000.0)
    rep = mappings.to_three_channels("audio", wave)
    dlt = mappings.to_three_channels("audio", wave, channels="deltas")
    np.testing.assert_allclose(dlt[0], rep[0])
    assert not np.allclose(dlt[1], dlt[0])
    np.testing.assert_allclose(
        mappings.from_three_channels("audio", dlt, channels="deltas"), mappings.log_mel(wave), atol=1e-3
    )


def test_audio_sample_decoding_resamples(fixtures):
    import soundfile as sf

    wave, rate = sf.read(fixtures / "speech" / "sample1_16kHz.wav", dtype="float32")
    assert rate == 16000
    sample = {"__key__": "s", "audio.flac": encode_flac(wave[::2], 8000)}
    up = mappings.signal_from_sample("audio", sample, sample_rate=16000)
    assert abs(up.size - 2 * (wave.size // 2 + wave.size % 2)) <= 2
    native = mappings.signal_from_sample("audio", sample)
    assert native.size == wave[::2].size
    x = mappings.to_three_channels("audio", up)
    assert x.shape == (3, 64, 64) and x.std() > 0.05  # real speech, not silence
    bad = {"__key__": "b", "audio.flac": (fixtures / "speech" / "invalid.wav").read_bytes()}
    with pytest.raises(SchemaError):
        mappings.signal_from_sample("audio", bad)


def _scan():
    rng = np.random.default_rng(1)
    r = rng.uniform(1.0, 70.0, size=(16, 64)).astype(np.float32)
    r[rng.random(r.shape) < 0.2] = 0.0  # no returns
    return r, rng.uniform(0, 1, size=r.shape).astype(np.float32)


def test_lidar_range_layout_fills_no_returns():
    r, inten = _scan()
    x = mappings.to_three_channels("lidar", np.stack([r, inten]))
    assert x.shape == (3, 16, 64)
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2])  # range replicated, like depth
    back = mappings.from_three_channels("lidar", x)
    np.testing.assert_allclose(back[r > 0], r[r > 0], rtol=1e-5)
    assert np.all(back > 0)  # no-return pixels hold the nearest return's range (dense)
    i, j = np.argwhere(r == 0)[0]
    neighbours = r[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
    assert np.any(np.isclose(back[i, j], neighbours[neighbours > 0], rtol=1e-5))
    zero = mappings.to_three_channels("lidar", r, fill="zero")
    assert np.all(zero[:, r == 0] == 0)
    np.testing.assert_array_equal(mappings.from_three_channels("lidar", zero, fill="zero") > 0, r > 0)
    with pytest.raises(UserError, match="lidar channels"):
        mappings.mapping_params("lidar", channels="rgb")


def test_lidar_range_intensity_mask_layout_round_trip():
    r, inten = _scan()
    p = {"channels": "range-intensity-mask"}
    x = mappings.to_three_channels("lidar", np.stack([r, inten]), **p)
    np.testing.assert_array_equal(x[2], (r > 0).astype(np.float32))
    back = mappings.from_three_channels("lidar", x, keep_intensity=True, **p)
    np.testing.assert_allclose(back[0], r, rtol=1e-5)  # exact on returns, 0 elsewhere
    np.testing.assert_allclose(back[1], np.where(r > 0, inten, 0), atol=1e-6)
    # range only (no intensity) is accepted too, and padding reads "no return"
    x2 = mappings.to_three_channels("lidar", r[:13], **p)
    assert x2.shape == (3, 16, 64) and np.all(x2[2, 13:] == 0)
    assert mappings.from_three_channels("lidar", x2, **p).shape == (16, 64)


def test_rgb_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    x = mappings.to_three_channels("rgb", rgb)
    assert x.shape == (3, 16, 24)
    np.testing.assert_array_equal(mappings.from_three_channels("rgb", x), rgb)
    got = mappings.signal_from_sample("rgb", {"__key__": "k", "rgb.png": encode_png(rgb)})
    np.testing.assert_array_equal(got, rgb)


def test_signal_from_sample_validates():
    d = _depth()
    assert (
        mappings.signal_from_sample("depth", {"__key__": "k", "depth.npy": encode_npy(d)}).dtype == np.float32
    )
    bad = d.copy()
    bad[0, 0] = np.nan
    with pytest.raises(SchemaError, match="NaN"):
        mappings.signal_from_sample("depth", {"__key__": "k", "depth.npy": encode_npy(bad)})
    with pytest.raises(SchemaError, match="rank"):
        mappings.signal_from_sample("depth", {"__key__": "k", "depth.npy": encode_npy(d[None, None])})
    with pytest.raises(SchemaError, match="no depth.npy"):
        mappings.signal_from_sample("depth", {"__key__": "k"})
    with pytest.raises(SchemaError, match="negative"):
        mappings.signal_from_sample("depth", {"__key__": "k", "depth.npy": encode_npy(-d)})
    r = np.abs(d)
    both = mappings.signal_from_sample(
        "lidar", {"__key__": "k", "lidar.npy": encode_npy(r), "lidar_intensity.npy": encode_npy(r / r.max())}
    )
    assert both.shape == (2, *r.shape)
    with pytest.raises(SchemaError, match="does not match"):
        mappings.signal_from_sample(
            "lidar", {"__key__": "k", "lidar.npy": encode_npy(r), "lidar_intensity.npy": encode_npy(r[:2])}
        )
