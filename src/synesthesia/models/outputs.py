"""Small output dataclasses shared by the teacher, the students and the methods."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TeacherOutput:
    """What the multimodal teacher returns.

    ``hidden_states[l]`` is the (B, N, D) token sequence after block ``l`` (``None`` for a
    block not asked for with the teacher's ``layers=``);
    ``spans[m]`` is the (start, end) slice of modality ``m``'s tokens in it
    (``spans["rgb"]`` the RGB patches; the CLS token is index 0).
    ``present[m]`` is a (B,) bool mask: True where modality ``m``'s real tokens
    were used, False where its null tokens stood in (missing or dropped).
    """

    logits: torch.Tensor
    hidden_states: list[torch.Tensor | None]
    spans: dict[str, tuple[int, int]]
    present: dict[str, torch.Tensor] = field(default_factory=dict)

    def modality_tokens(self, layer: int, modality: str) -> torch.Tensor:
        start, end = self.spans[modality]
        return self.hidden_states[layer][:, start:end]

    def modality_feature(self, layer: int, modality: str) -> torch.Tensor:
        """(B, D): the mean of modality ``m``'s tokens after block ``layer`` (MESSy's target)."""
        return self.modality_tokens(layer, modality).mean(dim=1)

    def cls(self, layer: int = -1) -> torch.Tensor:
        return self.hidden_states[layer][:, 0]


@dataclass
class StudentOutput:
    """What an RGB-only student returns: logits, pooled features and token sequences of the requested layers.

    ``features[l]`` is (B, D_l): the CLS token after block ``l`` for a ViT, the
    globally pooled output of stage ``l`` for a CNN (non-negative layer indices).
    ``tokens[l]`` is (B, N_l, D_l), the same layer as a token sequence: a ViT's
    patch tokens after block ``l`` (prefix tokens such as CLS excluded), a
    CNN's stage-``l`` map flattened row-major to h·w tokens. Both come from the
    one ``forward_intermediates`` call (no extra compute); without requested
    layers, both are empty and the forward is the plain model's.
    """

    logits: torch.Tensor
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
