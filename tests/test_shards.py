"""Shard format v1: schema checks, atomic reproducible writer, manifest, aligned reader, error policy."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from synesthesia import UserError
from synesthesia.shards import (
    ErrorPolicy,
    Manifest,
    SchemaError,
    ShardMismatchError,
    SplitWriter,
    decode_npy,
    encode_npy,
    iter_aligned,
    iter_shard,
    shard_name,
    shard_paths,
    write_shard,
)
from synesthesia.shards.reader import TruncatedTarError
from synesthesia.shards.schema import MAX_KEY_LENGTH, check_key, decode_json, encode_json, image_field
from synesthesia.shards.verify import verify


def _samples(n: int, prefix: str = "s", field: str = "x.bin") -> list[dict]:
    return [
        {"__key__": f"{prefix}{i:03d}", field: bytes([i]) * (i + 1), "cls": str(i % 3).encode()}
        for i in range(n)
    ]


def _write_set(
    directory: Path, kind: str, samples: list[dict], shard_size: int, split: str = "train"
) -> Manifest:
    writer = SplitWriter(directory, split, shard_size)
    for sample in samples:
        writer.add(sample)
    manifest = Manifest(kind=kind, dataset="t", splits={split: writer.close()}, skipped=dict(writer.skipped))
    manifest.write(directory)
    return manifest


# ----------------------------------------------------------------------------- schema


@pytest.mark.parametrize("key", ["a", "A-b_9", "x" * MAX_KEY_LENGTH])
def test_check_key_accepts(key):
    assert check_key(key) == key


@pytest.mark.parametrize("key", ["", "a.b", "a/b", "é", "a b", "x" * (MAX_KEY_LENGTH + 1), None, 3])
def test_check_key_rejects(key):
    with pytest.raises(SchemaError) as info:
        check_key(key)
    assert info.value.reason == "bad_key"


def test_npy_roundtrip_and_refusals():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(decode_npy(encode_npy(a), dtypes=("float32",), ndim=(2,), finite=True), a)
    # a pickle inside is refused, never loaded
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SchemaError, match="refused"):
        decode_npy(buf.getvalue())
    with pytest.raises(SchemaError, match="dtype"):
        decode_npy(encode_npy(a.astype(np.int64)), dtypes=("float32",))
    with pytest.raises(SchemaError, match="rank"):
        decode_npy(encode_npy(a[0]), ndim=(2,))
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(SchemaError) as info:
        decode_npy(encode_npy(bad), finite=True)
    assert info.value.reason == "non_finite"
    with pytest.raises(SchemaError, match="unreadable|refused"):
        decode_npy(b"not an npy file")


def test_json_and_image_field():
    assert encode_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'
    assert decode_json(encode_json({"k": "v"})) == {"k": "v"}
    assert image_field({"rgb.jpg": b""}) == "rgb.jpg"
    with pytest.raises(SchemaError):
        image_field({"__key__": "a"})
    assert shard_name("val", 12) == "val-000012.tar"


# ----------------------------------------------------------------------------- writer


def test_write_shard_is_reproducible_and_plain_tar(tmp_path):
    samples = _samples(5)
    a = write_shard(tmp_path / "a" / "train-000000.tar", samples)
    b = write_shard(tmp_path / "b" / "train-000000.tar", samples)
    assert a.sha256 == b.sha256 and a.bytes == b.bytes and a.samples == 5
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() == (
        tmp_path / "b" / "train-000000.tar"
    ).read_bytes()
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        members = tar.getmembers()
    # fixed member order (sample order, fields sorted), mtime, owner and mode
    assert [m.name for m in members[:2]] == ["s000.cls", "s000.x.bin"]
    assert {m.mtime for m in members} == {0}
    assert {m.uname for m in members} == {"synesthesia"}
    assert {m.mode for m in members} == {0o444}
    # no temporary file left beside it
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["train-000000.tar"]


def test_write_shard_refuses_bad_samples_before_writing(tmp_path):
    target = tmp_path / "train-000000.tar"
    for bad in (
        [{"__key__": "a.b", "x": b"1"}],
        [{"__key__": "a", "x": "not bytes"}],
        [{"__key__": "a", "x": b"1"}, {"__key__": "a", "x": b"2"}],
        [{"__key__": "a", "sub/x": b"1"}],
    ):
        with pytest.raises(SchemaError):
            write_shard(target, bad)
        assert not target.exists()
        assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "train-000000.tar"

    def broken_write(self, obj):
        raise OSError("disk full")

    closed = []
    real_close = wds.TarWriter.close

    def tracked_close(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(wds.TarWriter, "write", broken_write)
    monkeypatch.setattr(wds.TarWriter, "close", tracked_close)
    with pytest.raises(OSError):
        write_shard(target, _samples(2))
    assert list(tmp_path.iterdir()) == []
    assert len(closed) == 1 and closed[0].tarstream.closed  # the writer was closed on the failure


def test_iter_shard_reads_its_shard_in_every_dataloader_worker(tmp_path):
    """iter_shard reads the shard it is given: no worker splitter hands it to worker 0 only."""
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    path = tmp_path / "train-000000.tar"
    write_shard(path, _samples(3))

    class EveryWorker(IterableDataset):
        def __iter__(self):
            worker = get_worker_info().id
            for sample in iter_shard(path):
                yield worker, sample["__key__"]

    seen = list(DataLoader(EveryWorker(), batch_size=None, num_workers=2))
    assert sorted(map(tuple, seen)) == [(w, f"s{i:03d}") for w in (0, 1) for i in range(3)]


def test_split_writer_shards_and_duplicates(tmp_path):
    writer = SplitWriter(tmp_path, "train", shard_size=4)
    samples = _samples(10)
    for sample in samples:
        assert writer.add(sample)
    assert not writer.add(dict(samples[3]))
    with pytest.raises(SchemaError):
        writer.add({"__key__": "bad.key", "x": b""})
    infos = writer.close()
    assert [i.name for i in infos] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [i.samples for i in infos] == [4, 4, 2]
    assert writer.skipped == {"duplicate_key": 1}
    with pytest.raises(ValueError):
        SplitWriter(tmp_path, "train", 0)


def test_manifest_roundtrip_and_counts(tmp_path):
    manifest = _write_set(tmp_path, "source", _samples(7), shard_size=3)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["counts"] == {"train": 7}
    assert data["schema_version"] == 1
    again = Manifest.read(tmp_path)
    assert again == manifest
    assert again.count("train") == 7 and again.count("val") == 0
    assert shard_paths(tmp_path, "train") == [tmp_path / shard_name("train", i) for i in range(3)]


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "unreadable manifest"),
        ("[]", "JSON object"),
        ('{"schema_version": 99}', "schema version"),
        (
            '{"schema_version": 1, "kind": "source", "dataset": "t", "splits": {}, "bogus": 1}',
            "unknown manifest key",
        ),
        ('{"schema_version": 1, "kind": "weird", "dataset": "t", "splits": {}}', "unknown set kind"),
        (
            '{"schema_version": 1, "kind": "source", "dataset": "t", "splits": {"train": [{"name": "x"}]}}',
            "malformed",
        ),
    ],
)
def test_manifest_read_errors_are_user_errors(tmp_path, text, match):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(UserError, match=match):
        Manifest.read(tmp_path)


def test_manifest_missing(tmp_path):
    with pytest.raises(UserError, match="not a complete shard set"):
        Manifest.read(tmp_path)


# ----------------------------------------------------------------------------- reader


def test_iter_shard_returns_raw_bytes(tmp_path):
    samples = _samples(3)
    write_shard(tmp_path / "train-000000.tar", samples)
    got = list(iter_shard(tmp_path / "train-000000.tar"))
    assert got == samples


def test_iter_aligned_merges_sidecars(tmp_path):
    src, lat, dec = tmp_path / "source", tmp_path / "lat", tmp_path / "dec"
    samples = _samples(7)
    _write_set(src, "source", samples, 3)
    _write_set(
        lat, "latent", [{"__key__": s["__key__"], "depth.latent.npy": b"L" + s["x.bin"]} for s in samples], 3
    )
    _write_set(dec, "decoded", [{"__key__": s["__key__"], "depth.decoded.npy": b"D"} for s in samples], 3)
    merged = list(iter_aligned(src, {"lat": lat, "dec": dec}, "train"))
    assert [m["__key__"] for m in merged] == [s["__key__"] for s in samples]
    assert all(m["depth.latent.npy"] == b"L" + m["x.bin"] and m["depth.decoded.npy"] == b"D" for m in merged)
    # process r of n takes shards i mod n == r
    part = list(iter_aligned(src, {"lat": lat}, "train", shard_indices=[1]))
    assert [m["__key__"] for m in part] == ["s003", "s004", "s005"]


def test_iter_aligned_key_mismatch(tmp_path):
    src, lat = tmp_path / "source", tmp_path / "lat"
    samples = _samples(4)
    _write_set(src, "source", samples, 4)
    side = [{"__key__": s["__key__"], "z.npy": b"1"} for s in samples]
    side[2]["__key__"] = "other"
    _write_set(lat, "latent", side, 4)
    with pytest.raises(ShardMismatchError, match="key 'other' != source key 's002'"):
        list(iter_aligned(src, {"lat": lat}))


def test_iter_aligned_count_mismatch_from_manifest(tmp_path):
    src, lat = tmp_path / "source", tmp_path / "lat"
    _write_set(src, "source", _samples(4), 2)
    _write_set(lat, "latent", [{"__key__": f"s{i:03d}", "z.npy": b"1"} for i in range(3)], 2)
    with pytest.raises(ShardMismatchError, match="samples"):
        list(iter_aligned(src, {"lat": lat}))
    _write_set(lat, "latent", [{"__key__": f"s{i:03d}", "z.npy": b"1"} for i in range(4)], 4)
    with pytest.raises(ShardMismatchError, match="1 train shards, the source has 2"):
        list(iter_aligned(src, {"lat": lat}))


def test_iter_aligned_count_mismatch_inside_shard(tmp_path):
    """A sidecar shard shorter or longer than its source is caught even when the manifest lies."""
    src, lat = tmp_path / "source", tmp_path / "lat"
    _write_set(src, "source", _samples(3), 3)
    manifest = _write_set(lat, "latent", [{"__key__": f"s{i:03d}", "z.npy": b"1"} for i in range(2)], 3)
    manifest.splits["train"][0].samples = 3
    manifest.write(lat)
    with pytest.raises(ShardMismatchError, match="ends at sample 2"):
        list(iter_aligned(src, {"lat": lat}))
    manifest = _write_set(lat, "latent", [{"__key__": f"s{i:03d}", "z.npy": b"1"} for i in range(4)], 4)
    manifest.splits["train"][0].samples = 3
    manifest.write(lat)
    with pytest.raises(ShardMismatchError, match="more samples than the source"):
        list(iter_aligned(src, {"lat": lat}))


def _corrupt_tar(path: Path, cut: int = 512 * 3) -> None:
    """A shard cut short: by default inside the data of its second member."""
    write_shard(path, _samples(3))
    data = path.read_bytes()
    os.remove(path)
    path.write_bytes(data[:cut])


@pytest.mark.parametrize("policy", ["skip", "warn"])
def test_error_policy_counts_and_continues(tmp_path, policy, caplog):
    shard = tmp_path / "train-000000.tar"
    _corrupt_tar(shard)
    handler = ErrorPolicy(policy)
    got = list(iter_shard(shard, handler))
    assert sum(handler.counts.values()) >= 1
    assert len(got) <= 1
    assert ("skipped a bad sample" in caplog.text) == (policy == "warn")


def test_error_policy_raise_and_unknown(tmp_path):
    shard = tmp_path / "train-000000.tar"
    _corrupt_tar(shard)
    with pytest.raises(Exception):  # noqa: B017 - whatever tarfile raises, it propagates
        list(iter_shard(shard, ErrorPolicy("raise")))
    with pytest.raises(UserError, match="valid: raise, skip, warn"):
        ErrorPolicy("ignore")


# ----------------------------------------------------------------------------- verify


def test_verify_detects_changes(tmp_path):
    _write_set(tmp_path, "source", _samples(6), 3)
    assert verify(tmp_path) == []
    shard = tmp_path / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    assert any("sha256 differs" in p for p in verify(tmp_path))
    shard.write_bytes(bytes(data[:-512]))
    assert any("bytes, manifest says" in p for p in verify(tmp_path))
    shard.unlink()
    (tmp_path / "train-000009.tar").write_bytes(b"")
    problems = verify(tmp_path)
    assert any("missing" in p for p in problems) and any("not listed" in p for p in problems)


def test_truncated_shard_is_caught_by_aligned_reader(tmp_path):
    """A shard cut at a member boundary reads as a shorter tar; the manifest count catches it."""
    src = tmp_path / "source"
    _write_set(src, "source", _samples(3), 3)
    shard = src / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: 512 * 4 + 100])  # inside the header of the third member
    with pytest.raises(TruncatedTarError, match="truncated or corrupt header"):
        list(iter_aligned(src))
    handler = ErrorPolicy("skip")  # the sample being read when the tar broke is dropped too
    assert len(list(iter_aligned(src, handler=handler))) == 0
    assert handler.counts["TruncatedTarError"] == 1 and handler.counts["ShortShard"] == 1
