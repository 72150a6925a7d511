"""``basis-realloc`` — Explicit Basis Reallocation (Chaudhuri, Dutta, Bui, Georgescu, ICML 2025).

*A Closer Look at Multimodal Representation Collapse* (arXiv 2505.22483): a
modality collapses when its noisy features are entangled with another
modality's predictive features through shared neurons of the fusion head; SGD's
low-rank bias favours this, and cross-modal knowledge distillation frees the
rank bottleneck. Explicit Basis Reallocation (EBR) prevents it: after each
modality encoder f_i, an encoder h_i and a decoder h_i⁻¹ (two-layer MLPs),
g_i = h_i∘f_i; a modality discriminator ψ predicts which modality g_i(x) came
from (cross-entropy L_md); ψ minimises L_md while f_i and h_i minimise the task
loss and *maximise* L_md (a gradient-reversal layer, GRL); h_i⁻¹ minimises the
task loss; the decoded h_i⁻¹(g_i(x)) go into the fusion head.

Here, as a teacher objective (``stage = "teacher"``):

- f_i(x) is modality i's pooled representation in the multimodal teacher: the
  mean of its tokens after block ``feature_layer`` [−1], for i ∈ {rgb, privileged
  modalities}. h_i, h_i⁻¹ are Linear(D→H), GELU, Linear(H→D) with H =
  ``hidden`` [D]; ψ is Linear(D→H), GELU, Linear(H→M+1); the fusion head is
  LayerNorm, Linear((M+1)·D→H), GELU, Linear(H→classes) over the concatenated
  decoded features (``fusion: linear`` for one Linear layer). ψ starts with a
  LayerNorm (our choice): the encoders cannot fool it by rescaling g. These
  live in this module (trained with the teacher; not part of its checkpoint).
- Loss per step::

      L = w_t·CE(teacher) + CE(fusion(h⁻¹(g))) + w_md·L_adv
          + w_kd·T²·KL(softmax(z_full/T) ‖ softmax(z_rgb/T)) + w_rec·‖h⁻¹(g) − sg(f)‖²

  w_t = ``teacher_ce_weight`` [1], w_md = ``md_weight`` [0.1], w_kd =
  ``kd_weight`` [1], T = ``method.temperature``, w_rec = ``recon_weight`` [0].
- The adversarial game L_adv (``adversary``; the paper's is a GRL, its
  stability details are left open):

  - ``grl``: L_adv = L_md(ψ(GRL_γ(g))): ψ minimises L_md, the encoders get
    −γ·∂L_md, i.e. *maximise* ψ's cross-entropy — an unbounded objective: on the
    demo scenes (20-epoch teacher, γ = 1) it made ψ confidently wrong (L_md
    spikes of 10–27), its gradient dominated the global clip norm and the
    teacher stayed at chance (22.7 % test vs 56.3 % plain).
  - ``confusion`` [default]: the domain-confusion form of the same game
    (Tzeng et al. 2015): ψ minimises L_md on sg(g); the encoders minimise
    γ·CE(ψ̄(g), uniform) with ψ̄ = ψ's weights held fixed — bounded below by
    log(M+1), zero gradient once ψ cannot tell the modalities apart. Same
    equilibrium (ψ at chance), stable optimisation.

  The default was chosen on val accuracy (pipelines/methods-scenes.yaml, seed
  0, 20-epoch teachers): confusion 57.7 %, grl with the LayerNorm ψ and the
  ramp 56.0 %, no adversary (``md_weight: 0``) 56.3 %, the plain teacher 54.3 %.

  γ = ``grl_scale`` [1] ramps up as in DANN (Ganin & Lempitsky 2015),
  γ_s = γ·(2/(1 + exp(−10·s/S)) − 1) over S = ``grl_ramp_steps`` [200]
  training batches (0: constant γ). With ``adversary_into_teacher`` [true] the
  encoders' adversarial gradient reaches the teacher's trunk (the paper's f_i
  maximise L_md); false stops it at h_i.
- The KD term is the cross-modal distillation of
  the paper, read here as the teacher's all-modality prediction (stop-grad)
  distilled into its own RGB-only pathway (all privileged modalities replaced
  by null tokens) — the encoder that must carry the missing modalities' share.
  L_md is taken over the samples whose teacher saw the real modality.
- Missing modalities: modality m absent at inference (or dropped by the
  teacher's modality dropout in training, with ``substitute_in_training``
  [true]) is substituted by h_m⁻¹(g_j(x_j)) from the most similar available
  modality j. Similarity ranking (open in the paper; our choice): an EMA
  (``sim_momentum`` [0.9]) of the mean cosine similarity between g_i and g_j
  over training batches, where both are present; RGB is always available, so a
  substitute always exists.

``predict`` returns the fusion head's logits with substitution
(``predict_with: teacher`` for the teacher's own); ``diagnostics`` reports the
teacher-level collapse diagnostics of :func:`~synesthesia.methods.teacher_probes.teacher_diagnostics`
plus, in the fusion head, each modality's contribution (CE increase when its
decoded feature is replaced by the batch mean), its share of the first fusion
layer's weight norm (the basis it is allocated), and the stable rank of g_i.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from synesthesia import UserError
from synesthesia.config import MethodConfig
from synesthesia.methods.base import METHODS, Method, MethodContext, check_options, distillation_kl
from synesthesia.methods.teacher_probes import (
    eval_mode,
    stable_rank,
    teacher_diagnostics,
    unpack_batch,
)
from synesthesia.models.outputs import StudentOutput, TeacherOutput

OPTIONS = {
    "feature_layer": -1,
    "hidden": 0,  # 0: the teacher's width
    "fusion": "mlp",
    "teacher_ce_weight": 1.0,
    "md_weight": 0.1,
    "adversary": "confusion",
    "grl_scale": 1.0,
    "grl_ramp_steps": 200,
    "adversary_into_teacher": True,
    "kd_weight": 1.0,
    "recon_weight": 0.0,
    "sim_momentum": 0.9,
    "substitute_in_training": True,
    "predict_with": "fusion",
}


class _GradReverse(torch.autograd.Function):
    """Identity forward; gradient multiplied by −γ backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The gradient-reversal layer: ``x`` forward, ``−scale·∂L/∂x`` backward."""
    return _GradReverse.apply(x, scale)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


@METHODS.register("basis-realloc")
class BasisReallocation(Method):
    """EBR: per-modality encoder/decoder, a GRL modality discriminator, a fusion head, missing-modality substitution."""

    stage = "teacher"
    needs_teacher = False

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        check_options(cfg, tuple(OPTIONS))
        o = {**OPTIONS, **cfg.options}
        self.opts = o
        if ctx.teacher_dim <= 0:
            raise UserError("basis-realloc needs the teacher's width (MethodContext.teacher_dim)")
        if not ctx.modalities:
            raise UserError(
                "basis-realloc needs privileged modalities (train.modalities, train.source != none)"
            )
        if o["fusion"] not in ("mlp", "linear"):
            raise UserError(f"method.options.fusion={o['fusion']!r}; valid: mlp, linear")
        if o["adversary"] not in ("grl", "confusion"):
            raise UserError(f"method.options.adversary={o['adversary']!r}; valid: grl, confusion")
        if o["predict_with"] not in ("fusion", "teacher"):
            raise UserError(f"method.options.predict_with={o['predict_with']!r}; valid: fusion, teacher")
        if cfg.temperature <= 0:
            raise UserError(f"method.temperature={cfg.temperature} must be positive")
        self.names = ("rgb", *ctx.modalities)
        dim = ctx.teacher_dim
        hidden = int(o["hidden"]) or dim
        self.encoders = nn.ModuleDict({n: _mlp(dim, hidden, dim) for n in self.names})
        self.decoders = nn.ModuleDict({n: _mlp(dim, hidden, dim) for n in self.names})
        self.discriminator = nn.Sequential(nn.LayerNorm(dim), *_mlp(dim, hidden, len(self.names)))
        width = len(self.names) * dim
        if o["fusion"] == "linear":
            self.fusion = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ctx.num_classes))
        else:
            self.fusion = nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, ctx.num_classes)
            )
        # similarity[i, j]: EMA of mean cos(g_i, g_j); diagonal 1.
        self.register_buffer("similarity", torch.eye(len(self.names)))
        self.register_buffer("sim_seen", torch.zeros(len(self.names), len(self.names), dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training batches seen (γ ramp)

    # ------------------------------------------------------------------ pieces

    def encode(self, out: TeacherOutput, detach: bool = False) -> dict[str, torch.Tensor]:
        """g_i = h_i(f_i) for every modality slot (RGB and each privileged one); h_i(sg(f_i)) with ``detach``."""
        layer = int(self.opts["feature_layer"])
        feats = {n: out.modality_feature(layer, n).float() for n in self.names}
        return {n: self.encoders[n](f.detach() if detach else f) for n, f in feats.items()}

    def present_masks(
        self, out: TeacherOutput, latents: dict, batch_size: int, device
    ) -> dict[str, torch.Tensor]:
        masks = {"rgb": torch.ones(batch_size, dtype=torch.bool, device=device)}
        for m in self.names[1:]:
            if out.present and m in out.present:
                masks[m] = out.present[m].to(device=device, dtype=torch.bool)
            else:
                masks[m] = torch.full((batch_size,), m in latents, dtype=torch.bool, device=device)
        return masks

    def substitute_for(self, missing: str, available: list[str]) -> str:
        """The available modality most similar to ``missing`` by the EMA cosine ranking."""
        i = self.names.index(missing)
        candidates = [n for n in available if n != missing]
        return max(
            candidates, key=lambda n: (float(self.similarity[i, self.names.index(n)]), -self.names.index(n))
        )

    def decode(self, g: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """h_i⁻¹(g_i) where i is present; h_i⁻¹(g_j) of the most similar present j elsewhere (per sample)."""
        decoded = {}
        for n in self.names:
            own = self.decoders[n](g[n])
            mask = present[n]
            if bool(mask.all()):
                decoded[n] = own
                continue
            # Per sample: the best-ranked modality that sample has (RGB always).
            order = sorted(
                (j for j in self.names if j != n),
                key=lambda j: -float(self.similarity[self.names.index(n), self.names.index(j)]),
            )
            sub = self.decoders[n](g["rgb"])
            chosen = torch.zeros_like(mask)
            for j in order:
                take = present[j] & ~chosen
                if bool(take.any()):
                    sub = torch.where(take[:, None], self.decoders[n](g[j]), sub)
                chosen = chosen | present[j]
            decoded[n] = torch.where(mask[:, None], own, sub)
        return decoded

    def fuse(self, decoded: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fusion(torch.cat([decoded[n] for n in self.names], dim=-1))

    @torch.no_grad()
    def update_similarity(self, g: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> None:
        momentum = float(self.opts["sim_momentum"])
        normed = {n: F.normalize(g[n].detach().float(), dim=-1) for n in self.names}
        for a, na in enumerate(self.names):
            for b in range(a + 1, len(self.names)):
                nb = self.names[b]
                both = present[na] & present[nb]
                if not bool(both.any()):
                    continue
                cos = float((normed[na][both] * normed[nb][both]).sum(-1).mean())
                old = float(self.similarity[a, b])
                new = momentum * old + (1 - momentum) * cos if bool(self.sim_seen[a, b]) else cos
                self.similarity[a, b] = self.similarity[b, a] = new
                self.sim_seen[a, b] = self.sim_seen[b, a] = True

    def adversary_scale(self) -> float:
        """γ_s: ``grl_scale`` ramped by DANN's 2/(1 + exp(−10·s/S)) − 1 over ``grl_ramp_steps``."""
        scale = float(self.opts["grl_scale"])
        ramp = int(self.opts["grl_ramp_steps"])
        if ramp <= 0:
            return scale
        progress = min(float(self.steps) / ramp, 1.0)
        return scale * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)

    def _stack(self, g: dict[str, torch.Tensor], present: dict[str, torch.Tensor]):
        feats, targets = [], []
        for i, n in enumerate(self.names):
            rows = g[n][present[n]]
            feats.append(rows)
            targets.append(torch.full((rows.shape[0],), i, dtype=torch.long, device=rows.device))
        return torch.cat(feats), torch.cat(targets)

    def discriminator_loss(
        self, g: dict[str, torch.Tensor], present: dict[str, torch.Tensor], scale: float | None = None
    ) -> dict[str, torch.Tensor]:
        """The adversarial terms over present samples: ``md`` (ψ's CE), ``md_acc``, and for
        ``adversary: confusion`` the encoders' ``confusion`` (CE of fixed-weight ψ against uniform).

        ``grl``: ``md`` is computed on GRL_γ(g), so its gradient trains ψ and reverses into the
        encoders. ``confusion``: ``md`` sees sg(g) (ψ only); ``confusion`` (already × γ) moves
        only the encoders.
        """
        scale = self.adversary_scale() if scale is None else scale
        x, y = self._stack(g, present)
        if self.opts["adversary"] == "grl":
            logits = self.discriminator(grad_reverse(x, scale))
            return {
                "md": F.cross_entropy(logits, y),
                "md_acc": (logits.argmax(-1) == y).float().mean().detach(),
            }
        logits = self.discriminator(x.detach())
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        fooled = torch.func.functional_call(self.discriminator, frozen, (x,))
        confusion = -F.log_softmax(fooled.float(), dim=-1).mean(dim=-1).mean()
        return {
            "md": F.cross_entropy(logits, y),
            "md_acc": (logits.argmax(-1) == y).float().mean().detach(),
            "confusion": scale * confusion,
        }

    # ------------------------------------------------------------------ interface

    def teacher_step(self, teacher: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        rgb, latents, label = unpack_batch(batch)
        out = teacher(rgb, latents)
        g = self.encode(out)
        present = self.present_masks(out, latents, rgb.shape[0], rgb.device)
        self.update_similarity(g, present)
        if self.training:
            self.steps += 1
        if not self.opts["substitute_in_training"]:
            present_for_decode = {n: torch.ones_like(present[n]) for n in self.names}
        else:
            present_for_decode = present
        decoded = self.decode(g, present_for_decode)
        fused = self.fuse(decoded)
        ce_teacher = F.cross_entropy(out.logits.float(), label)
        ce_fusion = F.cross_entropy(fused.float(), label)
        g_adv = g if self.opts["adversary_into_teacher"] else self.encode(out, detach=True)
        adv = self.discriminator_loss(g_adv, present)
        terms = {"ce_teacher": ce_teacher, "ce_fusion": ce_fusion, **adv}
        loss = float(self.opts["teacher_ce_weight"]) * ce_teacher + ce_fusion
        loss = loss + float(self.opts["md_weight"]) * (adv["md"] + adv.get("confusion", 0.0))
        if float(self.opts["kd_weight"]) > 0:
            rgb_only = teacher(rgb, {})
            kd = distillation_kl(rgb_only.logits, out.logits, self.cfg.temperature)
            terms["kd"] = kd
            loss = loss + float(self.opts["kd_weight"]) * kd
        if float(self.opts["recon_weight"]) > 0:
            layer = int(self.opts["feature_layer"])
            recon = sum(
                F.mse_loss(self.decoders[n](g[n]), out.modality_feature(layer, n).detach().float())
                for n in self.names
            ) / len(self.names)
            terms["recon"] = recon
            loss = loss + float(self.opts["recon_weight"]) * recon
        return {"loss": loss, **terms}

    def after_backward(self, teacher: nn.Module) -> dict[str, float]:
        return {}

    def predict(self, teacher: nn.Module, batch: dict) -> torch.Tensor:
        """Logits with missing modalities substituted (fusion head), or the teacher's own."""
        rgb, latents, _ = unpack_batch(batch)
        with eval_mode(teacher), eval_mode(self):
            out = teacher(rgb, latents, drop=False)
            if self.opts["predict_with"] == "teacher":
                return out.logits
            g = self.encode(out)
            present = self.present_masks(out, latents, rgb.shape[0], rgb.device)
            return self.fuse(self.decode(g, present))

    @torch.no_grad()
    def diagnostics(self, teacher: nn.Module, batch: dict) -> dict[str, float]:
        rgb, latents, label = unpack_batch(batch)
        report = teacher_diagnostics(teacher, batch, int(self.opts["feature_layer"]))
        with eval_mode(teacher), eval_mode(self):
            out = teacher(rgb, latents, drop=False)
            g = self.encode(out)
            present = self.present_masks(out, latents, rgb.shape[0], rgb.device)
            decoded = self.decode(g, present)
            base = float(F.cross_entropy(self.fuse(decoded).float(), label))
            report["fusion_head/ce"] = base
            first = next(m for m in self.fusion if isinstance(m, nn.Linear)).weight
            dim = first.shape[1] // len(self.names)
            total = float(first.pow(2).sum())
            for i, n in enumerate(self.names):
                ablated = {**decoded, n: decoded[n].mean(dim=0, keepdim=True).expand_as(decoded[n])}
                report[f"fusion_head/contribution/{n}"] = (
                    float(F.cross_entropy(self.fuse(ablated).float(), label)) - base
                )
                report[f"fusion_head/weight_share/{n}"] = (
                    float(first[:, i * dim : (i + 1) * dim].pow(2).sum()) / total
                )
                report[f"g_stable_rank/{n}"] = float(stable_rank(g[n]))
        return report

    def forward(
        self, student: StudentOutput, teacher: TeacherOutput | None, batch: dict
    ) -> dict[str, torch.Tensor]:
        raise UserError("basis-realloc is a teacher objective: train it with train.stage=teacher")
