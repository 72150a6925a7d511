"""Rendering throughput of the procedural scenes: samples per second per core.

Renders ``--samples`` complete source samples (RGB, depth, LiDAR range and
intensity, impact sound, encoded PNG/npy/FLAC/json: everything a shard holds)
in one process and reports ``samples_per_s_per_core`` from the process's CPU
time, which stays meaningful on a shared machine, beside the wall-clock rate.
With ``--workers N`` it also times a full ``render_dataset`` into a temporary
folder (process-parallel, wall clock).

    python benchmarks/bench_render.py                      # 64×64, the demo settings
    python benchmarks/bench_render.py --image-size 128 --workers 2
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, parser  # noqa: E402
from synesthesia.config import load_pipeline  # noqa: E402
from synesthesia.sources.scenes import render_dataset, render_sample  # noqa: E402


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="pipelines/demo.yaml", help="pipeline whose scenes section is timed")
    p.add_argument("--samples", type=int, default=300, help="samples rendered in the single-process timing")
    p.add_argument("--image-size", type=int, default=None, help="override scenes.image_size")
    p.add_argument(
        "--workers", type=int, default=0, help="also time a parallel render_dataset with N processes"
    )
    args = p.parse_args()

    overrides = [f"scenes.image_size={args.image_size}"] if args.image_size else []
    cfg = load_pipeline(args.pipeline, overrides)
    sc = cfg.scenes
    render_sample(cfg.seed, "train", 0, sc)  # warm caches (ray tables, imports)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    total_bytes = 0
    for i in range(args.samples):
        sample = render_sample(cfg.seed, "train", i, sc)
        total_bytes += sum(len(v) for k, v in sample.items() if k != "__key__")
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    result = {
        "samples_per_s_per_core": round(args.samples / cpu, 1),
        "samples_per_s_wall_1proc": round(args.samples / wall, 1),
        "ms_per_sample_cpu": round(1000 * cpu / args.samples, 2),
        "kb_per_sample": round(total_bytes / args.samples / 1024, 1),
        "samples": args.samples,
        "image_size": sc.image_size,
        "lidar_shape": [sc.lidar_beams, sc.lidar_azimuth],
        "audio_seconds": sc.audio_seconds,
    }
    if args.workers > 1:
        n = max(args.samples, 2 * args.workers * 32)
        par = load_pipeline(
            args.pipeline,
            [
                *overrides,
                f"scenes.num_train={n}",
                "scenes.num_val=0",
                "scenes.num_test=0",
                "scenes.num_paired=0",
            ],
        )
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            render_dataset(par, tmp, workers=args.workers, force=True)
            result["parallel"] = {
                "workers": args.workers,
                "samples": n,
                "samples_per_s_wall": round(n / (time.perf_counter() - t0), 1),
            }
    emit(
        "bench_render",
        result,
        f"{result['samples_per_s_per_core']} samples/s per core ({result['ms_per_sample_cpu']} ms CPU each) at "
        f"{sc.image_size}x{sc.image_size}, LiDAR {sc.lidar_beams}x{sc.lidar_azimuth}, {sc.audio_seconds} s audio",
        args.json_out,
    )


if __name__ == "__main__":
    main()
