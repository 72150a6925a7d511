"""Stage one (`synesthesia shard`): source shards → one latent sidecar set per configured generator.

For every generator of ``shard.generators`` the runner writes
``<out>/<dataset>/latents/<set>/`` (and ``decoded/<set>/`` with
``shard.decode: true``, the decode-encode ablation), aligned shard for shard and
key for key with ``<out>/<dataset>/source/``.

Pipeline (per process)::

    DataLoader workers            main process                 writer thread
    read tar + sha256 ──► preprocess ──► batch ──► forward (autocast) ──► npy + tar (atomic)
    (stage_one_data)                              flag NaN/inf, [decode]

- **Work unit = one source shard.** Shard *i* of a sidecar depends only on
  source shard *i*, the generator and its seed: batches never cross shard
  boundaries, so a rerun computes the same batches and writes the same bytes.
- **Distributed.** Under ``accelerate launch`` or ``torchrun`` the processes
  join through accelerate's ``PartialState`` (NCCL on GPUs, gloo on CPU).
  The shards still to do are listed in order (splits in config order, shards
  in order) and process *r* of *N* takes those at positions *i* with
  *i* mod *N* = *r*. The set folder must be on a file system every process sees.
- **Resume.** A shard that exists under its final name is complete and is
  skipped. Temporary files of a killed run are removed at start.
- **Cache key.** ``cache_key.json`` holds the sha256 of the generator's
  identity and config, its latent spec, the settings that change the bytes
  (batch size, precision, device type, storage dtype, channels_last,
  attention backend) and the source shards' sha256s. A different key is
  refused unless ``--overwrite``, which deletes the old set first.
- **Manifest.** After every process is done, the main process re-reads the set
  in shard order (re-hash, sample counts, flags, per-channel mean/std of the
  train latents in float64) and writes ``manifest.json`` last, atomically, only
  when every shard exists. It holds no timings or paths, so it is
  byte-identical however often the run was interrupted; throughput (per shard
  and total, read / infer / decode / write seconds) is logged and written to
  ``throughput.json``, named by the manifest's ``extra.throughput``.
- **Bad input.** A sample whose ``preprocess`` raises ``SchemaError``
  (``bad_input``) or whose latent holds NaN/inf after the cast to the storage
  dtype (``nonfinite_latent``) keeps its key (the reader needs every source key
  in every sidecar) with an all-zero latent and a ``<modality>.flag.txt`` field
  holding the reason; the manifest lists them in ``extra.flagged`` and counts
  them in ``extra.flag_counts``, and they are left out of the channel stats.
  ``shard.on_error: raise`` fails the shard instead. A source shard that cannot
  be read or fails its sha256 fails with an error naming it; the other shards
  complete, the run exits non-zero and no manifest is written.
- **GPU path.** ``Generator.setup``: bf16 (or fp16 where bf16 is missing)
  autocast with ``precision: auto``, channels_last model (and, here, 4-D
  inputs; ``channels_last: false`` turns both off), xformers attention for
  diffusers models when installed, else PyTorch SDPA; pinned memory and
  non-blocking copies. fp32 on CPU.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synesthesia import UserError
from synesthesia.config import GeneratorConfig, PipelineConfig, ShardConfig, to_dict
from synesthesia.config import config_hash as hash_config
from synesthesia.generators.base import (
    Generator,
    LatentSpec,
    autocast_context,
    enable_fast_attention,
    resolve_precision,
)
from synesthesia.shards.schema import MANIFEST, SCHEMA_VERSION, decoded_field, encode_npy, latent_field
from synesthesia.shards.writer import Manifest, ShardInfo, write_shard
from synesthesia.stage_one_data import NONFINITE, ShardBatches, ShardTask
from synesthesia.stage_one_finalize import (
    THROUGHPUT,
    build_manifest,
    cache_key,
    channel_axis,
    check_set,
    prepare_set,
    scan_set,
    stored_shape,
    write_throughput,
)
from synesthesia.utils import atomic_write_text

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LATENT_DTYPES = ("auto", "float16", "float32")
ON_ERROR = ("skip", "raise")


# ----------------------------------------------------------------------------- names and paths


def set_name(gcfg: GeneratorConfig) -> str:
    """The sidecar folder name of a generator: ``set_name`` or ``<name>-<modality>``."""
    return gcfg.set_name or f"{gcfg.name}-{gcfg.modality}"


def flag_field(modality: str) -> str:
    """The sidecar field that marks a flagged sample (its latent is all zeros)."""
    return f"{modality}.flag.txt"


def source_dir(out: str | Path, dataset: str) -> Path:
    return Path(out) / dataset / "source"


def latent_dir(out: str | Path, dataset: str, name: str) -> Path:
    return Path(out) / dataset / "latents" / name


def decoded_dir(out: str | Path, dataset: str, name: str) -> Path:
    return Path(out) / dataset / "decoded" / name


# ----------------------------------------------------------------------------- config and runtime


def validate(cfg: PipelineConfig) -> None:
    """One-line UserErrors for shard settings that cannot work."""
    s = cfg.shard
    for name, value, valid in (
        ("precision", s.precision, PRECISIONS),
        ("device", s.device, DEVICES),
        ("latent_dtype", s.latent_dtype, LATENT_DTYPES),
        ("on_error", s.on_error, ON_ERROR),
    ):
        if value not in valid:
            raise UserError(f"shard.{name} {value!r} is not one of {', '.join(valid)}")
    if s.batch_size < 1:
        raise UserError(f"shard.batch_size must be at least 1, got {s.batch_size}")
    if s.num_workers < 0:
        raise UserError(f"shard.num_workers must be 0 or more, got {s.num_workers}")
    if s.max_pending_writes < 1:
        raise UserError(f"shard.max_pending_writes must be at least 1, got {s.max_pending_writes}")
    if not s.generators:
        raise UserError("no generators configured: add a list shard.generators to the pipeline")
    names = [set_name(g) for g in s.generators]
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"bad sidecar set name {name!r}: a plain folder name is needed")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two generators write the same set {dupes[0]!r}: give one a set_name")


@dataclass
class Runtime:
    """Where and how inference runs in this process."""

    state: Any  # accelerate.PartialState
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (resolved)
    channels_last: bool

    def settings(self, attention: str) -> dict[str, Any]:
        """The runtime choices that change the bytes written (part of the cache key)."""
        return {
            "device_type": self.device.type,
            "precision": self.precision,
            "channels_last": self.channels_last,
            "attention": attention,
        }


def resolve_runtime(shard: ShardConfig) -> Runtime:
    """Join the distributed job (if launched by accelerate/torchrun) and pick device and precision."""
    from accelerate import PartialState

    if shard.device == "cuda" and not torch.cuda.is_available():
        raise UserError("shard.device is cuda, but CUDA is not available (use device=auto or cpu)")
    # Without CUDA, accelerate joins a torchrun / accelerate-launch job (over gloo) only when told it
    # runs on CPU. The long timeout lets processes with more shards finish before the others give up.
    cpu = shard.device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=timedelta(hours=12))
    device = torch.device("cpu") if cpu else state.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Runtime(
        state=state,
        device=device,
        precision=resolve_precision(device, shard.precision),
        channels_last=device.type == "cuda" and shard.channels_last,
    )


def prepare_generator(generator: Generator, runtime: Runtime) -> str:
    """``Generator.setup`` on this process's device; returns the attention backend in use."""
    generator.setup(runtime.device, runtime.precision)
    if runtime.device.type != "cuda":
        return "none"
    if not runtime.channels_last:
        generator.to(memory_format=torch.contiguous_format)
    return enable_fast_attention(generator)  # idempotent: tells which backend setup() chose


def build_generator(gcfg: GeneratorConfig) -> Generator:
    """``GENERATORS.get(name)(modality=, weights=, samples_per_input=, seed=, **options)``."""
    from synesthesia.generators import create_generator  # importing it registers the built-ins

    try:
        return create_generator(gcfg)
    except TypeError as exc:  # an option the generator does not take
        raise UserError(f"generator {gcfg.name}: {exc}") from None


def storage_dtype(spec: LatentSpec, shard: ShardConfig) -> np.dtype:
    """The dtype latents are stored in: the spec's, unless ``shard.latent_dtype`` overrides a float one."""
    native = np.dtype(spec.dtype)
    if native.kind in "iu" or shard.latent_dtype == "auto":
        return native
    return np.dtype(shard.latent_dtype)


# ----------------------------------------------------------------------------- per-shard accumulation


@dataclass
class _ShardState:
    """What the main process has of one shard while its batches arrive."""

    task: ShardTask
    started: float
    keys: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    latents: list[np.ndarray | None] = field(default_factory=list)
    decoded: list[np.ndarray | None] = field(default_factory=list)
    read_s: float = 0.0
    infer_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class _InFlight:
    """A batch whose forward was launched and whose latents are on their way to the host."""

    item: dict[str, Any]
    arrived: float
    flags: list[str]
    good: list[int]
    host: torch.Tensor | None = None
    finite: torch.Tensor | None = None
    event: Any = None  # torch.cuda.Event on CUDA
    launch_s: float = 0.0


@dataclass
class _Job:
    """Everything the writer thread needs for one shard (no model access)."""

    state: _ShardState
    latent_path: Path | None
    decoded_path: Path | None
    latent_field: str
    decoded_field: str
    flag_field: str


def _write_job(job: _Job) -> dict[str, Any]:
    t0 = time.perf_counter()
    st = job.state
    written: dict[str, ShardInfo] = {}
    for kind, path, name, arrays in (
        ("latent", job.latent_path, job.latent_field, st.latents),
        ("decoded", job.decoded_path, job.decoded_field, st.decoded),
    ):
        if path is None:
            continue
        samples = []
        for key, flag, array in zip(st.keys, st.flags, arrays, strict=True):
            sample = {"__key__": key, name: encode_npy(array)}
            if flag:
                sample[job.flag_field] = flag.encode()
            samples.append(sample)
        try:
            written[kind] = write_shard(path, samples)
        except OSError as exc:
            raise UserError(f"writing {path} failed, nothing was left under that name: {exc}") from None
    write_s = time.perf_counter() - t0
    return {
        "shard": st.task.name,
        "split": st.task.split,
        "samples": len(st.keys),
        "flagged": sum(bool(f) for f in st.flags),
        "read_s": round(st.read_s, 6),
        "infer_s": round(st.infer_s, 6),
        "decode_s": round(st.decode_s, 6),
        "write_s": round(write_s, 6),
        "wall_s": round(time.perf_counter() - st.started, 6),
        "bytes": {k: v.bytes for k, v in written.items()},
    }


# ----------------------------------------------------------------------------- the runner for one set


@dataclass
class SetResult:
    """The outcome of one generator's sets in one process."""

    name: str
    latent_dir: Path
    decoded_dir: Path | None
    complete: bool = False
    failures: list[str] = field(default_factory=list)
    throughput: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageOneResult:
    sets: list[SetResult]

    @property
    def ok(self) -> bool:
        return all(s.complete and not s.failures for s in self.sets)


class StageOneIncomplete(UserError):
    """Some source shards failed: the other shards are written, the affected sets have no manifest."""

    def __init__(self, result: StageOneResult):
        self.result = result
        failures = [f for s in result.sets for f in s.failures]
        incomplete = [s.name for s in result.sets if not s.complete]
        first = f"; first: {failures[0]}" if failures else ""
        super().__init__(
            f"{len(failures)} source shard(s) failed{first}. Set(s) {', '.join(incomplete) or '-'} left without"
            " a manifest; the other shards are written - fix the source and rerun to complete them"
        )


class SetRunner:
    """Runs one generator over the source shards assigned to this process.

    Usable on its own (benchmarks): ``SetRunner(generator, runtime, shard_cfg,
    modality).run(tasks, latent_dir, decoded_dir)`` with a generator already
    prepared by :func:`prepare_generator` writes the shards and
    returns the throughput report; it does not check cache keys or write
    manifests.
    """

    def __init__(self, generator: Generator, runtime: Runtime, shard: ShardConfig, modality: str):
        self.generator = generator
        self.runtime = runtime
        self.shard = shard
        self.modality = modality
        self.spec = generator.latent_spec()
        self.dtype = storage_dtype(self.spec, shard)
        self.torch_dtype = torch.from_numpy(np.zeros(0, dtype=self.dtype)).dtype

    # -- inference

    def _to_device(self, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in arrays.items():
            tensor = tensor.to(self.runtime.device, non_blocking=True)
            if self.runtime.channels_last and tensor.ndim == 4 and tensor.is_floating_point():
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            out[name] = tensor
        return out

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The ablation only: the latents exactly as stored → raw signals (B, [S,] H, W) float32."""
        latents = latents.to(self.runtime.device)
        if latents.is_floating_point():
            latents = latents.float()
        with torch.inference_mode(), autocast_context(self.runtime.device, self.runtime.precision):
            signal = self.generator.decode(latents)
        return signal.float()

    def launch(self, item: dict[str, Any], arrived: float) -> _InFlight:
        """Start one batch: forward, cast, NaN/inf masking and the copy to the host, without waiting.

        On CUDA the device→host copy goes to pinned memory behind an event, so the
        main process can fetch and launch the next batch while this one computes.
        """
        keys, good = item["keys"], list(item["good"])
        fl = _InFlight(item=item, arrived=arrived, flags=list(item["flags"]), good=good)
        if not good:
            return fl
        t0 = time.perf_counter()
        cuda = self.runtime.device.type == "cuda"
        batch = self._to_device(item["arrays"])
        with torch.inference_mode():
            out = self.generator.encode(batch, [keys[i] for i in good])
            if not isinstance(out, torch.Tensor) or out.shape[0] != len(good):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise RuntimeError(
                    f"generator {self.generator.name} returned {got} for a batch of {len(good)}"
                )
            if out.is_floating_point():
                # NaN/inf are judged after the cast to the storage dtype (fp16 overflow)
                stored = out.detach().to(self.torch_dtype)
                finite = torch.isfinite(stored).reshape(len(good), -1).all(dim=1)
                # on the CPU the check costs nothing to read, so the masking copy is made only when
                # needed; on CUDA reading it would stall the stream, so the mask is always applied
                if cuda or not bool(finite.all()):
                    mask = finite.reshape(-1, *([1] * (stored.ndim - 1)))
                    zero = torch.zeros((), dtype=stored.dtype, device=stored.device)
                    stored = torch.where(mask, stored, zero)
                if cuda:
                    fl.finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
                    fl.finite.copy_(finite, non_blocking=True)
                else:
                    fl.finite = finite
            else:
                stored = out.detach()  # codes: range-checked and cast on the host
            if cuda:  # device → pinned host memory behind an event; collect() waits for it
                fl.host = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=True)
                fl.host.copy_(stored, non_blocking=True)
                fl.event = torch.cuda.Event()
                fl.event.record()
            else:  # already on the host: keep it (a fresh tensor, or a private copy when no cast made one)
                fl.host = stored.clone() if stored.data_ptr() == out.data_ptr() else stored
        fl.launch_s = time.perf_counter() - t0
        return fl

    def collect(self, fl: _InFlight, decode: bool) -> tuple[list, list, list[str], float, float]:
        """Finish a launched batch → (latents per key, decoded per key, flags per key, infer s, decode s).

        Samples without arrays (flagged in the worker) get ``None`` placeholders.
        """
        keys, good, flags = fl.item["keys"], fl.good, fl.flags
        latents: list[np.ndarray | None] = [None] * len(keys)
        decoded: list[np.ndarray | None] = [None] * len(keys)
        if not good:
            return latents, decoded, flags, 0.0, 0.0
        t0 = time.perf_counter()
        if fl.event is not None:
            fl.event.synchronize()
        host = fl.host.numpy()
        if fl.finite is not None:
            for j in np.flatnonzero(~fl.finite.numpy()).tolist():
                flags[good[j]] = NONFINITE
        else:
            info = np.iinfo(self.dtype)
            if host.size and (host.min() < info.min or host.max() > info.max):
                raise RuntimeError(f"generator {self.generator.name} returned codes outside {self.dtype}")
            host = host.astype(self.dtype)
        infer_s = fl.launch_s + time.perf_counter() - t0
        decode_s = 0.0
        dec = None
        if decode:
            t1 = time.perf_counter()
            dec = self._decode(torch.from_numpy(host)).cpu().numpy()
            decode_s = time.perf_counter() - t1
        for j, pos in enumerate(good):
            latents[pos] = host[j]
            if dec is not None:
                decoded[pos] = dec[j]
        return latents, decoded, flags, infer_s, decode_s

    def _fill_placeholders(self, st: _ShardState, decode: bool) -> None:
        """Zero latents (and their decodings) for samples that produced none."""
        if all(x is not None for x in st.latents):
            return
        template = next((x for x in st.latents if x is not None), None)
        if template is None:
            template = np.zeros(self.spec.full_shape, dtype=self.dtype)
        zero = np.zeros_like(template)
        st.latents = [zero if x is None else x for x in st.latents]
        if decode:
            dec_template = next((x for x in st.decoded if x is not None), None)
            if dec_template is None:
                dec_template = self._decode(torch.from_numpy(zero[None])).cpu().numpy()[0]
            dec_zero = np.zeros_like(dec_template)
            st.decoded = [dec_zero if x is None else x for x in st.decoded]

    # -- the loop

    def run(
        self,
        tasks: list[ShardTask],
        latent_out: Path,
        decoded_out: Path | None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Process ``tasks`` (shards), writing the missing sidecar shards. Returns the throughput report.

        Source shards that fail are reported in ``report["failures"]``; other
        errors (a generator bug, a full disk) propagate after in-flight writes end.
        """
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        decode = decoded_out is not None
        by_id = {(t.split, t.index): t for t in tasks}
        dataset = ShardBatches(tasks, self.generator.preprocess, self.shard.batch_size, self.shard.on_error)
        workers = min(self.shard.num_workers, len(tasks))
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.runtime.device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        report: dict[str, Any] = {"shards": [], "failures": []}
        totals = dict.fromkeys(("read_s", "infer_s", "decode_s", "write_s", "wait_s", "write_wait_s"), 0.0)
        states: dict[tuple[str, int], _ShardState] = {}
        futures: deque[Future] = deque()
        bar = tqdm(
            total=sum(t.samples for t in tasks),
            unit="sample",
            desc=latent_out.name,
            disable=None if progress and self.runtime.state.is_local_main_process else True,
        )
        lat_field, dec_field, flg_field = (
            latent_field(self.modality),
            decoded_field(self.modality),
            flag_field(self.modality),
        )

        def finish(fut: Future) -> None:
            t0 = time.perf_counter()
            shard_report = fut.result()
            totals["write_wait_s"] += time.perf_counter() - t0
            totals["write_s"] += shard_report["write_s"]
            report["shards"].append(shard_report)
            logger.info(
                "%s %s: %d samples, %.1f samples/s (read %.3f s, infer %.3f s, decode %.3f s, write %.3f s)%s",
                latent_out.name,
                shard_report["shard"],
                shard_report["samples"],
                shard_report["samples"] / max(shard_report["wall_s"], 1e-9),
                shard_report["read_s"],
                shard_report["infer_s"],
                shard_report["decode_s"],
                shard_report["write_s"],
                f", {shard_report['flagged']} flagged" if shard_report["flagged"] else "",
            )

        start = time.perf_counter()
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synesthesia-shard-writer")
        try:
            iterator = iter(loader)

            def absorb(fl: _InFlight) -> None:
                """Add a finished batch to its shard; hand a completed shard to the writer."""
                item = fl.item
                ident = (item["split"], int(item["index"]))
                st = states.get(ident)
                if st is None:
                    st = states[ident] = _ShardState(task=by_id[ident], started=fl.arrived)
                lat, dec, flags, infer_s, decode_s = self.collect(fl, decode)
                st.keys.extend(item["keys"])
                st.flags.extend(flags)
                st.latents.extend(lat)
                st.decoded.extend(dec)
                st.read_s += float(item["read_s"])
                st.infer_s += infer_s
                st.decode_s += decode_s
                totals["read_s"] += float(item["read_s"])
                totals["infer_s"] += infer_s
                totals["decode_s"] += decode_s
                bar.update(len(item["keys"]))
                if not item["last"]:
                    return
                del states[ident]
                self._fill_placeholders(st, decode)
                task = st.task
                job = _Job(
                    state=st,
                    latent_path=None if (latent_out / task.name).exists() else latent_out / task.name,
                    decoded_path=None
                    if not decode or (decoded_out / task.name).exists()
                    else decoded_out / task.name,
                    latent_field=lat_field,
                    decoded_field=dec_field,
                    flag_field=flg_field,
                )
                while len(futures) >= self.shard.max_pending_writes:
                    finish(futures.popleft())
                futures.append(writer.submit(_write_job, job))

            # one batch in flight: batch k+1 is fetched and launched before batch k is collected
            previous: _InFlight | None = None
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    break
                totals["wait_s"] += time.perf_counter() - t0
                if item["error"]:
                    if previous is not None:
                        absorb(previous)
                        previous = None
                    states.pop((item["split"], int(item["index"])), None)
                    report["failures"].append(item["error"])
                    logger.error("source shard failed: %s", item["error"])
                    continue
                current = self.launch(item, t0)
                if previous is not None:
                    absorb(previous)
                previous = current
            if previous is not None:
                absorb(previous)
            while futures:
                finish(futures.popleft())
        finally:
            bar.close()
            for fut in futures:
                fut.cancel()
            writer.shutdown(wait=True)
        wall = time.perf_counter() - start
        samples = sum(s["samples"] for s in report["shards"])
        report["shards"].sort(key=lambda s: (s["split"], s["shard"]))
        report["total"] = {
            "samples": samples,
            "shards": len(report["shards"]),
            "wall_s": round(wall, 6),
            "samples_per_s": round(samples / wall, 3) if wall > 0 else 0.0,
            **{k: round(v, 6) for k, v in totals.items()},
        }
        return report


# ----------------------------------------------------------------------------- the command


def source_tasks(source: Manifest, src_dir: Path, splits: list[str]) -> list[ShardTask]:
    """The shards of ``splits`` in the run's fixed order: splits as given, shards in order."""
    tasks = []
    for split in splits:
        for index, info in enumerate(source.splits.get(split, [])):
            tasks.append(
                ShardTask(
                    split=split,
                    index=index,
                    name=info.name,
                    path=str(src_dir / info.name),
                    samples=info.samples,
                    sha256=info.sha256,
                )
            )
    return tasks


def _merge_reports(reports: list[dict[str, Any]], skipped: int, settings: dict[str, Any]) -> dict[str, Any]:
    shards = sorted((s for r in reports for s in r["shards"]), key=lambda s: (s["split"], s["shard"]))
    keys = ("read_s", "infer_s", "decode_s", "write_s", "wait_s", "write_wait_s")
    samples = sum(r["total"]["samples"] for r in reports)
    wall = max((r["total"]["wall_s"] for r in reports), default=0.0)
    return {
        "num_processes": len(reports),
        **settings,
        "skipped_complete_shards": skipped,
        "failures": [f for r in reports for f in r["failures"]],
        "total": {
            "samples": samples,
            "shards": len(shards),
            "wall_s": wall,
            "samples_per_s": round(samples / wall, 3) if wall > 0 else 0.0,
            **{k: round(sum(r["total"][k] for r in reports), 6) for k in keys},
        },
        "ranks": [{"rank": i, **r["total"]} for i, r in enumerate(reports)],
        "shards": shards,
    }


def _run_generator(
    cfg: PipelineConfig,
    gcfg: GeneratorConfig,
    out: Path,
    source: Manifest,
    splits: list[str],
    runtime: Runtime,
    overwrite: bool,
    progress: bool = True,
) -> SetResult:
    state = runtime.state
    name = set_name(gcfg)
    lat_dir = latent_dir(out, cfg.dataset, name)
    dec_dir = decoded_dir(out, cfg.dataset, name) if cfg.shard.decode else None
    result = SetResult(name=name, latent_dir=lat_dir, decoded_dir=dec_dir)

    generator = build_generator(gcfg)
    attention = prepare_generator(generator, runtime)
    spec = generator.latent_spec()
    identity = generator.identity()
    mode = generator.mode
    dtype = storage_dtype(spec, cfg.shard)
    spec_dict = {**spec.to_dict(), "dtype": dtype.name}
    settings = {
        "batch_size": cfg.shard.batch_size,
        "latent_dtype": dtype.name,
        **runtime.settings(attention),
    }
    generator_config = {k: v for k, v in to_dict(gcfg).items() if k != "set_name"}
    material = {
        "schema_version": SCHEMA_VERSION,
        "kind": "latent",
        "generator": {"config": generator_config, "identity": identity},
        "latent_spec": spec_dict,
        "stage_one": settings,
        "source": {split: [s.sha256 for s in shards] for split, shards in sorted(source.splits.items())},
    }
    dirs = [(lat_dir, material)]
    if dec_dir is not None:
        dirs.append((dec_dir, {**material, "kind": "decoded"}))

    # 1. every process checks the set folders (read-only), then the main process prepares them
    actions = [check_set(d, cache_key(m), m, overwrite) for d, m in dirs]
    state.wait_for_everyone()
    if state.is_main_process:
        for (d, m), action in zip(dirs, actions, strict=True):
            prepare_set(d, cache_key(m), m, action)
    state.wait_for_everyone()

    # 2. every process lists the same pending shards before any of them writes
    tasks = source_tasks(source, source_dir(out, cfg.dataset), splits)
    pending = [
        t
        for t in tasks
        if not (lat_dir / t.name).exists() or (dec_dir is not None and not (dec_dir / t.name).exists())
    ]
    state.wait_for_everyone()
    if pending and state.is_main_process:
        for d, _ in dirs:
            (d / MANIFEST).unlink(missing_ok=True)
    mine = pending[state.process_index :: state.num_processes]
    logger.info(
        "%s: %d shards to do (%d complete), process %d of %d takes %d",
        name,
        len(pending),
        len(tasks) - len(pending),
        state.process_index,
        state.num_processes,
        len(mine),
    )

    # 3. inference
    runner = SetRunner(generator, runtime, cfg.shard, gcfg.modality)
    report = runner.run(mine, lat_dir, dec_dir, progress=progress)
    atomic_write_text(
        lat_dir / f".throughput-rank-{state.process_index}.json", json.dumps(report, sort_keys=True)
    )
    result.failures = list(report["failures"])
    del runner, generator
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    state.wait_for_everyone()

    # 4. the main process merges timings and writes the manifests from the files on disk
    if state.is_main_process:
        rank_files = [lat_dir / f".throughput-rank-{r}.json" for r in range(state.num_processes)]
        reports = [json.loads(p.read_text()) for p in rank_files if p.is_file()]
        merged = _merge_reports(reports, len(tasks) - len(pending), runtime.settings(attention))
        for p in rank_files:
            p.unlink(missing_ok=True)
        result.throughput = merged
        total = merged["total"]
        logger.info(
            "%s: %d samples in %d shards, %.1f samples/s over %d process(es)"
            " (read %.2f s, infer %.2f s, decode %.2f s, write %.2f s; waited %.2f s on input, %.2f s on writes)",
            name,
            total["samples"],
            total["shards"],
            total["samples_per_s"],
            merged["num_processes"],
            total["read_s"],
            total["infer_s"],
            total["decode_s"],
            total["write_s"],
            total["wait_s"],
            total["write_wait_s"],
        )
        for d, _ in dirs:
            write_throughput(d, merged)
        result.failures = merged["failures"]
        result.complete = _finalize(
            cfg, gcfg, source, splits, identity, mode, spec, spec_dict, material, dirs
        )
    state.wait_for_everyone()
    if not state.is_main_process:  # the main process wrote the manifests iff the sets are complete
        result.complete = all((d / MANIFEST).is_file() for d, _ in dirs)
    return result


def _finalize(cfg, gcfg, source, splits, identity, mode, spec, spec_dict, material, dirs) -> bool:
    """Main process: write each set's manifest if every shard exists. Returns whether all are complete."""
    generator_info = {
        **identity,
        "name": gcfg.name,
        "modality": gcfg.modality,
        "mode": mode,
    }
    config = {"dataset": cfg.dataset, "generator": to_dict(gcfg), "stage_one": material["stage_one"]}
    complete = True
    for directory, mat in dirs:
        kind = mat["kind"]
        if kind == "latent":
            field_name = latent_field(gcfg.modality)

            def axis(array, _nd=len(spec.shape)):
                return channel_axis(spec.kind, _nd, array.ndim)

            stats_axis = axis if spec.kind != "codes" else False
        else:
            field_name = decoded_field(gcfg.modality)

            def stats_axis(array):
                return None

        infos, flagged, counts, stats, missing = scan_set(
            directory, source, splits, field_name, flag_field(gcfg.modality), stats_axis
        )
        if missing:
            logger.error(
                "%s: %d shard(s) missing (%s); no manifest written",
                directory,
                len(missing),
                ", ".join(missing[:5]),
            )
            complete = False
            continue
        extra = {
            "set_name": set_name(gcfg),
            "modality": gcfg.modality,
            "field": field_name,
            "flag_field": flag_field(gcfg.modality),
            "flagged": flagged,
            "flag_counts": dict(sorted(counts.items())),
            "cache_key": cache_key(mat),
            "source": {"path": "../../source", "config_hash": source.config_hash},
            "throughput": THROUGHPUT,
        }
        if kind == "decoded":
            extra["decoded_from"] = f"../../latents/{set_name(gcfg)}"
            extra["shape"] = stored_shape(directory, infos, field_name)
        manifest = build_manifest(
            kind=kind,
            dataset=cfg.dataset,
            splits=infos,
            generator=generator_info,
            latent_spec=spec_dict,
            channel_stats=stats,
            preprocessing=identity.get("preprocessing"),
            config=config,
            config_hash=hash_config(config),
            extra=extra,
        )
        manifest.write(directory)
        logger.info(
            "%s: manifest written (%s)", directory, ", ".join(f"{k} {manifest.count(k)}" for k in infos)
        )
    return complete


def run_stage_one(
    cfg: PipelineConfig, out: str | Path = "shards", overwrite: bool = False, progress: bool = True
) -> StageOneResult:
    """Run every configured generator over the source set of ``cfg.dataset`` under ``out``.

    Raises :class:`StageOneIncomplete` (a ``UserError``) when a source shard failed, after every
    other shard was written; its ``result`` says which sets are complete.
    """
    validate(cfg)
    out = Path(out)
    src_dir = source_dir(out, cfg.dataset)
    if not (src_dir / MANIFEST).is_file():
        raise UserError(f"no source set at {src_dir}: run `synesthesia render` or `synesthesia ingest` first")
    source = Manifest.read(src_dir)
    splits = [s for s in cfg.shard.splits if s in source.splits]
    absent = [s for s in cfg.shard.splits if s not in source.splits]
    if absent:
        logger.warning("source set %s has no split(s) %s; skipping them", src_dir, ", ".join(absent))
    if not splits:
        raise UserError(
            f"none of shard.splits ({', '.join(cfg.shard.splits)}) is in the source set {src_dir}"
        )
    runtime = resolve_runtime(cfg.shard)
    logger.info(
        "stage one on %s (%s), process %d of %d",
        runtime.device,
        runtime.precision,
        runtime.state.process_index,
        runtime.state.num_processes,
    )
    results = [
        _run_generator(cfg, g, out, source, splits, runtime, overwrite, progress)
        for g in cfg.shard.generators
    ]
    result = StageOneResult(sets=results)
    if not result.ok:
        raise StageOneIncomplete(result)
    return result


__all__ = [
    "Runtime",
    "SetResult",
    "SetRunner",
    "StageOneIncomplete",
    "StageOneResult",
    "build_generator",
    "decoded_dir",
    "flag_field",
    "latent_dir",
    "prepare_generator",
    "resolve_runtime",
    "run_stage_one",
    "set_name",
    "source_dir",
    "source_tasks",
    "storage_dtype",
    "validate",
]
