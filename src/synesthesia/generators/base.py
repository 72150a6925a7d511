"""The one interface every stage-one generator implements, and their registry.

A generator is a frozen model that maps a batch of source samples to latents of
one modality. ``mode`` says how: ``encode`` (the paired signal exists and is
encoded by a VAE/codec/tokenizer) or ``generate`` (the latent is synthesised from
RGB, e.g. by image-conditioned latent diffusion). It never decodes on the DLA
path; ``decode()`` exists only for the decode-encode ablation.

Work is split in two so stage one can overlap I/O and compute:
``preprocess(sample)`` runs in DataLoader workers (bytes → arrays, numpy only),
``forward(batch, keys)`` runs batched in the main process on the device.

Construction convention (``config.GeneratorConfig``)::

    GENERATORS.get(cfg.name)(modality=cfg.modality, weights=cfg.weights,
                             samples_per_input=cfg.samples_per_input, seed=cfg.seed, **cfg.options)

Dtypes: ``forward`` returns float32 latents for the float kinds (``spatial``,
``tokens``) and int64 for ``codes``; ``LatentSpec.dtype`` is the dtype they are
*stored* in, applied by :meth:`Generator.to_storage` (float16 by default).

GPU path: :meth:`Generator.setup` moves the model to a device, uses
channels_last on CUDA and the fastest attention available (xformers if
installed, else PyTorch SDPA, which diffusers and transformers use by default);
:meth:`Generator.encode` runs ``forward`` under :func:`autocast_context`
(bf16/fp16 autocast on CUDA, plain fp32 on the CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from synesthesia import UserError
from synesthesia.registry import Registry

GENERATORS: Registry[type[Generator]] = Registry("generator")

LATENT_KINDS = ("spatial", "tokens", "codes")
STORED_AS = ("mode", "moments", "sample")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STORAGE_DTYPES = ("float16", "float32", "int16", "int32", "int64")


@dataclass(frozen=True)
class LatentSpec:
    """What a generator writes per input.

    ``shape`` excludes the batch dimension and the leading S (samples per input)
    dimension, which is present only when ``samples_per_input`` > 1.
    ``scaling_applied``: whether ``(z - shift_factor) * scaling_factor`` was
    applied before storing (diffusers convention); ``stored_as``: ``mode`` (the
    posterior mode / a deterministic encoder), ``moments`` (mean and log-variance
    concatenated on the channel axis), ``sample`` (a draw seeded per key).
    """

    kind: str  # spatial (C×h×w) | tokens (T×C) | codes (K×T integers)
    shape: tuple[int, ...]
    dtype: str = "float16"
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    scaling_applied: bool = True
    stored_as: str = "mode"  # mode | moments | sample
    seed: int | None = None
    samples_per_input: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in LATENT_KINDS:
            raise ValueError(f"latent kind {self.kind!r} not in {LATENT_KINDS}")
        if self.stored_as not in STORED_AS:
            raise ValueError(f"stored_as {self.stored_as!r} not in {STORED_AS}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"latent dtype {self.dtype!r} not in {STORAGE_DTYPES}")
        if self.kind == "codes" and not self.dtype.startswith("int"):
            raise ValueError("codes are stored as integers")

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The per-input stored shape, with the S dimension when samples_per_input > 1."""
        return ((self.samples_per_input,) if self.samples_per_input > 1 else ()) + tuple(self.shape)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


class Generator(nn.Module):
    """Base class: subclasses set ``name``/``modality``/``mode`` and implement the methods below."""

    name: str = "generator"
    modality: str = ""
    mode: str = "encode"  # encode | generate
    has_decoder: bool = False
    precision: str = "fp32"  # the autocast precision :meth:`encode` uses (set by :meth:`setup`)

    @property
    def device(self) -> torch.device:
        """Where the generator's weights are (follows ``.to(device)``); the CPU without weights."""
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    # -- the interface ------------------------------------------------------------------

    def latent_spec(self) -> LatentSpec:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What the sidecar's cache key hashes and its manifest records: ``name``, ``class``,
        ``weights`` (source), ``sha256`` (of the weights), ``config`` (constructor settings) and,
        where the input is transformed before the model, ``preprocessing`` (JSON types only)."""
        raise NotImplementedError

    def preprocess(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        """Raw source sample (``field -> bytes``) → named numpy arrays; runs in DataLoader workers.

        Raises ``synesthesia.shards.SchemaError`` for a bad sample (skipped and counted).
        """
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        """Collated preprocessed arrays → latents (B, [S,] *spec.shape); ``keys`` seed any sampling."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Stored latents (B, [S,] *spec.shape) → the raw 2-D signal (ablation only).

        The decoded signal is float32 (B, [S,] H, W): a depth map in metres, a
        log-mel spectrogram in dB or a range image in metres (see mappings).
        Never called on the DLA path.
        """
        raise NotImplementedError(f"generator {self.name!r} has no decoder")

    # -- shared helpers -----------------------------------------------------------------

    def identity_hash(self) -> str:
        """A short stable hash of :meth:`identity` (the sidecar cache key)."""
        from synesthesia.config import config_hash

        return config_hash(self.identity())

    def class_path(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def setup(self, device: str | torch.device = "cpu", precision: str = "auto") -> Generator:
        """Move to ``device`` in eval mode; channels_last and fast attention on CUDA."""
        device = torch.device(device)
        self.precision = resolve_precision(device, precision)
        self.eval().requires_grad_(False)
        self.to(device)
        if device.type == "cuda":
            self.to(memory_format=torch.channels_last)
            enable_fast_attention(self)
        return self

    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        """``forward`` on the generator's device under its autocast precision; float32/int64 out."""
        batch = {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
        }
        with autocast_context(self.device, self.precision):
            out = self.forward(batch, keys)
        return out.float() if out.is_floating_point() else out.long()

    def to_storage(self, latents: torch.Tensor) -> np.ndarray:
        """Latents → numpy in the spec's storage dtype (codes range-checked)."""
        dtype = np.dtype(self.latent_spec().dtype)
        array = latents.detach().cpu().numpy()
        if dtype.kind == "i":
            info = np.iinfo(dtype)
            if array.size and (array.min() < info.min or array.max() > info.max):
                raise ValueError(f"codes out of range for {dtype}")
        return array.astype(dtype)

    def collate(self, items: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Stack preprocessed samples into a batch (the default DataLoader collate, numpy-aware)."""
        return {k: torch.from_numpy(np.stack([item[k] for item in items])) for k in items[0]}


# ----------------------------------------------------------------------------- helpers


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (tuples → lists, unknown objects → str), for identities."""
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def check_common(name: str, *, samples_per_input: int, seed: int, max_samples: int | None = None) -> None:
    """Validate the arguments every generator takes; unsupported values are UserErrors."""
    if not isinstance(samples_per_input, int) or samples_per_input < 1:
        raise UserError(f"{name}: samples_per_input must be a positive integer, got {samples_per_input!r}")
    if max_samples is not None and samples_per_input > max_samples:
        raise UserError(
            f"{name}: samples_per_input={samples_per_input} is not supported here (a deterministic "
            f"encoding has one sample; use stored_as=sample or a generate-mode generator)"
        )
    if not isinstance(seed, int):
        raise UserError(f"{name}: seed must be an integer, got {seed!r}")


def key_seed(key: str, seed: int) -> int:
    """A per-sample seed from the sample key and the run seed (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def key_generators(
    keys: Sequence[str], seed: int, device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """One ``torch.Generator`` per sample, seeded by :func:`key_seed`: the draws of a sample
    do not depend on its batch, its position in it, or the process that runs it."""
    return [torch.Generator(device=device).manual_seed(key_seed(k, seed)) for k in keys]


def resolve_precision(device: str | torch.device, precision: str = "auto") -> str:
    """``auto`` → bf16 on CUDA when supported (else fp16), fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} not in {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


@contextlib.contextmanager
def autocast_context(device: str | torch.device, precision: str = "auto") -> Iterator[None]:
    """bf16/fp16 autocast on CUDA; nothing (fp32) on the CPU or for precision fp32."""
    device = torch.device(device)
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def enable_fast_attention(module: nn.Module) -> str:
    """Use xformers memory-efficient attention where installed, else PyTorch SDPA (the default
    of diffusers ≥ 0.20 and transformers). Returns the backend used."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return "sdpa"
    used = False
    for sub in module.modules():
        fn = getattr(sub, "enable_xformers_memory_efficient_attention", None)
        if callable(fn) and sub is not module:
            try:
                fn()
                used = True
            except Exception:  # a model without attention or an unsupported GPU: keep SDPA
                pass
    return "xformers" if used else "sdpa"


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: 10·log10(range² / MSE)."""
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * float(np.log10(data_range**2 / mse))
