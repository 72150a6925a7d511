"""RGB-only students: timm backbones by name, with pooled intermediate features.

A student is any timm model (``timm.create_model(name, pretrained=...,
num_classes=..., img_size=...)``) or one of the project's small variants in
:data:`STUDENTS`: a timm architecture with changed arguments (:class:`TimmVariant`),
sized for the 64×64 procedural scenes, so that timm alone rebuilds it:

=================  ===========================================================
``vit_tiny_scenes``  ``vit_tiny_patch16_224``, patch 8, depth 6 (width 192, 3 heads)
``vit_micro_test``   ``vit_tiny_patch16_224``, patch 8, width 32, depth 3, 2 heads (tests)
``resnet_scenes``    ``resnet18``, BasicBlock ×(1,1,1,1), widths 32-64-128-256
``cnn_micro_test``   ``convnext_tiny``, depths (1,1,1,1), widths 8-16-16-32, stem 2 (tests)
=================  ===========================================================

Intermediate features come from timm's ``forward_intermediates``; the layer
index ``l`` is timm's (one per entry of ``model.feature_info``: a block for a
ViT, a stage for a CNN — for a timm ResNet index 0 is the stem). ``features[l]``
is (B, D_l): the CLS token after block ``l`` for models with prefix tokens, the
mean of the tokens for a ViT without them, the global average of stage ``l``'s
map for a CNN; ``tokens[l]`` is the same layer as a (B, N_l, D_l) token
sequence (a ViT's patch tokens, a CNN's map flattened), which token-level
methods (``cotrain``) read. The exported student is this module alone: a method's heads live
in the method, never here. ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``
write and read that export (``synesthesia.train.export``): plain timm weights and config.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from synesthesia import UserError
from synesthesia.config import StudentConfig, build, to_dict
from synesthesia.models.outputs import StudentOutput
from synesthesia.registry import Registry


@dataclass(frozen=True)
class TimmVariant:
    """A project student: a timm architecture with its arguments changed.

    ``timm.create_model(architecture, num_classes=..., [img_size=...,] **model_args)``
    builds it, so an export's ``config.json`` (``architecture`` + ``model_args``)
    rebuilds it with timm alone.
    """

    architecture: str
    model_args: dict[str, Any]
    sized: bool  # takes img_size (ViTs); CNNs take any input size

    def __call__(self, num_classes: int, image_size: int, drop_path: float = 0.0) -> nn.Module:
        size = {"img_size": image_size} if self.sized else {}
        return timm.create_model(
            self.architecture, num_classes=num_classes, drop_path_rate=drop_path, **size, **self.model_args
        )


#: Project variants: name → TimmVariant, called as factory(num_classes, image_size, drop_path).
STUDENTS: Registry[TimmVariant] = Registry("student")
STUDENTS.register("vit_tiny_scenes")(
    TimmVariant("vit_tiny_patch16_224", {"patch_size": 8, "depth": 6}, sized=True)
)
STUDENTS.register("vit_micro_test")(
    TimmVariant(
        "vit_tiny_patch16_224",
        {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0},
        sized=True,
    )
)
STUDENTS.register("resnet_scenes")(
    TimmVariant(
        "resnet18", {"layers": (1, 1, 1, 1), "channels": (32, 64, 128, 256), "stem_width": 32}, sized=False
    )
)
STUDENTS.register("cnn_micro_test")(
    TimmVariant(
        "convnext_tiny", {"depths": (1, 1, 1, 1), "dims": (8, 16, 16, 32), "patch_size": 2}, sized=False
    )
)

# torch.export flattens and rebuilds StudentOutput, so an exported Student returns one too
torch.export.register_dataclass(StudentOutput, serialized_type_name="synesthesia.StudentOutput")


def create_backbone(cfg: StudentConfig, num_classes: int, image_size: int) -> nn.Module:
    """The timm model named by ``cfg.name``: a project variant, else any timm model name."""
    if cfg.name in STUDENTS:
        if cfg.pretrained:
            raise UserError(f"student {cfg.name!r} is a project variant with no pretrained weights")
        return STUDENTS.get(cfg.name)(num_classes, image_size, cfg.drop_path)
    if not timm.is_model(cfg.name):
        raise UserError(
            f"unknown student {cfg.name!r}; valid: {', '.join(STUDENTS.names())} or any timm model name"
        )
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": cfg.drop_path}
    try:
        try:
            # ViT-like models take the input size; CNNs do not accept the argument.
            return timm.create_model(cfg.name, pretrained=cfg.pretrained, img_size=image_size, **kwargs)
        except TypeError:
            return timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    except Exception as exc:  # timm raises many types for missing or unreachable weights
        if not cfg.pretrained:
            raise
        raise UserError(f"could not load pretrained weights for student {cfg.name!r}: {exc}") from None


def as_tokens(feature: Any) -> torch.Tensor:
    """(B, N, D) tokens of one intermediate: ViT patch tokens (prefix dropped), a flattened
    NCHW map, or a pooled (B, D) feature as one token."""
    if isinstance(feature, tuple):
        feature = feature[0]
    if feature.ndim == 4:
        return feature.flatten(2).transpose(1, 2)
    if feature.ndim == 2:
        return feature.unsqueeze(1)
    return feature


class Student(nn.Module):
    """An RGB-only classifier around a timm backbone (``self.model``).

    ``forward(rgb, layers)`` → :class:`StudentOutput` with ``logits``, pooled
    ``features[l]`` and ``tokens[l]`` (B, N_l, D_l) for each requested layer (negative indices count from the
    end and are returned under their non-negative index). ``feature_dims[l]``
    is the width of ``features[l]``; ``depth`` the number of layers.
    """

    def __init__(self, cfg: StudentConfig, num_classes: int, image_size: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.image_size = image_size
        self.model = create_backbone(cfg, num_classes, image_size)
        if not hasattr(self.model, "forward_intermediates"):
            raise UserError(f"student {cfg.name!r}: timm model has no forward_intermediates")
        info = self.model.feature_info
        self.feature_dims: dict[int, int] = {i: int(entry["num_chs"]) for i, entry in enumerate(info)}
        self.depth = len(self.feature_dims)
        params = inspect.signature(self.model.forward_intermediates).parameters
        self._token_model = "return_prefix_tokens" in params
        self._num_prefix = int(getattr(self.model, "num_prefix_tokens", 0) or 0)

    def resolve_layers(self, layers: list[int]) -> list[int]:
        """Non-negative, sorted, de-duplicated layer indices; out-of-range ones are UserErrors."""
        resolved = set()
        for layer in layers:
            index = layer + self.depth if layer < 0 else layer
            if not 0 <= index < self.depth:
                raise UserError(
                    f"student {self.cfg.name!r} has layers 0..{self.depth - 1} (or -{self.depth}..-1); got {layer}"
                )
            resolved.add(index)
        return sorted(resolved)

    def _pool(self, feature: Any) -> torch.Tensor:
        if isinstance(feature, tuple):  # (spatial tokens, prefix tokens) from a ViT
            tokens, prefix = feature
            return prefix[:, 0] if prefix is not None and prefix.shape[1] > 0 else tokens.mean(dim=1)
        if feature.ndim == 4:  # NCHW stage map
            return feature.mean(dim=(2, 3))
        if feature.ndim == 3:  # NLC tokens
            return feature.mean(dim=1)
        return feature

    def forward(self, rgb: torch.Tensor, layers: list[int] | None = None) -> StudentOutput:
        if not layers:
            return StudentOutput(logits=self.model(rgb))
        indices = self.resolve_layers(layers)
        if self._token_model:
            final, intermediates = self.model.forward_intermediates(
                rgb, indices=indices, output_fmt="NLC", return_prefix_tokens=self._num_prefix > 0
            )
        else:
            final, intermediates = self.model.forward_intermediates(rgb, indices=indices)
        logits = self.model.forward_head(final)
        pairs = list(zip(indices, intermediates, strict=True))
        features = {index: self._pool(feat) for index, feat in pairs}
        tokens = {index: as_tokens(feat) for index, feat in pairs}
        return StudentOutput(logits=logits, features=features, tokens=tokens)

    def config_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this student (JSON-able); weights go beside it."""
        return {"config": to_dict(self.cfg), "num_classes": self.num_classes, "image_size": self.image_size}

    def save_pretrained(self, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
        """Write the export folder (timm weights, timm config.json, model card); ``info`` as in
        :func:`~synesthesia.train.export.export_student`, by default what this student was loaded with."""
        from synesthesia.train.export import export_student

        return export_student(self, folder, getattr(self, "export_info", {}) if info is None else info)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> Student:
        """An export folder, a student run folder or a Hub repo id (see ``load_student``)."""
        from synesthesia.train.export import load_student

        return load_student(name_or_path, **kwargs)

    def push_to_hub(self, repo_id: str, info: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Export to a temporary folder and upload it (see ``synesthesia.train.export.push_to_hub``)."""
        import tempfile

        from synesthesia.train.export import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            return push_to_hub(self.save_pretrained(tmp, info), repo_id, **kwargs)

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> Student:
        """Rebuild a student from :meth:`config_dict` (never downloads: ``pretrained`` is dropped)."""
        try:
            cfg = build(StudentConfig, {**data["config"], "pretrained": False}, "student")
            return cls(cfg, int(data["num_classes"]), int(data["image_size"]))
        except KeyError as exc:
            raise UserError(f"student checkpoint config is missing {exc.args[0]!r}") from None


def build_student(cfg: StudentConfig, num_classes: int, image_size: int) -> Student:
    """The student named by ``cfg.name`` (a :data:`STUDENTS` variant or any timm model)."""
    return Student(cfg, num_classes, image_size)
