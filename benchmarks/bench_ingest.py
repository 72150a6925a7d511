"""Ingest throughput: a generated image folder (PNG + paired depth) → source shards.

Prints JSON with ``samples_per_s`` and ``mb_per_s`` (input bytes read per second),
then a one-line summary. The folder is generated in a temporary directory first
and not timed; the ingest itself runs as ``synesthesia ingest`` would.

    python benchmarks/bench_ingest.py [--images 400] [--size 64] [--depth-every 2]
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import emit, parser  # benchmarks/ is on sys.path when run as a script
from synesthesia.config import load_pipeline
from synesthesia.sources.ingest import ingest


def make_folder(root: Path, images: int, size: int, classes: int, depth_every: int, seed: int) -> int:
    """Write ``images`` random PNGs in ``classes`` class folders (and a depth map every ``depth_every``); bytes written."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(images):
        cls = f"class{i % classes}"
        # smooth random images compress like photos rather than like noise
        low = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        path = root / cls / f"img{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        total += len(buf.getvalue())
        if depth_every and i % depth_every == 0:
            depth = root / "depth" / cls / f"img{i:06d}.npy"
            depth.parent.mkdir(parents=True, exist_ok=True)
            np.save(depth, rng.uniform(0.5, 10.0, (size, size)).astype(np.float32))
            total += depth.stat().st_size
    return total


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400, help="number of images to generate (default 400)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--classes", type=int, default=4, help="class folders (default 4)")
    p.add_argument(
        "--depth-every", type=int, default=2, help="pair a depth map with every n-th image; 0: none"
    )
    p.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root, out = Path(tmp) / "data", Path(tmp) / "shards"
        input_bytes = make_folder(root, args.images, args.size, args.classes, args.depth_every, seed=0)
        cfg = load_pipeline(
            None, ["dataset=bench", f"ingest.source={root}", f"ingest.shard_size={args.shard_size}"]
        )
        start = time.perf_counter()
        directory, manifest = ingest(cfg, out)
        seconds = time.perf_counter() - start
        samples = sum(manifest.count(s) for s in manifest.splits)
        output_bytes = sum(s.bytes for shards in manifest.splits.values() for s in shards)
    result = {
        "samples": samples,
        "seconds": round(seconds, 4),
        "samples_per_s": round(samples / seconds, 2),
        "mb_per_s": round(input_bytes / 1e6 / seconds, 3),
        "input_mb": round(input_bytes / 1e6, 3),
        "output_mb": round(output_bytes / 1e6, 3),
        "images": args.images,
        "size": args.size,
        "depth_every": args.depth_every,
        "shards": sum(len(v) for v in manifest.splits.values()),
    }
    summary = (
        f"{samples} samples ({args.size}px, depth every {args.depth_every}) in {seconds:.2f} s: "
        f"{result['samples_per_s']:.0f} samples/s, {result['mb_per_s']:.1f} MB/s"
    )
    emit("ingest", result, summary, args.json_out)


if __name__ == "__main__":
    main()
