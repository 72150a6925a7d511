"""The training loop: one UNet, diffusion or regression objective, with accelerate.

The diffusion objective (:func:`_noise_and_targets`) is a diffusers scheduler's
forward process:

- ``scheduler: ddim`` — DDPM noising ``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε`` with the
  scaled-linear betas of Stable Diffusion, rescaled to zero terminal SNR (Lin et
  al. 2024) for x₀/v prediction so the first "trailing" inference step starts
  from pure noise; loss ``‖f(c, x_t, t) − y‖²`` with ``y`` = x₀ (``sample``), ε
  (``epsilon``) or v (``v_prediction``). Sampling: DDIM (η = 0), 1–4 steps;
- ``scheduler: flow`` — rectified flow ``x_σ = (1−σ) x₀ + σ ε``, velocity target
  ``ε − x₀`` at timestep ``1000·σ``; sampling: FlowMatchEulerDiscrete, 1–4 steps.

``timestep_sampling: inference`` trains only at the timesteps the few-step
sampler visits (as few-step fine-tuning of Marigold does), ``uniform`` at all.
The regression objective feeds ``[c ; 0]`` at timestep 0 and regresses x₀.

:func:`train_unet` is an accelerate loop (mixed precision, gradient clipping,
warmup + cosine LR, trackers, progress (a bar or log lines: :mod:`synesthesia.progress`), `checkpoints
kept by :class:`_Checkpoints`: safetensors and JSON, never a pickle, as stage two's). A batch's indices and noise are functions of
(seed, step) alone, so resuming from a checkpoint continues exactly where the
run stopped. The pairs stay on disk (:class:`~synesthesia.bootstrap.data.RowFile`); each step reads
its batch's rows, so memory does not grow with the paired set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from synesthesia import UserError
from synesthesia.bootstrap.data import PairedLatents
from synesthesia.bootstrap.model import _resize_cond, build_scheduler, build_unet
from synesthesia.config import BootstrapConfig
from synesthesia.shards.schema import read_json_file
from synesthesia.train.checkpoint import TrainState, load_training_state, save_training_state

logger = logging.getLogger(__name__)


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
    """Checkpoint folders under ``work_dir/checkpoints`` (:func:`~synesthesia.train.checkpoint.save_training_state`:
    safetensors and JSON) and a ``latest.json`` naming the newest."""

    def __init__(self, directory: Path):
        self.directory = directory

    def latest(self) -> tuple[Path, int] | None:
        index = self.directory / "latest.json"
        if not index.is_file():
            return None
        data = read_json_file(index, what="checkpoint index")
        folder = data.get("folder") if isinstance(data, dict) else None
        if not isinstance(folder, str) or not re.fullmatch(r"step-\d{7}", folder):
            raise UserError(f"{index}: names no step-NNNNNNN checkpoint folder")
        path = self.directory / folder
        return (path, int(folder[len("step-") :])) if path.is_dir() else None

    def save(self, accelerator, step: int, unet, optimizer, lr_schedule) -> None:
        from synesthesia.utils import atomic_write_text

        folder = f"step-{step:07d}"
        save_training_state(
            self.directory / folder, accelerator, unet, optimizer, lr_schedule, TrainState(step=step)
        )
        accelerator.wait_for_everyone()  # every rank's RNG is written before latest.json names it
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

    from synesthesia.progress import progress

    set_seed(cfg.seed)
    accelerator = Accelerator(
        mixed_precision=cfg.precision,
        cpu=device.type == "cpu",
        log_with=cfg.log_with or None,
        project_config=ProjectConfiguration(project_dir=str(work_dir), logging_dir=str(work_dir / "logs")),
    )
    # The pairs stay on disk (data.RowFile): each step reads its batch's rows.
    channels, hw = pairs.target.shape[1], tuple(pairs.target.shape[-2:])
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
        load_training_state(latest[0], accelerator, unet, optimizer, lr_schedule, TrainState())
        start = latest[1]
        logger.info("resumed %s from step %d (%s)", objective, start, latest[0])
    n = len(train_idx)
    per_epoch = max(1, n // cfg.batch_size)
    history: list[list[float]] = []
    running, seen = 0.0, 0
    bar = progress(
        range(start, steps),
        desc=objective,
        unit="step",
        initial=start,
        total=steps,
        disable=not accelerator.is_main_process,
    )
    unet.train()
    for step in bar:
        epoch, pos = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        rows = train_idx[order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x0 = pairs.target[rows].to(accelerator.device)
        c = _resize_cond(pairs.cond[rows], hw).to(accelerator.device)
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
            checkpoints.save(accelerator, step + 1, unet, optimizer, lr_schedule)
    accelerator.end_training()
    unet = accelerator.unwrap_model(unet).float().eval()
    return unet, {"steps": steps, "resumed_from": start, "loss_history": history}
