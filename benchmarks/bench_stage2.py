"""Stage two cost: MESSy against plain CE per step, the shard loader against in-memory tensors.

Writes a small source + sidecar shard set in a temporary folder (not timed):
64×64 RGB PNGs, three privileged modalities (depth, audio, lidar) of 32×8×8
fp16 latents with S=2 samples per input, channel stats in the manifests. The
models and privileged modalities are those of ``--pipeline`` (default
``pipelines/demo.yaml``: its teacher section, its student, its
``train.modalities`` and batch size), built and stepped with the trainer's own pieces
(``StudentTrainee``, the methods registry, AdamW, ``ShardLoader``); the frozen
teacher runs under ``torch.no_grad`` as in ``train/loop.py``.

(a) ``messy_over_ce_step``: seconds per MESSy training step (the frozen
    teacher's forward included) ÷ seconds per CE step, at equal batch, on the
    same in-memory batches (target ≤ 1.25). ``teacher_forward_s`` (the frozen
    teacher's forward alone, timed in the same rounds) shows how much of the
    gap is the teacher itself: ``messy_over_ce_step`` cannot fall below
    ``1 + teacher_over_ce_step``.
(b) ``loader_over_memory``: CE training throughput fed by the shard loader
    (decoding PNGs, drawing and standardising latents, augmenting) ÷ the same
    steps fed from in-memory tensors (target ≥ 0.8: the loader keeps up).
(c) ``samples_per_s``: MESSy training throughput fed by the shard loader.

How it stays fair and robust on a small, shared CPU machine:

- **Threads.** The training process uses ``--threads`` intra-op threads
  (``torch.set_num_threads``; default: every core) for *both* sides of every
  ratio. DataLoader workers (``--workers``) are separate processes with one
  thread each (PyTorch's worker default) that compete with those threads for
  the same cores: that competition is part of what a loader costs, so it is
  measured, not hidden. On the CPU the default is no workers (decoding inline
  costs ~2 ms a sample against a step of hundreds of ms, and a worker would
  only steal a core from the model); on CUDA two.
- **Interleaving.** Measurements are taken in rounds: every round times one
  step of each contender back to back, in an order that rotates from round to
  round, so a change in machine load hits all of them alike. Each ratio is the
  median over rounds of the ratio *within* a round; ``*_spread`` gives its
  quartiles and extremes (wide spread = a busy machine: repeat on a quiet one).
  With workers, loader-fed and in-memory steps cannot share a round (prefetching
  workers would slow the in-memory steps), so they run in alternating blocks
  (memory, loader, memory, …), each loader block compared with the mean of the
  memory blocks around it, and each loader block starts by draining the batches
  its workers prefetched while the memory block ran.
- **Warm-up.** ``--warmup`` untimed rounds first (allocator, kernels, the
  loader's first shard).

Prints the JSON result, then a one-line summary. The default run takes about a
minute on a quiet 2-core machine.

    python benchmarks/bench_stage2.py [--rounds 10] [--warmup 2] [--batch-size 16] [--workers -1] [--threads 0]
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from common import emit, parser  # benchmarks/ is on sys.path when run as a script
from synesthesia.config import load_pipeline
from synesthesia.methods import MethodContext, build_method
from synesthesia.models.students import build_student
from synesthesia.models.teacher import MultimodalTeacher
from synesthesia.shards.schema import encode_json, encode_npy, latent_field
from synesthesia.shards.writer import Manifest, SplitWriter
from synesthesia.sources.signals import encode_png
from synesthesia.train.build import parameter_groups
from synesthesia.train.data import build_loader
from synesthesia.train.evaluate import to_device
from synesthesia.train.objectives import StudentTrainee, privileged_inputs
from synesthesia.train.sidecars import resolve_data
from synesthesia.utils import pick_device

MODALITIES = ("depth", "audio", "lidar")
LATENT = (32, 8, 8)
NUM_CLASSES = 10


def write_shards(root: Path, samples: int, image_size: int = 64, spi: int = 2, shard_size: int = 64) -> None:
    """A source set of smooth random images and three latent sidecars (generate mode), with stats."""
    rng = np.random.default_rng(0)
    base = root / "bench"
    source = SplitWriter(base / "source", "train", shard_size)
    sides = {m: SplitWriter(base / "latents" / f"gen-{m}", "train", shard_size) for m in MODALITIES}
    for i in range(samples):
        key = f"s{i:06d}"
        label = int(rng.integers(NUM_CLASSES))
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        rgb = np.kron(coarse, np.ones((image_size // 8, image_size // 8, 1), dtype=np.uint8))
        rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
        source.add(
            {"__key__": key, "rgb.png": encode_png(rgb), "cls": str(label).encode(), "json": encode_json({})}
        )
        for m in MODALITIES:
            z = rng.normal(0, 1, (spi, *LATENT)).astype(np.float16)
            sides[m].add({"__key__": key, latent_field(m): encode_npy(z)})
    src = Manifest(kind="source", dataset="bench", splits={"train": source.close()})
    src.extra = {"modalities": list(MODALITIES), "num_classes": NUM_CLASSES, "image_size": image_size}
    src.write(base / "source")
    for m in MODALITIES:
        side = Manifest(kind="latent", dataset="bench", splits={"train": sides[m].close()})
        side.generator = {"name": "gen", "class": "Bench", "modality": m, "mode": "generate"}
        side.latent_spec = {"kind": "spatial", "shape": list(LATENT), "samples_per_input": spi}
        side.channel_stats = {"mean": [0.0] * LATENT[0], "std": [1.0] * LATENT[0]}
        side.write(base / "latents" / f"gen-{m}")


class Stepper:
    """One optimizer step of a student method, with the frozen teacher's forward when it needs one."""

    def __init__(self, method: str, teacher: MultimodalTeacher, device: torch.device, cfg, image_size: int):
        student = build_student(cfg.student, NUM_CLASSES, image_size)
        ctx = MethodContext(
            num_classes=NUM_CLASSES,
            student_dims=dict(student.feature_dims),
            student_depth=student.depth,
            teacher_dim=teacher.dim,
            teacher_depth=teacher.depth,
            modalities=tuple(cfg.train.modalities),
        )
        built = build_method(dataclasses.replace(cfg.method, name=method), ctx)
        self.trainee = StudentTrainee(student, built).to(device).train()
        self.teacher = teacher if built.needs_teacher else None
        self.optimizer = torch.optim.AdamW(parameter_groups(self.trainee, 0.05), lr=1e-4)
        self.device = device

    def __call__(self, batch) -> None:
        batch = to_device(batch, self.device)
        teacher_out = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out = self.teacher(batch["rgb"], privileged_inputs(batch))
        terms = self.trainee(batch, teacher_out)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.trainee.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def spread(values: list[float]) -> dict[str, float]:
    """Quartiles and extremes of ``values`` (how much the rounds disagreed)."""
    q = np.quantile(np.asarray(values, dtype=np.float64), [0.0, 0.25, 0.5, 0.75, 1.0])
    return {k: round(float(v), 4) for k, v in zip(("min", "p25", "median", "p75", "max"), q, strict=True)}


def rounds(contenders: dict[str, Callable[[], None]], count: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of one call of each contender per round, the order rotating from round to round."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + count):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def block(step: Stepper, feed: Iterator, count: int, skip: int = 0) -> list[float]:
    """Seconds per step fed by ``feed`` (the wait for the batch included), after ``skip`` untimed steps."""
    times = []
    for i in range(skip + count):
        start = time.perf_counter()
        step(next(feed))
        if i >= skip:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--rounds", "--steps", type=int, default=10, help="timed rounds per measurement (default 10)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument(
        "--pipeline",
        default=str(Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"),
        help="whose teacher, student, modalities and batch size to measure (default pipelines/demo.yaml)",
    )
    p.add_argument("--batch-size", type=int, default=0, help="0: the pipeline's train.batch_size")
    p.add_argument(
        "--workers",
        type=int,
        default=-1,
        help="DataLoader workers of the shard loader (-1: 0 on CPU, else 2)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads of the training process (0: every core)",
    )
    p.add_argument(
        "--samples", type=int, default=128, help="train samples written (the loader cycles epochs)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = pick_device(args.device)
    workers = args.workers if args.workers >= 0 else (0 if device.type == "cpu" else 2)
    threads = args.threads if args.threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), args.samples)
        base = load_pipeline(args.pipeline)
        modalities = list(base.train.modalities) or list(MODALITIES)
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown:
            raise SystemExit(f"{args.pipeline}: train.modalities {unknown} not in {MODALITIES}")
        batch_size = args.batch_size or base.train.batch_size
        cfg = load_pipeline(
            args.pipeline,
            [
                "dataset=bench",
                f"train.shards={tmp}",
                f"train.modalities={modalities}",
                "train.source=latent",
                f"train.batch_size={batch_size}",
                f"train.num_workers={workers}",
                "train.shuffle_buffer=256",
            ],
        )
        spec = resolve_data(cfg)
        teacher = MultimodalTeacher(cfg.teacher, NUM_CLASSES, spec.image_size, spec.teacher_modalities())
        teacher = teacher.to(device).eval().requires_grad_(False)
        loader = build_loader(spec, "train", cfg.train)

        def from_loader():
            for epoch in itertools.count():
                yield from loader.epoch(epoch)

        memory = list(itertools.islice(from_loader(), 4))  # in-memory, already decoded batches
        ce = Stepper("ce", teacher, device, cfg, spec.image_size)
        messy = Stepper("messy", teacher, device, cfg, spec.image_size)
        mem = itertools.cycle(memory)
        start = time.perf_counter()

        # (a) CE step, MESSy step and the teacher's forward alone, on the same in-memory batch
        batch0 = memory[0]

        def teacher_forward() -> None:
            batch = to_device(batch0, device)
            with torch.no_grad():
                teacher(batch["rgb"], privileged_inputs(batch))
            if device.type == "cuda":
                torch.cuda.synchronize()

        contenders = {"ce": lambda: ce(batch0), "messy": lambda: messy(batch0), "teacher": teacher_forward}
        timed = rounds(contenders, args.rounds, args.warmup)
        messy_ratios = [m / c for m, c in zip(timed["messy"], timed["ce"], strict=True)]
        teacher_ratios = [t / c for t, c in zip(timed["teacher"], timed["ce"], strict=True)]

        # (b) CE fed by the loader against CE fed from memory
        feed = from_loader()
        if workers == 0:
            fed = rounds(
                {"loader": lambda: ce(next(feed)), "memory": lambda: ce(next(mem))}, args.rounds, args.warmup
            )
            loader_ratios = [m / ld for m, ld in zip(fed["memory"], fed["loader"], strict=True)]
            ce_loader, ce_memory_b = fed["loader"], fed["memory"]
        else:
            # batches the workers can hold ready: drained untimed at the start of each loader block
            ready = max(1, (loader.num_workers * max(2, batch_size // loader.num_workers)) // batch_size)
            per_block = max(2, args.rounds // 2)
            block(ce, feed, 0, skip=args.warmup + ready)  # start the workers, warm up
            mem_blocks = [block(ce, mem, per_block, skip=1)]
            loader_blocks = []
            for _ in range(2):
                loader_blocks.append(block(ce, feed, per_block, skip=ready))
                mem_blocks.append(block(ce, mem, per_block, skip=1))
            loader_ratios = [
                (statistics.median(mem_blocks[i]) + statistics.median(mem_blocks[i + 1]))
                / 2
                / statistics.median(lb)
                for i, lb in enumerate(loader_blocks)
            ]
            ce_loader = [t for b in loader_blocks for t in b]
            ce_memory_b = [t for b in mem_blocks for t in b]

        # (c) MESSy fed by the loader
        messy_loader = block(messy, feed, args.rounds, skip=args.warmup)
        wall = time.perf_counter() - start

    result = {
        "messy_over_ce_step": round(statistics.median(messy_ratios), 4),
        "messy_over_ce_step_spread": spread(messy_ratios),
        "teacher_over_ce_step": round(statistics.median(teacher_ratios), 4),
        "loader_over_memory": round(statistics.median(loader_ratios), 4),
        "loader_over_memory_spread": spread(loader_ratios),
        "samples_per_s": round(batch_size / statistics.median(messy_loader), 3),
        "ce_step_s": round(statistics.median(timed["ce"]), 5),
        "messy_step_s": round(statistics.median(timed["messy"]), 5),
        "teacher_forward_s": round(statistics.median(timed["teacher"]), 5),
        "ce_loader_step_s": round(statistics.median(ce_loader), 5),
        "ce_memory_step_s": round(statistics.median(ce_memory_b), 5),
        "messy_loader_step_s": round(statistics.median(messy_loader), 5),
        "timing_wall_s": round(wall, 2),
        "config": {
            "batch_size": batch_size,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "workers": workers,
            "torch_threads": threads,
            "device": str(device),
            "image_size": spec.image_size,
            "latent": list(LATENT),
            "pipeline": args.pipeline,
            "modalities": modalities,
            "teacher": dataclasses.asdict(cfg.teacher),
            "student": cfg.student.name,
        },
    }
    ms, ls = result["messy_over_ce_step_spread"], result["loader_over_memory_spread"]
    summary = (
        f"messy_over_ce_step={result['messy_over_ce_step']:.2f} [{ms['p25']:.2f}-{ms['p75']:.2f}] (target <= 1.25;"
        f" teacher forward alone {result['teacher_over_ce_step']:.2f} of a CE step), "
        f"loader_over_memory={result['loader_over_memory']:.2f} [{ls['p25']:.2f}-{ls['p75']:.2f}] (target >= 0.8), "
        f"samples_per_s={result['samples_per_s']:.1f} [{device}, batch {batch_size}, {threads} threads,"
        f" {workers} workers]"
    )
    emit("bench_stage2", result, summary, args.json_out)


if __name__ == "__main__":
    main()
