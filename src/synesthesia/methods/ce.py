"""``ce`` — the image-only baseline: cross-entropy on the labels, no teacher.

    L = CE(z_s, y)

Options: ``label_smoothing`` (default 0).
"""

from __future__ import annotations

import torch

from synesthesia import UserError
from synesthesia.config import MethodConfig
from synesthesia.methods.base import METHODS, Method, MethodContext, check_options, cross_entropy
from synesthesia.models.outputs import StudentOutput, TeacherOutput


@METHODS.register("ce")
class CrossEntropy(Method):
    """Plain supervised training of the RGB-only student."""

    needs_teacher = False

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        check_options(cfg, ("label_smoothing",))
        self.label_smoothing = float(cfg.options.get("label_smoothing", 0.0))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"method.options.label_smoothing={self.label_smoothing} is not in [0, 1)")

    def forward(
        self, student: StudentOutput, teacher: TeacherOutput | None, batch: dict
    ) -> dict[str, torch.Tensor]:
        ce = cross_entropy(student, batch, self.label_smoothing)
        return {"loss": ce, "ce": ce}
