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
  a diffusers scheduler's forward process:

  - ``scheduler: ddim`` — DDPM noising ``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε`` with the
    scaled-linear betas of Stable Diffusion, rescaled to zero terminal SNR (Lin et
    al. 2024) for x₀/v prediction so the first "trailing" inference step starts
    from pure noise; loss ``‖f(c, x_t, t) − y‖²`` with ``y`` = x₀ (``sample``), ε
    (``epsilon``) or v (``v_prediction``). Sampling: DDIM (η = 0), 1–4 steps;
  - ``scheduler: flow`` — rectified flow ``x_σ = (1−σ) x₀ + σ ε``, velocity target
    ``ε − x₀`` at timestep ``1000·σ``; sampling: FlowMatchEulerDiscrete, 1–4 steps.

  ``timestep_sampling: inference`` trains only at the timesteps the few-step
  sampler visits (as few-step fine-tuning of Marigold does), ``uniform`` at all.

Training is an accelerate loop (mixed precision, gradient clipping, warmup +
cosine LR, trackers, a tqdm progress bar, ``save_state`` checkpoints). A batch's
indices and noise are functions of (seed, step) alone, so resuming from a
checkpoint continues exactly where the run stopped.

Quality (held-out pairs: the last ``holdout`` of the split) compares what stage
one will write — the latent-diffusion generator's output for S = 1, noise
seeded by the sample key — with the true encoded latent (MSE, cosine), against
two baselines: the mean training latent, and a regression UNet of the same
architecture and size trained for as many steps to map ``[c ; 0]`` → x₀
directly. With ``ensemble: N`` > 1 (Marigold's test-time ensembling, saved as
the model's default so stage one writes the same) that output is the mean of N
seeded samples; the report then gives both numbers: ``single_sample_latent_mse``
(one draw, the first of the N) and ``ensemble_latent_mse`` (the N-mean), and the
headline ``latent_mse`` is the one stage one writes, i.e. the ensemble's
(``latent_mse_is`` says which). A single draw carries the posterior's spread
(expected error ≈ 2× the posterior variance where RGB leaves the target
undetermined), the N-mean ≈ (1 + 1/N)×, which is why ensembling is what lets a
sampler compete with a regressor of the posterior mean on MSE. For depth the
latents are also decoded (evaluation only) and compared in metres: AbsRel =
mean |d̂ − d| / d and δ₁ = fraction with max(d̂/d, d/d̂) < 1.25, over pixels with
d > 0. The model folder is written atomically:
``model_index.json``, ``unet/``, ``scheduler/``, [``vae/``], ``README.md``,
``quality.json`` — the layout :mod:`synesthesia.generators.latent_diffusion` loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synesthesia import UserError, __version__
from synesthesia.config import BootstrapConfig, PipelineConfig, config_hash
from synesthesia.generators.base import key_generators
from synesthesia.generators.latent_diffusion import (
    BOOTSTRAP_CLASS,
    MODEL_INDEX,
    LatentCodec,
    TAECodec,
    draw_latents,
    load_diffusers_vae,
)

logger = logging.getLogger(__name__)

SCHEDULER_KINDS = ("ddim", "flow")
PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
TIMESTEP_SAMPLING = ("uniform", "inference")
PRECISIONS = ("no", "bf16", "fp16")
# Options that change only how a trained model is evaluated and sampled, not its training: they are left
# out of the run hash, so changing them resumes the same training run's checkpoints instead of starting over.
EVALUATION_ONLY = ("ensemble",)


# ----------------------------------------------------------------------------- checks


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


# ----------------------------------------------------------------------------- paired latents


@dataclass
class PairedLatents:
    """Encoded pairs of one modality: RGB latents, target latents and (depth) the true signals."""

    keys: list[str]
    cond: torch.Tensor  # N×C×h_rgb×w_rgb
    target: torch.Tensor  # N×C×h×w
    signal: np.ndarray | None  # N×H×W: the 2-D signal, for depth metrics (None otherwise)
    rgb_size: tuple[int, int]
    signal_shape: tuple[int, ...]


def build_codec(cfg: BootstrapConfig) -> LatentCodec:
    if cfg.vae == "tae":
        return TAECodec(cfg.vae_weights)
    folder = Path(cfg.vae)
    if not (folder / "config.json").is_file():
        raise UserError(f"bootstrap.vae must be 'tae' or a diffusers autoencoder folder, got {cfg.vae!r}")
    return load_diffusers_vae(folder)


@torch.no_grad()
def _encode(
    codec: LatentCodec, images: list[np.ndarray], batch_size: int, device: torch.device
) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.stack(images[i : i + batch_size])).to(device)
        out.append(codec.encode(batch).float().cpu())
    return torch.cat(out)


def encode_pairs(
    source_dir: Path, cfg: BootstrapConfig, codec: LatentCodec, device: torch.device
) -> tuple[dict[str, PairedLatents], dict[str, int]]:
    """Read the paired split once and encode RGB and every target modality (frozen autoencoder).

    A sample whose RGB is bad is skipped for all modalities; one whose signal of
    a modality is bad or missing is skipped for that modality. Returns the pairs
    per modality and the skip counts.
    """
    from synesthesia.generators.mappings import mapping_params, signal_from_sample, to_2d, to_three_channels
    from synesthesia.shards import ErrorPolicy, SchemaError, iter_aligned
    from synesthesia.sources.signals import decode_image

    params = {m: mapping_params(m, **cfg.mapping.get(m, {})) for m in cfg.modalities}
    keys: list[str] = []
    rgbs: list[np.ndarray] = []
    targets: dict[str, list[tuple[int, np.ndarray, np.ndarray | None]]] = {m: [] for m in cfg.modalities}
    skipped: dict[str, int] = {}
    rgb_size: tuple[int, int] | None = None
    handler = ErrorPolicy("warn")
    for sample in iter_aligned(source_dir, split=cfg.split, handler=handler):
        if cfg.max_pairs and len(keys) >= cfg.max_pairs:
            break
        try:
            from synesthesia.shards.schema import image_field

            rgb = decode_image(sample[image_field(sample)])
        except SchemaError as exc:
            skipped["rgb"] = skipped.get("rgb", 0) + 1
            logger.warning("skipped %s: %s", sample.get("__key__"), exc)
            continue
        if rgb_size is None:
            rgb_size = rgb.shape[:2]
            if rgb_size[0] % codec.downscale or rgb_size[1] % codec.downscale:
                raise UserError(
                    f"RGB of {source_dir} is {rgb_size}; bootstrap needs multiples of {codec.downscale}"
                )
        if rgb.shape[:2] != rgb_size:
            skipped["rgb_size"] = skipped.get("rgb_size", 0) + 1
            continue
        index = len(keys)
        for modality in cfg.modalities:
            p = params[modality]
            try:
                rate = {"sample_rate": p["sample_rate"]} if modality == "audio" else {}
                signal = signal_from_sample(modality, sample, **rate)
                image3 = to_three_channels(modality, signal, **cfg.mapping.get(modality, {}))
                truth = (
                    to_2d(modality, signal, **cfg.mapping.get(modality, {})) if modality == "depth" else None
                )
            except SchemaError as exc:
                skipped[modality] = skipped.get(modality, 0) + 1
                logger.debug("skipped %s for %s: %s", sample.get("__key__"), modality, exc)
                continue
            targets[modality].append((index, image3, truth))
        keys.append(sample["__key__"])
        rgbs.append(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0)
    for name, count in handler.counts.items():
        skipped[name] = skipped.get(name, 0) + count
    if not keys:
        raise UserError(f"no usable {cfg.split} pairs in {source_dir}")
    logger.info("encoding %d RGB images of %s/%s", len(keys), source_dir, cfg.split)
    cond_all = _encode(codec, rgbs, cfg.encode_batch_size, device)
    pairs = {}
    for modality, items in targets.items():
        if len(items) <= cfg.holdout:
            raise UserError(
                f"{len(items)} usable {modality} pairs in {cfg.split}: need more than bootstrap.holdout={cfg.holdout}"
            )
        logger.info("encoding %d %s targets", len(items), modality)
        index = torch.tensor([i for i, _, _ in items])
        target = _encode(codec, [im for _, im, _ in items], cfg.encode_batch_size, device)
        signal = np.stack([t for _, _, t in items]) if modality == "depth" else None
        pairs[modality] = PairedLatents(
            keys=[keys[i] for i in index.tolist()],
            cond=cond_all[index],
            target=target,
            signal=signal,
            rgb_size=tuple(rgb_size),
            signal_shape=tuple(items[0][1].shape[-2:]),
        )
    return pairs, skipped


# ----------------------------------------------------------------------------- models


def build_unet(cfg: BootstrapConfig, channels: int, hw: tuple[int, int]):
    """The tiny UNet2DModel: in_channels = cond C + target C, out_channels = target C."""
    from diffusers import UNet2DModel

    n = len(cfg.block_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=list(hw),
        in_channels=2 * channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=cfg.norm_groups,
        attention_head_dim=8,
    )


def build_scheduler(cfg: BootstrapConfig):
    """The diffusers scheduler saved with the model (its config is the sampling recipe)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if cfg.scheduler == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=1.0)
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=cfg.prediction_type != "epsilon",
    )


def _noise_and_targets(cfg, scheduler, x0: torch.Tensor, g: torch.Generator):
    """(x_t, model timestep, regression target) for one batch of the diffusion objective."""
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    if cfg.scheduler == "flow":
        if cfg.timestep_sampling == "inference":
            scheduler.set_timesteps(cfg.inference_steps)
            choices = scheduler.sigmas[:-1]
            sigma = choices[torch.randint(len(choices), (n,), generator=g)]
        else:
            sigma = torch.rand(n, generator=g)
        sigma = sigma.to(x0.device).view(-1, 1, 1, 1)
        x_t = (1 - sigma) * x0 + sigma * noise
        return x_t, sigma.flatten() * cfg.num_train_timesteps, noise - x0
    if cfg.timestep_sampling == "inference":
        scheduler.set_timesteps(cfg.inference_steps)
        choices = scheduler.timesteps
        t = choices[torch.randint(len(choices), (n,), generator=g)]
    else:
        t = torch.randint(cfg.num_train_timesteps, (n,), generator=g)
    t = t.to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    if cfg.prediction_type == "sample":
        y = x0
    elif cfg.prediction_type == "epsilon":
        y = noise
    else:
        y = scheduler.get_velocity(x0, noise, t)
    return x_t, t, y


class _Checkpoints:
    """``save_state`` folders under ``work_dir/checkpoints`` and a ``latest.json`` naming the newest."""

    def __init__(self, directory: Path):
        self.directory = directory

    def latest(self) -> tuple[Path, int] | None:
        index = self.directory / "latest.json"
        if not index.is_file():
            return None
        data = json.loads(index.read_text())
        path = self.directory / data["folder"]
        return (path, int(data["step"])) if path.is_dir() else None

    def save(self, accelerator, step: int) -> None:
        from synesthesia.utils import atomic_write_text

        folder = f"step-{step:07d}"
        accelerator.save_state(str(self.directory / folder))
        if accelerator.is_main_process:
            previous = self.latest()
            atomic_write_text(
                self.directory / "latest.json", json.dumps({"folder": folder, "step": step}) + "\n"
            )
            if previous is not None and previous[0].name != folder:
                shutil.rmtree(previous[0], ignore_errors=True)


def train_unet(
    cfg: BootstrapConfig,
    pairs: PairedLatents,
    train_idx: torch.Tensor,
    objective: str,
    work_dir: Path,
    steps: int,
    device: torch.device,
) -> tuple[Any, dict[str, Any]]:
    """Train one UNet with accelerate; ``objective`` is ``diffusion`` or ``regression``.

    Regression feeds ``[c ; 0]`` at timestep 0 and regresses x₀: the same
    network and size as the diffusion model, without noise.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm

    set_seed(cfg.seed)
    accelerator = Accelerator(
        mixed_precision=cfg.precision,
        cpu=device.type == "cpu",
        log_with=cfg.log_with or None,
        project_config=ProjectConfiguration(project_dir=str(work_dir), logging_dir=str(work_dir / "logs")),
    )
    target = pairs.target[train_idx].to(accelerator.device)
    cond = _resize_cond(pairs.cond[train_idx], target.shape[-2:]).to(accelerator.device)
    channels, hw = target.shape[1], tuple(target.shape[-2:])
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, channels, hw)
    scheduler = build_scheduler(cfg)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, steps // 10), steps)
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    if cfg.log_with:
        accelerator.init_trackers(f"bootstrap-{objective}", config=dataclasses.asdict(cfg))
    checkpoints = _Checkpoints(work_dir / "checkpoints")
    start = 0
    if cfg.resume and (latest := checkpoints.latest()) is not None:
        accelerator.load_state(str(latest[0]))
        start = latest[1]
        logger.info("resumed %s from step %d (%s)", objective, start, latest[0])
    n = target.shape[0]
    per_epoch = max(1, n // cfg.batch_size)
    history: list[list[float]] = []
    running, seen = 0.0, 0
    bar = tqdm(
        range(start, steps),
        initial=start,
        total=steps,
        desc=objective,
        disable=not accelerator.is_main_process,
    )
    unet.train()
    for step in bar:
        epoch, pos = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        idx = order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size].to(accelerator.device)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x0, c = target[idx], cond[idx]
        if objective == "diffusion":
            x_t, t, y = _noise_and_targets(cfg, scheduler, x0, g)
        else:
            x_t, t, y = torch.zeros_like(x0), torch.zeros(x0.shape[0], device=x0.device), x0
        with accelerator.autocast():
            pred = unet(torch.cat([c, x_t], dim=1), t).sample
        loss = F.mse_loss(pred.float(), y.float())
        accelerator.backward(loss)
        if cfg.clip_grad > 0:
            accelerator.clip_grad_norm_(unet.parameters(), cfg.clip_grad)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        seen += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            mean = running / seen
            history.append([step + 1, round(mean, 6)])
            accelerator.log(
                {f"{objective}/loss": mean, f"{objective}/lr": lr_schedule.get_last_lr()[0]}, step=step + 1
            )
            bar.set_postfix(loss=f"{mean:.4f}")
            running, seen = 0.0, 0
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            checkpoints.save(accelerator, step + 1)
    accelerator.end_training()
    unet = accelerator.unwrap_model(unet).float().eval()
    return unet, {"steps": steps, "resumed_from": start, "loss_history": history}


def _resize_cond(cond: torch.Tensor, hw) -> torch.Tensor:
    """Bilinearly resize the RGB latent to the target latent's h×w (LiDAR range images)."""
    if tuple(cond.shape[-2:]) == tuple(hw):
        return cond
    return F.interpolate(cond, size=tuple(hw), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sample_heldout(
    unet,
    scheduler,
    cond: torch.Tensor,
    keys: list[str],
    inference_steps: int,
    seed: int,
    draws: int = 1,
    batch_size: int = 64,
) -> torch.Tensor:
    """``draws`` samples per input (B×draws×C×h×w) with stage one's key-seeded noise and sampler.

    Draw 0 is what stage one writes with ``ensemble: 1``; the mean over all draws
    is what it writes with ``ensemble: draws`` (the same :func:`draw_latents`).
    """
    device = next(unet.parameters()).device
    out = []
    target_shape = (unet.config.out_channels, *cond.shape[-2:])

    def denoise(cond_, z, t):
        return unet(torch.cat([cond_, z], dim=1), t).sample

    for i in range(0, cond.shape[0], batch_size):
        c = cond[i : i + batch_size].to(device)
        gens = key_generators(keys[i : i + batch_size], seed)
        z = draw_latents(denoise, scheduler, c, gens, target_shape, inference_steps, draws)
        out.append(z.float().cpu().reshape(c.shape[0], draws, *target_shape))
    return torch.cat(out)


@torch.no_grad()
def regress(unet, cond: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    device = next(unet.parameters()).device
    out = []
    for i in range(0, cond.shape[0], batch_size):
        c = cond[i : i + batch_size].to(device)
        zeros = torch.zeros_like(c[:, : unet.config.out_channels])
        t = torch.zeros(c.shape[0], device=device)
        out.append(unet(torch.cat([c, zeros], dim=1), t).sample.float().cpu())
    return torch.cat(out)


def latent_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """Mean squared error over all elements and the mean per-sample cosine similarity."""
    mse = F.mse_loss(pred, true).item()
    cos = F.cosine_similarity(pred.flatten(1), true.flatten(1), dim=1).mean().item()
    return {"mse": mse, "cosine": cos}


@torch.no_grad()
def depth_metrics(
    codec: LatentCodec, latents: torch.Tensor, truth: np.ndarray, mapping: dict[str, Any], device
) -> dict[str, float]:
    """Decode (evaluation only) and compare in metres: AbsRel and δ<1.25, per image, averaged."""
    from synesthesia.generators.mappings import from_three_channels

    abs_rel, delta1 = [], []
    for i in range(0, latents.shape[0], 64):
        images = codec.decode(latents[i : i + 64].to(device)).float().cpu().numpy()
        for image, gt in zip(images, truth[i : i + 64], strict=True):
            pred = from_three_channels("depth", image, **mapping)[: gt.shape[0], : gt.shape[1]]
            valid = gt > 0
            p, d = np.maximum(pred[valid], 1e-6), gt[valid]
            abs_rel.append(float(np.mean(np.abs(p - d) / d)))
            delta1.append(float(np.mean(np.maximum(p / d, d / p) < 1.25)))
    return {"abs_rel": float(np.mean(abs_rel)), "delta1": float(np.mean(delta1))}


# ----------------------------------------------------------------------------- saving


def _model_card(name: str, index: dict[str, Any], quality: dict[str, Any], command: str) -> str:
    t = index["training"]
    n = quality["ensemble"]
    single = "single_sample_"
    rows = [
        ("latent MSE ↓", "latent_mse", "regression_latent_mse", "mean_latent_mse"),
        ("latent cosine ↑", "latent_cosine", "regression_latent_cosine", "mean_latent_cosine"),
    ]
    if "abs_rel" in quality:
        rows += [
            ("AbsRel ↓ (decoded, m)", "abs_rel", "regression_abs_rel", "mean_latent_abs_rel"),
            ("δ<1.25 ↑ (decoded)", "delta1", "regression_delta1", "mean_latent_delta1"),
        ]
    if n > 1:
        header = (
            f"| metric | this model, {n}-sample ensemble (stage one's output) | this model, 1 sample "
            "| regression UNet (same size) | mean latent |\n| --- | --- | --- | --- | --- |"
        )
        table = "\n".join(
            f"| {label} | {quality[a]:.4f} | {quality[single + a]:.4f} | {quality[b]:.4f} | {quality[c]:.4f} |"
            for label, a, b, c in rows
        )
    else:
        header = "| metric | this model (1 sample) | regression UNet (same size) | mean latent |\n| --- | --- | --- | --- |"
        table = "\n".join(
            f"| {label} | {quality[a]:.4f} | {quality[b]:.4f} | {quality[c]:.4f} |" for label, a, b, c in rows
        )
    single_verdict = "beats" if quality[f"{single}beats_baselines"] else "does NOT beat"
    ceiling = ""
    if "vae_abs_rel" in quality:
        ceiling = (
            f"\nDecoding the *true* latent gives AbsRel {quality['vae_abs_rel']:.4f}, δ<1.25 "
            f"{quality['vae_delta1']:.4f}: the autoencoder's own ceiling.\n"
        )
    verdict = "beats both baselines" if quality["beats_baselines"] else "does NOT beat both baselines"
    return f"""---
library_name: diffusers
tags: [synesthesia, latent-diffusion, marigold-layout, {index["modality"]}]
---

# {name}

An image-conditioned latent diffusion generator in the Marigold layout, trained by
`synesthesia bootstrap` (synesthesia {__version__}): RGB → {index["modality"]} latent
({"×".join(map(str, index["target_shape"]))}, the frozen `{index["vae"]}` autoencoder's space).
Stage one runs it with the `latent-diffusion` generator and writes the final latent; it
is never decoded there.

- **Data**: {t["dataset"]} `{t["split"]}` split at {t["source"]}: {t["train_pairs"]} training pairs,
  {t["heldout_pairs"]} held out (the last of the split).
- **Model**: diffusers UNet2DModel, block channels {t["block_channels"]}, {t["layers_per_block"]} layer(s)
  per block, {t["parameters"]:,} parameters; input [RGB latent ; noisy target latent]
  ({index["cond_shape"][0]} + {index["target_shape"][0]} channels).
- **Diffusion**: {index["scheduler"][-1]}, prediction `{index["prediction_type"]}`, timestep sampling
  `{t["timestep_sampling"]}`; stage one samples with {index["inference_steps"]} step(s) and writes the
  mean of `ensemble` = {index["ensemble"]} seeded sample(s) per latent (Marigold-style test-time
  ensembling; override with the generator option `ensemble`).
- **Training**: {t["steps"]} steps, batch {t["batch_size"]}, AdamW lr {t["lr"]}, seed {t["seed"]},
  precision {t["precision"]}, on {t["device"]}; {t["seconds"]:.0f} s for this modality (including its
  regression baseline); final loss {t["final_loss"]}.

## Quality on {t["heldout_pairs"]} held-out pairs

{header}
{table}
{ceiling}
`latent_mse` in quality.json is {quality["latent_mse_is"]}; the one-sample numbers are the
`single_sample_*` keys. Verdict: as stage one runs it, the generator **{verdict}**
(a single sample {single_verdict} both).

## Reproduce

```
{command}
```
"""


def save_model(
    folder: Path,
    unet,
    scheduler,
    codec: LatentCodec,
    index: dict[str, Any],
    quality: dict[str, Any],
    card: str,
    max_mb: float,
) -> float:
    """Write the model folder atomically (temp folder, then rename); returns its size in MB."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        if index["vae"] == "vae":
            codec.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "quality.json").write_text(json.dumps(quality, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(card)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 1e6
        if size > max_mb:
            raise UserError(f"{folder.name} would be {size:.2f} MB, over bootstrap.max_model_mb={max_mb}")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        return size
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the verb


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
    mean = pairs.target[train_idx].mean(dim=0, keepdim=True).expand_as(true)
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
        truth = pairs.signal[held_idx.numpy()]
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
    pairs, skipped = encode_pairs(source_dir, cfg, codec, device)
    encode_seconds = time.monotonic() - t0
    if skipped:
        logger.warning("skipped samples: %s", skipped)
    logger.info("encoded pairs in %.1f s", encode_seconds)
    results = []
    for modality in cfg.modalities:
        results.append(
            bootstrap_modality(
                pipeline,
                modality,
                pairs[modality],
                codec,
                out_root,
                Path(cfg.work_dir),
                source_dir,
                command,
                device,
            )
        )
    for r in results:
        r["encode_seconds"] = round(encode_seconds, 1)
        r["skipped"] = skipped
    return results


def format_summary(results: list[dict[str, Any]]) -> str:
    """A short table: one line per model."""
    lines = [
        "model | s | MB | N | latent_mse (N-mean) | 1-sample | regression | mean | cosine | abs_rel | delta1 | beats"
    ]
    for r in results:
        abs_rel = f"{r['abs_rel']:.4f}" if "abs_rel" in r else "-"
        delta1 = f"{r['delta1']:.4f}" if "delta1" in r else "-"
        lines.append(
            f"{r['name']} | {r['seconds']:.0f} | {r['mb']:.2f} | {r['ensemble']} | {r['latent_mse']:.4f} | "
            f"{r['single_sample_latent_mse']:.4f} | {r['regression_latent_mse']:.4f} | "
            f"{r['mean_latent_mse']:.4f} | {r['latent_cosine']:.4f} | {abs_rel} | {delta1} | {r['beats_baselines']}"
        )
    return "\n".join(lines)


__all__ = ["PairedLatents", "check_config", "encode_pairs", "format_summary", "run_bootstrap", "train_unet"]
