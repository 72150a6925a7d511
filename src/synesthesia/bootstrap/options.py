"""The bootstrap section's valid option values and :func:`check_config`.

* ``SCHEDULER_KINDS``, ``PREDICTION_TYPES``, ``TIMESTEP_SAMPLING``, ``PRECISIONS``:
  what ``bootstrap.scheduler``, ``prediction_type``, ``timestep_sampling`` and
  ``precision`` accept;
* ``EVALUATION_ONLY``: options that change only evaluation and sampling, left
  out of the run hash (:func:`synesthesia.bootstrap.run.bootstrap_modality`);
* :func:`check_config`: one clear :class:`~synesthesia.UserError` line per mistake.
"""

from __future__ import annotations

from synesthesia import UserError
from synesthesia.config import BootstrapConfig

SCHEDULER_KINDS = ("ddim", "flow")
PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
TIMESTEP_SAMPLING = ("uniform", "inference")
PRECISIONS = ("no", "bf16", "fp16")
# Options that change only how a trained model is evaluated and sampled, not its training: they are left
# out of the run hash, so changing them resumes the same training run's checkpoints instead of starting over.
EVALUATION_ONLY = ("ensemble",)


def check_config(cfg: BootstrapConfig) -> None:
    """One clear line for each mistake a user can make in the bootstrap section."""
    from synesthesia.generators.mappings import mapping_params

    if not cfg.modalities:
        raise UserError("bootstrap.modalities is empty")
    for modality in cfg.modalities:
        if modality not in ("depth", "audio", "lidar"):
            raise UserError(
                f"bootstrap: cannot train a generator for {modality!r}; valid: depth, audio, lidar"
            )
        mapping_params(modality, **cfg.mapping.get(modality, {}))
    for modality, options in cfg.mapping.items():  # options of modalities not trained now are checked too
        if modality not in ("depth", "audio", "lidar"):
            raise UserError(f"bootstrap.mapping: unknown modality {modality!r}; valid: depth, audio, lidar")
        mapping_params(modality, **options)
    if cfg.scheduler not in SCHEDULER_KINDS:
        raise UserError(f"bootstrap.scheduler {cfg.scheduler!r}; valid: {', '.join(SCHEDULER_KINDS)}")
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"bootstrap.prediction_type {cfg.prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
        )
    if cfg.timestep_sampling not in TIMESTEP_SAMPLING:
        raise UserError(
            f"bootstrap.timestep_sampling {cfg.timestep_sampling!r}; valid: {', '.join(TIMESTEP_SAMPLING)}"
        )
    if cfg.precision not in PRECISIONS:
        raise UserError(f"bootstrap.precision {cfg.precision!r}; valid: {', '.join(PRECISIONS)}")
    if cfg.ensemble < 1:
        raise UserError(f"bootstrap.ensemble must be at least 1, got {cfg.ensemble}")
    if not 1 <= cfg.inference_steps <= cfg.num_train_timesteps:
        raise UserError(
            f"bootstrap.inference_steps must be in 1..{cfg.num_train_timesteps}, got {cfg.inference_steps}"
        )
    for name in ("steps", "batch_size", "encode_batch_size", "num_train_timesteps", "log_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"bootstrap.{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.holdout < 1:
        raise UserError(
            f"bootstrap.holdout must be at least 1 (the quality report needs held-out pairs), got {cfg.holdout}"
        )
    if not cfg.block_channels or any(c < 1 or c % cfg.norm_groups for c in cfg.block_channels):
        raise UserError(
            f"bootstrap.block_channels {cfg.block_channels} must be positive multiples of norm_groups ({cfg.norm_groups})"
        )
