"""``hallucination`` — modality hallucination (Hoffman, Gupta, Darrell, CVPR 2016), rigid matching.

Hoffman et al. train a hallucination network that sees RGB only to reproduce
the *depth network's* mid-level activations: a squared L2 loss between
sigmoid(hallucination activations) and sigmoid(depth activations), weighted
about 10× the other terms, next to the classification losses. Here the depth
network is the teacher's modality pathway and the hallucination network is the
student itself: at each chosen student layer l its own pooled feature s_l (the
CLS token for a ViT) is made equal to the teacher's feature of modality m at
the matched layer — the mean of that modality's tokens — with no predictor
head in between (the rigidity MESSy's predictive heads remove):

    L = CE(z_s, y) + w · Σ_{l,m} MSE(σ(s_l·P), stop-grad(σ(mean_tokens_m(h^T_{l'}))))

- l' is the teacher block at the same relative depth
  (:func:`~synesthesia.methods.base.matched_teacher_layer`);
- P is fixed, never learned: the identity when the widths are equal, else a
  frozen random semi-orthogonal matrix (an isometry, so it cannot reshape the
  student's features to ease the match; seeded by ``options.seed``).
  ``options.projection: none`` instead requires equal widths;
- σ is the sigmoid of the paper (``options.squash: sigmoid``, the default) or
  the identity (``none``);
- MSE is averaged over features and over the samples whose teacher saw the
  real modality (not its null tokens);
- w is ``method.weight``, default 10 (the paper weights this loss about 10×
  the others); the layers are ``method.layers`` (default: the last three
  blocks, the same as MESSy's, so that the two differ only in the heads).
"""

from __future__ import annotations

import torch

from synesthesia import UserError
from synesthesia.config import MethodConfig
from synesthesia.methods.base import (
    METHODS,
    Method,
    MethodContext,
    check_options,
    cross_entropy,
    masked_mse,
    matched_teacher_layer,
    resolve_layers,
)
from synesthesia.models.outputs import StudentOutput, TeacherOutput

DEFAULT_WEIGHT = 10.0


@METHODS.register("hallucination")
class Hallucination(Method):
    """CE plus rigid L2 matching of the student's own features to the teacher's modality features."""

    needs_teacher = True

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        check_options(cfg, ("projection", "squash", "seed", "label_smoothing"))
        if not ctx.modalities:
            raise UserError(
                "method 'hallucination' needs at least one privileged modality (train.modalities)"
            )
        if ctx.teacher_dim <= 0:
            raise UserError("method 'hallucination' needs the teacher's width (MethodContext.teacher_dim)")
        self.weight = DEFAULT_WEIGHT if cfg.weight is None else float(cfg.weight)
        self.layers = resolve_layers(cfg.layers, ctx.student_depth)
        self.label_smoothing = float(cfg.options.get("label_smoothing", 0.0))
        self.squash = cfg.options.get("squash", "sigmoid")
        if self.squash not in ("sigmoid", "none"):
            raise UserError(f"method.options.squash={self.squash!r}; valid: sigmoid, none")
        projection = cfg.options.get("projection", "auto")
        if projection not in ("auto", "orthogonal", "none"):
            raise UserError(f"method.options.projection={projection!r}; valid: auto, orthogonal, none")
        generator = torch.Generator().manual_seed(int(cfg.options.get("seed", 0)))
        for layer in self.layers:
            width = ctx.student_dims[layer]
            if width == ctx.teacher_dim and projection != "orthogonal":
                continue
            if projection == "none":
                raise UserError(
                    f"hallucination with projection: none needs equal widths; student layer {layer} has "
                    f"{width}, the teacher {ctx.teacher_dim} (use projection: auto for a frozen orthogonal map)"
                )
            matrix = torch.empty(width, ctx.teacher_dim)
            torch.nn.init.orthogonal_(matrix, generator=generator)
            self.register_buffer(f"projection_l{layer}", matrix)

    def student_layers(self) -> list[int]:
        return list(self.layers)

    def _project(self, layer: int, feature: torch.Tensor) -> torch.Tensor:
        matrix = getattr(self, f"projection_l{layer}", None)
        return feature if matrix is None else feature @ matrix.to(feature.dtype)

    def _squash(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) if self.squash == "sigmoid" else x

    def forward(
        self, student: StudentOutput, teacher: TeacherOutput | None, batch: dict
    ) -> dict[str, torch.Tensor]:
        teacher = self._require_teacher(teacher)
        teacher_depth = self.ctx.teacher_depth or len(teacher.hidden_states)
        ce = cross_entropy(student, batch, self.label_smoothing)
        terms: dict[str, torch.Tensor] = {"ce": ce}
        total = ce.new_zeros(())
        for layer in self.layers:
            feature = self._squash(self._project(layer, student.features[layer]))
            t_layer = matched_teacher_layer(layer, self.ctx.student_depth, teacher_depth)
            for modality in self.ctx.modalities:
                target = self._squash(teacher.modality_feature(t_layer, modality).detach())
                term = masked_mse(feature, target, teacher.present.get(modality))
                terms[f"hallucination/l{layer}/{modality}"] = term
                total = total + term
        terms["hallucination"] = total
        terms["loss"] = ce + self.weight * total
        return terms
