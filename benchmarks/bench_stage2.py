"""Stage two cost: MESSy against plain CE per step, the shard loader against in-memory tensors.

Writes a small source + sidecar shard set in a temporary folder (not timed):
64×64 RGB PNGs, three privileged modalities (depth, audio, lidar) of 32×8×8
fp16 latents with S=2 samples per input, channel stats in the manifests. The
models are the demo's: the default teacher (``TeacherConfig()``) and the
``vit_tiny_scenes`` student, built and stepped with the trainer's own pieces
(``StudentTrainee``, the methods registry, AdamW, ``ShardLoader``).

(a) ``messy_over_ce_step``: seconds per MESSy training step (the frozen
    teacher's forward included) ÷ seconds per CE step, at equal batch, on the
    same in-memory batches (target ≤ 1.25).
(b) ``loader_over_memory``: CE training throughput fed by the shard loader
    (``--workers`` DataLoader workers decoding PNGs, drawing and
    standardising latents, augmenting) ÷ the same steps fed from in-memory
    tensors (target ≥ 0.8: the loader keeps up with training).
(c) ``samples_per_s``: MESSy training throughput fed by the shard loader.

Each timing is the median step time after ``--warmup`` steps. CE and MESSy
steps are interleaved (a busy machine's changing load favours neither). With
no workers (the CPU default: decoding inline costs ~2 ms a sample, and workers
would only compete with the model for cores), loader-fed and in-memory CE steps
are interleaved too; with workers, the loader-fed run comes after and is
compared with the mean in-memory CE time before and after it (prefetching
workers would otherwise slow the interleaved in-memory steps). Prints the JSON result, then a one-line summary.

    python benchmarks/bench_stage2.py [--steps 6] [--warmup 2] [--batch-size 16] [--workers 2] [--samples 128]
"""

from __future__ import annotations

import itertools
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import emit, parser  # benchmarks/ is on sys.path when run as a script
from synesthesia.config import MethodConfig, StudentConfig, TeacherConfig, load_pipeline
from synesthesia.methods import MethodContext, build_method
from synesthesia.models.students import build_student
from synesthesia.models.teacher import MultimodalTeacher
from synesthesia.shards.schema import encode_json, encode_npy, latent_field
from synesthesia.shards.writer import Manifest, SplitWriter
from synesthesia.sources.signals import encode_png
from synesthesia.train.data import build_loader, resolve_data
from synesthesia.train.evaluate import privileged_inputs, to_device
from synesthesia.train.loop import StudentTrainee, parameter_groups
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

    def __init__(self, method: str, teacher: MultimodalTeacher, device: torch.device, image_size: int):
        student = build_student(StudentConfig(name="vit_tiny_scenes"), NUM_CLASSES, image_size)
        ctx = MethodContext(
            num_classes=NUM_CLASSES,
            student_dims=dict(student.feature_dims),
            student_depth=student.depth,
            teacher_dim=teacher.dim,
            teacher_depth=teacher.depth,
            modalities=MODALITIES,
        )
        built = build_method(MethodConfig(name=method), ctx)
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


def timed(steppers: dict[str, Stepper], batches, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each stepper on the next batches, the steppers' steps interleaved.

    Interleaving keeps a shared, busy machine's changing load from favouring one
    stepper over another.
    """
    times: dict[str, list[float]] = {name: [] for name in steppers}
    it = iter(batches)
    for i in range(warmup + steps):
        for name, step in steppers.items():
            batch = next(it)
            start = time.perf_counter()
            step(batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fed_pair(step: Stepper, loader, memory, steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds per step fed by ``loader`` (its wait included) and by ``memory``, interleaved."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + steps):
        for j, feed in enumerate((loader, memory)):
            start = time.perf_counter()
            step(next(feed))
            if i >= warmup:
                times[j].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def fed(step: Stepper, batches, steps: int, warmup: int) -> float:
    """Median seconds per step, the wait for the next batch included (a loader-fed training step)."""
    times = []
    it = iter(batches)
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(next(it))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--workers",
        type=int,
        default=-1,
        help="DataLoader workers of the shard loader (-1: 0 on CPU, else 2)",
    )
    p.add_argument(
        "--samples", type=int, default=128, help="train samples written (the loader cycles epochs)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = pick_device(args.device)
    workers = args.workers if args.workers >= 0 else (0 if device.type == "cpu" else 2)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), args.samples)
        cfg = load_pipeline(
            None,
            [
                "dataset=bench",
                f"train.shards={tmp}",
                f"train.modalities={list(MODALITIES)}",
                f"train.batch_size={args.batch_size}",
                f"train.num_workers={workers}",
                "train.shuffle_buffer=256",
            ],
        )
        spec = resolve_data(cfg)
        teacher = MultimodalTeacher(TeacherConfig(), NUM_CLASSES, spec.image_size, spec.teacher_modalities())
        teacher = teacher.to(device).eval().requires_grad_(False)
        loader = build_loader(spec, "train", cfg.train)

        def from_loader():
            for epoch in itertools.count():
                yield from loader.epoch(epoch)

        memory = list(itertools.islice(from_loader(), 4))  # in-memory, already decoded batches
        ce = Stepper("ce", teacher, device, spec.image_size)
        messy = Stepper("messy", teacher, device, spec.image_size)
        total = args.steps + args.warmup
        start = time.perf_counter()
        # (a) both methods on the same in-memory batches, steps interleaved (no loader workers alive)
        times = timed({"ce": ce, "messy": messy}, itertools.cycle(memory), args.steps, args.warmup)
        ce_memory, messy_memory = times["ce"], times["messy"]
        if workers == 0:
            # (b) decoding inline: loader-fed and in-memory steps interleaved, like (a)
            pair = fed_pair(ce, from_loader(), itertools.cycle(memory), args.steps, args.warmup)
            ce_loader, ce_memory_after = pair
            reference = ce_memory_after
        else:
            # (b) with workers, after the in-memory runs: prefetching workers would steal CPU from
            # interleaved in-memory steps
            ce_loader = fed(ce, from_loader(), args.steps, args.warmup)
            ce_memory_after = fed(ce, itertools.cycle(memory), args.steps, args.warmup)
            reference = (ce_memory + ce_memory_after) / 2
        # (c)
        messy_loader = fed(messy, from_loader(), args.steps, args.warmup)
        wall = time.perf_counter() - start

    result = {
        "messy_over_ce_step": messy_memory / ce_memory,
        "loader_over_memory": reference / ce_loader,
        "samples_per_s": args.batch_size / messy_loader,
        "ce_step_s": ce_memory,
        "ce_step_after_s": ce_memory_after,
        "messy_step_s": messy_memory,
        "ce_loader_step_s": ce_loader,
        "messy_loader_step_s": messy_loader,
        "timing_wall_s": wall,
        "config": {
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "steps_per_measurement": total,
            "workers": workers,
            "device": str(device),
            "image_size": spec.image_size,
            "latent": list(LATENT),
            "modalities": list(MODALITIES),
            "teacher": "TeacherConfig() (dim 192, depth 6)",
            "student": "vit_tiny_scenes",
        },
    }
    summary = (
        f"messy_over_ce_step={result['messy_over_ce_step']:.2f} (target <= 1.25), "
        f"loader_over_memory={result['loader_over_memory']:.2f} (target >= 0.8), "
        f"samples_per_s={result['samples_per_s']:.1f} [{device}, batch {args.batch_size}]"
    )
    emit("bench_stage2", result, summary, args.json_out)


if __name__ == "__main__":
    main()
