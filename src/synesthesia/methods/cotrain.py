"""``cotrain`` — co-training with a multimodal transformer branch (Chumachenko, Iosifidis, Gabbouj 2023).

*Improving Unimodal Inference with Multimodal Transformers* (arXiv 2311.10170):
unimodal branches and a transformer-based multimodal branch share early feature
layers and are trained together with a multi-task objective; the stronger
multimodal branch transfers its knowledge to the unimodal ones, and a unimodal
branch alone is used at inference.

Here the unimodal branch is the RGB-only student; the multimodal branch is a
small transformer owned by this method (so the exported student drops it). Its
input is the student's own tokens after the shared layer l
(``shared_layer``, default the middle block ``depth // 2 − 1``; blocks 0..l are
shared) projected to width D, followed by each privileged modality's latent
tokens through an adapter (:func:`synesthesia.models.adapters.build_adapter`)
with a learned positional embedding, each part tagged by a learned type
embedding, after a CLS token::

    [CLS] [proj(student tokens at l)] [adapter_m1(z_m1)] [adapter_m2(z_m2)] …
    → ``depth`` pre-norm transformer blocks → LayerNorm → Linear → z_mm

Objective::

    L = CE(z_s, y) + CE(z_mm, y) + w·T²·KL(softmax(sg(z_mm)/T) ‖ softmax(z_s/T)) [+ w_att·L_att]

z_s is the student's logits; sg is stop-gradient, so the multimodal branch is
updated only by its own CE (which also reaches the shared student blocks 0..l),
while the KL trains the RGB branch only. w = ``method.weight`` (None: 1.0; the
paper's weight is open, α=5 was reported best for gestures in one summary), T =
``method.temperature``. ``method.alpha`` is not used.

Optional attention-level transfer (``attention_weight`` > 0, default 0): the
multimodal CLS token's attention over the RGB tokens in the branch's last block
(averaged over heads, renormalised over the RGB tokens, stop-grad) is distilled
into the RGB branch's own CLS-to-token attention at student layer
``attention_layer`` [last], taken as softmax(⟨cls, t_j⟩/√d) over that layer's
tokens: L_att = KL(a_mm ‖ a_s).

What this method needs from the student: ``features[l]`` (pooled, as every
method) and, for token-level sharing, ``StudentOutput.tokens[l]`` — the (B, N,
D_l) token sequence of each layer in ``student_layers()``: a ViT's patch tokens
(CLS excluded), a CNN's stage map flattened to h·w tokens. The student fills it
from the same ``forward_intermediates`` call as ``features`` whenever layers
are requested, so the branch runs over the shared layer's tokens at no extra
student cost; the exported student is the plain one. Given an output without
``tokens`` (a hand-built :class:`StudentOutput`), the pooled feature is used as
a single RGB token, and attention transfer is refused.

Modality specs (``kind``/``shape``/``vocab``, as the teacher's) come from
``MethodContext.modality_specs`` (the trainer provides them: latent tokens go
through the teacher's adapters, raw signals with ``train.source=decoded``
through its conv encoder), else from
``method.options.modalities``; failing both, each standardised latent is
flattened (``MethodContext.latent_dims``) and mapped by LayerNorm + Linear to
``flat_tokens`` [4] tokens.

Options [defaults]: ``shared_layer``, ``dim`` [student width at l], ``depth``
[2], ``heads`` [4], ``mlp_ratio`` [2.0], ``latent_patch_size`` [1],
``dropout`` [0.1], ``modality_dropout`` [0.0] (per sample, a modality's tokens
are masked out of the branch's attention), ``attention_weight`` [0],
``attention_layer`` [−1], ``label_smoothing`` [0], ``flat_tokens`` [4],
``modalities`` [none].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from synesthesia import UserError
from synesthesia.config import MethodConfig
from synesthesia.methods.base import (
    METHODS,
    Method,
    MethodContext,
    check_options,
    cross_entropy,
    distillation_kl,
)
from synesthesia.models.adapters import build_adapter
from synesthesia.models.outputs import StudentOutput, TeacherOutput
from synesthesia.models.students import as_tokens

DEFAULT_WEIGHT = 1.0
OPTIONS = (
    "shared_layer",
    "dim",
    "depth",
    "heads",
    "mlp_ratio",
    "latent_patch_size",
    "dropout",
    "modality_dropout",
    "attention_weight",
    "attention_layer",
    "label_smoothing",
    "flat_tokens",
    "modalities",
)


class FlatAdapter(nn.Module):
    """A flattened latent of width ``in_dim`` → ``num_tokens`` tokens of width ``dim`` (LayerNorm, Linear)."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.dim = dim
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, num_tokens * dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise UserError("cotrain: codes latents need a modality spec (method.options.modalities)")
        return self.net(x.float().flatten(1)).view(x.shape[0], self.num_tokens, self.dim)


class Block(nn.Module):
    """Pre-norm transformer block that can return its (head-averaged) attention weights."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.norm1(x)
        attended, weights = self.attn(
            h, h, h, key_padding_mask=key_padding_mask, need_weights=need_weights, average_attn_weights=True
        )
        x = x + attended
        x = x + self.mlp(self.norm2(x))
        return x, weights


@METHODS.register("cotrain")
class CoTrain(Method):
    """RGB branch + multimodal transformer branch over shared student tokens and latent tokens."""

    needs_teacher = False

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        check_options(cfg, OPTIONS)
        if cfg.temperature <= 0:
            raise UserError(f"method.temperature={cfg.temperature} must be positive")
        o = cfg.options
        depth = ctx.student_depth
        if depth < 1:
            raise UserError("cotrain needs the student's depth (MethodContext.student_depth)")
        self.shared_layer = self._layer(int(o.get("shared_layer", max(depth // 2 - 1, 0))), "shared_layer")
        self.attention_weight = float(o.get("attention_weight", 0.0))
        self.attention_layer = self._layer(int(o.get("attention_layer", -1)), "attention_layer")
        self.weight = DEFAULT_WEIGHT if cfg.weight is None else float(cfg.weight)
        self.label_smoothing = float(o.get("label_smoothing", 0.0))
        self.modality_dropout = float(o.get("modality_dropout", 0.0))
        if not 0.0 <= self.modality_dropout < 1.0:
            raise UserError(f"method.options.modality_dropout={self.modality_dropout} is not in [0, 1)")
        if self.shared_layer not in ctx.student_dims:
            raise UserError(
                f"cotrain: no student width for layer {self.shared_layer} in MethodContext.student_dims"
            )
        dim = int(o.get("dim", ctx.student_dims[self.shared_layer]))
        heads = int(o.get("heads", 4))
        if dim % heads:
            raise UserError(f"method.options: cotrain dim={dim} is not divisible by heads={heads}")
        dropout = float(o.get("dropout", 0.1))
        self.dim = dim

        self.rgb_proj = nn.Linear(ctx.student_dims[self.shared_layer], dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.type_embed = nn.ParameterDict({"rgb": nn.Parameter(torch.zeros(1, 1, dim))})
        self.adapters = nn.ModuleDict()
        self.pos_embed = nn.ParameterDict()
        specs = ctx.modality_specs or o.get("modalities") or {}
        self.modalities = tuple(ctx.modalities)
        if not self.modalities:
            raise UserError("cotrain needs privileged modalities (train.modalities, train.source != none)")
        for m in self.modalities:
            if m in specs:
                adapter = build_adapter(
                    m,
                    specs[m],
                    dim,
                    patch_size=int(o.get("latent_patch_size", 1)),
                    dropout=dropout,
                    max_tokens=256,
                )
            elif ctx.latent_dims and m in ctx.latent_dims:
                adapter = FlatAdapter(int(ctx.latent_dims[m]), dim, int(o.get("flat_tokens", 4)))
            else:
                raise UserError(
                    f"cotrain: no latent spec for modality {m!r} (MethodContext.modality_specs, "
                    "method.options.modalities or MethodContext.latent_dims)"
                )
            self.adapters[m] = adapter
            self.pos_embed[m] = nn.Parameter(torch.zeros(1, adapter.num_tokens, dim))
            self.type_embed[m] = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, float(o.get("mlp_ratio", 2.0)), dropout) for _ in range(int(o.get("depth", 2)))
        )
        if not self.blocks:
            raise UserError("method.options.depth must be at least 1 for cotrain")
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, ctx.num_classes)
        for p in [self.cls_token, *self.type_embed.values(), *self.pos_embed.values()]:
            nn.init.trunc_normal_(p, std=0.02)

    def _layer(self, layer: int, what: str) -> int:
        depth = self.ctx.student_depth
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise UserError(f"method.options.{what}: the student has layers 0..{depth - 1}; got {layer}")
        return index

    def student_layers(self) -> list[int]:
        layers = {self.shared_layer}
        if self.attention_weight > 0:
            layers.add(self.attention_layer)
        return sorted(layers)

    def _student_tokens(self, student: StudentOutput, layer: int, strict: bool = False) -> torch.Tensor:
        tokens = getattr(student, "tokens", None) or {}
        if layer in tokens:
            return as_tokens(tokens[layer])
        if strict:
            raise UserError(
                "cotrain attention transfer needs token-level student features (StudentOutput.tokens)"
            )
        if layer not in student.features:
            raise UserError(f"cotrain: the student output has no features for layer {layer}")
        return as_tokens(student.features[layer])

    def multimodal(self, student: StudentOutput, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The multimodal branch: (logits, last block's CLS attention over all tokens, number of RGB tokens)."""
        latents = batch.get("decoded") or batch.get("latents") or {}  # as train.objectives.privileged_inputs
        missing = [m for m in self.modalities if m not in latents]
        if missing:
            raise UserError(
                f"cotrain: the batch has no latents for {missing[0]!r} (train.source must not be none)"
            )
        rgb = self.rgb_proj(self._student_tokens(student, self.shared_layer).float())
        batch_size, n_rgb = rgb.shape[0], rgb.shape[1]
        parts = [self.cls_token.expand(batch_size, -1, -1), rgb + self.type_embed["rgb"]]
        pad = [torch.zeros(batch_size, 1 + n_rgb, dtype=torch.bool, device=rgb.device)]
        for m in self.modalities:
            tokens = self.adapters[m](latents[m]) + self.pos_embed[m] + self.type_embed[m]
            parts.append(tokens)
            drop = torch.zeros(batch_size, dtype=torch.bool, device=rgb.device)
            if self.training and self.modality_dropout > 0:
                drop = torch.rand(batch_size, device=rgb.device) < self.modality_dropout
            pad.append(drop[:, None].expand(-1, tokens.shape[1]))
        x = torch.cat(parts, dim=1)
        mask = torch.cat(pad, dim=1)
        weights = None
        for i, block in enumerate(self.blocks):
            x, w = block(
                x, key_padding_mask=mask if bool(mask.any()) else None, need_weights=i == len(self.blocks) - 1
            )
            weights = w if w is not None else weights
        logits = self.head(self.norm(x)[:, 0])
        return logits, weights[:, 0], n_rgb

    def forward(
        self, student: StudentOutput, teacher: TeacherOutput | None, batch: dict
    ) -> dict[str, torch.Tensor]:
        mm_logits, cls_attention, n_rgb = self.multimodal(student, batch)
        label = batch["label"]
        ce = cross_entropy(student, batch, self.label_smoothing)
        ce_mm = F.cross_entropy(mm_logits.float(), label, label_smoothing=self.label_smoothing)
        kl = distillation_kl(student.logits, mm_logits, self.cfg.temperature)  # detaches mm_logits
        loss = ce + ce_mm + self.weight * kl
        terms = {"ce": ce, "ce_mm": ce_mm, "kl": kl}
        if self.attention_weight > 0:
            attn = self.attention_transfer(student, cls_attention, n_rgb)
            terms["attention"] = attn
            loss = loss + self.attention_weight * attn
        terms["acc_mm"] = (mm_logits.argmax(-1) == label).float().mean().detach()
        return {"loss": loss, **terms}

    def attention_transfer(
        self, student: StudentOutput, cls_attention: torch.Tensor, n_rgb: int
    ) -> torch.Tensor:
        """KL(a_mm ‖ a_s) between the branch's CLS→RGB attention (stop-grad) and the student's CLS→token one."""
        target = cls_attention[:, 1 : 1 + n_rgb].detach().float()
        target = target / target.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        tokens = self._student_tokens(student, self.attention_layer, strict=True).float()
        query = student.features[self.attention_layer].float()
        if tokens.shape[1] != n_rgb:
            side_s, side_t = math.isqrt(tokens.shape[1]), math.isqrt(n_rgb)
            if side_s**2 != tokens.shape[1] or side_t**2 != n_rgb:
                raise UserError(
                    f"cotrain attention transfer: {tokens.shape[1]} student tokens vs {n_rgb} shared tokens"
                )
            grid = target.view(-1, 1, side_t, side_t)
            target = F.adaptive_avg_pool2d(grid, side_s).flatten(1)
            target = target / target.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = torch.einsum("bd,bnd->bn", query, tokens) / math.sqrt(tokens.shape[-1])
        log_a_s = F.log_softmax(scores, dim=-1)
        return F.kl_div(log_a_s, target, reduction="batchmean")
