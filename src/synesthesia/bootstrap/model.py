"""What a bootstrap run builds from its config: the frozen codec, the UNet, the scheduler.

* :func:`build_codec`: the frozen autoencoder — TAEF2 (``vae: tae``) or a
  diffusers autoencoder folder;
* :func:`build_unet`: the tiny diffusers ``UNet2DModel`` on ``[c ; x_t]``
  (in_channels = 2·C, out_channels = C);
* :func:`build_scheduler`: the diffusers scheduler saved with the model (DDIM or
  FlowMatchEulerDiscrete), whose config is the sampling recipe;
* :func:`_resize_cond`: the RGB latent bilinearly resized to the target latent's
  h×w when they differ (LiDAR range images).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from synesthesia import UserError
from synesthesia.config import BootstrapConfig
from synesthesia.generators.latent_diffusion import LatentCodec, TAECodec, load_diffusers_vae


def build_codec(cfg: BootstrapConfig) -> LatentCodec:
    if cfg.vae == "tae":
        return TAECodec(cfg.vae_weights)
    folder = Path(cfg.vae)
    if not (folder / "config.json").is_file():
        raise UserError(f"bootstrap.vae must be 'tae' or a diffusers autoencoder folder, got {cfg.vae!r}")
    return load_diffusers_vae(folder)


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


def _resize_cond(cond: torch.Tensor, hw) -> torch.Tensor:
    """Bilinearly resize the RGB latent to the target latent's h×w (LiDAR range images)."""
    if tuple(cond.shape[-2:]) == tuple(hw):
        return cond
    return F.interpolate(cond, size=tuple(hw), mode="bilinear", align_corners=False)
