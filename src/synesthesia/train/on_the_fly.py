"""The decoded privileged source decoded on the fly (``train.decoded_from=latents``).

The decode-encode loop that DLA removes can read stage one's decoded sidecars
(``decoded_from: sidecars``, :mod:`synesthesia.train.sidecars`) or decode the
latent set ``train.source=latent`` reads while training, here:

- :func:`build_decoder`: the set's own generator, rebuilt from its manifest's
  ``config.generator`` once per process, frozen, eval mode, with the autocast
  precision stage one recorded (fp32 on the CPU);
- :func:`decode_latents`: stored latents → raw signals, as stage one decodes
  them for ``shard.decode: true`` (``torch.inference_mode``);
- :class:`OnTheFlyDecoder`: in the main process, after :func:`~synesthesia.train.samples.collate`,
  a batch's raw latents (one of their ``S`` samples drawn exactly as for the
  latent source, not standardised) → ``batch["decoded"]``, flagged samples
  zeroed as in the decoded sidecars, image-aligned modalities cropped and flipped
  by each sample's ``batch["geometry"]`` as a decoded sidecar's are. It runs on
  the loader's ``device`` (the trainer passes the accelerator's) and counts its
  seconds (the trainer's ``timing.decode_s_per_step``, part of ``data_s_per_step``).

Either way the teacher sees ``{"kind": "decoded", "shape": [H, W]}`` (the
on-the-fly shape is found at resolve time by decoding one zero latent), so a
teacher trained one way evaluates and distils the other way.
"""

from __future__ import annotations

import functools
import json
import time
from typing import TYPE_CHECKING, Any

import torch

from synesthesia import UserError
from synesthesia.generators.base import Generator, autocast_context
from synesthesia.train.samples import RAW_LATENTS, apply_geometry

if TYPE_CHECKING:  # the sidecars module imports this one
    from synesthesia.train.sidecars import Sidecar


def build_decoder(
    gen: dict[str, Any], device: str | torch.device = "cpu", precision: str = "fp32"
) -> Generator:
    """The generator of a latent set's manifest (``config.generator``), frozen and in eval mode on
    ``device`` with ``precision`` autocast (fp32 on the CPU), to decode its latents.

    Built once per process for each (config, device, precision): resolving the data and each
    loader (train, val, test) share it, as decoding never changes it."""
    return _cached_decoder(json.dumps(gen, sort_keys=True), str(torch.device(device)), precision)


@functools.lru_cache(maxsize=4)
def _cached_decoder(gen_json: str, device: str, precision: str) -> Generator:
    from synesthesia.config import GeneratorConfig, build
    from synesthesia.stage_one import build_generator

    generator = build_generator(build(GeneratorConfig, json.loads(gen_json), "generator"))
    return generator.setup(device, precision)


def decode_latents(generator: Generator, latents: torch.Tensor) -> torch.Tensor:
    """Latents as stored (B, *latent shape) → raw signals (B, H, W) float32 (or B×C×H×W) on the CPU, as stage
    one decodes them for ``shard.decode: true`` (floats in float32, codes as integers; the
    generator's device and autocast precision; ``torch.inference_mode``)."""
    latents = latents.to(generator.device)
    if latents.is_floating_point():
        latents = latents.float()
    try:
        with torch.inference_mode(), autocast_context(generator.device, generator.precision):
            signal = generator.decode(latents)
    except NotImplementedError:
        raise UserError(
            f"generator {generator.name!r} has no decoder: train.decoded_from=latents cannot decode its latents"
        ) from None
    signal = signal.float().cpu()
    # a normal tensor, not an inference tensor: flagged rows are zeroed in place, and autograd may keep it
    return signal.clone() if signal.is_inference() else signal


class OnTheFlyDecoder:
    """``train.decoded_from=latents``: a collated batch's raw latents → ``batch["decoded"]``.

    Runs in the main process (DataLoader workers only read and decode RGB and
    latents). Each modality's generator is taken on first use from
    :func:`build_decoder` (built once per process), frozen and in eval mode on ``device`` with the
    precision stage one recorded; a batch is decoded in one call per modality
    under ``torch.inference_mode``, to float32 (B, *shape) on the CPU, rows of
    flagged samples (``present`` False) set to zeros as in stage one's decoded
    sets. The signals of ``aligned`` modalities then take each sample's geometry
    (``batch["geometry"]``, :func:`apply_geometry`), as a decoded sidecar's do in
    :class:`SampleDecoder`. ``seconds`` sums the time spent here.
    """

    def __init__(
        self,
        sidecars: dict[str, Sidecar],
        device: str | torch.device | None = None,
        aligned: frozenset[str] = frozenset(),
    ):
        self.sidecars = {m: s for m, s in sidecars.items() if s.on_the_fly}
        self.aligned = aligned
        self.device = torch.device(device if device is not None else "cpu")
        self.generators: dict[str, Generator] = {}
        self.seconds = 0.0

    def generator(self, modality: str) -> Generator:
        if modality not in self.generators:
            sidecar = self.sidecars[modality]
            self.generators[modality] = build_decoder(
                sidecar.generator, self.device, sidecar.spec.get("precision", "fp32")
            )
        return self.generators[modality]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        raw = batch.pop(RAW_LATENTS)
        decoded = dict(batch.get("decoded") or {})
        for m, sidecar in self.sidecars.items():
            signal = decode_latents(self.generator(m), raw[m])
            if tuple(signal.shape[1:]) != tuple(sidecar.spec["shape"]):
                raise UserError(
                    f"{m}: the generator decoded a batch to {list(signal.shape[1:])}, "
                    f"not the {sidecar.spec['shape']} found when the data was resolved"
                )
            present = (batch.get("present") or {}).get(m)
            if present is not None and not bool(present.all()):
                signal[~present] = 0.0
            decoded[m] = apply_geometry(signal, batch["geometry"]) if m in self.aligned else signal
        batch["decoded"] = decoded
        self.seconds += time.perf_counter() - start
        return batch
