"""``synesthesia bootstrap``: train small image-conditioned latent diffusion generators on paired data.

DLA needs a frozen generator RGB → latent of a missing modality. Where no
pretrained one exists, one is trained here on a paired split (RGB + the true
signal, no labels) and then frozen. Per target modality, in the Marigold layout
(Ke et al., CVPR 2024):

* ``c = E(rgb)``: the RGB latent of the frozen autoencoder (TAEF2: 32×H/8×W/8),
  bilinearly resized to the target latent's h×w when they differ;
* ``x₀ = E(map(signal))``: the target, the signal mapped to a 3-channel image in
  [0, 1] by :mod:`synesthesia.generators.mappings` and encoded by the same
  autoencoder (both are encoded once and cached; the autoencoder stays frozen);
* a diffusers ``UNet2DModel`` on ``[c ; x_t]`` (in_channels = 2·C) trained with
  a diffusers scheduler's forward process (DDIM or rectified flow, 1–4 sampling
  steps), evaluated on held-out pairs against a mean-latent and a same-size
  regression baseline, and saved as the folder
  :mod:`synesthesia.generators.latent_diffusion` loads.

Modules, in the order a run uses them:

* :mod:`~synesthesia.bootstrap.options` — valid option values, ``EVALUATION_ONLY``
  and :func:`check_config`;
* :mod:`~synesthesia.bootstrap.data` — read the paired split and encode it once
  (:class:`PairedLatents`, :func:`encode_pairs`);
* :mod:`~synesthesia.bootstrap.model` — build from config: the frozen codec
  (:func:`build_codec`), the UNet (:func:`build_unet`), the scheduler
  (:func:`build_scheduler`);
* :mod:`~synesthesia.bootstrap.loop` — the accelerate training loop
  (:func:`train_unet`): noising objective, resumable checkpoints;
* :mod:`~synesthesia.bootstrap.quality` — held-out sampling as stage one does it
  (:func:`sample_heldout`), the regression baseline (:func:`regress`),
  :func:`latent_metrics`, :func:`depth_metrics`, and :func:`format_summary`;
* :mod:`~synesthesia.bootstrap.folder` — the model card and the atomic write of
  the model folder (:func:`save_model`);
* :mod:`~synesthesia.bootstrap.run` — the verb: :func:`bootstrap_modality` (train,
  evaluate, save one modality) and :func:`run_bootstrap` (all of them).
"""

from synesthesia.bootstrap.data import PairedLatents, encode_pairs
from synesthesia.bootstrap.folder import save_model
from synesthesia.bootstrap.loop import train_unet
from synesthesia.bootstrap.model import build_codec, build_scheduler, build_unet
from synesthesia.bootstrap.options import (
    EVALUATION_ONLY,
    PRECISIONS,
    PREDICTION_TYPES,
    SCHEDULER_KINDS,
    TIMESTEP_SAMPLING,
    check_config,
)
from synesthesia.bootstrap.quality import (
    depth_metrics,
    format_summary,
    latent_metrics,
    regress,
    sample_heldout,
)
from synesthesia.bootstrap.run import bootstrap_modality, run_bootstrap

__all__ = [
    "EVALUATION_ONLY",
    "PRECISIONS",
    "PREDICTION_TYPES",
    "SCHEDULER_KINDS",
    "TIMESTEP_SAMPLING",
    "PairedLatents",
    "bootstrap_modality",
    "build_codec",
    "build_scheduler",
    "build_unet",
    "check_config",
    "depth_metrics",
    "encode_pairs",
    "format_summary",
    "latent_metrics",
    "regress",
    "run_bootstrap",
    "sample_heldout",
    "save_model",
    "train_unet",
]
