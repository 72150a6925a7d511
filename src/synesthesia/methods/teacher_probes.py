"""Probing a multimodal teacher: its privileged inputs, removed or corrupted, and its collapse diagnostics.

What the teacher objectives (``modalimmune``, ``basis-realloc``) and the
teacher evaluation share:

- the batch: :func:`privileged` (``"decoded"`` when present, else
  ``"latents"``), :func:`with_privileged`, :func:`unpack_batch` (``rgb``,
  privileged inputs, ``label``), :func:`without` (one modality removed: the
  teacher then uses its null tokens) and :func:`eval_mode`;
- the spectral diagnostics of a set of embeddings X (N×D, rows centred),
  :func:`stable_rank` ‖X_c‖_F²/‖X_c‖_2² (differentiable; 1 = collapsed onto one
  direction) and :func:`effective_rank` exp(H(p)), p the normalised singular
  values;
- the missing-modality evaluation :func:`modality_robustness`: accuracy with all
  modalities, each removed (null tokens), each corrupted (:func:`corrupt`:
  ``gaussian`` noise or ``shuffle``: another sample's) and all removed; run
  it on the plain teacher (:func:`teacher_predict`) and on a teacher
  objective's ``predict`` to compare;
- :func:`leave_one_out_losses` (the clean CE with all modalities and with each
  one removed) and :func:`teacher_diagnostics`: per modality its contribution
  (CE without it − CE with all), the accuracy without it and the stable rank of
  its tokens; the stable and effective ranks of the fusion (CLS) features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from synesthesia import UserError

CORRUPTIONS = ("gaussian", "shuffle")


def privileged(batch: dict) -> dict[str, torch.Tensor]:
    """The teacher's privileged inputs: ``batch["decoded"]`` when present (decoded source), else ``batch["latents"]``.

    The same rule as :func:`synesthesia.train.objectives.privileged_inputs`.
    """
    return dict(batch.get("decoded") or batch.get("latents") or {})


def with_privileged(batch: dict, inputs: dict[str, torch.Tensor]) -> dict:
    """A copy of ``batch`` whose privileged inputs (decoded or latents, as in use) are ``inputs``."""
    key = "decoded" if batch.get("decoded") else "latents"
    return {**batch, key: inputs}


def unpack_batch(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``(rgb, privileged inputs, label)`` from the trainer's batch; a missing key is a clear error."""
    missing = [k for k in ("rgb", "label") if k not in batch]
    if missing:
        raise UserError(f"teacher objective: the batch has no {missing[0]!r} (keys: {', '.join(batch)})")
    return batch["rgb"], privileged(batch), batch["label"]


def without(inputs: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    """``inputs`` with ``modality`` removed: the teacher then uses its null tokens for it."""
    return {k: v for k, v in inputs.items() if k != modality}


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode (no dropout, no modality dropout) for the block; the previous mode after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def stable_rank(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """‖X_c‖_F² / ‖X_c‖_2² of the centred rows of ``x`` (N×D) = ‖C‖_*/‖C‖_2 for C = cov(X).

    Between 1 (all variance along one direction: collapsed) and rank(X_c).
    Differentiable; 0 when ``x`` has no variance.
    """
    xc = x.float() - x.float().mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(xc)
    if s.numel() == 0 or s[0] <= eps:
        return xc.sum() * 0.0
    return (s.pow(2).sum()) / (s[0].pow(2) + eps)


def effective_rank(x: torch.Tensor, eps: float = 1e-12) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p = normalised singular values of centred ``x``."""
    xc = x.detach().float() - x.detach().float().mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(xc)
    total = s.sum()
    if total <= eps:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def corrupt(value: torch.Tensor, corruption: str, generator: torch.Generator) -> torch.Tensor:
    """A corrupted copy of one modality's batch.

    ``gaussian``: float inputs become Gaussian noise with the batch's overall
    mean and std (no per-sample information survives); integer codes become
    uniform random codes in [0, max code]. ``shuffle``: each sample gets
    another sample's input (a batch roll by one), i.e. a real but wrong signal.
    """
    if corruption == "shuffle":
        return value.roll(1, dims=0)
    if corruption != "gaussian":
        raise UserError(f"unknown corruption {corruption!r}; valid: {', '.join(CORRUPTIONS)}")
    if not value.is_floating_point():
        high = int(value.max().item()) + 1
        codes = torch.randint(0, max(high, 1), value.shape, generator=generator)
        return codes.to(device=value.device, dtype=value.dtype)
    flat = value.float()
    std = flat.std() if flat.numel() > 1 else flat.new_tensor(1.0)
    noise = torch.randn(value.shape, generator=generator).to(value.device)
    return (noise * std + flat.mean()).to(value.dtype)


@torch.no_grad()
def modality_robustness(
    predict: Callable[[dict], torch.Tensor],
    batches: Iterable[dict],
    modalities: Iterable[str],
    corruption: str = "gaussian",
    seed: int = 0,
) -> dict[str, float]:
    """Top-1 accuracy of ``predict(batch) -> logits`` under missing and corrupted modalities.

    Conditions: ``full``; ``removed/<m>`` (m left out of the privileged inputs);
    ``corrupted/<m>`` (m replaced by :func:`corrupt`); ``removed/all`` (RGB
    only). Run it on the plain teacher (``predict=teacher_predict(teacher)``)
    and on a teacher objective's ``predict`` to compare. ``predict`` should put
    its model in eval mode itself, or be called on a model in eval mode.
    """
    modalities = list(modalities)
    if corruption not in CORRUPTIONS:
        raise UserError(f"unknown corruption {corruption!r}; valid: {', '.join(CORRUPTIONS)}")
    generator = torch.Generator().manual_seed(seed)
    names = [
        "full",
        *(f"removed/{m}" for m in modalities),
        *(f"corrupted/{m}" for m in modalities),
        "removed/all",
    ]
    correct = dict.fromkeys(names, 0)
    total = 0
    for batch in batches:
        _, latents, label = unpack_batch(batch)
        absent = [m for m in modalities if m not in latents]
        if absent:
            raise UserError(f"robustness evaluation: the batch has no input for modality {absent[0]!r}")
        conditions = {"full": latents, "removed/all": {}}
        for m in modalities:
            conditions[f"removed/{m}"] = without(latents, m)
            conditions[f"corrupted/{m}"] = {**latents, m: corrupt(latents[m], corruption, generator)}
        for name, inputs in conditions.items():
            logits = predict(with_privileged(batch, inputs))
            correct[name] += int((logits.argmax(dim=-1) == label).sum())
        total += int(label.shape[0])
    if total == 0:
        raise UserError("robustness evaluation got no samples")
    return {name: correct[name] / total for name in names}


def teacher_predict(teacher: nn.Module) -> Callable[[dict], torch.Tensor]:
    """``batch -> logits`` of the plain teacher in eval mode (missing modalities: null tokens)."""

    def predict(batch: dict) -> torch.Tensor:
        rgb, latents, _ = unpack_batch(batch)
        with eval_mode(teacher):
            return teacher(rgb, latents, drop=False).logits

    return predict


@torch.no_grad()
def leave_one_out_losses(
    teacher: nn.Module, rgb: torch.Tensor, latents: dict[str, torch.Tensor], label: torch.Tensor
) -> tuple[float, dict[str, float]]:
    """Clean CE with all modalities and with each one removed (eval mode, no gradients)."""
    with eval_mode(teacher):
        full = float(F.cross_entropy(teacher(rgb, latents, drop=False).logits.float(), label))
        loo = {
            m: float(F.cross_entropy(teacher(rgb, without(latents, m), drop=False).logits.float(), label))
            for m in latents
        }
    return full, loo


def teacher_diagnostics(teacher: nn.Module, batch: dict, layer: int = -1) -> dict[str, float]:
    """Collapse diagnostics of a teacher on one batch (no gradients, eval mode).

    ``contribution/<m>`` = CE(without m) − CE(full), the per-modality
    contribution (≈0 for a collapsed modality); ``acc_without/<m>``;
    ``fusion_stable_rank`` / ``fusion_effective_rank`` of the final CLS
    features (the fusion features); ``stable_rank/<m>`` of modality m's pooled
    tokens after block ``layer``.
    """
    rgb, latents, label = unpack_batch(batch)
    out: dict[str, float] = {}
    with torch.no_grad(), eval_mode(teacher):
        full = teacher(rgb, latents, drop=False)
        ce_full = float(F.cross_entropy(full.logits.float(), label))
        out["ce_full"] = ce_full
        out["acc_full"] = float((full.logits.argmax(-1) == label).float().mean())
        for m in latents:
            res = teacher(rgb, without(latents, m), drop=False)
            out[f"contribution/{m}"] = float(F.cross_entropy(res.logits.float(), label)) - ce_full
            out[f"acc_without/{m}"] = float((res.logits.argmax(-1) == label).float().mean())
            out[f"stable_rank/{m}"] = float(stable_rank(full.modality_tokens(layer, m).mean(dim=1)))
        cls = full.cls(-1)
        out["fusion_stable_rank"] = float(stable_rank(cls))
        out["fusion_effective_rank"] = effective_rank(cls)
    return out
