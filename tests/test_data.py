"""Stage-two data: exact coverage over ranks and workers, fixed epoch length, standardisation, draws."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from tests.stage2_shards import write_tiny_dataset

from synesthesia import UserError
from synesthesia.config import load_pipeline
from synesthesia.train.data import batch_sizes, build_loader, rank_pieces, worker_pieces
from synesthesia.train.sidecars import resolve_data


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("shards"), counts={"train": 23, "val": 7, "test": 6})


def config(shards, *overrides):
    return load_pipeline(
        None,
        [
            "dataset=tiny",
            f"train.shards={shards}",
            "train.modalities=[depth, audio]",
            "train.num_workers=0",
            *overrides,
        ],
    )


@pytest.mark.parametrize("counts", [[5, 5, 5, 5, 3], [7], [1, 9, 2], [4, 4]])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_pieces_cover_every_sample_exactly_once(counts, world, workers):
    order = list(reversed(range(len(counts))))
    seen, sizes = Counter(), []
    for rank in range(world):
        pieces = rank_pieces(counts, order, rank, world)
        sizes.append(sum(hi - lo for _, lo, hi in pieces))
        for worker in range(workers):
            for shard, lo, hi in worker_pieces(pieces, worker, workers):
                seen.update((shard, i) for i in range(lo, hi))
    assert seen == Counter((s, i) for s, n in enumerate(counts) for i in range(n))
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n, steps, b", [(10, 3, 4), (9, 3, 4), (8, 3, 4), (3, 3, 4), (12, 3, 4)])
def test_batch_sizes(n, steps, b):
    sizes = batch_sizes(n, steps, b)
    assert len(sizes) == steps and sum(sizes) == n and min(sizes) >= 1 and max(sizes) <= b


def test_resolve_data_finds_sets_and_stats(shards):
    spec = resolve_data(config(shards))
    assert spec.num_classes == 3 and spec.image_size == 32
    assert set(spec.sidecars) == {"depth", "audio"}
    assert spec.sidecars["depth"].samples_per_input == 2
    assert spec.teacher_modalities()["depth"] == {"kind": "spatial", "shape": [4, 4, 4]}
    with pytest.raises(UserError, match="no latents sidecar set for lidar"):
        resolve_data(config(shards, "train.modalities=[lidar]"))
    with pytest.raises(UserError, match="train.augment 'sideways'; valid: aligned, rgb, none"):
        resolve_data(config(shards, "train.augment=sideways"))
    with pytest.raises(UserError, match="no source shards"):
        resolve_data(config(shards, "dataset=nothing"))
    with pytest.raises(UserError, match="only 1 modality|not in train.modalities"):
        resolve_data(config(shards, "train.latent_sets={lidar: gen-depth}"))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_see_every_key_once_with_equal_step_counts(shards, world):
    cfg = config(shards, "train.batch_size=4")
    spec = resolve_data(cfg)
    for epoch in (0, 1):
        keys, steps = [], set()
        for rank in range(world):
            loader = build_loader(spec, "train", cfg.train, rank=rank, world=world)
            batches = list(loader.epoch(epoch))
            steps.add(len(batches))
            assert len(batches) == loader.steps_per_epoch
            keys += [k for b in batches for k in b["keys"]]
        assert sorted(keys) == [f"train_{i:05d}" for i in range(23)]
        assert len(steps) == 1


def test_batches_are_a_function_of_seed_and_epoch(shards):
    cfg = config(shards, "train.batch_size=5", "train.shuffle_buffer=8")
    spec = resolve_data(cfg)
    a = list(build_loader(spec, "train", cfg.train).epoch(0))
    b = list(build_loader(spec, "train", cfg.train).epoch(0))
    c = list(build_loader(spec, "train", cfg.train).epoch(1))
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(torch.equal(x["rgb"], y["rgb"]) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x["latents"]["depth"], y["latents"]["depth"]) for x, y in zip(a, b, strict=True))
    assert [x["keys"] for x in a] != [x["keys"] for x in c]
    # skipping resumes mid-epoch with the very same batches
    skipped = list(build_loader(spec, "train", cfg.train).epoch(0, skip=2))
    assert [x["keys"] for x in skipped] == [x["keys"] for x in a[2:]]
    assert torch.equal(skipped[0]["rgb"], a[2]["rgb"])


def test_batch_contents_standardised_and_augmented(shards):
    cfg = config(shards, "train.batch_size=23")
    spec = resolve_data(cfg)
    (batch,) = list(build_loader(spec, "train", cfg.train).epoch(0))
    assert batch["rgb"].shape == (23, 3, 32, 32) and batch["rgb"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and batch["label"].shape == (23,)
    depth = batch["latents"]["depth"]
    assert depth.shape == (23, 4, 4, 4)
    # each sample's crop box and flip (train.augment=aligned, the default: depth was cropped alike)
    geometry = batch["geometry"]
    assert geometry.shape == (23, 5) and 0 < geometry[:, 4].sum() < 23 and (geometry[:, 2:4] < 1).any()
    # standardised with the train split's channel stats: about zero mean and unit std per channel
    assert depth.mean(dim=(0, 2, 3)).abs().max() < 0.3
    assert (depth.std(dim=(0, 2, 3)) - 1).abs().max() < 0.3
    # the S draw depends on the epoch (and key): some sample draws another of its 2 latents next epoch
    (again,) = list(build_loader(spec, "train", cfg.train).epoch(1))
    order = {k: i for i, k in enumerate(again["keys"])}
    other = again["latents"]["depth"][[order[k] for k in batch["keys"]]]
    assert not torch.equal(other, depth)
    # eval: no augmentation, so two epochs give the same images
    val = [list(build_loader(spec, "val", cfg.train).epoch(e))[0] for e in (0, 1)]
    assert torch.equal(val[0]["rgb"], val[1]["rgb"])
    assert val[0]["geometry"].tolist() == [[0.0, 0.0, 1.0, 1.0, 0.0]] * len(val[0]["keys"])


def test_workers_cover_the_same_keys(shards):
    cfg = config(shards, "train.batch_size=4", "train.num_workers=2")
    spec = resolve_data(cfg)
    loader = build_loader(spec, "train", cfg.train, rank=1, world=2)
    keys = [k for b in loader.epoch(0) for k in b["keys"]]
    single = build_loader(spec, "train", config(shards, "train.batch_size=4").train, rank=1, world=2)
    assert sorted(keys) == sorted(k for b in single.epoch(0) for k in b["keys"])
    assert len(keys) == len(set(keys)) == 12  # rank 1 of 2 takes samples 11..22


def rewrite_member(shard, name, data, after=None):
    """Replace one member of a tar shard, or insert a new one right after member ``after``."""
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m, data if m.name == name else tar.extractfile(m).read()))
            if m.name == after:
                members.append((tarfile.TarInfo(name), data))
    with tarfile.open(shard, "w") as tar:
        for m, content in members:
            m.size = len(content)
            tar.addfile(m, io.BytesIO(content))


def test_bad_sample_is_skipped_and_the_epoch_keeps_its_length(tmp_path):
    root = write_tiny_dataset(tmp_path, counts={"train": 8, "val": 2, "test": 2}, shard_size=4)
    rewrite_member(root / "tiny" / "source" / "train-000000.tar", "train_00001.rgb.png", b"not a png")
    cfg = config(root, "train.batch_size=4")
    loader = build_loader(resolve_data(cfg), "train", cfg.train)
    batches = list(loader.epoch(0))
    assert len(batches) == 2 and all(len(b["keys"]) == 4 for b in batches)
    assert "train_00001" not in {k for b in batches for k in b["keys"]}
    assert loader.padded == 1
    np.testing.assert_array_equal(np.isfinite(batches[0]["rgb"].numpy()), True)


def test_decoded_source_gives_raw_signals(tmp_path):
    root = write_tiny_dataset(tmp_path, counts={"train": 6, "val": 2}, decoded=True)
    cfg = config(root, "train.source=decoded", "train.batch_size=6")
    spec = resolve_data(cfg)
    assert spec.teacher_modalities() == {
        "depth": {"kind": "decoded", "shape": [16, 16]},
        "audio": {"kind": "decoded", "shape": [16, 16]},
    }
    (batch,) = list(build_loader(spec, "train", cfg.train).epoch(0))
    assert batch["decoded"]["depth"].shape == (6, 16, 16) and batch["decoded"]["depth"].dtype == torch.float32
    assert batch["latents"] == {}


def test_flagged_latent_is_marked_missing(tmp_path):
    root = write_tiny_dataset(tmp_path, counts={"train": 4, "val": 2}, shard_size=4)
    shard = root / "tiny" / "latents" / "gen-depth" / "train-000000.tar"
    rewrite_member(shard, "train_00002.depth.flag.txt", b"bad_input", after="train_00002.depth.latent.npy")
    cfg = config(root, "train.batch_size=4", "train.augment=none")
    (batch,) = list(build_loader(resolve_data(cfg), "train", cfg.train).epoch(0))
    flagged = batch["keys"].index("train_00002")
    assert batch["present"]["depth"].tolist() == [i != flagged for i in range(4)]
    assert batch["present"]["audio"].all()
    assert not batch["latents"]["depth"][flagged].any()


def test_building_a_loader_reads_each_manifest_a_bounded_number_of_times(monkeypatch, tmp_path):
    """Opening a split reads each manifest a fixed number of times, whatever the shard count (it
    was once per shard: 23 s to build a loader over 4,000 shards)."""
    from synesthesia.shards.writer import Manifest

    calls = Counter()
    read = Manifest.read.__func__

    def counting(cls, directory, *args, **kwargs):
        calls[str(directory)] += 1
        return read(cls, directory, *args, **kwargs)

    reads = {}
    for shards_per_split in (1, 12):
        root = write_tiny_dataset(
            tmp_path / str(shards_per_split),
            counts={"train": 24, "val": 4, "test": 4},
            shard_size=24 // shards_per_split,
        )
        spec = resolve_data(config(root))
        monkeypatch.setattr(Manifest, "read", classmethod(counting))
        calls.clear()
        build_loader(spec, "train", config(root).train)
        monkeypatch.undo()
        reads[shards_per_split] = sum(calls.values())
    assert reads[12] == reads[1] <= 4, reads
