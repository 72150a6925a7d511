"""``modalimmune`` — ModalImmune (Fu et al., 2026, arXiv 2602.16197), a teacher objective.

"Immunity-driven unlearning via self-destructive training": while the
multimodal teacher trains, one privileged modality at a time is deliberately and
controllably *collapsed*, so that the joint representation survives losing it.
Four parts, each as read from the paper (PAPERS.md) with our choices where it
is silent — every choice is an option (``method.options``), default in brackets:

1. **Spectrum-adaptive collapse regulariser.** For the selected modality m*,
   the task loss is also taken with m* removed from fusion (its tokens replaced
   by the teacher's learned null tokens), and m*'s embeddings Z (B×D: the mean
   of its tokens after block ``embedding_layer`` [0], over the samples whose
   teacher saw the real modality) are pushed to collapse::

       R(Z) = ‖C‖_* / (‖C‖_2 · r_max)  +  η · ‖Z − σ(Z)·ε‖² / D,     C = cov(Z)

   ‖C‖_*/‖C‖_2 = ‖Z_c‖_F²/‖Z_c‖_2² is the stable rank of the centred
   embeddings (normalised by r_max = min(B−1, D) to lie in (0, 1]); ε is fresh
   N(0, I) noise and σ(Z) = sqrt(tr C / D) the embeddings' own scale (stop-grad)
   — the "scale-matched Gaussian" the embeddings are shrunk towards, with weight
   η = ``shrink_weight`` [0.1]. The target adapts to the spectrum: its scale
   follows the embeddings', so the penalty cannot be met by shrinking them.
   Per step::

       L = CE(full) + w_drop · CE(without m*) + λ · R(Z_{m*})

   with w_drop = ``drop_weight`` [1.0] and λ = ``lambda_init`` [0.1], adapted by (4).

2. **Information-gain controller.** Every ``controller_every`` [5] steps each
   modality is scored by the squared leave-one-out loss difference
   s_m = (L(without m) − L(full))², computed without gradients in eval mode
   (no modality dropout), and smoothed by an EMA (``controller_momentum``
   [0.9]). Selection rule (open in the paper): ``select`` ["max"] collapses
   the modality the teacher currently leans on most, so it learns to do
   without it (the score falls, another modality takes its turn); ``"sample"``
   draws m* with probability ∝ s_m. Scoring costs M + 1 no-grad forward
   passes, hence the default of every 5 steps.

3. **Curvature-aware gradient masking.** ``after_backward(teacher)`` (the
   trainer calls it between backward and the optimiser step) keeps a running
   diagonal empirical Fisher F ← β·F + (1 − β)·g² (β = ``fisher_beta``
   [0.99]) and, after ``mask_warmup`` [20] steps, scales by
   (1 − ``mask_strength`` [0.5]) the gradient entries whose F is above the
   ``mask_quantile`` [0.99] quantile (per tensor, or over all parameters with
   ``mask_scope: global``). *Fix of the paper's rule:* as written, masking
   fires when the Fisher's minimum eigenvalue is below −τ, which a positive
   semi-definite matrix never is; the quantile test above can fire, and does
   where destructive updates meet sharp curvature. λ, the controller's scores
   and the step count are buffers (checkpointed, and saved with the teacher
   run's ``best/``); the running Fisher is not: a resumed run re-estimates it
   from its first gradient.

4. **Neumann-truncated hypergradient** for λ. Every ``hyper_every`` [20] steps
   the batch is split: a fraction ``meta_fraction`` [0.25] serves as the
   validation set of the meta objective (the clean, all-modality CE), the
   rest as the training set. With θ the teacher's parameters (``hyper_params``:
   name prefixes, [all]), H = ∇²_θ L_train, v = ∂_λ∇_θ L_train = ∇_θ R::

       dL_val/dλ ≈ −α · ∇_θL_valᵀ (I − αH)⁻¹ v,   (I − αH)⁻¹ ≈ Σ_{k=0}^{K} (αH)^k

   (K = ``neumann_terms`` [3], α = ``hyper_alpha`` [0.01]). The series
   converges when α‖H‖ < 1 and its truncation error is certified by
   ‖tail‖ ≤ (α‖H‖)^{K+1}/(1 − α‖H‖)·‖v‖; ‖H‖ is estimated by
   ``power_iters`` [2] Hessian-vector products, and α is lowered to
   ``0.5/‖H‖`` when needed so the bound holds (reported as ``neumann_tail``).
   λ moves in log space by a normalised step, log λ ← log λ − ``meta_lr``
   [0.1]·c with c = dL_val/dλ / (α‖∇_θL_val‖·‖Σ(αH)^k v‖) ∈ [−1, 1] (the raw
   hypergradient's scale depends on α and the gradient norms; the cosine
   bounds λ's relative change per update by ``meta_lr``), clamped to
   [``lambda_min``, ``lambda_max``] = [1e-4, 10]. Hessian-vector
   products run with the math attention kernel (fused kernels lack double
   backward). The paper also adapts κ and η; here only λ is adapted.

What ModalImmune shares with ``basis-realloc`` and the teacher evaluation
(unpacking the batch, removing a modality, the spectral ranks, the
missing-modality evaluation and the collapse diagnostics) is in
:mod:`~synesthesia.methods.teacher_probes`.

Teacher-objective interface (also ``basis-realloc``): ``stage = "teacher"``;
``teacher_step(teacher, batch) -> dict`` (``loss`` and named scalar terms; may
run the teacher several times); ``after_backward(teacher) -> dict`` between
backward and step; ``predict(teacher, batch) -> logits``;
``diagnostics(teacher, batch) -> dict``. The batch is the trainer's:
``"rgb"``, ``"label"``, ``"latents"`` {modality: tensor} (or ``"decoded"``
for the decoded privileged source, which then takes precedence).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from synesthesia import UserError
from synesthesia.config import MethodConfig
from synesthesia.methods.base import METHODS, Method, MethodContext, check_options
from synesthesia.methods.teacher_probes import (
    leave_one_out_losses,
    stable_rank,
    teacher_diagnostics,
    teacher_predict,
    unpack_batch,
    without,
)
from synesthesia.models.outputs import StudentOutput, TeacherOutput

# ----------------------------------------------------------------------------- the hypergradient's linear algebra


def neumann_series(
    matvec: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, alpha: float, terms: int
) -> torch.Tensor:
    """Σ_{k=0}^{K} (αH)^k v ≈ (I − αH)⁻¹ v with K = ``terms`` and ``matvec(u) = H u``."""
    if terms < 0:
        raise UserError(f"neumann_terms must be ≥ 0, got {terms}")
    term = v
    total = v.clone()
    for _ in range(terms):
        term = alpha * matvec(term)
        total = total + term
    return total


def neumann_tail_bound(alpha: float, h_norm: float, terms: int) -> float:
    """‖(I − αH)⁻¹ − Σ_{k≤K}(αH)^k‖ ≤ (α‖H‖)^{K+1}/(1 − α‖H‖); infinite when α‖H‖ ≥ 1."""
    q = alpha * h_norm
    if q >= 1.0:
        return math.inf
    return q ** (terms + 1) / (1.0 - q)


def power_norm(
    matvec: Callable[[torch.Tensor], torch.Tensor], size: int, iters: int, generator: torch.Generator, device
) -> float:
    """An estimate of ‖H‖_2 (the largest |eigenvalue| of symmetric H) by power iteration."""
    u = torch.randn(size, generator=generator).to(device)
    u = u / u.norm().clamp_min(1e-12)
    norm = 0.0
    for _ in range(max(iters, 1)):
        w = matvec(u)
        norm = float(w.norm())
        if norm <= 1e-12:
            return 0.0
        u = w / norm
    return norm


# ----------------------------------------------------------------------------- the method

OPTIONS = {
    "embedding_layer": 0,
    "drop_weight": 1.0,
    "shrink_weight": 0.1,
    "lambda_init": 0.1,
    "lambda_min": 1e-4,
    "lambda_max": 10.0,
    "controller_every": 5,
    "controller_momentum": 0.9,
    "select": "max",
    "fisher_beta": 0.99,
    "mask_quantile": 0.99,
    "mask_strength": 0.5,
    "mask_warmup": 20,
    "mask_scope": "tensor",
    "hyper_every": 20,
    "meta_fraction": 0.25,
    "hyper_alpha": 0.01,
    "neumann_terms": 3,
    "power_iters": 2,
    "meta_lr": 0.1,
    "hyper_params": [],
    "seed": 0,
}


@METHODS.register("modalimmune")
class ModalImmune(Method):
    """Controlled spectral collapse of one modality at a time, for a teacher robust to losing it."""

    stage = "teacher"
    needs_teacher = False

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        check_options(cfg, tuple(OPTIONS))
        o = {**OPTIONS, **cfg.options}
        self.opts = o
        if not ctx.modalities:
            raise UserError(
                "modalimmune needs privileged modalities (train.modalities, train.source != none)"
            )
        if o["select"] not in ("max", "sample"):
            raise UserError(f"method.options.select={o['select']!r}; valid: max, sample")
        if o["mask_scope"] not in ("tensor", "global"):
            raise UserError(f"method.options.mask_scope={o['mask_scope']!r}; valid: tensor, global")
        if not 0.0 < o["mask_quantile"] < 1.0:
            raise UserError(f"method.options.mask_quantile={o['mask_quantile']} is not in (0, 1)")
        if not 0.0 <= o["mask_strength"] <= 1.0:
            raise UserError(f"method.options.mask_strength={o['mask_strength']} is not in [0, 1]")
        if not 0.0 < o["meta_fraction"] < 1.0:
            raise UserError(f"method.options.meta_fraction={o['meta_fraction']} is not in (0, 1)")
        if not 0 < o["lambda_min"] <= o["lambda_init"] <= o["lambda_max"]:
            raise UserError("method.options: need 0 < lambda_min <= lambda_init <= lambda_max")
        if int(o["neumann_terms"]) < 0 or int(o["controller_every"]) < 1 or int(o["hyper_every"]) < 0:
            raise UserError(
                "method.options: neumann_terms ≥ 0, controller_every ≥ 1, hyper_every ≥ 0 (0: off)"
            )
        self.modalities = tuple(ctx.modalities)
        # Meta-parameter and controller state: buffers, so they are checkpointed with the method.
        self.register_buffer("log_lambda", torch.tensor(math.log(float(o["lambda_init"]))))
        self.register_buffer("scores", torch.zeros(len(self.modalities)))
        self.register_buffer("scored", torch.zeros(len(self.modalities), dtype=torch.bool))
        self.register_buffer("selected", torch.tensor(-1))
        self.register_buffer("step", torch.tensor(0))
        self._fisher: dict[str, torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(int(o["seed"]))
        self.last_hyper: dict[str, float] = {}

    @property
    def lam(self) -> float:
        return float(self.log_lambda.exp())

    # ------------------------------------------------------------------ controller

    def update_controller(
        self, teacher: nn.Module, rgb: torch.Tensor, latents: dict[str, torch.Tensor], label: torch.Tensor
    ) -> str:
        """Score modalities by (L(without m) − L(full))², EMA them, and pick m* (returned)."""
        full, loo = leave_one_out_losses(teacher, rgb, latents, label)
        momentum = float(self.opts["controller_momentum"])
        for i, m in enumerate(self.modalities):
            if m in loo:
                gain = (loo[m] - full) ** 2
                seen = bool(self.scored[i])
                self.scores[i] = momentum * self.scores[i] + (1 - momentum) * gain if seen else gain
                self.scored[i] = True
        available = [i for i, m in enumerate(self.modalities) if m in latents]
        scores = self.scores[available]
        if self.opts["select"] == "sample" and float(scores.sum()) > 0:
            pick = int(
                torch.multinomial(scores.cpu().float() / scores.sum().cpu(), 1, generator=self._generator)
            )
        else:
            pick = int(scores.argmax())
        self.selected.fill_(available[pick])
        return self.modalities[available[pick]]

    # ------------------------------------------------------------------ regulariser

    def collapse_penalty(self, out: TeacherOutput, modality: str) -> torch.Tensor:
        """R(Z) = srank(Z)/min(n−1, D) + η·‖Z − σ(Z)·ε‖²/D on m's pooled embeddings (present samples)."""
        z = out.modality_feature(int(self.opts["embedding_layer"]), modality).float()
        mask = out.present.get(modality) if out.present else None
        if mask is not None:
            z = z[mask]
        if z.shape[0] < 2:
            return out.logits.sum() * 0.0
        r_max = max(min(z.shape[0] - 1, z.shape[1]), 1)
        spectral = stable_rank(z) / r_max
        zc = z - z.mean(dim=0, keepdim=True)
        sigma = zc.detach().pow(2).sum(dim=1).mean().div(z.shape[1]).sqrt()
        noise = torch.randn(z.shape, generator=self._generator).to(z.device)
        shrink = (z - sigma * noise).pow(2).mean()
        return spectral + float(self.opts["shrink_weight"]) * shrink

    def _losses(
        self,
        teacher: nn.Module,
        rgb: torch.Tensor,
        latents: dict[str, torch.Tensor],
        label: torch.Tensor,
        m: str,
    ) -> dict[str, torch.Tensor]:
        out = teacher(rgb, latents)
        ce_full = F.cross_entropy(out.logits.float(), label)
        ce_drop = F.cross_entropy(teacher(rgb, without(latents, m)).logits.float(), label)
        return {"ce_full": ce_full, "ce_drop": ce_drop, "collapse": self.collapse_penalty(out, m)}

    # ------------------------------------------------------------------ hypergradient

    def _meta_params(self, teacher: nn.Module) -> list[torch.Tensor]:
        prefixes = list(self.opts["hyper_params"] or [])
        named = [(n, p) for n, p in teacher.named_parameters() if p.requires_grad]
        if prefixes:
            named = [(n, p) for n, p in named if any(n.startswith(pre) for pre in prefixes)]
            if not named:
                raise UserError(f"method.options.hyper_params {prefixes} match no teacher parameter")
        return [p for _, p in named]

    def hypergradient(
        self,
        teacher: nn.Module,
        train: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor],
        meta: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor],
        m: str,
    ) -> dict[str, float]:
        """dL_val/dλ by the Neumann-truncated implicit hypergradient; updates log λ in place."""
        params = self._meta_params(teacher)
        alpha = float(self.opts["hyper_alpha"])
        terms = int(self.opts["neumann_terms"])
        shapes = [p.shape for p in params]
        sizes = [p.numel() for p in params]

        def flat(grads) -> torch.Tensor:
            return torch.cat(
                [
                    (g if g is not None else torch.zeros(s, device=p.device)).reshape(-1)
                    for g, s, p in zip(grads, shapes, params, strict=True)
                ]
            )

        with sdpa_kernel(SDPBackend.MATH):
            losses = self._losses(teacher, *train, m)
            train_loss = losses["ce_full"] + float(self.opts["drop_weight"]) * losses["ce_drop"]
            train_loss = train_loss + self.lam * losses["collapse"]
            grads = torch.autograd.grad(train_loss, params, create_graph=True, allow_unused=True)
            used = [(g, p) for g, p in zip(grads, params, strict=True) if g is not None and g.requires_grad]
            v = flat(torch.autograd.grad(losses["collapse"], params, retain_graph=True, allow_unused=True))

            def hvp(u: torch.Tensor) -> torch.Tensor:
                chunks = dict(zip([id(p) for p in params], torch.split(u, sizes), strict=True))
                outs = [g for g, _ in used]
                vecs = [chunks[id(p)].view_as(p) for _, p in used]
                hv = torch.autograd.grad(
                    outs, params, grad_outputs=vecs, retain_graph=True, allow_unused=True
                )
                return flat(hv).detach()

            h_norm = power_norm(hvp, sum(sizes), int(self.opts["power_iters"]), self._generator, v.device)
            if alpha * h_norm >= 0.5:
                alpha = 0.5 / h_norm
            w = neumann_series(hvp, v.detach(), alpha, terms)
            rgb, latents, label = meta
            val_loss = F.cross_entropy(teacher(rgb, latents).logits.float(), label)
            g_val = flat(torch.autograd.grad(val_loss, params, allow_unused=True))
        hyper = -alpha * float(g_val @ w)
        # Normalised step: the raw hypergradient's scale depends on α and the gradient norms;
        # its cosine form lies in [-1, 1], so meta_lr bounds the relative change of λ per update.
        cosine = hyper / (alpha * float(g_val.norm()) * float(w.norm()) + 1e-12)
        new_log = math.log(self.lam) - float(self.opts["meta_lr"]) * cosine
        new_log = min(max(new_log, math.log(self.opts["lambda_min"])), math.log(self.opts["lambda_max"]))
        self.log_lambda.fill_(new_log)
        tail = neumann_tail_bound(alpha, h_norm, terms) * float(v.norm()) * alpha * float(g_val.norm())
        self.last_hyper = {
            "hypergrad": hyper,
            "hyper_cosine": cosine,
            "hessian_norm": h_norm,
            "hyper_alpha": alpha,
            "neumann_tail": tail,
            "val_loss": float(val_loss.detach()),
        }
        return self.last_hyper

    # ------------------------------------------------------------------ interface

    def teacher_step(self, teacher: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """One training step's loss: CE(full) + w_drop·CE(without m*) + λ·R(Z_{m*}), and its terms."""
        rgb, latents, label = unpack_batch(batch)
        present = [m for m in self.modalities if m in latents]
        if not present:
            raise UserError(f"modalimmune: the batch has none of the modalities {', '.join(self.modalities)}")
        self.step += 1
        step = int(self.step)
        if int(self.selected) < 0 or step % int(self.opts["controller_every"]) == 0:
            m = self.update_controller(teacher, rgb, latents, label)
        else:
            m = self.modalities[int(self.selected)]
            if m not in latents:
                m = self.update_controller(teacher, rgb, latents, label)
        terms: dict[str, torch.Tensor] = {}
        every = int(self.opts["hyper_every"])
        n_meta = int(round(rgb.shape[0] * float(self.opts["meta_fraction"])))
        if every and step % every == 0 and n_meta >= 2 and rgb.shape[0] - n_meta >= 2:
            cut = rgb.shape[0] - n_meta
            train = (rgb[:cut], {k: v[:cut] for k, v in latents.items()}, label[:cut])
            meta = (rgb[cut:], {k: v[cut:] for k, v in latents.items()}, label[cut:])
            info = self.hypergradient(teacher, train, meta, m)
            terms.update({k: torch.tensor(v) for k, v in info.items()})
            rgb, latents, label = train
        losses = self._losses(teacher, rgb, latents, label, m)
        lam = self.lam
        loss = (
            losses["ce_full"] + float(self.opts["drop_weight"]) * losses["ce_drop"] + lam * losses["collapse"]
        )
        terms.update(losses)
        terms["lambda"] = torch.tensor(lam)
        terms["selected"] = torch.tensor(float(self.modalities.index(m)))
        for i, name in enumerate(self.modalities):
            terms[f"score/{name}"] = self.scores[i].detach().clone()
        return {"loss": loss, **terms}

    @torch.no_grad()
    def after_backward(self, teacher: nn.Module) -> dict[str, float]:
        """Curvature-aware gradient masking (see the module docstring); returns the masked fraction."""
        beta = float(self.opts["fisher_beta"])
        named = [(n, p) for n, p in teacher.named_parameters() if p.grad is not None]
        for name, p in named:
            sq = p.grad.detach().float().pow(2)
            prev = self._fisher.get(name)
            self._fisher[name] = sq if prev is None else prev.mul_(beta).add_(sq, alpha=1 - beta)
        if int(self.step) <= int(self.opts["mask_warmup"]) or not named:
            return {"mask_fraction": 0.0}
        q = float(self.opts["mask_quantile"])
        keep = 1.0 - float(self.opts["mask_strength"])
        threshold = None
        if self.opts["mask_scope"] == "global":
            threshold = _quantile(torch.cat([self._fisher[n].reshape(-1) for n, _ in named]), q)
        masked = total = 0
        for name, p in named:
            fisher = self._fisher[name]
            thr = threshold if threshold is not None else _quantile(fisher.reshape(-1), q)
            mask = fisher > thr
            p.grad.mul_(torch.where(mask, keep, 1.0).to(p.grad.dtype))
            masked += int(mask.sum())
            total += mask.numel()
        return {"mask_fraction": masked / max(total, 1)}

    def predict(self, teacher: nn.Module, batch: dict) -> torch.Tensor:
        """The teacher's own logits (ModalImmune changes training, not inference)."""
        return teacher_predict(teacher)(batch)

    def diagnostics(self, teacher: nn.Module, batch: dict) -> dict[str, float]:
        out = teacher_diagnostics(teacher, batch, int(self.opts["embedding_layer"]))
        out["lambda"] = self.lam
        for i, m in enumerate(self.modalities):
            out[f"score/{m}"] = float(self.scores[i])
        return out

    def forward(
        self, student: StudentOutput, teacher: TeacherOutput | None, batch: dict
    ) -> dict[str, torch.Tensor]:
        raise UserError("modalimmune is a teacher objective: train it with train.stage=teacher")


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (lower) of a 1-D tensor, by kthvalue (torch.quantile caps its input size)."""
    k = min(max(int(math.ceil(q * values.numel())), 1), values.numel())
    return values.float().kthvalue(k).values
