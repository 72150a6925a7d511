"""The methods registry and the interface every training objective implements.

An objective is a pure function of outputs and batch: no optimiser, no device
moves, no logging (the trainer owns those). It may own parameters (MESSy's
predictive heads); they are trained with the student and dropped at export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from synesthesia.config import MethodConfig
from synesthesia.models.outputs import StudentOutput, TeacherOutput
from synesthesia.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")


@dataclass(frozen=True)
class MethodContext:
    """What a method may need to build its parameters.

    ``student_dims``: feature width per (non-negative) student layer index;
    ``teacher_dim``/``teacher_depth``: the teacher's width and block count;
    ``modalities``: the privileged modalities; ``latent_dims``: flattened
    per-modality width of the standardised latent (for ``target: latent``).
    """

    num_classes: int
    student_dims: dict[int, int]
    student_depth: int
    teacher_dim: int = 0
    teacher_depth: int = 0
    modalities: tuple[str, ...] = ()
    latent_dims: dict[str, int] | None = None


class Method(nn.Module):
    """Base class. ``forward`` returns a dict holding ``loss`` and every named term."""

    needs_teacher: bool = False

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx

    def student_layers(self) -> list[int]:
        """Non-negative student layer indices whose features ``forward`` needs."""
        return []

    def forward(
        self, student: StudentOutput, teacher: TeacherOutput | None, batch: dict
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError
