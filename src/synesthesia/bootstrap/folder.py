"""The model folder: its README card and its atomic write.

The folder is written atomically (a temp folder, then a rename):
``model_index.json``, ``unet/``, ``scheduler/``, [``vae/``], ``README.md``,
``quality.json`` — the layout :mod:`synesthesia.generators.latent_diffusion` loads.

* :func:`_model_card`: the README.md — data, model, diffusion, training, and the
  quality table against both baselines;
* :func:`save_model`: write the folder, refusing one over ``bootstrap.max_model_mb``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from synesthesia import UserError, __version__
from synesthesia.generators.latent_diffusion import MODEL_INDEX, LatentCodec
from synesthesia.utils import umask_mode


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
    umask_mode(tmp)  # published as a normal folder (mkdtemp makes it 0700)
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
