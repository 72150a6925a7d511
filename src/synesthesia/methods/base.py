"""The methods registry and the interface every training objective implements.

An objective is a pure function of outputs and batch: no optimiser, no device
moves, no logging (the trainer owns those). It may own parameters (MESSy's
predictive heads) or buffers (hallucination's fixed projection); they live in
the method module, are trained with the student and are dropped at export
simply because the exported student module does not contain them.

The batch the trainer provides: ``"rgb"`` (B, 3, H, W), ``"label"`` (B,) long,
``"latents"`` {modality: standardised latent (B, *shape)}, ``"keys"`` list[str]
(and ``"decoded"`` {modality: raw signal} with ``train.source=decoded``).

Two stages. A *student* method (``stage = "student"``, the default) is
``forward(student_out, teacher_out, batch) -> dict``. A *teacher objective*
(``stage = "teacher"``: ``modalimmune``, ``basis-realloc``) trains the
multimodal teacher itself through ``teacher_step(teacher, batch) -> dict``;
``after_backward(teacher) -> dict`` runs between backward and the optimizer
step; ``predict(teacher, batch) -> logits`` is what val/test evaluate;
``diagnostics(teacher, batch) -> dict`` reports collapse. The trainer saves a
teacher objective's own parameters and buffers beside the teacher's weights
(``best/method.safetensors``), so ``predict`` works after loading ``best/``.
``forward`` returns a dict with ``"loss"`` (the scalar to minimise) and every
named term that makes it up (scalars, e.g. ``"ce"``, ``"kd"``,
``"messy/l4/depth"``), all of which the trainer logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synesthesia import UserError
from synesthesia.config import MethodConfig
from synesthesia.models.outputs import StudentOutput, TeacherOutput
from synesthesia.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")


@dataclass(frozen=True)
class MethodContext:
    """What a method may need to build its parameters.

    ``student_dims``: feature width per (non-negative) student layer index
    (``Student.feature_dims``); ``student_depth``: ``Student.depth``;
    ``teacher_dim``/``teacher_depth``: the teacher's width and block count;
    ``modalities``: the privileged modalities; ``latent_dims``: per modality,
    the flattened width of one sample's standardised latent, i.e. the product
    of its shape (for MESSy's ``target: latent``); ``modality_specs``: per
    modality, the teacher-style input spec (``kind``, ``shape``, ``vocab``, as
    ``DataSpec.teacher_modalities()``), so a method can build real adapters
    (cotrain's multimodal branch).
    """

    num_classes: int
    student_dims: dict[int, int]
    student_depth: int
    teacher_dim: int = 0
    teacher_depth: int = 0
    modalities: tuple[str, ...] = ()
    latent_dims: dict[str, int] | None = None
    modality_specs: dict[str, dict] | None = None


class Method(nn.Module):
    """Base class. ``forward`` returns a dict holding ``loss`` and every named term.

    ``needs_teacher`` says whether the trainer must run the (frozen, eval-mode)
    teacher and pass its output; before the method is built (its heads need
    the teacher's width) ask the class: ``METHODS.get(name).needs_teacher_for(cfg)``,
    which also sees options such as MESSy's ``target: latent``.
    ``student_layers()`` says which student layers' features the trainer must
    request (``student(rgb, layers=...)``).
    """

    needs_teacher: bool = False
    stage: str = "student"
    # whether some of the trainee's parameters (the method's or the model's) may get no gradient
    # on a step: DDP must then look for them after each backward (find_unused_parameters), else
    # it fails with "Expected to have finished reduction in the prior iteration"
    find_unused_parameters: bool = False

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def needs_teacher_for(cls, cfg: MethodConfig) -> bool:
        """Whether this method, configured by ``cfg``, needs the teacher's outputs."""
        return cls.needs_teacher

    def student_layers(self) -> list[int]:
        """Non-negative student layer indices whose features ``forward`` needs."""
        return []

    def forward(
        self, student: StudentOutput, teacher: TeacherOutput | None, batch: dict
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _require_teacher(self, teacher: TeacherOutput | None) -> TeacherOutput:
        if teacher is None:
            raise UserError(f"method {self.cfg.name!r} needs a trained teacher (train.teacher=<run>)")
        return teacher


# ----------------------------------------------------------------------------- shared pieces


def resolve_layers(layers: list[int], depth: int, what: str = "student") -> list[int]:
    """Layer indices made non-negative (−1 is the last), sorted and unique; out of range is a UserError."""
    if not layers:
        raise UserError(f"method.layers is empty; give {what} layer indices (negative count from the end)")
    resolved = set()
    for layer in layers:
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise UserError(f"method.layers: {what} has layers 0..{depth - 1} (or -{depth}..-1); got {layer}")
        resolved.add(index)
    return sorted(resolved)


def matched_teacher_layer(student_layer: int, student_depth: int, teacher_depth: int) -> int:
    """The teacher block at the same relative depth as student layer ``l``.

    ``round((l + 1) · D_T / D_S) − 1`` (halves rounded up), clamped to
    ``[0, D_T − 1]``: the fraction of the network done after student layer l
    is matched to the teacher block that completes the nearest fraction. Equal
    depths map l → l, the last student layer always maps to the last teacher
    block, and a shallower student spreads its layers over the teacher's
    (student 3 blocks, teacher 12: 0 → 3, 1 → 7, 2 → 11).
    """
    index = math.floor((student_layer + 1) * teacher_depth / student_depth + 0.5) - 1
    return min(max(index, 0), teacher_depth - 1)


def cross_entropy(student: StudentOutput, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of the student's logits against ``batch["label"]``."""
    return F.cross_entropy(student.logits, batch["label"], label_smoothing=label_smoothing)


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al. 2015: T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the batch.

    The teacher's logits are detached (stop-gradient); the T² keeps gradient
    magnitudes comparable across temperatures.
    """
    if student_logits.shape != teacher_logits.shape:
        raise UserError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: were they trained on the same classes?"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over features, averaged over the samples where ``mask`` is True.

    With no sample selected the result is an exact zero that is still part of
    the graph (so every parameter keeps a gradient, of zero).
    """
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=-1)
    if mask is None:
        return per_sample.mean()
    weights = mask.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp(min=1.0)


def check_alpha_temperature(cfg: MethodConfig) -> None:
    if not 0.0 <= cfg.alpha <= 1.0:
        raise UserError(f"method.alpha={cfg.alpha} is not in [0, 1]")
    if cfg.temperature <= 0:
        raise UserError(f"method.temperature={cfg.temperature} must be positive")


def check_options(cfg: MethodConfig, valid: tuple[str, ...]) -> None:
    unknown = sorted(set(cfg.options) - set(valid))
    if unknown:
        raise UserError(
            f"method {cfg.name!r} has no option {unknown[0]!r}; valid: {', '.join(valid) or '(none)'}"
        )
