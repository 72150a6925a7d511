"""Scale: peak memory and seconds of ingest → shard → one training epoch at two dataset sizes.

Writes a synthetic webdataset input (tiny smooth random PNGs with a paired
depth map, in tars of 10 000 samples, ``--classes`` labels; not timed), then runs, each as its own
``python -m synesthesia`` process: ``ingest`` (two passes, webdataset spool),
``shard`` (stage one: the ``tae`` generator encodes the depth maps, mapped to 16×16) and ``train`` (one
epoch of a ``ce`` student, ``cnn_micro_test``, on the latents). Each step's
peak RSS is the child's ``ru_maxrss`` (read by a small wrapper process that
runs only that child) and its seconds the wall time. The keys:

- ``rss_100k_over_10k``: the largest step's peak RSS at the large size over
  that at the small size (target ≤ 1.1: memory flat in the dataset size);
- ``seconds_100k_over_10k``: total seconds, large over small (target ≤ 11,
  i.e. roughly linear for 10 × the data);
- ``loader_build_s_4000_shards``: seconds to resolve the data and build a
  stage-two loader over a set of 4000 one-sample shards with three latent
  sidecars (target ≤ 2).

Per-step figures are under ``steps``. ``--small`` runs 1 000 and 10 000 samples
(a quick check; the ratios keep their names). Results go to stdout as JSON
plus a one-line summary, and with ``--json-out`` to a file (conventionally
under ``benchmarks/results/``).

    python benchmarks/bench_scale.py [--small] [--size 32] [--json-out benchmarks/results/scale.json]
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import emit, parser  # benchmarks/ is on sys.path when run as a script

PER_TAR = 10_000
TARGETS = {"rss_100k_over_10k": 1.1, "seconds_100k_over_10k": 11.0, "loader_build_s_4000_shards": 2.0}

# Runs one command as its only child and prints that child's peak RSS (bytes) and exit code.
_WRAPPER = """
import json, resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(json.dumps({"rc": rc, "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""

PIPELINE = """name: scale
dataset: scale
seed: 0
ingest: {{shard_size: {shard_size}, val_fraction: 0.05, test_fraction: 0.05}}
shard:
  generators: [{{name: tae, modality: depth, options: {{size: [16, 16]}}}}]
  splits: [train, val, test]
  batch_size: 256
student: {{name: cnn_micro_test}}
method: {{name: ce}}
train:
  stage: student
  modalities: [depth]
  source: latent
  latent_sets: {{depth: tae-depth}}
  epochs: 1
  batch_size: 256
  num_workers: 0
  warmup_steps: 1
  shards: {shards}
"""


def write_tars(root: Path, samples: int, size: int, classes: int, seed: int = 0) -> int:
    """``samples`` smooth random PNGs with a label, in tars of ``PER_TAR``; bytes written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for t, start in enumerate(range(0, samples, PER_TAR)):
        path = root / f"train-{t:04d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + PER_TAR, samples)):
                coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(buf, format="PNG")
                depth = np.kron(rng.uniform(0.5, 10.0, (2, 2)), np.ones((size // 2, size // 2))).astype(
                    np.float32
                )
                npy = io.BytesIO()
                np.save(npy, depth)
                fields = (
                    ("png", buf.getvalue()),
                    ("cls", str(i % classes).encode()),
                    ("depth.npy", npy.getvalue()),
                )
                for name, data in fields:
                    info = tarfile.TarInfo(f"s{i:07d}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        total += path.stat().st_size
    return total


def measured(command: list[str]) -> dict[str, float]:
    """Peak RSS (MB) and wall seconds of ``command`` run as a child process; fails loudly."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True, check=True
    ).stdout
    seconds = time.perf_counter() - start
    report = json.loads(out.strip().splitlines()[-1])
    if report["rc"] != 0:
        raise SystemExit(f"step failed (exit {report['rc']}): {' '.join(command)}")
    return {"peak_rss_mb": round(report["maxrss"] / 2**20, 1), "seconds": round(seconds, 2)}


def run_size(tmp: Path, samples: int, size: int, classes: int, shard_size: int) -> dict[str, object]:
    """Input generation (not measured), then ingest, shard and one training epoch, each measured."""
    base = tmp / f"n{samples}"
    data, shards, runs = base / "data", base / "shards", base / "runs"
    input_bytes = write_tars(data, samples, size, classes)
    pipeline = base / "scale.yaml"
    pipeline.write_text(PIPELINE.format(shard_size=shard_size, shards=shards))
    cli = [sys.executable, "-m", "synesthesia"]
    commands = {
        "ingest": [*cli, "ingest", str(pipeline), f"ingest.source={data}", "--out", str(shards)],
        "shard": [*cli, "shard", str(pipeline), "--out", str(shards), "--no-progress"],
        "train": [*cli, "train", str(pipeline), "--out", str(runs)],
    }
    steps = {}
    for step, command in commands.items():
        steps[step] = measured(command)
        print(
            f"{samples} samples, {step}: {steps[step]}", file=sys.stderr, flush=True
        )  # kept if a later step fails
    return {
        "samples": samples,
        "input_mb": round(input_bytes / 1e6, 2),
        "steps": steps,
        "peak_rss_mb": max(s["peak_rss_mb"] for s in steps.values()),
        "seconds": round(sum(s["seconds"] for s in steps.values()), 2),
    }


def loader_build_seconds(tmp: Path, shards: int) -> float:
    """Seconds to resolve the data and build a stage-two loader over ``shards`` one-sample shards."""
    from bench_stage2 import write_shards
    from synesthesia.config import load_pipeline
    from synesthesia.train.data import build_loader
    from synesthesia.train.sidecars import resolve_data

    write_shards(tmp, shards, image_size=32, spi=1, shard_size=1)
    cfg = load_pipeline(
        None,
        [
            "dataset=bench",
            f"train.shards={tmp}",
            "train.modalities=[depth, audio, lidar]",
            "train.source=latent",
            "train.num_workers=0",
        ],
    )
    start = time.perf_counter()
    spec = resolve_data(cfg)
    build_loader(spec, "train", cfg.train)
    return time.perf_counter() - start


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--small", action="store_true", help="1 000 and 10 000 samples instead of 10 000 and 100 000"
    )
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--classes", type=int, default=10, help="labels (default 10)")
    p.add_argument("--shard-size", type=int, default=1000, help="ingest.shard_size (default 1000)")
    p.add_argument(
        "--loader-shards", type=int, default=4000, help="shards of the loader-build set (default 4000)"
    )
    args = p.parse_args()
    sizes = (1_000, 10_000) if args.small else (10_000, 100_000)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        small, large = (run_size(Path(tmp), n, args.size, args.classes, args.shard_size) for n in sizes)
        loader_s = loader_build_seconds(Path(tmp) / "loader", args.loader_shards)
    result = {
        "sizes": list(sizes),
        "image_size": args.size,
        "small": small,
        "large": large,
        "rss_100k_over_10k": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "seconds_100k_over_10k": round(large["seconds"] / small["seconds"], 2),
        "loader_build_s_4000_shards": round(loader_s, 3),
        "loader_shards": args.loader_shards,
        "per_step_rss_ratio": {
            step: round(large["steps"][step]["peak_rss_mb"] / small["steps"][step]["peak_rss_mb"], 3)
            for step in small["steps"]
        },
    }
    result["targets_met"] = {key: result[key] <= limit for key, limit in TARGETS.items()}
    summary = (
        f"{sizes[0]} → {sizes[1]} samples ({args.size}px): peak RSS ×{result['rss_100k_over_10k']}"
        f" ({small['peak_rss_mb']:.0f} → {large['peak_rss_mb']:.0f} MB), seconds ×{result['seconds_100k_over_10k']};"
        f" loader over {args.loader_shards} shards built in {loader_s:.2f} s;"
        f" targets met: {sum(result['targets_met'].values())}/{len(TARGETS)}"
    )
    emit("scale", result, summary, args.json_out)


if __name__ == "__main__":
    main()
