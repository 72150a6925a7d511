"""The verb: train, evaluate and save one generator per modality.

* :func:`run_bootstrap`: check the config, encode the paired split of
  ``<shards>/<dataset>/source`` once, then :func:`bootstrap_modality` for each
  of ``bootstrap.modalities``;
* :func:`bootstrap_modality`: train the diffusion UNet and its regression
  baseline (:func:`~synesthesia.bootstrap.loop.train_unet`, work folders keyed by
  a hash of the training options, so a rerun resumes), build the quality report
  on the held-out pairs (:mod:`synesthesia.bootstrap.quality`) and save the
  model folder (:mod:`synesthesia.bootstrap.folder`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from synesthesia import UserError, __version__
from synesthesia.bootstrap.data import PairedLatents, encode_pairs
from synesthesia.bootstrap.folder import _model_card, save_model
from synesthesia.bootstrap.loop import train_unet
from synesthesia.bootstrap.model import _resize_cond, build_codec, build_scheduler
from synesthesia.bootstrap.options import EVALUATION_ONLY, check_config
from synesthesia.bootstrap.quality import depth_metrics, latent_metrics, regress, sample_heldout
from synesthesia.config import PipelineConfig, config_hash
from synesthesia.generators.latent_diffusion import BOOTSTRAP_CLASS, LatentCodec

logger = logging.getLogger(__name__)


def bootstrap_modality(
    pipeline: PipelineConfig,
    modality: str,
    pairs: PairedLatents,
    codec: LatentCodec,
    out_root: Path,
    work_root: Path,
    source_dir: Path,
    command: str,
    device: torch.device,
) -> dict[str, Any]:
    """Train, evaluate and save one modality's generator; returns its quality report."""
    cfg = pipeline.bootstrap
    start = time.monotonic()
    name = f"{cfg.name or pipeline.dataset}-{modality}"
    n = pairs.target.shape[0]
    train_idx = torch.arange(0, n - cfg.holdout)
    held_idx = torch.arange(n - cfg.holdout, n)
    training_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EVALUATION_ONLY}
    run_hash = config_hash({"bootstrap": training_cfg, "modality": modality, "source": str(source_dir)})
    work_dir = work_root / f"{name}-{run_hash}"
    reg_steps = cfg.steps if cfg.regression_steps < 0 else cfg.regression_steps

    unet, train_info = train_unet(
        cfg, pairs, train_idx, "diffusion", work_dir / "diffusion", cfg.steps, device
    )
    reg_unet, reg_info = train_unet(
        cfg, pairs, train_idx, "regression", work_dir / "regression", reg_steps, device
    )

    hw = tuple(pairs.target.shape[-2:])
    cond = _resize_cond(pairs.cond[held_idx], hw)
    true = pairs.target[held_idx]
    keys = [pairs.keys[i] for i in held_idx.tolist()]
    scheduler = build_scheduler(cfg)
    unet.to(device)
    reg_unet.to(device)
    draws = sample_heldout(unet, scheduler, cond, keys, cfg.inference_steps, cfg.seed, cfg.ensemble)
    single, ensembled = draws[:, 0], draws.mean(dim=1)
    reg = regress(reg_unet, cond)
    mean = pairs.target.mean(train_idx).expand_as(true)  # summed a chunk at a time
    quality: dict[str, Any] = {
        "modality": modality,
        "heldout_pairs": len(keys),
        "ensemble": cfg.ensemble,
        "latent_mse_is": (
            f"the mean of {cfg.ensemble} seeded samples (ensemble_*), what stage one writes by default"
            if cfg.ensemble > 1
            else "one seeded sample, what stage one writes by default"
        ),
    }
    candidates = [("single_sample_", single), ("ensemble_", ensembled), ("regression_", reg), ("mean_", mean)]
    for prefix, latents in candidates:
        m = latent_metrics(latents, true)
        quality[f"{prefix}latent_mse"] = m["mse"]
        quality[f"{prefix}latent_cosine"] = m["cosine"]
    mapping = {k: v for k, v in cfg.mapping.get(modality, {}).items()}
    if modality == "depth":
        truth = pairs.signal.read(held_idx)
        for prefix, latents in [*candidates[:3], ("mean_latent_", mean), ("vae_", true)]:
            d = depth_metrics(codec, latents, truth, mapping, device)
            quality[f"{prefix}abs_rel"] = d["abs_rel"]
            quality[f"{prefix}delta1"] = d["delta1"]
    headline = "ensemble_" if cfg.ensemble > 1 else "single_sample_"
    for key in [k for k in quality if k.startswith(headline)]:
        quality[key[len(headline) :]] = quality[key]
    for prefix in ("single_sample_", "ensemble_"):
        beats = quality[f"{prefix}latent_mse"] < min(
            quality["regression_latent_mse"], quality["mean_latent_mse"]
        )
        if modality == "depth":
            beats = beats and quality[f"{prefix}abs_rel"] < min(
                quality["regression_abs_rel"], quality["mean_latent_abs_rel"]
            )
        quality[f"{prefix}beats_baselines"] = bool(beats)
    quality["beats_baselines"] = quality[f"{headline}beats_baselines"]
    beats = quality["beats_baselines"]
    seconds = time.monotonic() - start

    from synesthesia.generators.mappings import mapping_params

    full_mapping = mapping_params(modality, **mapping)
    index = {
        "_class_name": BOOTSTRAP_CLASS,
        "_synesthesia_version": __version__,
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "modality": modality,
        **codec.describe(),
        "mapping": full_mapping,
        "target_shape": list(pairs.target.shape[1:]),
        "cond_shape": list(pairs.cond.shape[1:]),
        "cond_resize": "bilinear" if tuple(pairs.cond.shape[-2:]) != hw else None,
        "signal_shape": list(pairs.signal_shape),
        "prediction_type": "flow" if cfg.scheduler == "flow" else cfg.prediction_type,
        "inference_steps": cfg.inference_steps,
        "ensemble": cfg.ensemble,
        "rgb_size": list(pairs.rgb_size),
        "training": {
            "dataset": pipeline.dataset,
            "source": str(source_dir),
            "split": cfg.split,
            "train_pairs": len(train_idx),
            "heldout_pairs": len(held_idx),
            "steps": cfg.steps,
            "regression_steps": reg_steps,
            "resumed_from": {"diffusion": train_info["resumed_from"], "regression": reg_info["resumed_from"]},
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "seed": cfg.seed,
            "precision": cfg.precision,
            "device": str(device),
            "timestep_sampling": cfg.timestep_sampling,
            "block_channels": list(cfg.block_channels),
            "layers_per_block": cfg.layers_per_block,
            "parameters": sum(p.numel() for p in unet.parameters()),
            "final_loss": train_info["loss_history"][-1][1] if train_info["loss_history"] else None,
            "regression_final_loss": reg_info["loss_history"][-1][1] if reg_info["loss_history"] else None,
            "seconds": round(seconds, 1),
            "config_hash": config_hash(cfg),
            "command": command,
        },
    }
    card = _model_card(name, index, quality, command)
    size = save_model(out_root / name, unet, scheduler, codec, index, quality, card, cfg.max_model_mb)
    quality_line = ", ".join(f"{k}={v:.4g}" for k, v in quality.items() if isinstance(v, float))
    logger.info("%s: %.1f s, %.2f MB, %s; beats baselines: %s", name, seconds, size, quality_line, beats)
    return {"name": name, "folder": str(out_root / name), "seconds": seconds, "mb": size, **quality}


def run_bootstrap(
    pipeline: PipelineConfig,
    out: str | Path | None = None,
    shards: str | Path | None = None,
    command: str = "",
) -> list[dict[str, Any]]:
    """Train one generator per ``bootstrap.modalities`` from ``<shards>/<dataset>/source``."""
    from synesthesia.utils import pick_device

    cfg = pipeline.bootstrap
    check_config(cfg)
    out_root = Path(out or cfg.out)
    source_dir = Path(shards or cfg.shards) / pipeline.dataset / "source"
    if not (source_dir / "manifest.json").is_file():
        raise UserError(f"no source set at {source_dir}; render or ingest it first (synesthesia render ...)")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    codec = build_codec(cfg).to(device)
    t0 = time.monotonic()
    work_root = Path(cfg.work_dir)
    work_root.mkdir(parents=True, exist_ok=True)
    pairs, skipped = encode_pairs(source_dir, cfg, codec, device, folder=work_root)  # latents on disk
    encode_seconds = time.monotonic() - t0
    if skipped:
        logger.warning("skipped samples: %s", skipped)
    logger.info("encoded pairs in %.1f s", encode_seconds)
    results = []
    try:
        for modality in cfg.modalities:
            results.append(
                bootstrap_modality(
                    pipeline,
                    modality,
                    pairs[modality],
                    codec,
                    out_root,
                    work_root,
                    source_dir,
                    command,
                    device,
                )
            )
    finally:
        for paired in pairs.values():
            paired.close()
    for r in results:
        r["encode_seconds"] = round(encode_seconds, 1)
        r["skipped"] = skipped
    return results
