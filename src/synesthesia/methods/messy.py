"""``messy`` — MESSy distillation (Sbrolli, Michel, Matteucci, Yamasaki, ECCV 2026).

The RGB-only student learns the teacher's soft labels and, through small
predictive heads, *predicts* what the teacher's privileged-modality tokens
look like at several depths:

    L = α·CE(z_s, y) + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))
        + w · Σ_{l ∈ layers} Σ_{m ∈ modalities} MSE(head_{l,m}(s_l), stop-grad(mean_tokens_m(h^T_{l'})))

- s_l is the student's pooled feature after layer l (the CLS token for a ViT,
  as in the paper); h^T_{l'} the teacher's hidden states after block l', the
  block at the same relative depth (:func:`~synesthesia.methods.base.matched_teacher_layer`;
  l' = l when the depths are equal); the target is the mean over modality m's
  tokens (its span in the sequence), detached;
- head_{l,m} is Linear(d_s → 512) → GELU → Linear(512 → d_T) (hidden width
  ``options.head_hidden``); the heads live in this module, so exporting the
  student drops them;
- MSE is averaged over features and over the samples whose teacher saw the real
  modality (not its null tokens);
- paper defaults: α = 0.25, T = 2, w = 1 (``method.weight``; None means 1), the
  last three blocks (``method.layers: [-3, -2, -1]``).

Variant ``options.target: latent`` — no teacher: each head predicts the
standardised generative latent of modality m itself, flattened to one vector
(``MethodContext.latent_dims[m]`` = the product of one sample's latent shape;
the trainer's ``batch["latents"][m]``), and the KD term is gone:

    L = CE(z_s, y) + w · Σ_{l,m} MSE(head_{l,m}(s_l), flatten(ẑ_m))

Codes latents (integers) have no standardised form and are refused there.
"""

from __future__ import annotations

import torch
from torch import nn

from synesthesia import UserError
from synesthesia.config import MethodConfig
from synesthesia.methods.base import (
    METHODS,
    Method,
    MethodContext,
    check_alpha_temperature,
    check_options,
    cross_entropy,
    distillation_kl,
    masked_mse,
    matched_teacher_layer,
    resolve_layers,
)
from synesthesia.models.outputs import StudentOutput, TeacherOutput

DEFAULT_WEIGHT = 1.0
TARGETS = ("teacher", "latent")


def predictive_head(in_dim: int, out_dim: int, hidden: int = 512) -> nn.Sequential:
    """MESSy's head: Linear(d_s → hidden), GELU, Linear(hidden → d_target)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def batch_r2(mse: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """How much of the target's variance a head explains on this batch (a logged diagnostic, no
    gradient): R² = 1 − MSE ÷ the MSE of predicting every sample by the batch's mean target, over
    the samples ``mask`` keeps. Near 0: the head predicts no better than the mean feature, i.e.
    the student's features carry little of what the teacher's modality tokens vary with."""
    with torch.no_grad():
        target = target.float()
        if mask is None:
            mean = target.mean(dim=0, keepdim=True)
        else:
            weights = mask.to(target.dtype).unsqueeze(-1)
            mean = (target * weights).sum(dim=0, keepdim=True) / weights.sum().clamp(min=1.0)
        spread = masked_mse(mean.expand_as(target), target, mask)
        return 1.0 - mse.detach().float() / spread.clamp(min=1e-12)


@METHODS.register("messy")
class Messy(Method):
    """KD plus per-layer, per-modality predictive heads regressing the teacher's modality features."""

    needs_teacher = True  # the default target; False on instances built with target: latent

    @classmethod
    def needs_teacher_for(cls, cfg: MethodConfig) -> bool:
        return cfg.options.get("target", "teacher") != "latent"

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        check_options(cfg, ("target", "head_hidden", "label_smoothing"))
        check_alpha_temperature(cfg)
        self.target = cfg.options.get("target", "teacher")
        if self.target not in TARGETS:
            raise UserError(f"method.options.target={self.target!r}; valid: {', '.join(TARGETS)}")
        if not ctx.modalities:
            raise UserError("method 'messy' needs at least one privileged modality (train.modalities)")
        self.needs_teacher = self.target == "teacher"
        self.weight = DEFAULT_WEIGHT if cfg.weight is None else float(cfg.weight)
        self.layers = resolve_layers(cfg.layers, ctx.student_depth)
        self.label_smoothing = float(cfg.options.get("label_smoothing", 0.0))
        hidden = int(cfg.options.get("head_hidden", 512))
        if hidden < 1:
            raise UserError(f"method.options.head_hidden={hidden} must be positive")

        out_dims: dict[str, int] = {}
        for modality in ctx.modalities:
            if self.target == "teacher":
                if ctx.teacher_dim <= 0:
                    raise UserError("method 'messy' needs the teacher's width (MethodContext.teacher_dim)")
                out_dims[modality] = ctx.teacher_dim
            else:
                if not ctx.latent_dims or modality not in ctx.latent_dims:
                    raise UserError(f"messy target: latent needs the latent width of modality {modality!r}")
                out_dims[modality] = int(ctx.latent_dims[modality])
        self.heads = nn.ModuleDict(
            {
                self.head_name(layer, modality): predictive_head(
                    ctx.student_dims[layer], out_dims[modality], hidden
                )
                for layer in self.layers
                for modality in ctx.modalities
            }
        )

    @staticmethod
    def head_name(layer: int, modality: str) -> str:
        return f"l{layer}_{modality}"

    def student_layers(self) -> list[int]:
        return list(self.layers)

    def teacher_layers(self) -> list[int] | None:
        """The teacher blocks whose hidden states the loss reads (``teacher(..., layers=)``), or None
        when unknown (no teacher depth in the context). The target ``latent`` reads none."""
        if not self.needs_teacher:
            return []
        if self.ctx.teacher_depth <= 0:
            return None
        return sorted(
            {
                matched_teacher_layer(layer, self.ctx.student_depth, self.ctx.teacher_depth)
                for layer in self.layers
            }
        )

    def _latent_target(self, batch: dict, modality: str) -> torch.Tensor:
        latents = batch.get("latents") or {}
        if modality not in latents:
            raise UserError(f"messy target: latent: the batch has no latent of modality {modality!r}")
        latent = latents[modality]
        if not latent.is_floating_point():
            raise UserError(f"messy target: latent: modality {modality!r} has integer codes, not a latent")
        flat = latent.flatten(1).float()
        if flat.shape[1] != self.ctx.latent_dims[modality]:
            raise UserError(
                f"messy target: latent: modality {modality!r} latent has {flat.shape[1]} values, "
                f"the heads were built for {self.ctx.latent_dims[modality]}"
            )
        return flat

    def head_outputs(
        self, student: StudentOutput, teacher: TeacherOutput | None, batch: dict
    ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(layer, modality) → (the head's prediction, its stop-gradient target, the mask of samples
        that have the modality or None): what the loss regresses, also read by the heads' R² probe
        (:func:`synesthesia.train.probe.messy_head_r2`)."""
        if self.needs_teacher:
            teacher = self._require_teacher(teacher)
            teacher_depth = self.ctx.teacher_depth or len(teacher.hidden_states)
        out = {}
        for layer in self.layers:
            feature = student.features[layer]
            for modality in self.ctx.modalities:
                prediction = self.heads[self.head_name(layer, modality)](feature)
                if self.needs_teacher:
                    t_layer = matched_teacher_layer(layer, self.ctx.student_depth, teacher_depth)
                    target = teacher.modality_feature(t_layer, modality).detach()
                    mask = teacher.present.get(modality)
                else:
                    target, mask = self._latent_target(batch, modality), None
                out[(layer, modality)] = (prediction, target, mask)
        return out

    def forward(
        self, student: StudentOutput, teacher: TeacherOutput | None, batch: dict
    ) -> dict[str, torch.Tensor]:
        ce = cross_entropy(student, batch, self.label_smoothing)
        terms: dict[str, torch.Tensor] = {"ce": ce}
        if self.needs_teacher:
            teacher = self._require_teacher(teacher)
            kd = distillation_kl(student.logits, teacher.logits, self.cfg.temperature)
            terms["kd"] = kd
            loss = self.cfg.alpha * ce + (1.0 - self.cfg.alpha) * kd
        else:
            loss = ce
        total = ce.new_zeros(())
        for (layer, modality), (prediction, target, mask) in self.head_outputs(
            student, teacher, batch
        ).items():
            term = masked_mse(prediction, target, mask)
            terms[f"messy/l{layer}/{modality}"] = term
            terms[f"messy_r2/l{layer}/{modality}"] = batch_r2(term, target, mask)
            total = total + term
        terms["messy"] = total
        terms["loss"] = loss + self.weight * total
        return terms
