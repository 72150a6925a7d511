"""Writing one finished shard: what the main process gathers of it, and the writer thread's job.

- :class:`_ShardState` - one shard while its batches arrive: keys, flags, latents (and decodings),
  read / infer / decode seconds;
- :class:`_Job` - everything the writer thread needs for one shard (no model access): the state, the
  latent and decoded shard paths still to write (local or fsspec URLs), the field names;
- :func:`_write_job` - each sample as npy (plus the flag field when flagged), each tar written
  atomically (a failed write leaves nothing under the shard's name); returns the shard's throughput
  entry.

:class:`~synesthesia.stage_one.set_runner.SetRunner` fills the states and submits the jobs to a
one-thread pool, so writing one shard overlaps inference on the next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from upath import UPath

from synesthesia import UserError
from synesthesia.shards.schema import encode_npy
from synesthesia.shards.writer import ShardInfo, write_shard
from synesthesia.stage_one.data import ShardTask


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
class _Job:
    """Everything the writer thread needs for one shard (no model access)."""

    state: _ShardState
    latent_path: Path | UPath | None
    decoded_path: Path | UPath | None
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
