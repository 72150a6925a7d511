"""Shard settings and this process's runtime: check the settings, join the job, pick device and precision.

- ``PRECISIONS``, ``DEVICES``, ``LATENT_DTYPES``, ``ON_ERROR`` - the valid values of those ``shard.*``
  settings;
- :func:`validate` - one-line ``UserError``\\ s for shard settings that cannot work, before anything runs;
- :class:`Runtime` - where and how inference runs in this process (accelerate state, device, precision,
  channels_last) and which of those choices change the bytes written (part of the cache key);
- :func:`resolve_runtime` - join the distributed job started by ``accelerate launch`` / ``torchrun``
  (accelerate's ``PartialState``: NCCL on GPUs, gloo on CPU) and resolve ``shard.device`` and
  ``shard.precision`` (fp32 on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from synesthesia import UserError
from synesthesia.config import PipelineConfig, ShardConfig
from synesthesia.generators.base import resolve_precision
from synesthesia.stage_one.paths import set_name

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LATENT_DTYPES = ("auto", "float16", "float32")
ON_ERROR = ("skip", "raise")


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
