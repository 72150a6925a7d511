"""Sampling a latent-diffusion model: its scheduler, seeded noise, and the loop to the final latent.

:func:`load_scheduler` loads one of ``SCHEDULERS`` from a folder's
``scheduler/``. :func:`sample_latents` runs the scheduler from the noise::

    z_T = noise · init_noise_sigma   (DDPM family; flow matching starts at the noise itself)
    z   ← scheduler.step(denoise(cond, scale_model_input(z, t), t), t, z)   for t in the timesteps

:func:`draw_latents` draws several samples per conditioning row, each row's
noise from its own generator (one per key, seeded by ``key_seed``), so a key's
draw d does not depend on its batch or on the number of draws. The stage-one
generator and the bootstrap quality report share it, hence their samples.
"""

from __future__ import annotations

from pathlib import Path

import torch

from synesthesia import UserError
from synesthesia.generators.diffusers_folder import _read_json

# Schedulers a folder may name; each is loaded with from_pretrained from its subfolder.
SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "LCMScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
)


def load_scheduler(folder: Path):
    """The scheduler saved in ``folder`` (its ``scheduler_config.json`` names the class)."""
    import diffusers

    config = _read_json(folder / "scheduler_config.json")
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise UserError(f"{folder}: scheduler {name!r} is not supported; valid: {', '.join(SCHEDULERS)}")
    return getattr(diffusers, name).from_pretrained(folder)


def is_flow_scheduler(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


# ----------------------------------------------------------------------------- sampling


def initial_noise(
    shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """One N(0, I) draw per row from its own CPU generator (rows of one key share one generator)."""
    rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)


@torch.no_grad()
def sample_latents(
    denoise,
    scheduler,
    cond: torch.Tensor,
    noise: torch.Tensor,
    num_inference_steps: int,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Run ``scheduler`` from ``noise`` to the final latent: z ← step(denoise(cond, z, t), t, z).

    ``denoise(cond, z_t, t)`` returns the model output the scheduler expects
    (ε, x₀ or v for DDPM-family schedulers, the velocity for flow matching). A
    DDIM scheduler with ``set_alpha_to_one`` returns the x₀ prediction at its
    last step, so the result is the model's clean latent, not a noisy one.
    """
    scheduler.set_timesteps(num_inference_steps, device=cond.device)
    latent = noise
    if hasattr(scheduler, "init_noise_sigma") and not is_flow_scheduler(scheduler):
        latent = latent * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = (
            scheduler.scale_model_input(latent, t) if hasattr(scheduler, "scale_model_input") else latent
        )
        output = denoise(cond, model_input, t)
        kwargs = {}
        if generators is not None and "generator" in _step_params(scheduler):
            kwargs["generator"] = generators
        latent = scheduler.step(output, t, latent, **kwargs).prev_sample
    return latent


@torch.no_grad()
def draw_latents(
    denoise,
    scheduler,
    cond: torch.Tensor,
    generators: list[torch.Generator],
    target_shape: tuple[int, ...],
    num_inference_steps: int,
    draws: int = 1,
) -> torch.Tensor:
    """``draws`` samples per row of ``cond`` (B×C×h×w) → B·draws latents, row-major (row b: b·draws …).

    Row b's draws all take their noise, in order, from ``generators[b]`` (one
    per key, seeded by ``key_seed``), so draw d of a key is the same whatever the
    batch and whatever the total number of draws: the stage-one generator and the
    bootstrap quality report share this function and therefore the samples.
    """
    cond = cond.repeat_interleave(draws, dim=0)
    rows = [g for g in generators for _ in range(draws)]
    noise = initial_noise(tuple(target_shape), rows, cond.device, cond.dtype)
    return sample_latents(denoise, scheduler, cond, noise, num_inference_steps, rows)


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)
