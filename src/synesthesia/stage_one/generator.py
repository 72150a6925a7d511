"""The generator of one set: built from its config, set up on this process's device, its storage dtype.

- :func:`build_generator` - ``GENERATORS.get(name)(modality=, weights=, ...)`` from a
  ``GeneratorConfig``, an option it does not take as a ``UserError`` (stage two builds its on-the-fly
  generators with it too);
- :func:`prepare_generator` - ``Generator.setup`` on the runtime's device and precision
  (channels_last, xformers or PyTorch SDPA attention); returns the attention backend, which is part of
  the cache key;
- :func:`storage_dtype` - the dtype latents are stored in: the spec's, unless ``shard.latent_dtype``
  overrides a float one.
"""

from __future__ import annotations

import numpy as np
import torch

from synesthesia import UserError
from synesthesia.config import GeneratorConfig, ShardConfig
from synesthesia.generators.base import Generator, LatentSpec, enable_fast_attention
from synesthesia.stage_one.runtime import Runtime


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
