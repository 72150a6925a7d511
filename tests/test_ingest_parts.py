"""`synesthesia ingest --part i/N`: independent parts write their shards; the last publishes the set."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synesthesia import UserError
from synesthesia.config import load_pipeline
from synesthesia.parts import Part, resolve_part
from synesthesia.sources.ingest import ingest

ROOT = Path(__file__).resolve().parents[1]


def _png(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path) -> Path:
    """3 classes × 9 images, one unreadable (skipped inside its shard)."""
    root = tmp_path / "data"
    for c in range(3):
        for i in range(9):
            path = root / f"c{c}" / f"img{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_png(c * 10 + i))
    (root / "c2" / "img4.png").write_bytes(b"broken")
    return root


OVERRIDES = ("dataset=p", "ingest.shard_size=3", "ingest.val_fraction=0.2", "ingest.test_fraction=0.1")


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_three_independent_processes_give_the_bytes_of_one(tmp_path, folder):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("seed: 0\n")
    cfg = load_pipeline(str(pipeline), [*OVERRIDES, f"ingest.source={folder}"])
    whole, manifest = ingest(cfg, tmp_path / "one")
    assert sum(len(v) for v in manifest.splits.values()) >= 4  # enough shards to share
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for name in ("WORLD_SIZE", "RANK", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS"):
        env.pop(name, None)
    cmd = [
        sys.executable,
        "-m",
        "synesthesia",
        "ingest",
        str(pipeline),
        *OVERRIDES,
        f"ingest.source={folder}",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, "--out", str(tmp_path / "parts"), "--part", f"{i}/3"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert _files(tmp_path / "parts") == _files(tmp_path / "one")  # shards, manifest, dataset card
    assert sorted(p.name for p in (tmp_path / "parts" / "p").iterdir()) == ["README.md", "source"]


def test_parts_publish_only_when_all_are_done_and_reruns_keep_work(tmp_path, folder, monkeypatch):
    cfg = load_pipeline(None, [*OVERRIDES, f"ingest.source={folder}"])
    _, reference = ingest(cfg, tmp_path / "one")
    out = tmp_path / "parts"
    final = out / "p" / "source"
    environ = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_ID": "3"}
    assert resolve_part(None, environ) == Part(2, 3, "slurm-array")
    _, manifest = ingest(cfg, out, part=resolve_part(None, environ))
    assert manifest is None and not final.exists()
    staging = [p for p in (out / "p").iterdir() if p.name.startswith(".ingest-")]
    assert len(staging) == 1
    written = {p.name: p.stat().st_mtime_ns for p in staging[0].glob("*.tar")}
    assert written
    _, manifest = ingest(cfg, out, part=Part(2, 3, "--part"))  # a rerun keeps complete shards
    assert {p.name: p.stat().st_mtime_ns for p in staging[0].glob("*.tar")} == written
    assert manifest is None
    _, manifest = ingest(cfg, out, part=Part(0, 3, "--part"))
    assert manifest is None and not final.exists()
    _, manifest = ingest(cfg, out, part=Part(1, 3, "torch.distributed"))
    assert manifest is not None and manifest.splits == reference.splits
    assert _files(out) == _files(tmp_path / "one")
    # a part rerun after the set is published finds it and writes nothing
    _, again = ingest(cfg, out, part=Part(0, 3, "--part"))
    assert again is not None and again.splits == reference.splits
    assert sorted(p.name for p in (out / "p").iterdir()) == ["README.md", "source"]


def test_every_part_sees_the_same_bad_input_errors(tmp_path):
    (tmp_path / "data" / "c").mkdir(parents=True)
    (tmp_path / "data" / "c" / "x.png").write_bytes(b"")
    cfg = load_pipeline(None, ["dataset=p", f"ingest.source={tmp_path / 'data'}"])
    # the only chunk belongs to part 0; part 1 has nothing to write and waits for it
    assert ingest(cfg, tmp_path / "out", part=Part(1, 2, "--part"))[1] is None
    with pytest.raises(UserError, match="no usable samples"):
        ingest(cfg, tmp_path / "out", part=Part(0, 2, "--part"))
    assert list((tmp_path / "out" / "p").iterdir()) == []


def test_a_stale_staging_folder_of_another_input_is_removed(tmp_path, folder):
    cfg = load_pipeline(None, [*OVERRIDES, f"ingest.source={folder}"])
    ingest(cfg, tmp_path / "out", part=Part(0, 3, "--part"))
    (old,) = (tmp_path / "out" / "p").glob(".ingest-*")
    (folder / "c0" / "extra.png").write_bytes(_png(99))  # another input: another fingerprint
    ingest(cfg, tmp_path / "out", part=Part(0, 3, "--part"))
    assert old.exists()  # recent: maybe another job's part still to come
    os.utime(old, (0, 0))
    for p in old.iterdir():
        os.utime(p, (0, 0))
    ingest(cfg, tmp_path / "out", part=Part(0, 3, "--part"))
    assert not old.exists() and len(list((tmp_path / "out" / "p").glob(".ingest-*"))) == 1
