"""What one training step optimises: the trainees, one ``nn.Module`` per stage that accelerate prepares.

- :class:`TeacherTrainee`: the multimodal teacher with cross-entropy on RGB plus
  the privileged inputs (:func:`privileged_inputs`; its modality dropout is the
  teacher's own);
- :class:`TeacherObjectiveTrainee`: the teacher and a teacher objective
  (``modalimmune``, ``basis-realloc``), whose ``teacher_step`` gives the loss;
- :class:`StudentTrainee`: the RGB-only student and its method (KD, MESSy, ...),
  whose parameters (MESSy's heads) train with it; the frozen teacher's output
  comes in as ``teacher_out``.

Each ``forward(batch, teacher_out)`` returns named loss terms with ``loss`` the
one to minimise; the loop (:mod:`synesthesia.train.loop`) owns the optimiser,
devices and logging, and evaluation (:mod:`synesthesia.train.evaluate`) reads
the same :func:`privileged_inputs`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def privileged_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What the teacher gets beside RGB: the decoded signals when present, else the latents."""
    return batch.get("decoded") or batch.get("latents") or {}


class TeacherTrainee(nn.Module):
    """The teacher and its objective: cross-entropy on RGB + privileged inputs (with modality dropout)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, batch: dict[str, Any], teacher_out=None) -> dict[str, torch.Tensor]:
        logits = self.teacher(batch["rgb"], privileged_inputs(batch), present=batch.get("present")).logits
        ce = F.cross_entropy(logits.float(), batch["label"])
        return {"loss": ce, "ce": ce}


class TeacherObjectiveTrainee(nn.Module):
    """The teacher and a teacher objective (``modalimmune``, ``basis-realloc``), whose parameters train with it.

    ``forward`` is the objective's ``teacher_step(teacher, batch)`` (which may
    run the teacher several times); the trainer calls
    ``method.after_backward(teacher)`` itself, between backward and step.
    """

    def __init__(self, teacher: nn.Module, method: nn.Module):
        super().__init__()
        self.teacher = teacher
        self.method = method

    def forward(self, batch: dict[str, Any], teacher_out=None) -> dict[str, torch.Tensor]:
        return self.method.teacher_step(self.teacher, batch)


class StudentTrainee(nn.Module):
    """The student and its method (whose parameters, e.g. MESSy's heads, train with it)."""

    def __init__(self, student: nn.Module, method: nn.Module):
        super().__init__()
        self.student = student
        self.method = method
        self.layers = method.student_layers()

    def forward(self, batch: dict[str, Any], teacher_out=None) -> dict[str, torch.Tensor]:
        out = self.student(batch["rgb"], layers=self.layers or None)
        return self.method(out, teacher_out, batch)
