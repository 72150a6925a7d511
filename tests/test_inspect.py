"""`synesthesia inspect PATH [--verify]`: describe shard sets and re-hash them against their manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synesthesia import UserError
from synesthesia.cli import main
from synesthesia.shards import Manifest, SplitWriter
from synesthesia.shards.verify import describe, find_sets, verify


def _write(directory: Path, kind: str, fields: dict[str, bytes], n: int = 5, **manifest_kw) -> Manifest:
    splits = {}
    for split, count in (("train", n), ("val", 2)):
        writer = SplitWriter(directory, split, shard_size=2)
        for i in range(count):
            writer.add({"__key__": f"{split}{i:03d}", **fields})
        splits[split] = writer.close()
    manifest = Manifest(kind=kind, dataset="ds", splits=splits, **manifest_kw)
    manifest.write(directory)
    return manifest


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "shards" / "ds"
    _write(
        root / "source",
        "source",
        {"rgb.png": b"png", "cls": b"1"},
        skipped={"unreadable_image": 2},
        extra={"modalities": ["depth"], "num_classes": 3, "class_names": ["a", "b", "c"]},
    )
    _write(
        root / "latents" / "tae-depth",
        "latent",
        {"depth.latent.npy": b"lat"},
        generator={
            "name": "tae",
            "class": "TAEGenerator",
            "modality": "depth",
            "mode": "encode",
            "weights": "taef2",
            "sha256": "ab",
        },
        latent_spec={"kind": "spatial", "shape": [32, 8, 8], "dtype": "float16"},
        channel_stats={"mean": [0.0], "std": [1.0]},
    )
    return root


def test_find_sets_and_describe(root):
    sets = find_sets(root)
    assert sets == [root / "latents" / "tae-depth", root / "source"]
    assert find_sets(root / "source") == [root / "source"]
    info = describe(root / "source")
    assert info["kind"] == "source" and info["num_classes"] == 3 and info["modalities"] == ["depth"]
    assert info["splits"] == {"train": {"shards": 3, "samples": 5}, "val": {"shards": 1, "samples": 2}}
    assert info["skipped"] == {"unreadable_image": 2}
    assert info["bytes"] == sum(p.stat().st_size for p in (root / "source").glob("*.tar"))
    lat = describe(root / "latents" / "tae-depth")
    assert lat["generator"]["name"] == "tae" and lat["latent_spec"]["shape"] == [32, 8, 8]
    # generators record their weights' digest as ``sha256``; inspect shows it as weights_sha256
    assert lat["generator"]["weights"] == "taef2" and lat["generator"]["weights_sha256"] == "ab"


def test_find_sets_ignores_sets_being_written(root):
    hidden = root / ".source-abc.tmp"
    _write(hidden, "source", {"cls": b"0"})
    assert hidden not in find_sets(root)


def test_find_sets_errors(tmp_path):
    with pytest.raises(UserError, match="no such path"):
        find_sets(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no shard set"):
        find_sets(tmp_path)


def test_inspect_cli_text_and_json(root, capsys):
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "[source]  train 5 in 3 shards, val 2 in 1 shards" in out
    assert "modalities: depth" in out and '"name": "tae"' in out and "latent spec" in out
    assert main(["inspect", str(root), "--json", "--verify"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["kind"] for d in data] == ["latent", "source"]
    assert all(d["verified"] and d["problems"] == [] for d in data)


def test_inspect_verify_fails_on_any_difference(root, capsys):
    assert main(["inspect", str(root), "--verify"]) == 0
    assert capsys.readouterr().out.count("verify: ok") == 2
    shard = root / "source" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 1
    shard.write_bytes(bytes(data))
    assert verify(root / "source") == [f"{shard}: sha256 differs from the manifest"]
    assert main(["inspect", str(root), "--verify"]) == 1
    captured = capsys.readouterr()
    assert "verify: FAILED" in captured.out and "sha256 differs" in captured.err
    # a stray shard is a difference too
    shard.unlink()
    (root / "latents" / "tae-depth" / "train-000007.tar").write_bytes(b"x")
    assert main(["inspect", str(root / "latents" / "tae-depth"), "--verify"]) == 1
    assert main(["inspect", str(root / "source"), "--verify"]) == 1


def test_inspect_user_mistakes(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("synesthesia inspect: error: no such path")
    (tmp_path / "manifest.json").write_text("{broken")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "unreadable manifest" in capsys.readouterr().err
