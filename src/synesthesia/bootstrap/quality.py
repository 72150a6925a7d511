"""The quality report's pieces: held-out predictions, metrics, and the summary table.

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
d > 0.

* :func:`sample_heldout`: ``draws`` samples per held-out input with stage one's
  key-seeded noise and sampler (:func:`~synesthesia.generators.latent_diffusion.draw_latents`);
* :func:`regress`: the regression baseline's prediction;
* :func:`latent_metrics`, :func:`depth_metrics`: MSE and cosine on latents;
  AbsRel and δ<1.25 on decoded depth;
* :func:`format_summary`: the one-line-per-model table the CLI prints.

The report itself is assembled in :func:`synesthesia.bootstrap.run.bootstrap_modality`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synesthesia.generators.base import key_generators
from synesthesia.generators.latent_diffusion import LatentCodec, draw_latents


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
