"""Hostile inputs to `synesthesia ingest` (issue 17): each is skipped and counted, or refused.

Every case is generated on the fly beside a few good images and run through the
CLI. A bad sample must leave exit code 0, one warning line, its reason in the
manifest's ``skipped``, and the good samples written; a source with nothing
usable exits 2 with one error line. Nothing may be written outside ``--out``,
no temporary file may be left, and no traceback printed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import tarfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from tests.hostile import assert_contained, assert_refused, run, tree

from synesthesia.shards import Manifest, decode_npy, iter_aligned
from synesthesia.sources import lidar
from synesthesia.sources.ingest import checks
from synesthesia.sources.ingest.items import MAX_FILE_BYTES

GOOD_PER_CLASS = 3
SIZE = 16  # the good images are SIZE×SIZE


def _png(seed: int, size: int = SIZE, fmt: str = "PNG") -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def _good_folder(root: Path) -> Path:
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(GOOD_PER_CLASS):
            (root / f"class{c}" / f"img{i}.png").write_bytes(_png(10 * c + i))
    return root


def _signal(root: Path, modality: str, name: str) -> Path:
    """The path of a paired signal of class0/img0 (``name`` is its file name)."""
    folder = root / modality / "class0"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _wav(rate: int, seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(max(1, int(rate * seconds)), np.int16), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _png_bomb(side: int) -> bytes:
    """An all-zero side×side 8-bit grey PNG, written by hand: a few hundred KB for 13000²."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(1)
    row = bytes(side + 1)  # filter byte + side zero pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims width × height."""
    data = bytearray(_png(7, fmt="JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _scan(value: float) -> bytes:
    points = np.ones((100, 4), np.float32)
    points[:, 0] = np.linspace(5, 20, 100)
    points[3, 1] = value
    return points.tobytes()


# Each case plants one bad input in a folder of good images; (name, plant, skip reason).
FOLDER_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("symlink_to_dev_zero", lambda r: os.symlink("/dev/zero", r / "class0" / "zero.png"), "not_regular_file"),
    (
        "image_over_size_cap",  # sparse: costs no disk
        lambda r: os.truncate(_touch(r / "class0" / "big.png"), MAX_FILE_BYTES + 1),
        "file_too_large",
    ),
    (
        "png_bomb_13000",
        lambda r: (r / "class0" / "bomb.png").write_bytes(_png_bomb(13000)),
        "image_too_large",
    ),
    (
        "jpeg_claiming_10000x10000",
        lambda r: (r / "class0" / "claim.jpg").write_bytes(_jpeg_claiming(10000, 10000)),
        "image_too_large",
    ),
    (
        "depth_float64_beyond_float32",
        lambda r: _signal(r, "depth", "img0.npy").write_bytes(_npy(np.full((SIZE, SIZE), 1e39))),
        "non_finite",
    ),
    (
        "depth_other_size_than_image",
        lambda r: _signal(r, "depth", "img0.npy").write_bytes(_npy(np.ones((SIZE, SIZE * 2), np.float32))),
        "size_mismatch",
    ),
    (
        "depth_symlink_to_dev_zero",
        lambda r: os.symlink("/dev/zero", _signal(r, "depth", "img0.npy")),
        "not_regular_file",
    ),
    ("audio_1_hz", lambda r: _signal(r, "audio", "img0.wav").write_bytes(_wav(1, 600)), "bad_audio_rate"),
    (
        "audio_1_mhz",
        lambda r: _signal(r, "audio", "img0.wav").write_bytes(_wav(1_000_000, 0.01)),
        "bad_audio_rate",
    ),
    (
        "audio_too_long",
        lambda r: _signal(r, "audio", "img0.wav").write_bytes(_wav(1000, 601)),
        "audio_too_long",
    ),
    ("lidar_bin_1e30", lambda r: _signal(r, "lidar", "img0.bin").write_bytes(_scan(1e30)), "bad_lidar"),
    ("lidar_bin_nan", lambda r: _signal(r, "lidar", "img0.bin").write_bytes(_scan(np.nan)), "non_finite"),
    ("lidar_bin_inf", lambda r: _signal(r, "lidar", "img0.bin").write_bytes(_scan(np.inf)), "non_finite"),
    (
        "lidar_range_1e30",
        lambda r: _signal(r, "lidar", "img0.npy").write_bytes(_npy(np.full((8, 32), 1e30, np.float32))),
        "bad_lidar",
    ),
    (
        "lidar_range_float64_beyond_float32",
        lambda r: _signal(r, "lidar", "img0.npy").write_bytes(_npy(np.full((8, 32), 1e39))),
        "bad_lidar",  # beyond MAX_LIDAR_RANGE, checked before the cast
    ),
    (
        "lidar_intensity_float64_beyond_float32",
        lambda r: _signal(r, "lidar", "img0.npy").write_bytes(
            _npy(np.stack([np.ones((8, 32)), np.full((8, 32), 1e39)]))
        ),
        "non_finite",
    ),
    (
        "lidar_range_image_too_wide",
        lambda r: _signal(r, "lidar", "img0.npy").write_bytes(_npy(np.ones((1, 20000), np.float32))),
        "bad_lidar",
    ),
]


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _ingest_args(tmp_path: Path, source: Path, out: Path) -> list:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("dataset: h\n")
    return [
        "ingest",
        "--out",
        out,
        pipeline,
        f"ingest.source={source}",
        "ingest.val_fraction=0",
        "ingest.test_fraction=0",
    ]


def _assert_skipped(
    capsys, caplog, tmp_path: Path, source: Path, reason: str, kept: int, origin: str = ""
) -> Manifest:
    """ingest ``source``: exit 0, ``reason`` counted once, one warning, ``kept`` samples, contained."""
    out = tmp_path / "out"
    args = _ingest_args(tmp_path, source, out)
    before = tree(tmp_path)
    with caplog.at_level(logging.WARNING):
        code, err = run(capsys, args)
    assert code == 0, err
    assert not any("Traceback" in line for line in err), err
    manifest = Manifest.read(out / "h" / "source")
    assert manifest.skipped == {reason: 1}, manifest.skipped
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "skipped" in warnings[0] and origin in warnings[0], warnings
    assert "\n" not in warnings[0]
    assert sum(manifest.count(s) for s in manifest.splits) == kept
    assert_contained(tmp_path, out, before)
    return manifest


@pytest.mark.parametrize("plant, reason", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES])
def test_bad_folder_input_is_skipped_and_counted(tmp_path, capsys, caplog, plant, reason):
    root = _good_folder(tmp_path / "data")
    plant(root)
    images = 2 * GOOD_PER_CLASS
    bad_image = any(
        p.name not in {f"img{i}.png" for i in range(GOOD_PER_CLASS)} for p in (root / "class0").iterdir()
    )
    _assert_skipped(capsys, caplog, tmp_path, root, reason, kept=images - (0 if bad_image else 1))


def test_finite_depth_is_kept_as_float32(tmp_path, capsys, caplog):
    """The control of the cases above: a float64 depth map of the image's size is stored, finite."""
    root = _good_folder(tmp_path / "data")
    _signal(root, "depth", "img0.npy").write_bytes(_npy(np.full((SIZE, SIZE), 3.5)))
    assert run(capsys, _ingest_args(tmp_path, root, tmp_path / "out"))[0] == 0
    depth = [s["depth.npy"] for s in iter_aligned(tmp_path / "out" / "h" / "source") if "depth.npy" in s]
    np.testing.assert_array_equal(
        decode_npy(depth[0], dtypes=("float32",)), np.full((SIZE, SIZE), 3.5, np.float32)
    )


def _run_with_deadline(capsys, args: list, fifos: list[Path], seconds: float = 60.0) -> tuple[int, list[str]]:
    """``run`` in a thread; past the deadline, feed the FIFOs an EOF (unblocking a reader stuck on
    one) and fail, so a regression fails instead of hanging the suite."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(run(capsys, args)), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):  # ENXIO: nobody is reading it
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"ingest hung on a FIFO for {seconds:.0f} s")
    assert result, "ingest raised (see the thread's traceback above)"
    return result[0]


@pytest.mark.parametrize("where", ["image", "depth"])
def test_fifo_is_skipped_without_hanging(tmp_path, capsys, caplog, where):
    """A FIFO named like an image or a signal: reading it would block forever."""
    root = _good_folder(tmp_path / "data")
    fifo = root / "class0" / "x.png" if where == "image" else _signal(root, "depth", "img0.npy")
    os.mkfifo(fifo)
    out = tmp_path / "out"
    args = _ingest_args(tmp_path, root, out)
    before = tree(tmp_path)
    with caplog.at_level(logging.WARNING):
        code, err = _run_with_deadline(capsys, args, [fifo])
    assert code == 0 and not any("Traceback" in line for line in err), err
    assert Manifest.read(out / "h" / "source").skipped == {"not_regular_file": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and fifo.name in warnings[0], warnings
    assert_contained(tmp_path, out, before)


def test_source_of_only_unusable_files_is_refused(tmp_path, capsys):
    root = tmp_path / "data" / "c"
    root.mkdir(parents=True)
    os.mkfifo(root / "x.png")
    os.symlink("/dev/zero", root / "zero.png")
    out = tmp_path / "out"
    line = assert_refused(
        capsys, _ingest_args(tmp_path, root.parent, out), tmp_path, out, "no usable samples"
    )
    assert "not_regular_file 2" in line


def test_lidar_point_count_is_capped(tmp_path, capsys, caplog, monkeypatch):
    """A scan with more points than ``MAX_LIDAR_POINTS`` (lowered here: the real cap is 64 MiB of points)."""
    monkeypatch.setattr(lidar, "MAX_LIDAR_POINTS", 50)
    root = _good_folder(tmp_path / "data")
    _signal(root, "lidar", "img0.bin").write_bytes(_scan(1.0))  # 100 points
    _assert_skipped(capsys, caplog, tmp_path, root, "bad_lidar", kept=2 * GOOD_PER_CLASS - 1)
    with pytest.raises(checks.SchemaError, match="points"):
        lidar.project_scan(np.ones((60, 4), np.float32))


# ----------------------------------------------------------------------------- webdataset tars


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    return info, io.BytesIO(data)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(*_member(name, data))
    return buf.getvalue()


def _samples(keys: list[str]) -> list[tuple[str, bytes]]:
    return [m for i, k in enumerate(keys) for m in ((f"{k}.png", _png(i)), (f"{k}.cls", str(i % 2).encode()))]


def _member_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar.getmembers()]


def _cut_in_header(data: bytes) -> bytes:
    """Cut 100 bytes into the header of the 5th member (the first of the 3rd sample)."""
    return data[: _member_offsets(data)[4] + 100]


def _cut_at_boundary(data: bytes) -> bytes:
    """Cut exactly before the 5th member: no end-of-archive marker."""
    return data[: _member_offsets(data)[4]]


def _corrupt_header() -> bytes:
    """The 5th member's header checksum overwritten: tar readers stop there as if at the end."""
    data = bytearray(_tar(_samples(["a", "b", "c", "d"])))
    at = _member_offsets(bytes(data))[4] + 148
    data[at : at + 8] = b"garbage!"
    return bytes(data)


TAR_CASES = [
    # (name, tar bytes, skipped, samples kept from the bad tar)
    (
        "truncated_inside_a_header",
        _cut_in_header(_tar(_samples(["a", "b", "c", "d"]))),
        {"corrupt_tar": 1},
        1,
    ),
    (
        "cut_at_a_member_boundary",
        _cut_at_boundary(_tar(_samples(["a", "b", "c", "d"]))),
        {"corrupt_tar": 1},
        1,
    ),
    ("corrupt_header", _corrupt_header(), {"corrupt_tar": 1}, 1),
    (
        "duplicate_key_adjacent",  # a.png a.cls a.png a.cls: a field repeated under one key
        _tar(_samples(["a", "b"]) + _samples(["c", "c"])),
        {"duplicate_key": 1},
        3,
    ),
    ("duplicate_key_apart", _tar(_samples(["a", "b", "a", "c"])), {"duplicate_key": 1}, 3),
]


@pytest.mark.parametrize("data, skipped, kept", [c[1:] for c in TAR_CASES], ids=[c[0] for c in TAR_CASES])
def test_bad_tar_is_reported_for_what_it_is(tmp_path, capsys, caplog, data, skipped, kept):
    """Truncation (wherever the cut) is a corrupt tar, warned about and counted, and the sample being
    read is dropped with the rest; a repeated key is a duplicate key, not a truncated tar."""
    tars = tmp_path / "tars"
    tars.mkdir()
    (tars / "good-000.tar").write_bytes(_tar(_samples(["g0", "g1"])))
    (tars / "bad-000.tar").write_bytes(data)
    (reason,) = skipped
    _assert_skipped(capsys, caplog, tmp_path, tars, reason, kept=2 + kept, origin="bad-000.tar")


def test_fifo_tar_is_skipped_without_hanging(tmp_path, capsys):
    tars = tmp_path / "tars"
    tars.mkdir()
    (tars / "good-000.tar").write_bytes(_tar(_samples(["g0", "g1"])))
    os.mkfifo(tars / "pipe-000.tar")
    out = tmp_path / "out"
    args = _ingest_args(tmp_path, tars, out)
    before = tree(tmp_path)
    code, err = _run_with_deadline(capsys, args, [tars / "pipe-000.tar"])
    assert code == 0 and not any("Traceback" in line for line in err), err
    assert Manifest.read(out / "h" / "source").skipped == {"corrupt_tar": 1}
    assert_contained(tmp_path, out, before)


def test_oversized_tar_member_is_not_read(tmp_path, capsys, caplog):
    """A member over the file cap is skipped (its sample counted) without reading its bytes."""
    tars = tmp_path / "tars"
    tars.mkdir()
    path = tars / "big-000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in _samples(["a", "b"]):
            tar.addfile(*_member(name, data))
        info = tarfile.TarInfo("c.png")
        info.size = MAX_FILE_BYTES + 1
        tar.addfile(info, _Zeros(info.size))
        tar.addfile(*_member("c.cls", b"1"))
    _assert_skipped(capsys, caplog, tmp_path, tars, "file_too_large", kept=2, origin="c.png")


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, read without holding them."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n
