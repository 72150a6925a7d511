"""synesthesia.storage: URLs as paths, pipes, input listing, atomic publish beside a remote target.

Remote behaviour is checked on fsspec's in-memory store (``memory://``, a real fsspec filesystem,
fast and offline); tests/test_s3.py runs the same code against a real S3 server.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import shlex
import uuid
from pathlib import Path

import pytest
from upath import UPath

from synesthesia import UserError
from synesthesia.shards.reader import ErrorPolicy, iter_shard
from synesthesia.shards.schema import read_json_file
from synesthesia.shards.writer import Manifest, SplitWriter, shard_info, write_shard
from synesthesia.stage_one.paths import latent_dir, source_dir
from synesthesia.storage import (
    ForwardReader,
    as_path,
    atomic_path,
    atomic_write_text,
    expand_inputs,
    is_remote,
    open_input,
    remove_stale_temps,
)

SAMPLES = [
    {"__key__": f"k{i}", "cls": str(i % 3).encode(), "x.bin": bytes([i]) * (700 + i)} for i in range(6)
]


@pytest.fixture
def mem() -> UPath:
    """A fresh folder on fsspec's in-memory store."""
    root = UPath(f"memory://synesthesia-test-{uuid.uuid4().hex}")
    yield root
    if root.fs.exists(root.path):
        root.fs.rm(root.path, recursive=True)


# ----------------------------------------------------------------------------- as_path


def test_local_paths_stay_pathlib_paths(tmp_path: Path):
    for value in (
        tmp_path,
        str(tmp_path),
        "relative/folder",
        f"file://{tmp_path}",
        UPath(f"file://{tmp_path}"),
    ):
        path = as_path(value)
        assert type(path) is type(Path()) and not is_remote(path)
    assert as_path(f"file://{tmp_path}/x") == tmp_path / "x"
    assert as_path(UPath(str(tmp_path))) == tmp_path


def test_urls_stay_urls():
    path = as_path("s3://bucket/out")
    assert is_remote(path) and str(path) == "s3://bucket/out"
    assert str(path / "toy" / "source") == "s3://bucket/out/toy/source"
    # the regression: Path("s3://b/x") is the local "s3:/b/x"; the stage-one paths keep the URL
    assert str(source_dir("s3://bucket/out", "toy")) == "s3://bucket/out/toy/source"
    assert str(latent_dir("s3://bucket/out", "toy", "tae")) == "s3://bucket/out/toy/latents/tae"
    assert as_path(path) is path


@pytest.mark.parametrize("value", ["s3:/bucket/x", Path("s3://bucket/x"), "gs:/b/x", "hf:/datasets/x"])
def test_a_url_that_lost_a_slash_is_refused(value):
    with pytest.raises(UserError, match="lost a slash; write [a-z0-9]+://"):
        as_path(value, "--out")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("pipe:cat x.tar", "pipe: command can be read as one input tar"),
        ("https://example.org/set", "read-only here"),
        ("nosuchscheme://b/x", "unknown storage scheme nosuchscheme://"),
    ],
)
def test_urls_that_cannot_hold_a_set_are_one_line_errors(value, message):
    with pytest.raises(UserError, match=message) as info:
        as_path(value, "--out")
    assert "\n" not in str(info.value) and str(info.value).startswith("--out ")


def test_a_scheme_whose_package_is_missing_says_so():
    if importlib.util.find_spec("dropboxdrivefs") is not None:
        pytest.skip("dropboxdrivefs is installed here")
    with pytest.raises(UserError, match="dropbox:// needs a package that is not installed"):
        as_path("dropbox://folder/set")


# ----------------------------------------------------------------------------- reading


def _shard(tmp_path: Path, name: str = "train-000000.tar") -> Path:
    path = tmp_path / name
    write_shard(path, SAMPLES)
    return path


def test_pipe_reads_a_command_output(tmp_path: Path):
    shard = _shard(tmp_path)
    with open_input(f"pipe:cat {shlex.quote(str(shard))}") as fh:
        assert fh.read() == shard.read_bytes()
    assert list(iter_shard(f"pipe:cat {shlex.quote(str(shard))}")) == list(iter_shard(shard))


def test_pipe_of_a_gzip_tar(tmp_path: Path):
    shard = _shard(tmp_path)
    gz = tmp_path / "train.tar.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes()))
    assert list(iter_shard(f"pipe:cat {shlex.quote(str(gz))}")) == list(iter_shard(shard))


def test_a_failing_pipe_is_a_one_line_error(tmp_path: Path):
    with open_input("pipe:echo gone >&2; exit 3") as fh, pytest.raises(OSError, match=r"status 3 \(gone\)"):
        fh.read()
    errors: list[BaseException] = []
    assert list(iter_shard("pipe:echo no such bucket >&2; exit 7", errors.append)) == []
    assert len(errors) == 1 and "exited with status 7 (no such bucket)" in str(errors[0])


def test_a_pipe_cut_short_is_reported_not_read_as_a_shorter_tar(tmp_path: Path):
    shard = _shard(tmp_path)
    size = shard.stat().st_size
    for cut in (512 * 3, size - 1024 * 10 - 512 if size > 11 * 1024 else size // 2):
        errors: list[BaseException] = []
        got = list(iter_shard(f"pipe:head -c {cut} {shlex.quote(str(shard))}", errors.append))
        assert errors, cut
        assert len(got) < len(SAMPLES)
    policy = ErrorPolicy("skip")
    list(iter_shard(f"pipe:head -c 100 {shlex.quote(str(shard))}", policy))
    assert sum(policy.counts.values()) == 1


def test_forward_reader_seeks_back_only_within_its_window():
    reader = ForwardReader(io.BytesIO(bytes(range(256)) * 64), window=1024)
    reader.seek(5000)
    assert reader.tell() == 5000 and reader.read(4) == bytes([5000 % 256 + i for i in range(4)])
    reader.seek(4500)
    assert reader.read(1) == bytes([4500 % 256])
    with pytest.raises(OSError, match="cannot seek back"):
        reader.seek(100)


def test_file_urls_and_memory_urls_read_and_write(tmp_path: Path, mem: UPath):
    local = _shard(tmp_path)
    url = f"file://{tmp_path}/val-000000.tar"
    info = write_shard(url, SAMPLES)
    assert (tmp_path / "val-000000.tar").read_bytes() == local.read_bytes()
    remote = write_shard(mem / "train-000000.tar", SAMPLES)
    assert (mem / "train-000000.tar").read_bytes() == local.read_bytes()
    assert remote.sha256 == info.sha256 == shard_info(local, len(SAMPLES)).sha256
    assert remote.bytes == local.stat().st_size
    assert list(iter_shard(str(mem / "train-000000.tar"))) == list(iter_shard(local))
    assert list(iter_shard(url)) == list(iter_shard(local))


def test_expand_inputs_local_and_remote(tmp_path: Path, mem: UPath):
    for i in range(3):
        _shard(tmp_path, f"train-{i:06d}.tar")
        write_shard(mem / f"train-{i:06d}.tar", SAMPLES)
    (tmp_path / "notes.txt").write_text("x")
    local = [str(tmp_path / f"train-{i:06d}.tar") for i in range(3)]
    assert expand_inputs(str(tmp_path / "train-{000000..000002}.tar")) == local
    assert expand_inputs(str(tmp_path / "*.tar")) == local
    assert expand_inputs(str(tmp_path)) == local
    remote = [str(mem / f"train-{i:06d}.tar") for i in range(3)]
    assert expand_inputs(str(mem / "train-{000000..000002}.tar")) == remote
    assert expand_inputs(str(mem / "train-*.tar")) == remote
    assert expand_inputs(str(mem)) == remote
    assert expand_inputs("pipe:cat a-{0..1}.tar") == ["pipe:cat a-0.tar", "pipe:cat a-1.tar"]
    with pytest.raises(UserError, match="webdataset shard not found: .*train-000003.tar"):
        expand_inputs(str(mem / "train-{000000..000009}.tar"))
    with pytest.raises(UserError, match="no input tar matches"):
        expand_inputs(str(tmp_path / "val-*.tar"))


# ----------------------------------------------------------------------------- writing


def test_remote_publish_appears_only_complete_and_leaves_no_temporary(mem: UPath):
    target = mem / "set" / "manifest.json"
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
        assert tmp.name.startswith(".manifest.json.") and tmp.name.endswith(".tmp")
        assert not target.exists()  # written under the temporary key only
    assert target.read_text() == "{}"
    assert [p.name for p in (mem / "set").iterdir()] == ["manifest.json"]

    with pytest.raises(RuntimeError), atomic_path(mem / "set" / "train-000000.tar") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in (mem / "set").iterdir()] == ["manifest.json"]


def test_manifest_round_trip_in_a_bucket(mem: UPath):
    writer = SplitWriter(mem / "toy" / "source", "train", 4)
    for sample in SAMPLES:
        writer.add(sample)
    Manifest(kind="source", dataset="toy", splits={"train": writer.close()}).write(mem / "toy" / "source")
    manifest = Manifest.read(str(mem / "toy" / "source"))
    assert [s.name for s in manifest.splits["train"]] == ["train-000000.tar", "train-000001.tar"]
    assert manifest.count("train") == len(SAMPLES)
    with pytest.raises(UserError, match="no manifest.json in"):
        Manifest.read(mem / "elsewhere")


def test_remote_json_reads_are_bounded(mem: UPath):
    big = mem / "big.json"
    big.write_bytes(b"[" + b"0," * 5000 + b"0]")
    with pytest.raises(UserError, match="larger than 1000 bytes"):
        read_json_file(big, max_bytes=1000)
    (mem / "folder.json" / "inner").write_bytes(b"{}")
    with pytest.raises(UserError, match="not a regular file"):
        read_json_file(mem / "folder.json")
    with pytest.raises(UserError, match="unreadable"):
        read_json_file(mem / "missing.json")
    deep = mem / "deep.json"
    deep.write_bytes(b"[" * 40 + b"]" * 40)
    with pytest.raises(UserError, match="nested deeper"):
        read_json_file(deep)
    atomic_write_text(mem / "ok.json", '{"a": 1}')
    assert read_json_file(str(mem / "ok.json")) == {"a": 1}


def test_stale_remote_temporaries_go_live_ones_stay(mem: UPath):
    (mem / "set" / "train-000000.tar").write_bytes(b"done")
    (mem / "set" / ".train-000001.tar.0123.tmp").write_bytes(b"killed")
    (mem / "set" / ".other.json.4567.tmp").write_bytes(b"someone else, recent")
    removed = remove_stale_temps(mem / "set", own=[".*.tar.*.tmp"])
    assert removed == [".train-000001.tar.0123.tmp"]
    assert sorted(p.name for p in (mem / "set").iterdir()) == [".other.json.4567.tmp", "train-000000.tar"]
    assert remove_stale_temps(mem / "set", lease_s=0.0) == [".other.json.4567.tmp"]
