"""The multimodal teacher: a ViT over RGB patches and each privileged modality's tokens.

DLA (Sbrolli et al., ECCV 2026; PAPERS.md) trains a ViT from scratch on the
token sequence ::

    [CLS] [RGB patch 1 … N] [SEP_m1] [m1 token 1 … K] [SEP_m2] [m2 token 1 … K] …

Per privileged modality m: an adapter (:mod:`synesthesia.models.adapters`) maps
its input to tokens, a learned positional embedding is added, and a
Perceiver-style resampler (:mod:`synesthesia.models.resampler`) reduces them to
a fixed budget of K = ``tokens_per_modality`` tokens. Modality dropout replaces,
per sample, a modality's K tokens by K learned *null tokens* with probability
``modality_dropout`` during training; at evaluation a modality that is not
given is replaced by its nulls, so the teacher runs on any subset of its
modalities (RGB is always given). The blocks are timm ViT blocks (pre-norm,
fused scaled-dot-product attention); the classifier reads the final CLS token.

Per-layer hidden states and each modality's token span are returned
(:class:`~synesthesia.models.outputs.TeacherOutput`), which is what MESSy and
hallucination distil from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from synesthesia import UserError
from synesthesia.config import TeacherConfig, build, to_dict
from synesthesia.models.adapters import build_adapter
from synesthesia.models.outputs import TeacherOutput
from synesthesia.models.resampler import Resampler


class MultimodalTeacher(nn.Module):
    """A ViT over RGB patches plus resampled tokens of each privileged modality.

    Args:
        cfg: the ``teacher`` section (width, depth, heads, patch size, token budget, dropout).
        num_classes: classifier outputs.
        image_size: RGB side length (square images; divisible by ``cfg.patch_size``).
        modalities: ``{name: {"kind": "spatial" | "tokens" | "codes" | "decoded",
            "shape": [...], "vocab": int}}`` — the shape of one sample's input
            (spatial C×h×w, tokens T×C, codes K×T with ``vocab`` codes per
            codebook, decoded the raw signal H×W or C×H×W). The order of this
            mapping is the order of the modalities in the token sequence.
    """

    def __init__(
        self, cfg: TeacherConfig, num_classes: int, image_size: int, modalities: dict[str, dict[str, Any]]
    ):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise UserError(f"teacher.dim={cfg.dim} is not divisible by teacher.heads={cfg.heads}")
        if image_size % cfg.patch_size:
            raise UserError(
                f"image size {image_size} is not divisible by teacher.patch_size={cfg.patch_size}"
            )
        if not 0.0 <= cfg.modality_dropout <= 1.0:
            raise UserError(f"teacher.modality_dropout={cfg.modality_dropout} is not in [0, 1]")
        for name in modalities:
            if not name or not name.replace("_", "").isalnum() or name == "rgb":
                raise UserError(f"modality name {name!r} must be letters, digits or _ (and not 'rgb')")
        self.cfg = cfg
        self.num_classes = num_classes
        self.image_size = image_size
        self.modalities = {name: dict(spec) for name, spec in modalities.items()}
        self.dim = cfg.dim
        self.depth = cfg.depth
        dim, budget = cfg.dim, cfg.tokens_per_modality

        self.patch_embed = PatchEmbed(
            img_size=image_size, patch_size=cfg.patch_size, in_chans=3, embed_dim=dim
        )
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))

        self.adapters = nn.ModuleDict()
        self.modality_pos = nn.ParameterDict()
        self.resamplers = nn.ModuleDict()
        self.null_tokens = nn.ParameterDict()
        self.separators = nn.ParameterDict()
        for name, spec in self.modalities.items():
            adapter = build_adapter(
                name,
                spec,
                dim,
                patch_size=cfg.latent_patch_size,
                dropout=cfg.adapter_dropout,
                max_tokens=cfg.decoded_max_tokens,
            )
            self.adapters[name] = adapter
            self.modality_pos[name] = nn.Parameter(torch.zeros(1, adapter.num_tokens, dim))
            self.resamplers[name] = Resampler(
                dim, budget, cfg.heads, mlp_ratio=cfg.resampler_mlp_ratio, depth=cfg.resampler_depth
            )
            self.null_tokens[name] = nn.Parameter(torch.zeros(1, budget, dim))
            self.separators[name] = nn.Parameter(torch.zeros(1, 1, dim))

        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path=rate) for rate in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for param in [self.cls_token, self.pos_embed, *self.modality_pos.values()]:
            trunc_normal_(param, std=0.02)
        for param in [*self.null_tokens.values(), *self.separators.values()]:
            trunc_normal_(param, std=0.02)

    # ------------------------------------------------------------------ layout

    def spans(self) -> dict[str, tuple[int, int]]:
        """(start, end) of RGB and of each modality's K tokens in the sequence (separators excluded)."""
        spans = {"rgb": (1, 1 + self.num_patches)}
        pos = 1 + self.num_patches
        for name in self.modalities:
            spans[name] = (pos + 1, pos + 1 + self.cfg.tokens_per_modality)
            pos += 1 + self.cfg.tokens_per_modality
        return spans

    @property
    def num_tokens(self) -> int:
        return 1 + self.num_patches + len(self.modalities) * (1 + self.cfg.tokens_per_modality)

    def _check_input(self, name: str, value: torch.Tensor, batch: int) -> None:
        spec = self.modalities[name]
        expected = tuple(int(s) for s in spec["shape"])
        if tuple(value.shape[1:]) != expected or value.shape[0] != batch:
            raise UserError(
                f"teacher input {name!r}: expected shape ({batch}, {', '.join(map(str, expected))}), "
                f"got {tuple(value.shape)}"
            )
        if spec["kind"] == "codes" and value.is_floating_point():
            raise UserError(f"teacher input {name!r}: codes must be integers, got {value.dtype}")

    # ------------------------------------------------------------------ forward

    def _layer_set(self, layers: Sequence[int] | None) -> set[int] | None:
        """Block indices (negative from the end) → a set of non-negative ones; UserError when out of range."""
        if layers is None:
            return None
        out = set()
        for layer in layers:
            if not -self.depth <= int(layer) < self.depth:
                raise UserError(f"teacher layer {layer} is out of range for a depth-{self.depth} teacher")
            out.add(int(layer) % self.depth)
        return out

    def forward(
        self,
        rgb: torch.Tensor,
        inputs: dict[str, torch.Tensor] | None = None,
        drop: bool | None = None,
        present: dict[str, torch.Tensor] | None = None,
        layers: Sequence[int] | None = None,
    ) -> TeacherOutput:
        """Classify ``rgb`` (B, 3, H, W) with the privileged ``inputs`` {modality: (B, *shape)}.

        A modality absent from ``inputs`` is replaced by its null tokens for the
        whole batch; ``present`` (optional {modality: (B,) bool}) does so per
        sample. Modality dropout is applied when ``drop`` is True, or when it is
        None and the module is in training mode. ``TeacherOutput.present`` says
        which samples saw each modality's real tokens.

        ``layers`` (block indices, negative ones counted from the end) keeps only
        those blocks' hidden states: ``hidden_states`` still has one entry per
        block, ``None`` for the others, so a frozen teacher distilled from at a
        few depths does not hold every block's (B, N, D) tokens alive. None (the
        default) keeps them all.
        """
        keep_layers = self._layer_set(layers)
        inputs = inputs or {}
        unknown = sorted(set(inputs) - set(self.modalities))
        if unknown:
            raise UserError(
                f"teacher has no modality {unknown[0]!r}; its modalities: {', '.join(self.modalities) or '(none)'}"
            )
        batch = rgb.shape[0]
        apply_drop = self.training if drop is None else drop
        x = self.patch_embed(rgb) + self.pos_embed
        parts = [self.cls_token.expand(batch, -1, -1), x]
        kept: dict[str, torch.Tensor] = {}
        for name in self.modalities:
            nulls = self.null_tokens[name].expand(batch, -1, -1)
            keep = torch.zeros(batch, dtype=torch.bool, device=rgb.device)
            if name in inputs:
                value = inputs[name]
                self._check_input(name, value, batch)
                tokens = self.adapters[name](value) + self.modality_pos[name]
                tokens = self.resamplers[name](tokens)
                keep = torch.ones(batch, dtype=torch.bool, device=rgb.device)
                if present is not None and name in present:
                    keep = keep & present[name].to(device=rgb.device, dtype=torch.bool)
                if apply_drop and self.cfg.modality_dropout > 0:
                    keep = keep & (torch.rand(batch, device=rgb.device) >= self.cfg.modality_dropout)
                tokens = torch.where(keep[:, None, None], tokens.to(nulls.dtype), nulls)
            else:
                tokens = nulls
            kept[name] = keep
            parts += [self.separators[name].expand(batch, -1, -1), tokens]
        x = torch.cat(parts, dim=1)

        hidden_states: list[torch.Tensor | None] = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            hidden_states.append(x if keep_layers is None or index in keep_layers else None)
        logits = self.head(self.norm(x)[:, 0])
        return TeacherOutput(logits=logits, hidden_states=hidden_states, spans=self.spans(), present=kept)

    # ------------------------------------------------------------------ checkpoints

    def config_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this teacher (JSON-able); weights go beside it."""
        return {
            "config": to_dict(self.cfg),
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "modalities": self.modalities,
        }

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> MultimodalTeacher:
        """Rebuild an (untrained) teacher from :meth:`config_dict`; load its state dict after."""
        try:
            cfg = build(TeacherConfig, data["config"], "teacher")
            return cls(cfg, int(data["num_classes"]), int(data["image_size"]), data["modalities"])
        except KeyError as exc:
            raise UserError(f"teacher checkpoint config is missing {exc.args[0]!r}") from None
