"""One generator over this process's shards: batches in, sidecar shards out, and their timings.

- :class:`SetRunner` - ``run(tasks, latent_dir, decoded_dir)`` iterates a DataLoader over
  :class:`~synesthesia.stage_one.data.ShardBatches`; ``launch`` starts a batch's forward (cast to the
  storage dtype, NaN/inf zeroed and flagged, the copy to pinned host memory behind a CUDA event) before
  ``collect`` finishes the previous batch ([decode] for the ablation); a shard's batches are gathered
  and the finished shard goes to the writer thread (:mod:`~synesthesia.stage_one.writer`). Returns the
  throughput report (per shard and total: read / infer / decode / write / wait seconds);
- :class:`_InFlight` - a launched batch whose latents are on their way to the host.

``SetRunner`` checks no cache keys and writes no manifests (:mod:`~synesthesia.stage_one.runner` does),
so benchmarks use it on its own.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synesthesia.config import ShardConfig
from synesthesia.generators.base import Generator, autocast_context
from synesthesia.processes import DieWithParent
from synesthesia.shards.schema import decoded_field, latent_field
from synesthesia.stage_one.data import NONFINITE, ShardBatches, ShardTask
from synesthesia.stage_one.generator import storage_dtype
from synesthesia.stage_one.paths import flag_field
from synesthesia.stage_one.runtime import Runtime
from synesthesia.stage_one.writer import _Job, _ShardState, _write_job

logger = logging.getLogger(__name__)


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

        from synesthesia.progress import progress as progress_counter

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
            worker_init_fn=DieWithParent() if workers else None,  # no orphan outlives a killed run
        )
        report: dict[str, Any] = {"shards": [], "failures": []}
        totals = dict.fromkeys(("read_s", "infer_s", "decode_s", "write_s", "wait_s", "write_wait_s"), 0.0)
        states: dict[tuple[str, int], _ShardState] = {}
        futures: deque[Future] = deque()
        bar = progress_counter(
            total=sum(t.samples for t in tasks),
            desc=latent_out.name,
            unit="sample",
            disable=not (progress and self.runtime.state.is_local_main_process),
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
