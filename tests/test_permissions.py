"""Published files and folders take the process umask's permissions (0644/0755 under umask 022),
not the private 0600/0700 of the temporaries they are written through: others on a shared
cluster can read the data."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from tests.tiny_scenes import tiny_scenes

from synesthesia.cli import main
from synesthesia.utils import atomic_write_text, process_umask

TINY = tiny_scenes()


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_process_umask_reads_without_changing(umask):
    assert process_umask() == umask
    assert process_umask() == umask


def test_render_and_ingest_outputs_follow_the_umask(tmp_path, umask):
    out = tmp_path / "out"
    assert main(["render", "--out", str(out), "pipelines/demo.yaml", *TINY]) == 0
    source = out / "scenes" / "source"
    dataset = "again"
    assert (
        main(
            [
                "ingest",
                "--out",
                str(out),
                "pipelines/demo.yaml",
                f"dataset={dataset}",
                f"ingest.source={source}",
            ]
        )
        == 0
    )
    atomic_write_text(out / "note" / "metrics.json", "{}\n")
    found = modes(out)
    assert any(name.endswith(".tar") for name in found) and f"{dataset}/source/manifest.json" in found
    for name, mode in found.items():
        expected = (0o777 if (out / name).is_dir() else 0o666) & ~umask
        assert mode == expected, (name, oct(mode), oct(expected))
