"""examples/ray/shard_parts.py on a local Ray (two CPUs): three parts as Ray tasks, then finalize, give
the same files as one process."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from synesthesia.cli import main
from synesthesia.stage_one import source_dir
from tiny_scenes import DEFAULTS

ray = pytest.importorskip("ray")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray" / "shard_parts.py"


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "throughput.json"
    }


def test_ray_example_one_task_per_part_then_finalize(tmp_path: Path):
    pipeline = tmp_path / "pipeline.yaml"
    generator = {"name": "tokens", "modality": "lidar", "options": {"num_tokens": 8, "k": 4}}
    shard = {"generators": [generator], "splits": ["train", "val", "test"], "batch_size": 2, "num_workers": 0}
    pipeline.write_text(
        yaml.safe_dump({"dataset": "tiny", "scenes": {**DEFAULTS, "num_train": 6}, "shard": shard})
    )
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["render", str(pipeline), "--out", str(whole)]) == 0
    shutil.copytree(source_dir(whole, "tiny"), source_dir(parts, "tiny"))
    assert main(["shard", str(pipeline), "--out", str(whole), "--no-progress"]) == 0

    spec = importlib.util.spec_from_file_location("shard_parts", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main([str(pipeline), "--out", str(parts), "--parts", "3", "--num-cpus", "2"]) == 0
    assert _digests(parts / "tiny") == _digests(whole / "tiny")  # hidden files too: no lease or report left
    timing = json.loads((parts / "tiny" / "latents" / "tokens-lidar" / "throughput.json").read_text())
    assert timing["num_processes"] == 3 and timing["total"]["shards"] == 5  # every part's report merged
