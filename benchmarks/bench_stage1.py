"""Stage one cost: the pipeline against the bare generator forward, DLA against decode-encode, bytes on disk.

Renders a small procedural-scenes source set in a temporary folder (not timed),
then, with the real pretrained TAEF2 generator (``tae``):

(a) ``pipeline_over_bare``: stage-one pipeline throughput ÷ bare generator
    forward throughput on the same batches, i.e. bare seconds ÷ pipeline
    seconds (target ≥ 0.9). *Pipeline*: ``SetRunner.run``, the whole stage one
    for a fresh set: DataLoader workers reading, hashing and preprocessing the
    source shards, batched inference in this process, npy encoding and atomic
    tar writing in the background writer thread (DataLoader start-up
    included). *Bare*: the same ``Generator.encode`` forward, under the same
    ``torch.inference_mode``, on the very batches the pipeline builds (same
    shard-bounded composition), preprocessed beforehand and already resident
    on the device, so it reads, copies and writes nothing.
(b) ``dla_seconds_per_sample``: producing the training input by DLA, i.e. the
    stage-one pipeline's wall time per sample (the latent is the input);
    ``decode_encode_seconds_per_sample``: the decode-encode loop, i.e. the
    pipeline with ``decode: true`` (the latent decoded to the raw signal and
    written) plus re-encoding that decoded signal with the modality encoder
    (the same TAEF2 encoder through the modality's 3-channel mapping), per sample.
(c) ``latent_bytes_per_sample`` and ``decoded_bytes_per_sample``: the sidecar
    shards' size on disk (tar headers included) per sample.

Fair and robust on a small, shared CPU machine:

- **Threads.** Both sides run the forward with the same ``--threads`` torch
  intra-op threads (``torch.set_num_threads``; default: every core). The
  pipeline's DataLoader workers (``--workers``, one torch thread each, PyTorch's
  worker default) and its writer thread share those cores with the forward:
  that contention is the pipeline's real overhead on this machine, so it is
  charged to the pipeline, not hidden by giving the bare forward fewer threads.
- **Warm-up.** One untimed bare pass and one untimed pipeline run first
  (kernels, allocator, page cache, the worker start path).
- **Interleaved pairs.** ``--repeats`` bare/pipeline pairs, the order inside a
  pair alternating (bare first, then pipeline first, …), so a machine whose load
  changes favours neither side. ``pipeline_over_bare`` is the median of the
  pairs' ratios; ``pipeline_over_bare_spread`` their quartiles and extremes
  (a wide spread means a busy machine: repeat on a quiet one);
  ``pipeline_over_bare_best`` is best bare ÷ best pipeline.
- ``pipeline_breakdown``: the pipeline's own accounting (median over runs, as a
  share of its wall time) of waiting for input, inference and waiting for the
  writer, which says where any gap is.

Prints the JSON result, then a one-line summary. The default run takes about a
minute on a quiet 2-core machine.

    python benchmarks/bench_stage1.py [--samples 96] [--repeats 6] [--batch-size 32] [--workers 1] [--threads 0]
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import emit, parser  # benchmarks/ is on sys.path when run as a script
from synesthesia.config import load_pipeline
from synesthesia.shards.schema import SIGNAL_FIELDS, decode_npy, encode_npy
from synesthesia.shards.writer import Manifest
from synesthesia.sources.scenes import render_dataset
from synesthesia.stage_one import (
    SetRunner,
    build_generator,
    prepare_generator,
    resolve_runtime,
    source_dir,
    source_tasks,
)
from synesthesia.stage_one.data import ShardBatches, read_shard_samples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_batches(generator, runtime, tasks, batch_size: int) -> list[tuple[dict, list[str]]]:
    """The pipeline's own batches (same shard-bounded composition), preprocessed and on the device."""
    batches = []
    for item in ShardBatches(tasks, generator.preprocess, batch_size):
        arrays = {k: torch.from_numpy(v).to(runtime.device) for k, v in item["arrays"].items()}
        if runtime.channels_last:
            arrays = {
                k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v
                for k, v in arrays.items()
            }
        batches.append((arrays, item["keys"]))
    return batches


def bare_forward_seconds(generator, runtime, batches) -> float:
    """Seconds of ``generator.encode`` alone over ready batches (nothing read, copied or written)."""
    with torch.inference_mode():
        _sync(runtime.device)
        t0 = time.perf_counter()
        for arrays, keys in batches:
            generator.encode(arrays, keys)
        _sync(runtime.device)
        return time.perf_counter() - t0


def pipeline_seconds(runner, tasks, lat: Path, dec: Path | None) -> tuple[float, dict]:
    """Wall seconds of the stage-one runner writing a fresh set (DataLoader start-up included), its report."""
    t0 = time.perf_counter()
    report = runner.run(tasks, lat, dec, progress=False)
    return time.perf_counter() - t0, report


def reencode_seconds(generator, runtime, decoded: Path, modality: str, batch_size: int) -> float:
    """Seconds to re-encode every decoded signal: map it to 3 channels (preprocess) and encode it."""
    field = SIGNAL_FIELDS[modality]
    samples = [s for path in sorted(decoded.glob("*.tar")) for s in read_shard_samples(path)[0]]
    signals = [decode_npy(s[f"{modality}.decoded.npy"]) for s in samples]
    _sync(runtime.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(signals), batch_size):
            chunk = signals[start : start + batch_size]
            arrays = [generator.preprocess({field: encode_npy(sig.astype(np.float32))}) for sig in chunk]
            batch = {k: torch.from_numpy(np.stack([a[k] for a in arrays])) for k in arrays[0]}
            generator.encode(batch, [f"k{start + i}" for i in range(len(chunk))])
    _sync(runtime.device)
    return time.perf_counter() - t0


def spread(values: list[float]) -> dict[str, float]:
    """Quartiles and extremes of ``values`` (how much the pairs disagreed)."""
    q = np.quantile(np.asarray(values, dtype=np.float64), [0.0, 0.25, 0.5, 0.75, 1.0])
    return {k: round(float(v), 4) for k, v in zip(("min", "p25", "median", "p75", "max"), q, strict=True)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=96, help="train samples to render (default 96)")
    p.add_argument("--shard-size", type=int, default=32, help="samples per source shard (default 32)")
    p.add_argument("--batch-size", type=int, default=32, help="stage-one batch size (default 32)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    p.add_argument("--image-size", type=int, default=64, help="rendered image side (default 64)")
    p.add_argument("--modality", default="depth", choices=["depth", "lidar"], help="encoded modality")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="inference device")
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads for the forward (0: every core)"
    )
    p.add_argument(
        "--repeats", type=int, default=6, help="interleaved bare/pipeline timing pairs (default 6)"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = args.threads if args.threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(threads)

    cfg = load_pipeline(
        None,
        [
            "dataset=bench",
            f"scenes.num_train={args.samples}",
            "scenes.num_val=0",
            "scenes.num_test=0",
            "scenes.num_paired=0",
            f"scenes.shard_size={args.shard_size}",
            f"scenes.image_size={args.image_size}",
            f"shard.generators=[{{name: tae, modality: {args.modality}}}]",
            f"shard.batch_size={args.batch_size}",
            f"shard.num_workers={args.workers}",
            f"shard.device={args.device}",
        ],
    )
    gcfg = cfg.shard.generators[0]
    with tempfile.TemporaryDirectory(prefix="bench-stage1-") as tmp:
        out = Path(tmp)
        render_dataset(cfg, out)
        src = source_dir(out, cfg.dataset)
        tasks = source_tasks(Manifest.read(src), src, ["train"])
        samples = sum(t.samples for t in tasks)

        runtime = resolve_runtime(cfg.shard)
        generator = build_generator(gcfg)
        attention = prepare_generator(generator, runtime)
        runner = SetRunner(generator, runtime, cfg.shard, gcfg.modality)

        batches = device_batches(generator, runtime, tasks, args.batch_size)
        bare_forward_seconds(generator, runtime, batches)  # warm-up: kernels, allocator
        pipeline_seconds(runner, tasks, out / "warm-up", None)  # warm-up: page cache, worker start
        shutil.rmtree(out / "warm-up")
        bare, piped, breakdown = [], [], []
        for r in range(args.repeats):
            # the order inside a pair alternates, so neither side always runs on a warmer/cooler machine
            if r % 2 == 0:
                bare.append(bare_forward_seconds(generator, runtime, batches))
            wall, report = pipeline_seconds(runner, tasks, out / f"dla-{r}", None)
            if r % 2 == 1:
                bare.append(bare_forward_seconds(generator, runtime, batches))
            piped.append(wall)
            total = report["total"]
            breakdown.append({k: total[k] / wall for k in ("wait_s", "infer_s", "write_wait_s")})
            if r > 0:
                shutil.rmtree(out / f"dla-{r}")
        lat_dir = out / "dla-0"
        dec_dir = out / "decoded"
        dec_s, _ = pipeline_seconds(runner, tasks, out / "latents-with-decode", dec_dir)
        reenc_s = reencode_seconds(generator, runtime, dec_dir, gcfg.modality, args.batch_size)
        latent_bytes = sum(p.stat().st_size for p in lat_dir.glob("*.tar"))
        decoded_bytes = sum(p.stat().st_size for p in dec_dir.glob("*.tar"))

    ratios = [b / w for b, w in zip(bare, piped, strict=True)]
    result = {
        "pipeline_over_bare": round(float(np.median(ratios)), 4),
        "pipeline_over_bare_spread": spread(ratios),
        "pipeline_over_bare_best": round(min(bare) / min(piped), 4),
        "pair_ratios": [round(r, 4) for r in ratios],
        "pipeline_breakdown": {
            k.removesuffix("_s") + "_share": round(float(np.median([b[k] for b in breakdown])), 4)
            for k in ("wait_s", "infer_s", "write_wait_s")
        },
        "bare_samples_per_s": round(samples / float(np.median(bare)), 2),
        "pipeline_samples_per_s": round(samples / float(np.median(piped)), 2),
        "dla_seconds_per_sample": round(float(np.median(piped)) / samples, 6),
        "decode_encode_seconds_per_sample": round((dec_s + reenc_s) / samples, 6),
        "decode_pipeline_seconds_per_sample": round(dec_s / samples, 6),
        "reencode_seconds_per_sample": round(reenc_s / samples, 6),
        "latent_bytes_per_sample": round(latent_bytes / samples, 1),
        "decoded_bytes_per_sample": round(decoded_bytes / samples, 1),
        "samples": samples,
        "shards": len(tasks),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "image_size": args.image_size,
        "modality": args.modality,
        "generator": "tae",
        "device": str(runtime.device),
        "precision": runtime.precision,
        "attention": attention,
        "repeats": args.repeats,
        "torch_threads": threads,
    }
    sp = result["pipeline_over_bare_spread"]
    summary = (
        f"pipeline/bare {result['pipeline_over_bare']:.3f} [{sp['p25']:.2f}-{sp['p75']:.2f}] (target >= 0.9); "
        f"DLA {result['dla_seconds_per_sample'] * 1e3:.2f} ms/sample vs decode-encode "
        f"{result['decode_encode_seconds_per_sample'] * 1e3:.2f} ms/sample; "
        f"latent {result['latent_bytes_per_sample']:.0f} B vs decoded {result['decoded_bytes_per_sample']:.0f} B per sample"
        f" [{runtime.device}, {threads} threads, {args.workers} workers]"
    )
    emit("bench_stage1", result, summary, args.json_out)


if __name__ == "__main__":
    main()
