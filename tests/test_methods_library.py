"""The methods library: cotrain, modalimmune, basis-realloc and the tuned-KD grid (tiny, offline)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from synesthesia import UserError
from synesthesia.config import MethodConfig, PipelineConfig, StudentConfig, TeacherConfig, replace
from synesthesia.methods.base import METHODS, MethodContext
from synesthesia.methods.basis_realloc import BasisReallocation, grad_reverse
from synesthesia.methods.cotrain import CoTrain
from synesthesia.methods.modalimmune import ModalImmune, neumann_series, neumann_tail_bound
from synesthesia.methods.teacher_probes import corrupt, modality_robustness, stable_rank, teacher_predict
from synesthesia.methods.tuned_kd import expand_grid, select_best
from synesthesia.models.outputs import StudentOutput
from synesthesia.models.students import Student
from synesthesia.models.teacher import MultimodalTeacher

NUM_CLASSES = 3
IMAGE = 32
SPECS = {
    "depth": {"kind": "spatial", "shape": [4, 4, 4]},
    "audio": {"kind": "tokens", "shape": [6, 8]},
    "lidar": {"kind": "codes", "shape": [2, 5], "vocab": 16},
}


def make_batch(n: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % NUM_CLASSES
    return {
        "rgb": torch.randn(n, 3, IMAGE, IMAGE, generator=g),
        "label": label,
        "latents": {
            # depth carries the label, so the teacher can learn to rely on it
            "depth": torch.randn(n, 4, 4, 4, generator=g) + label.view(-1, 1, 1, 1).float(),
            "audio": torch.randn(n, 6, 8, generator=g),
            "lidar": torch.randint(0, 16, (n, 2, 5), generator=g),
        },
        "keys": [f"k{i}" for i in range(n)],
    }


@pytest.fixture
def teacher() -> MultimodalTeacher:
    torch.manual_seed(0)
    cfg = TeacherConfig(dim=32, depth=2, heads=2, patch_size=8, tokens_per_modality=4, modality_dropout=0.3)
    return MultimodalTeacher(cfg, NUM_CLASSES, IMAGE, SPECS)


def teacher_ctx(teacher: MultimodalTeacher) -> MethodContext:
    return MethodContext(
        num_classes=NUM_CLASSES,
        student_dims={},
        student_depth=0,
        teacher_dim=teacher.dim,
        teacher_depth=teacher.depth,
        modalities=tuple(SPECS),
    )


def grads_of(loss: torch.Tensor, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor | None]:
    names = list(params)
    out = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True, allow_unused=True)
    return dict(zip(names, out, strict=True))


def nonzero(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


# ----------------------------------------------------------------------------- tuned KD


def test_tuned_kd_grid_and_selection_on_val():
    cfg = MethodConfig(
        name="kd", options={"alphas": [0.3, 0.5], "temperatures": [1, 4], "label_smoothing": 0.1}
    )
    cells = expand_grid(cfg)
    assert [c.name for c in cells] == ["a0.3-T1", "a0.3-T4", "a0.5-T1", "a0.5-T4"]
    assert all(c.method.name == "kd" and c.method.options == {"label_smoothing": 0.1} for c in cells)
    # the overrides reproduce the cell through the ordinary config path
    grid_pipeline = replace(PipelineConfig(), ["method.options={alphas: [0.3, 0.5], label_smoothing: 0.1}"])
    assert replace(grid_pipeline, cells[1].overrides).method == cells[1].method
    rows = [
        {"cell": "a0.3-T1", "seed": 0, "val_acc": 0.70, "test_acc": 0.99},
        {"cell": "a0.3-T1", "seed": 1, "val_acc": 0.72},
        {"cell": "a0.3-T4", "seed": 0, "val_acc": 0.80},
        {"cell": "a0.3-T4", "seed": 1, "val_acc": 0.60},
        {"cell": "a0.5-T1", "seed": 0, "val_acc": 0.71},
        {"cell": "a0.5-T1", "seed": 1, "val_acc": 0.71},
    ]
    sel = select_best(cells, rows)
    # a0.3-T1 and a0.5-T1 tie on mean 0.71; the smaller std over seeds wins
    assert sel.best.name == "a0.5-T1"
    assert sel.summary["a0.3-T4"]["mean"] == pytest.approx(0.70)
    assert "a0.5-T4" not in sel.summary
    with pytest.raises(UserError, match="validation"):
        select_best(cells, rows, metric="test_acc")
    with pytest.raises(UserError, match="unknown grid cell"):
        select_best(cells, [{"cell": "nope", "val_acc": 1.0}])
    with pytest.raises(UserError, match="outside"):
        expand_grid(MethodConfig(name="kd", options={"alphas": [1.5]}))
    assert len(expand_grid(MethodConfig(name="kd"))) == 12


# ----------------------------------------------------------------------------- cotrain


def student_output(student: Student, rgb: torch.Tensor, layers: list[int]):
    """The student's output with its token-level features (what the trainer hands cotrain)."""
    out = student(rgb, layers=layers)
    _, inter = student.model.forward_intermediates(rgb, indices=layers, output_fmt="NLC")
    for layer, tokens in zip(layers, inter, strict=True):  # the patch tokens, prefix (CLS) excluded
        torch.testing.assert_close(out.tokens[layer], tokens)
    return out


@pytest.fixture
def student() -> Student:
    torch.manual_seed(0)
    return Student(StudentConfig(name="vit_micro_test"), NUM_CLASSES, IMAGE)


def cotrain_method(student: Student, **options) -> CoTrain:
    ctx = MethodContext(
        num_classes=NUM_CLASSES,
        student_dims=student.feature_dims,
        student_depth=student.depth,
        modalities=tuple(SPECS),
    )
    cfg = MethodConfig(name="cotrain", temperature=2.0, options={"modalities": SPECS, "heads": 2, **options})
    return METHODS.get("cotrain")(cfg, ctx)


def test_cotrain_losses_and_gradient_routing(student):
    method = cotrain_method(student, shared_layer=0, dropout=0.0)
    assert not method.needs_teacher and method.student_layers() == [0]
    batch = make_batch()
    out = student_output(student, batch["rgb"], method.student_layers())
    terms = method(out, None, batch)
    assert all(torch.isfinite(v) for v in terms.values())
    assert float(terms["loss"].detach()) == pytest.approx(
        float((terms["ce"] + terms["ce_mm"] + terms["kl"]).detach()), rel=1e-5
    )

    branch = dict(method.named_parameters())
    blocks = student.model.blocks
    shared = dict(blocks[0].named_parameters(prefix="b0"))
    later = {
        **dict(blocks[2].named_parameters(prefix="b2")),
        **dict(student.model.head.named_parameters(prefix="student_head")),
    }
    # the KL (stop-grad on the multimodal logits) trains the RGB branch only
    g_kl = grads_of(terms["kl"], {**branch, **later})
    assert not any(nonzero(g_kl[n]) for n in branch)
    assert any(nonzero(g_kl[n]) for n in later)
    # the multimodal CE trains the branch and the shared blocks, not the RGB branch's later blocks or head
    g_mm = grads_of(terms["ce_mm"], {**branch, **shared, **later})
    assert nonzero(g_mm["head.weight"])  # the branch's own head
    assert nonzero(g_mm["adapters.depth.mlp.net.1.weight"]) and nonzero(
        g_mm["adapters.lidar.tables.0.weight"]
    )
    assert any(nonzero(g_mm[n]) for n in shared)
    assert not any(nonzero(g_mm[n]) for n in later)
    # the RGB CE does not touch the multimodal branch
    g_ce = grads_of(terms["ce"], branch)
    assert not any(nonzero(g) for g in g_ce.values())


def test_cotrain_attention_transfer_and_pooled_fallback(student):
    method = cotrain_method(student, shared_layer=1, attention_weight=1.0, attention_layer=-1)
    assert method.student_layers() == [1, 2]
    batch = make_batch()
    out = student_output(student, batch["rgb"], method.student_layers())
    terms = method(out, None, batch)
    assert torch.isfinite(terms["attention"]) and terms["attention"] >= 0
    g = grads_of(terms["attention"], {**dict(method.named_parameters()), **dict(student.named_parameters())})
    assert not any(
        nonzero(v) for k, v in g.items() if k.startswith(("adapters", "blocks", "head", "rgb_proj"))
    )
    assert any(nonzero(v) for k, v in g.items() if k.startswith("model.blocks.2"))
    # without token-level features the pooled feature is one RGB token; attention transfer is refused
    plain = StudentOutput(logits=out.logits, features=out.features)
    with pytest.raises(UserError, match="tokens"):
        method(plain, None, batch)
    simple = cotrain_method(student, shared_layer=1)
    assert torch.isfinite(simple(plain, None, batch)["loss"])
    with pytest.raises(UserError, match="latents"):
        simple(plain, None, {**batch, "latents": {}})


def test_cotrain_flat_adapter_without_specs(student):
    ctx = MethodContext(
        num_classes=NUM_CLASSES,
        student_dims=student.feature_dims,
        student_depth=student.depth,
        modalities=("depth", "audio"),
        latent_dims={"depth": 64, "audio": 48},
    )
    method = CoTrain(MethodConfig(name="cotrain", weight=5.0, options={"heads": 2}), ctx)
    batch = make_batch()
    batch["latents"].pop("lidar")
    out = student_output(student, batch["rgb"], method.student_layers())
    terms = method(out, None, batch)
    assert float(terms["loss"].detach()) == pytest.approx(
        float((terms["ce"] + terms["ce_mm"] + 5.0 * terms["kl"]).detach()), rel=1e-5
    )


# ----------------------------------------------------------------------------- modalimmune


def test_neumann_series_matches_inverse_within_certified_bound():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    h = a @ a.T
    norm = float(torch.linalg.matrix_norm(h, ord=2))
    v = torch.randn(6, generator=g, dtype=torch.float64)
    alpha = 0.6 / norm
    exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - alpha * h, v)
    for terms in (0, 2, 5, 20):
        approx = neumann_series(lambda u: h @ u, v, alpha, terms)
        bound = neumann_tail_bound(alpha, norm, terms) * float(v.norm())
        err = float((approx - exact).norm())
        assert err <= bound + 1e-12
    assert float((neumann_series(lambda u: h @ u, v, alpha, 60) - exact).norm()) < 1e-9
    assert neumann_tail_bound(1.1 / norm, norm, 3) == math.inf


def test_stable_rank_bounds():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(400, 4, generator=g)
    assert 3.0 < float(stable_rank(iso)) <= 4.0 + 1e-5
    line = torch.randn(50, 1, generator=g) * torch.tensor([[1.0, 2.0, 3.0]])
    assert float(stable_rank(line)) == pytest.approx(1.0, abs=1e-4)


def test_modalimmune_step_controller_and_hypergradient(teacher):
    cfg = MethodConfig(
        name="modalimmune", options={"hyper_every": 1, "mask_warmup": 0, "power_iters": 1, "neumann_terms": 1}
    )
    method = METHODS.get("modalimmune")(cfg, teacher_ctx(teacher))
    assert method.stage == "teacher"
    batch = make_batch(8)
    lam0 = method.lam
    terms = method.teacher_step(teacher, batch)
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert method.lam != lam0 and terms["neumann_tail"] < math.inf
    assert -1.0 <= float(terms["hyper_cosine"]) <= 1.0
    assert abs(math.log(method.lam) - math.log(lam0)) <= 0.1 + 1e-6  # meta_lr bounds the step
    assert float(terms["hyper_alpha"]) * float(terms["hessian_norm"]) < 1.0
    # controller: the score of each modality is its squared leave-one-out loss difference
    teacher.eval()
    with torch.no_grad():
        full = F.cross_entropy(teacher(batch["rgb"], batch["latents"], drop=False).logits, batch["label"])
        loo = {
            m: F.cross_entropy(
                teacher(
                    batch["rgb"], {k: v for k, v in batch["latents"].items() if k != m}, drop=False
                ).logits,
                batch["label"],
            )
            for m in SPECS
        }
    teacher.train()
    for _i, m in enumerate(SPECS):
        assert float(terms[f"score/{m}"]) == pytest.approx(float((loo[m] - full) ** 2), rel=1e-3, abs=1e-7)
    assert int(terms["selected"]) == int(torch.stack([terms[f"score/{m}"] for m in SPECS]).argmax())
    # gradients reach the teacher, including the collapsed modality's adapter through R
    terms["loss"].backward()
    selected = list(SPECS)[int(terms["selected"])]
    assert all(p.grad is not None for n, p in teacher.named_parameters() if n.startswith("blocks"))
    g_reg = torch.autograd.grad(
        method.teacher_step(teacher, batch)["collapse"],
        list(teacher.adapters[selected].parameters()),
        allow_unused=True,
    )
    assert any(nonzero(g) for g in g_reg)


def test_modalimmune_masking_fires_on_high_fisher_quantile(teacher):
    cfg = MethodConfig(
        name="modalimmune",
        options={"hyper_every": 0, "mask_warmup": 1, "mask_quantile": 0.9, "mask_strength": 1.0},
    )
    method = ModalImmune(cfg, teacher_ctx(teacher))
    batch = make_batch(8)
    for step in range(2):
        teacher.zero_grad()
        method.teacher_step(teacher, batch)["loss"].backward()
        before = {n: p.grad.clone() for n, p in teacher.named_parameters() if p.grad is not None}
        info = method.after_backward(teacher)
        if step == 0:  # warm-up: Fisher accumulates, nothing is masked
            assert info["mask_fraction"] == 0.0
    assert 0.0 < info["mask_fraction"] < 0.2
    w = teacher.blocks[0].attn.qkv.weight
    fisher = method._fisher["blocks.0.attn.qkv.weight"]
    masked = fisher > fisher.flatten().kthvalue(math.ceil(0.9 * fisher.numel())).values
    assert masked.any() and (~masked).any()
    assert torch.all(w.grad[masked] == 0)
    assert torch.equal(w.grad[~masked], before["blocks.0.attn.qkv.weight"][~masked])


def test_modalimmune_global_mask_scope(teacher):
    options = {"hyper_every": 0, "mask_warmup": 0, "mask_scope": "global", "mask_quantile": 0.95}
    method = ModalImmune(MethodConfig(name="modalimmune", options=options), teacher_ctx(teacher))
    method.teacher_step(teacher, make_batch(8))["loss"].backward()
    assert 0.0 < method.after_backward(teacher)["mask_fraction"] <= 0.05 + 1e-6


def test_robustness_evaluation_removed_and_corrupted(teacher):
    batches = [make_batch(6, seed=s) for s in range(2)]
    report = modality_robustness(teacher_predict(teacher), batches, list(SPECS))
    expected = {"full", "removed/all", *(f"removed/{m}" for m in SPECS), *(f"corrupted/{m}" for m in SPECS)}
    assert set(report) == expected
    assert all(0.0 <= v <= 1.0 for v in report.values())
    assert teacher.training  # the helper restores the mode it found
    codes = batches[0]["latents"]["lidar"]
    noisy = corrupt(codes, "gaussian", torch.Generator().manual_seed(0))
    assert noisy.dtype == codes.dtype and int(noisy.max()) <= int(codes.max())
    shuffled = modality_robustness(teacher_predict(teacher), batches, ["depth"], corruption="shuffle")
    assert set(shuffled) == {"full", "removed/depth", "corrupted/depth", "removed/all"}

    # a predictor that reads depth only: removing or corrupting depth must hurt it
    def oracle(batch):
        z = batch["latents"].get("depth")
        if z is None:
            return torch.zeros(batch["label"].shape[0], NUM_CLASSES)
        return -(z.mean(dim=(1, 2, 3))[:, None] - torch.arange(NUM_CLASSES)[None]).abs()

    clean = make_batch(30, seed=3)
    clean["latents"]["depth"] = clean["label"].view(-1, 1, 1, 1).float().expand(-1, 4, 4, 4).clone()
    scores = modality_robustness(oracle, [clean], ["depth"])
    assert scores["full"] == 1.0 and scores["removed/depth"] < 0.5 and scores["corrupted/depth"] < 0.8


# ----------------------------------------------------------------------------- basis-realloc


def test_grad_reverse():
    x = torch.randn(4, 3, requires_grad=True)
    (grad_reverse(x, 0.5) * 2).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -1.0))


def test_basis_realloc_gradients_and_missing_modalities(teacher):
    cfg = MethodConfig(
        name="basis-realloc",
        options={"md_weight": 1.0, "grl_scale": 1.0, "adversary": "grl", "grl_ramp_steps": 0},
    )
    method = METHODS.get("basis-realloc")(cfg, teacher_ctx(teacher))
    assert method.stage == "teacher"
    batch = make_batch(8)
    terms = method.teacher_step(teacher, batch)
    assert all(torch.isfinite(v) for v in terms.values())
    # the discriminator minimises L_md; the encoders h_i (and the teacher) maximise it through the GRL
    disc = dict(method.discriminator.named_parameters(prefix="disc"))
    enc = dict(method.encoders["depth"].named_parameters(prefix="enc"))
    g_md = grads_of(terms["md"], {**disc, **enc})
    torch.manual_seed(1)
    teacher.eval()
    out = teacher(batch["rgb"], batch["latents"], drop=False)
    g = method.encode(out)
    present = method.present_masks(out, batch["latents"], 8, batch["rgb"].device)
    feats = torch.cat([g[n][present[n]] for n in method.names])
    ys = torch.cat([torch.full((int(present[n].sum()),), i) for i, n in enumerate(method.names)])
    plain_md = F.cross_entropy(method.discriminator(feats), ys)  # no GRL
    g_plain = grads_of(plain_md, {**disc, **enc})
    # recompute the GRL loss on the same (eval-mode) outputs for an exact comparison
    grl_md = method.discriminator_loss(g, present)["md"]
    g_grl = grads_of(grl_md, {**disc, **enc})
    for n in disc:
        assert torch.allclose(g_grl[n], g_plain[n], atol=1e-6)
    for n in enc:
        assert torch.allclose(g_grl[n], -g_plain[n], atol=1e-6) and nonzero(g_plain[n])
    assert any(nonzero(v) for v in g_md.values())
    # the decoders and the fusion head learn from the task loss; the teacher from its CE, KD and L_md
    g_sem = grads_of(terms["ce_fusion"], dict(method.named_parameters()))
    assert nonzero(g_sem["decoders.audio.2.weight"]) and nonzero(g_sem["fusion.1.weight"])
    assert not any(nonzero(v) for k, v in g_sem.items() if k.startswith("discriminator"))
    teacher.train()
    terms["loss"].backward()
    assert (
        teacher.head.weight.grad is not None and teacher.adapters["depth"].mlp.net[1].weight.grad is not None
    )

    # missing-modality inference: depth substituted from its most similar available modality
    method.similarity.copy_(torch.eye(4))
    method.similarity[1, 2] = method.similarity[2, 1] = 0.9  # depth ~ audio
    with torch.no_grad():
        teacher.eval()
        out = teacher(batch["rgb"], {"audio": batch["latents"]["audio"]}, drop=False)
        g = method.encode(out)
        present = method.present_masks(out, {"audio": 1}, 8, batch["rgb"].device)
        decoded = method.decode(g, present)
        assert torch.allclose(decoded["depth"], method.decoders["depth"](g["audio"]))
        assert torch.allclose(
            decoded["lidar"], method.decoders["lidar"](g["rgb"])
        )  # only RGB left ranked above
        teacher.train()
    assert method.substitute_for("depth", ["rgb", "audio"]) == "audio"
    logits = method.predict(teacher, {**batch, "latents": {"audio": batch["latents"]["audio"]}})
    assert logits.shape == (8, NUM_CLASSES) and torch.isfinite(logits).all()
    report = modality_robustness(lambda b: method.predict(teacher, b), [batch], list(SPECS))
    assert set(report) >= {"full", "removed/depth", "corrupted/lidar", "removed/all"}


def test_basis_realloc_confusion_adversary_splits_the_game(teacher):
    """confusion: ψ learns only from L_md on sg(g); the encoders (and the teacher) only from the
    bounded confusion term, which is smallest (log K) when ψ outputs uniform."""
    method = BasisReallocation(
        MethodConfig(name="basis-realloc", options={"grl_ramp_steps": 0}), teacher_ctx(teacher)
    )
    assert method.opts["adversary"] == "confusion"
    batch = make_batch(8)
    terms = method.teacher_step(teacher, batch)
    assert {"md", "md_acc", "confusion"} <= set(terms)
    disc = dict(method.discriminator.named_parameters(prefix="disc"))
    enc = dict(method.encoders["depth"].named_parameters(prefix="enc"))
    trunk = {"trunk": teacher.adapters["depth"].mlp.net[1].weight}
    g_md = grads_of(terms["md"], {**disc, **enc, **trunk})
    g_conf = grads_of(terms["confusion"], {**disc, **enc, **trunk})
    assert all(nonzero(g_md[n]) for n in disc) and not any(nonzero(g_md[n]) for n in (*enc, *trunk))
    assert not any(nonzero(g_conf[n]) for n in disc) and all(nonzero(g_conf[n]) for n in (*enc, *trunk))
    k = len(method.names)
    assert float(terms["confusion"].detach()) >= math.log(k) - 1e-5
    with torch.no_grad():  # a ψ that says "uniform" reaches the bound exactly
        method.discriminator[-1].weight.zero_()
        method.discriminator[-1].bias.zero_()
    assert float(method.teacher_step(teacher, batch)["confusion"].detach()) == pytest.approx(
        math.log(k), abs=1e-5
    )

    # adversary_into_teacher=false: the adversarial gradient stops at h_i
    stopped = BasisReallocation(
        MethodConfig(name="basis-realloc", options={"adversary_into_teacher": False}), teacher_ctx(teacher)
    )
    conf = stopped.teacher_step(teacher, batch)["confusion"]
    enc = dict(stopped.encoders["depth"].named_parameters(prefix="enc"))
    g = grads_of(conf, {**enc, **trunk})
    assert nonzero(g["enc.0.weight"]) and not nonzero(g["trunk"])


def test_basis_realloc_adversary_ramp():
    """γ_s follows DANN's 2/(1+exp(−10 s/S)) − 1: 0 at the start, ≈ γ after S batches."""
    ctx = MethodContext(num_classes=3, student_dims={}, student_depth=0, teacher_dim=8, modalities=("depth",))
    method = BasisReallocation(
        MethodConfig(name="basis-realloc", options={"grl_scale": 0.5, "grl_ramp_steps": 100}), ctx
    )
    assert method.adversary_scale() == 0.0
    method.steps.fill_(50)
    assert method.adversary_scale() == pytest.approx(0.5 * (2 / (1 + math.exp(-5)) - 1))
    method.steps.fill_(1000)
    assert method.adversary_scale() == pytest.approx(0.5 * (2 / (1 + math.exp(-10)) - 1))
    with pytest.raises(UserError, match="adversary"):
        BasisReallocation(MethodConfig(name="basis-realloc", options={"adversary": "wgan"}), ctx)


def test_basis_realloc_diagnostics(teacher):
    method = BasisReallocation(
        MethodConfig(name="basis-realloc", options={"recon_weight": 0.5}), teacher_ctx(teacher)
    )
    batch = make_batch(8)
    terms = method.teacher_step(teacher, batch)
    assert torch.isfinite(terms["recon"])
    diag = method.diagnostics(teacher, batch)
    assert all(math.isfinite(v) for v in diag.values())
    shares = [diag[f"fusion_head/weight_share/{n}"] for n in method.names]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    assert 1.0 <= diag["fusion_stable_rank"] <= 8
    assert {f"contribution/{m}" for m in SPECS} <= set(diag)


def test_teacher_objectives_reject_student_use_and_bad_options(teacher):
    with pytest.raises(UserError, match="no option"):
        ModalImmune(MethodConfig(name="modalimmune", options={"bogus": 1}), teacher_ctx(teacher))
    with pytest.raises(UserError, match="select"):
        ModalImmune(MethodConfig(name="modalimmune", options={"select": "min"}), teacher_ctx(teacher))
    method = BasisReallocation(MethodConfig(name="basis-realloc"), teacher_ctx(teacher))
    with pytest.raises(UserError, match="stage=teacher"):
        method(None, None, {})


# ----------------------------------------------------------------------------- on real shards


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from tests.stage2_shards import write_tiny_dataset

    return write_tiny_dataset(
        tmp_path_factory.mktemp("shards"), counts={"train": 12, "val": 6, "test": 2}, shard_size=6
    )


@pytest.mark.parametrize("name", ["cotrain", "modalimmune", "basis-realloc"])
def test_methods_train_on_shards_like_the_trainer(tiny_shards, name):
    """A few AdamW steps on the trainer's own batches: backward, after_backward, step; params move."""
    from synesthesia.config import load_pipeline
    from synesthesia.train.data import build_loader
    from synesthesia.train.sidecars import resolve_data

    cfg = load_pipeline(
        None,
        [
            "dataset=tiny",
            f"train.shards={tiny_shards}",
            "train.modalities=[depth, audio]",
            "train.num_workers=0",
            "train.batch_size=6",
            f"method.name={name}",
            "method.options={hyper_every: 2, mask_warmup: 1, power_iters: 1, neumann_terms: 1}"
            if name == "modalimmune"
            else "method.options={}",
        ],
    )
    spec = resolve_data(cfg)
    modalities = spec.teacher_modalities()
    torch.manual_seed(0)
    if name == "cotrain":
        model = Student(StudentConfig(name="vit_micro_test"), spec.num_classes, spec.image_size)
        ctx = MethodContext(
            spec.num_classes, dict(model.feature_dims), model.depth, modalities=tuple(modalities)
        )
        method = CoTrain(MethodConfig(name=name, options={"modalities": modalities, "heads": 2}), ctx)
    else:
        tcfg = TeacherConfig(dim=16, depth=2, heads=2, tokens_per_modality=2, patch_size=8)
        model = MultimodalTeacher(tcfg, spec.num_classes, spec.image_size, modalities)
        ctx = MethodContext(spec.num_classes, {}, 0, 16, 2, tuple(modalities))
        method = METHODS.get(name)(cfg.method, ctx)
    params = [*model.parameters(), *method.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loader = build_loader(spec, "train", cfg.train)
    for batch in loader.epoch(0):
        if name == "cotrain":
            terms = method(student_output(model, batch["rgb"], method.student_layers()), None, batch)
        else:
            terms = method.teacher_step(model, batch)
        assert all(torch.isfinite(v).all() for v in terms.values())
        terms["loss"].backward()
        if hasattr(method, "after_backward"):
            method.after_backward(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    if name != "cotrain":
        report = modality_robustness(
            lambda b: method.predict(model, b),
            build_loader(spec, "val", cfg.train).epoch(0),
            list(modalities),
        )
        plain = modality_robustness(
            teacher_predict(model), build_loader(spec, "val", cfg.train).epoch(0), list(modalities)
        )
        assert set(report) == set(plain) and all(0.0 <= v <= 1.0 for v in report.values())
        assert all(math.isfinite(v) for v in method.diagnostics(model, next(iter(loader.epoch(1)))).values())


def test_robustness_report_streams_the_split(teacher):
    """The teacher's robustness report reads its split batch by batch (one pass per corruption):
    the figures equal those of the whole split in memory, and no more than a couple of batches
    are alive at once, whatever the split's length."""
    import gc
    import weakref

    from accelerate import Accelerator

    from synesthesia.train.evaluate import robustness_report

    class Loader:  # ShardLoader's eval interface: a fixed order, a fresh pass per call
        def __init__(self, n: int):
            self.n, self.alive, self.most = n, set(), 0

        def epoch(self, epoch: int):
            for seed in range(self.n):
                batch = make_batch(6, seed=seed)
                token = (epoch, seed, len(self.alive), id(batch))
                self.alive.add(token)
                weakref.finalize(batch["rgb"], self.alive.discard, token)  # alive while the batch is
                self.most = max(self.most, len(self.alive))
                yield batch
                gc.collect()

    teacher.eval()
    loader = Loader(12)
    report = robustness_report(teacher, None, loader, Accelerator(cpu=True), seed=3)
    assert loader.most <= 3, loader.most
    whole = [make_batch(6, seed=s) for s in range(12)]
    expected = modality_robustness(teacher_predict(teacher), whole, list(SPECS), "gaussian", 3)
    for name, value in expected.items():
        assert report["robustness"][name] == pytest.approx(value), name
    assert {f"shuffled/{m}" for m in SPECS} <= set(report["robustness"]) and report["diagnostics"]
