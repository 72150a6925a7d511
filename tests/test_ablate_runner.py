"""`synesthesia ablate`: the grid runner end to end (tiny, real training), resume, tuned KD, CLI errors."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from stage2_shards import write_tiny_dataset
from synesthesia import UserError
from synesthesia.ablate.grid import read_results
from synesthesia.ablate.reuse import from_current_teacher
from synesthesia.ablate.runner import Ablation, training_hash
from synesthesia.cli import main
from synesthesia.config import (
    PipelineConfig,
    build,
    config_hash,
    load_pipeline,
    replace,
    to_dict,
    write_resolved,
)

PNG = b"\x89PNG\r\n\x1a\n"
GEN = [{"name": "gen", "modality": "depth", "set_name": "gen-depth"}]


def tiny_pipeline(tmp_path: Path, **ablate) -> tuple[PipelineConfig, str]:
    """A tiny pipeline over stage2_shards' dataset (latent and decoded sidecars ``gen-depth``), as a file."""
    data = {
        "name": "tiny-ablation",
        "dataset": "tiny",
        "teacher": {"dim": 32, "depth": 2, "heads": 2, "tokens_per_modality": 4},
        "student": {"name": "cnn_micro_test"},
        "train": {
            "modalities": ["depth"],
            "epochs": 1,
            "batch_size": 8,
            "warmup_steps": 1,
            "num_workers": 0,
            "augment": "none",
            "device": "cpu",
        },
        "ablate": {
            "methods": ["kd", "messy"],
            "sources": ["latent", "decoded"],
            "seeds": [0, 1],
            "generators": {"latent": GEN, "decoded": GEN},
            "kd_alphas": [0.3, 0.7],
            "kd_temperatures": [2.0],
            **ablate,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_pipeline(path), str(path)


@pytest.fixture
def shards(tmp_path):
    root = write_tiny_dataset(
        tmp_path / "shards", modalities=("depth",), decoded=True, counts={"train": 16, "val": 6, "test": 6}
    )
    latent = root / "tiny" / "latents" / "gen-depth" / "throughput.json"
    latent.write_text(json.dumps({"total": {"samples": 28, "wall_s": 2.8, "decode_s": 0.0}}))
    return root


def fake_stage_one(calls):
    """Stage one is not the point here: record the configs it gets, write the decoded set's timing."""

    def run_stage_one(cfg, out, overwrite=False, progress=True):
        calls.append((cfg.shard.decode, [g.name for g in cfg.shard.generators]))
        if cfg.shard.decode:
            report = {"total": {"samples": 28, "wall_s": 5.6, "decode_s": 1.4}}
            (Path(out) / cfg.dataset / "decoded" / "gen-depth" / "throughput.json").write_text(
                json.dumps(report)
            )

    return run_stage_one


def test_tiny_grid_end_to_end(tmp_path, shards, monkeypatch):
    cfg, path = tiny_pipeline(tmp_path)
    calls = []
    monkeypatch.setattr("synesthesia.stage_one.run_stage_one", fake_stage_one(calls))
    out = tmp_path / "results"
    ablation = Ablation(cfg, path, shards=shards, runs=tmp_path / "runs", out=out)
    summary = ablation.run()

    assert calls == [(False, ["gen"]), (True, ["gen"])]  # latent first, decoded (decode: true) last
    rows = read_results(out)
    cells = {n: r for n, r in rows.items() if r["role"] == "cell"}
    tune = {n: r for n, r in rows.items() if r["role"] == "tune"}
    assert sorted(cells) == sorted(
        f"{m}-{s}-s{seed}" for m in ("kd", "messy") for s in ("latent", "decoded") for seed in (0, 1)
    )
    assert len(tune) == 4  # 2 settings x 2 sources, at seed 0
    for row in cells.values():
        assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["val_acc"] <= 1.0
        assert 0.0 <= row["teacher_acc"] <= 1.0
        assert row["train_seconds"] > 0 and row["samples_per_s"] > 0
        assert Path(row["config"]).is_file() and "synesthesia train" in row["command"]
    assert cells["kd-latent-s0"]["stage1_s_per_sample"] == pytest.approx(0.1)
    assert cells["kd-decoded-s0"]["stage1_s_per_sample"] == pytest.approx(0.2)  # generate + decode
    assert cells["kd-latent-s0"]["stage1_bytes_per_sample"] > 0
    # the KD cell at the tune seed is the selected tuning run, not a second training
    selection = json.loads((out / "tuning.json").read_text())["kd"]
    for source in ("latent", "decoded"):
        chosen = selection[source]["selected"]
        assert cells[f"kd-{source}-s0"]["run"] == tune[f"tune/kd-{source}-s0-{chosen}"]["run"]
        assert cells[f"kd-{source}-s1"]["run"].endswith(f"kd-{source}-s1-{chosen}")
    curves = cells["messy-latent-s1"]["loss_curves"]
    assert any(term.startswith("messy/") for term in curves) and curves["loss"]
    # findings: the teacher's reliance on depth, and the MESSy heads' R² on val (measured, finite, ≤ 1)
    assert {"full", "removed/depth", "shuffled/depth"} <= set(cells["kd-latent-s1"]["teacher_robustness"])
    r2 = cells["messy-decoded-s0"]["heads_r2"]
    assert r2 and all(k.endswith("/depth") and -100 < v <= 1 for k, v in r2.items())
    assert "heads_r2" not in cells["kd-latent-s1"]

    text = summary.read_text()
    assert "| messy | latent | 2 |" in text and "## Tuning" in text and "teacher (latent)" in text
    assert "## What the teacher relies on, and what the student can predict" in text
    for name in ("accuracy.png", "cost.png", "messy_layers.png"):
        assert (out / name).read_bytes()[:8] == PNG

    # every row's command rebuilds the config its run was trained with
    row = cells["messy-decoded-s1"]
    words = shlex.split(row["command"])
    assert words[:3] == ["synesthesia", "train", path] and words[-2] == "--out"
    rebuilt = load_pipeline(words[2], words[3:-2], section="train")
    written = json.loads(Path(row["config"]).read_text())["config"]
    assert training_hash(rebuilt) == training_hash(written)


def fake_train(calls, val_of=lambda cfg: 0.5, test_of=lambda cfg: 0.5):
    """A stand-in for train.loop.train writing what a finished run leaves: config, metrics, logs."""
    from synesthesia.train.checkpoint import run_dir

    def train(cfg, out="runs", resume=None):
        run = run_dir(cfg, out)
        calls.append((run.name, resume))
        write_resolved(cfg, run)
        (run / "logs").mkdir(parents=True, exist_ok=True)
        terms = {"train/loss": 1.0, "train/messy/l2/depth": 0.5} if cfg.method.name == "messy" else {}
        (run / "logs" / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 0.0, **terms}) + "\n")
        metrics = {
            "best": {"accuracy": val_of(cfg)},
            "test": {"accuracy": test_of(cfg)},
            "train_samples_per_s": 100.0,
            "final_weights_sha256": {"model.safetensors": config_hash(cfg)},  # new weights per config
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    return train


def test_resume_skips_completed_cells(tmp_path, shards, monkeypatch):
    cfg, path = tiny_pipeline(tmp_path, kd_alphas=[0.5])  # one KD setting: no tuning runs
    monkeypatch.setattr("synesthesia.stage_one.run_stage_one", fake_stage_one([]))
    calls = []
    monkeypatch.setattr("synesthesia.train.loop.train", fake_train(calls))
    out, runs = tmp_path / "results", tmp_path / "runs"
    Ablation(cfg, path, shards=shards, runs=runs, out=out).run()
    assert len(calls) == 2 + 8  # two teachers, eight cells

    # kill simulated after five cells: results.jsonl holds them (and a torn line); the sixth was
    # mid-training with a checkpoint, the last two had not started
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:5]) + '\n{"cell": "messy-lat')
    unfinished = [json.loads(line) for line in lines[5:]]
    for row in unfinished:
        (Path(row["run"]) / "metrics.json").unlink()
    (Path(unfinished[0]["run"]) / "checkpoints").mkdir()
    (Path(unfinished[0]["run"]) / "checkpoints" / "latest").write_text("step-2\n")

    calls.clear()
    ablation = Ablation(cfg, path, shards=shards, runs=runs, out=out)
    assert "to do: 3 of 8 cells, 0 teacher(s)" in ablation.plan().lines[-1]
    ablation.run()
    assert calls == [
        (Path(unfinished[0]["run"]).name, "latest"),
        (Path(unfinished[1]["run"]).name, None),
        (Path(unfinished[2]["run"]).name, None),
    ]
    assert len([r for r in read_results(out).values() if r["role"] == "cell"]) == 8

    # a finished run trained under another config is not silently reused
    (out / "results.jsonl").unlink()
    changed, _ = tiny_pipeline(tmp_path, kd_alphas=[0.5])
    changed = build(PipelineConfig, {**to_dict(changed), "train": {**to_dict(changed.train), "lr": 0.5}})
    with pytest.raises(UserError, match="another config"):
        Ablation(changed, path, shards=shards, runs=runs, out=out).run()


def test_a_changed_teacher_config_retrains_its_students_never_mixes_them(
    tmp_path, shards, monkeypatch, caplog
):
    import os
    import shutil

    cfg, path = tiny_pipeline(tmp_path, methods=["ce", "messy"], sources=["latent"], kd_alphas=[0.5])
    monkeypatch.setattr("synesthesia.stage_one.run_stage_one", fake_stage_one([]))
    calls = []
    monkeypatch.setattr("synesthesia.train.loop.train", fake_train(calls))
    out, runs = tmp_path / "results", tmp_path / "runs"
    Ablation(cfg, path, shards=shards, runs=runs, out=out).run()
    old_teacher = read_results(out)["messy-latent-s0"]["teacher_weights"]
    assert old_teacher and "teacher_weights" not in read_results(out)["ce-none-s0"]

    bigger = build(PipelineConfig, {**to_dict(cfg), "teacher": {**to_dict(cfg.teacher), "dim": 48}})
    with pytest.raises(UserError, match="another config"):  # the teacher run itself is refused
        Ablation(bigger, path, shards=shards, runs=runs, out=out).run()
    shutil.rmtree(runs / cfg.name / "teacher-latent-s0")  # deleted as told: its students are refused next
    with pytest.raises(UserError, match="distilled from another teacher"):
        Ablation(bigger, path, shards=shards, runs=runs, out=out).run()

    calls.clear()  # another runs root, the same results folder: the old students' rows are not reused
    Ablation(bigger, path, shards=shards, runs=tmp_path / "runs2", out=out).run()
    assert "2 row(s)" in caplog.text and "trained again" in caplog.text
    # ce has no teacher: its rows stand (a student's config hash leaves the teacher section out)
    assert sorted(n for n, _ in calls) == ["messy-latent-s0", "messy-latent-s1", "teacher-latent-s0"]
    assert read_results(out)["messy-latent-s1"]["teacher_weights"] not in (None, old_teacher)

    # a run from before the teacher hash was recorded: older than its teacher means another teacher
    ablation = Ablation(bigger, path, shards=shards, runs=tmp_path / "runs2", out=out)
    student = tmp_path / "runs2" / cfg.name / "messy-latent-s0"
    (student / "ablate_time.json").write_text('{"seconds": 1.0}')
    assert from_current_teacher(ablation, student, "latent")
    teacher_metrics = ablation.teacher_run("latent") / "metrics.json"
    later = (student / "metrics.json").stat().st_mtime + 10
    os.utime(teacher_metrics, (later, later))
    assert not from_current_teacher(ablation, student, "latent")


def test_tuned_kd_is_selected_on_val_not_test(tmp_path, shards, monkeypatch):
    cfg, path = tiny_pipeline(
        tmp_path, methods=["ce", "kd"], kd_alphas=[0.3, 0.7], kd_temperatures=[1.0, 4.0]
    )
    monkeypatch.setattr("synesthesia.stage_one.run_stage_one", fake_stage_one([]))
    calls = []

    def val_of(c):  # α=0.7, T=4 is best on val ...
        return 0.4 + 0.1 * (c.method.alpha == 0.7) + 0.05 * (c.method.temperature == 4.0)

    def test_of(c):  # ... and worst on test: picking it proves test was not looked at
        return 0.9 - val_of(c)

    monkeypatch.setattr("synesthesia.train.loop.train", fake_train(calls, val_of, test_of))
    out = tmp_path / "results"
    Ablation(cfg, path, shards=shards, runs=tmp_path / "runs", out=out).run()
    rows = read_results(out)
    for source in ("latent", "decoded"):
        for seed in (0, 1):
            row = rows[f"kd-{source}-s{seed}"]
            assert (row["kd_alpha"], row["kd_temperature"]) == (0.7, 4.0)
            assert row["tune_runs"] == 4 and row["tune_seconds"] >= 0
    # 2 teachers + 2 ce + 2 sources x (4 tuning runs + 1 more seed)
    assert len(calls) == 2 + 2 + 2 * (4 + 1)
    # one at a time: the teachers, the tuning runs they make ready, then the cells seed by seed
    names = [name for name, _ in calls]
    assert names[:2] == ["teacher-latent-s0", "teacher-decoded-s0"]
    assert all("-s0-a" in name for name in names[2:10])
    assert names[10:] == ["ce-none-s0", "ce-none-s1", "kd-latent-s1-a0.7-T4", "kd-decoded-s1-a0.7-T4"]
    assert rows["ce-none-s0"]["teacher_acc"] is None and rows["ce-none-s0"]["stage1_s_per_sample"] == 0.0
    text = (out / "summary.md").read_text()
    assert "kd (α=0.7, T=4)" in text and "Tuning cost" in text


def test_messy_weight_is_tuned_on_val_like_kd_and_replaces_untuned_rows(
    tmp_path, shards, monkeypatch, caplog
):
    """ablate.tune: MESSy's weight trained at the tune seed per source, the best on val used at
    every seed; rows trained before it was tuned are trained again; a moved run is the same run."""
    import shutil

    cfg, path = tiny_pipeline(tmp_path, methods=["ce", "messy"], sources=["latent"], seeds=[0, 1, 2])
    monkeypatch.setattr("synesthesia.stage_one.run_stage_one", fake_stage_one([]))
    calls = []

    def val_of(c):  # w = 0.1 is best on val ...
        return 0.6 if c.method.weight == 0.1 else 0.4

    def test_of(c):  # ... and worst on test: picking it proves test was not looked at
        return 1.0 - val_of(c)

    monkeypatch.setattr("synesthesia.train.loop.train", fake_train(calls, val_of, test_of))
    out, runs = tmp_path / "results", tmp_path / "runs"
    Ablation(cfg, path, shards=shards, runs=runs, out=out).run()  # untuned: MESSy at its default weight
    assert read_results(out)["messy-latent-s1"].get("setting") is None
    # a run moved to another folder name (here: the tuned w = 0.1 run of seed 2, trained elsewhere)
    # is adopted, not trained again: the run name is not part of what a run depends on
    other = replace(
        cfg, ["ablate.methods=[ce,messy@w0.1]", 'ablate.variants={"messy@w0.1": {"weight": 0.1}}']
    )
    Ablation(other, path, shards=shards, runs=runs, out=tmp_path / "variant").run()
    shutil.copytree(runs / cfg.name / "messy@w0.1-latent-s2", runs / cfg.name / "messy-latent-s2-w0.1")

    tuned = replace(cfg, ['ablate.tune={"messy": {"weight": [0.1, 1.0]}}'])
    ablation = Ablation(tuned, path, shards=shards, runs=runs, out=out)
    plan = ablation.plan()
    assert "2 tuning runs (messy: 2 weight settings; per source at seed 0" in plan.lines[1]
    assert "to do: 3 of 6 cells, 0 teacher(s), 2 tuning run(s)" in plan.lines[-1]  # the untuned rows
    calls.clear()
    ablation.run()
    assert "3 row(s)" in caplog.text  # the untuned MESSy rows
    assert sorted(n for n, _ in calls) == [
        "messy-latent-s0-w0.1",
        "messy-latent-s0-w1",
        "messy-latent-s1-w0.1",
    ]
    rows = read_results(out)
    for seed in (0, 1, 2):
        row = rows[f"messy-latent-s{seed}"]
        assert row["setting"] == "w0.1" and row["setting_fields"] == {"weight": 0.1}
        assert row["run"].endswith(f"messy-latent-s{seed}-w0.1") and row["tune_runs"] == 2
        assert "method.weight=0.1" in shlex.split(row["command"])
    assert rows["tune/messy-latent-s0-w1"]["val_acc"] == 0.4
    selection = json.loads((out / "tuning.json").read_text())
    assert selection["messy"]["latent"]["selected"] == "w0.1" and selection["messy"]["latent"]["runs"] == 2
    text = (out / "summary.md").read_text()
    assert "| messy (w=0.1) | latent | 3 |" in text and "| messy | latent | w=1 | 40.00 |" in text
    # another results folder over the same runs knows the selection from the finished tuning runs,
    # so it plans no training; one more seed is one run, at the selected setting
    again = Ablation(tuned, path, shards=shards, runs=runs, out=tmp_path / "again")
    assert "to do: 6 of 6 cells, 0 teacher(s), 0 tuning run(s) — 0 training runs" in again.plan().lines[-1]
    more = Ablation(replace(tuned, ["ablate.seeds=[0,1,2,3]"]), path, shards=shards, runs=runs, out=out)
    assert "to do: 2 of 8 cells, 0 teacher(s), 0 tuning run(s) — 2 training runs" in more.plan().lines[-1]
    # a sweep over fewer methods keeps the tune entry of a method it leaves out unused
    assert set(Ablation(replace(tuned, ["ablate.methods=[ce,kd]"]), path).settings) == {"kd"}


@pytest.mark.parametrize(
    "tune, message",
    [
        ({"kd": {"alpha": [0.1, 0.5]}}, "kd is tuned over ablate.kd_alphas"),
        ({"ce": {"weight": [1.0, 2.0]}}, "ce has no teacher term"),
        ({"messy@w": {"weight": [1.0, 2.0]}}, "a labelled method has its one setting"),
        ({"mesy": {"weight": [1.0, 2.0]}}, "unknown method 'mesy'"),
        ({"messy": {"layers": [1, 2]}}, "'layers' is not a tunable method field"),
        ({"messy": {"weight": []}}, "non-empty list of numbers"),
        ({"messy": {"weight": [1.0, 1.0]}}, "repeated values"),
        ({"messy": {"alpha": [0.5, 2.0]}}, "outside [0, 1]"),
        ({"messy": {}}, "must map method fields to lists"),
        ({"messy": {"weight": [0.1, 0.1000001]}}, "differ only past 6 significant digits"),
    ],
)
def test_tuning_mistakes_are_refused_up_front(tmp_path, tune, message):
    with pytest.raises(UserError, match=re.escape(message)):  # on reading the pipeline, or on planning
        cfg, path = tiny_pipeline(tmp_path, methods=["ce", "kd", "messy"], sources=["latent"], tune=tune)
        Ablation(cfg, path)


def test_a_labelled_source_reads_its_own_generators_set_and_pairs_with_ce(tmp_path, shards, monkeypatch):
    """A generator sweep in one grid: latent (the committed generator) and latent@alt, ce shared."""
    import shutil

    alt = [{"name": "gen", "modality": "depth", "set_name": "alt-depth", "options": {"steps": 1}}]
    cfg, path = tiny_pipeline(
        tmp_path,
        methods=["ce", "messy"],
        sources=["none", "latent", "latent@alt"],
        generators={"latent": GEN, "latent@alt": alt},
    )
    staged = []

    def run_stage_one(cfg, out, overwrite=False, progress=True):
        staged.append([g.set_name for g in cfg.shard.generators])
        latents = Path(out) / cfg.dataset / "latents"
        if cfg.shard.generators[0].set_name == "alt-depth" and not (latents / "alt-depth").is_dir():
            shutil.copytree(latents / "gen-depth", latents / "alt-depth")  # stands in for the other generator

    monkeypatch.setattr("synesthesia.stage_one.run_stage_one", run_stage_one)
    calls = []
    monkeypatch.setattr("synesthesia.train.loop.train", fake_train(calls))
    out = tmp_path / "results"
    Ablation(cfg, path, shards=shards, runs=tmp_path / "runs", out=out).run()

    assert staged == [["gen-depth"], ["alt-depth"]]
    rows = read_results(out)
    row = rows["messy-latent@alt-s1"]
    words = shlex.split(row["command"])
    assert "train.source=latent" in words and 'train.latent_sets={"depth": "alt-depth"}' in words
    assert any(w.endswith("teacher-latent@alt-s0") for w in words if w.startswith("train.teacher="))
    assert rows["messy-latent-s1"]["teacher_run"] != row["teacher_run"]
    assert "| messy | latent@alt | 2 |" in (out / "summary.md").read_text()
    # another results folder over the same runs (a sweep sharing the main grid's) trains nothing again
    other = Ablation(cfg, path, shards=shards, runs=tmp_path / "runs", out=tmp_path / "other")
    assert "to do: 6 of 6 cells, 0 teacher(s), 0 tuning run(s) — 0 training runs" in other.plan().lines[-1]


def test_method_variants_train_with_their_settings_and_pair_with_ce_and_tuned_kd(
    tmp_path, shards, monkeypatch
):
    """messy@w0.1 (MESSy at a tenth of its weight) and kd@messy (MESSy's α, T without the heads):
    their own runs, with their fields in the command, compared in summary.md like any method."""
    cfg, path = tiny_pipeline(
        tmp_path,
        methods=["ce", "kd", "messy", "messy@w0.1", "kd@messy"],
        sources=["latent"],
        seeds=[0, 1],
        variants={"messy@w0.1": {"weight": 0.1}, "kd@messy": {"alpha": 0.25, "temperature": 2.0}},
    )
    monkeypatch.setattr("synesthesia.stage_one.run_stage_one", fake_stage_one([]))
    calls = []
    monkeypatch.setattr(
        "synesthesia.train.loop.train", fake_train(calls, test_of=lambda c: c.method.weight or 0.5)
    )
    out = tmp_path / "results"
    Ablation(cfg, path, shards=shards, runs=tmp_path / "runs", out=out).run()
    rows = read_results(out)
    words = shlex.split(rows["messy@w0.1-latent-s1"]["command"])
    assert "method.name=messy" in words and "method.weight=0.1" in words
    assert "train.run_name=messy@w0.1-latent-s1" in words
    assert rows["messy@w0.1-latent-s1"]["test_acc"] == 0.1  # trained with its weight
    kd_messy = rows["kd@messy-latent-s0"]
    assert "kd_alpha" not in kd_messy  # a labelled kd is not tuned: its variant's α and T
    assert {"method.alpha=0.25", "method.temperature=2.0"} <= set(shlex.split(kd_messy["command"]))
    assert "tune_runs" in rows["kd-latent-s0"]
    text = (out / "summary.md").read_text()
    assert "| messy@w0.1 | latent | 2 |" in text and "| kd@messy | latent | 2 |" in text
    # a changed variant never reuses the old variant's runs: their folders are refused by name
    changed = replace(
        cfg,
        ['ablate.variants={"messy@w0.1": {"weight": 0.2}, "kd@messy": {"alpha": 0.25, "temperature": 2.0}}'],
    )
    with pytest.raises(UserError, match="messy@w0.1-latent-s0.*another config"):
        Ablation(changed, path, shards=shards, runs=tmp_path / "runs", out=out).run()


@pytest.mark.parametrize(
    "variants, message",
    [
        ({"messy": {"weight": 0.1}}, "variants are labelled methods"),
        ({"messy@w": {"wieght": 0.1}}, "unknown method field(s) wieght"),
        ({"messy@w": {"name": "kd"}}, "unknown method field(s) name"),
        ({"messy@w": {"alpha": 2.0}}, "outside [0, 1]"),
        ({"nope@w": {}}, "unknown method 'nope@w'"),
    ],
)
def test_variant_mistakes_are_refused_up_front(tmp_path, variants, message):
    cfg, path = tiny_pipeline(tmp_path, methods=["ce", *variants], sources=["latent"], variants=variants)
    with pytest.raises(UserError, match=re.escape(message)):
        Ablation(cfg, path)


def test_two_sources_writing_one_set_with_different_generators_are_refused(tmp_path):
    clash = [{"name": "gen", "modality": "depth", "set_name": "gen-depth", "options": {"steps": 1}}]
    cfg, path = tiny_pipeline(
        tmp_path, sources=["latent", "latent@alt"], generators={"latent": GEN, "latent@alt": clash}
    )
    with pytest.raises(UserError, match="both write the sidecar set gen-depth"):
        Ablation(cfg, path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sources=[latnet]"], "unknown privileged source 'latnet'"),
        (["methods=[ce,nope]"], "unknown method 'nope'"),
        (["methods=[ce,modalimmune]"], "is a teacher objective"),
        (["seeds=[]"], "ablate.seeds is empty"),
        (["ablate.generators.none=[]"], "ablate.generators.none"),
        (["kd_alphas=[2.0]"], "outside [0, 1]"),
    ],
)
def test_cli_mistakes_are_one_line(tmp_path, capsys, overrides, message):
    _, path = tiny_pipeline(tmp_path)
    assert main(["ablate", path, *overrides, "--plan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("synesthesia ablate: error:") and message in err and "\n" not in err


def test_cli_plan_and_missing_results(tmp_path, shards, capsys):
    _, path = tiny_pipeline(tmp_path)
    assert main(["ablate", path, "--plan", "--shards", str(shards), "--runs", str(tmp_path / "r")]) == 0
    assert "8 cells" in capsys.readouterr().out
    assert main(["ablate", path, "--report", "--out", str(tmp_path / "none")]) == 2
    assert "no finished cell" in capsys.readouterr().err


def test_demo_scale_pipeline_reuses_the_demo_and_fits_the_budget(tmp_path):
    """pipelines/ablation-scenes.yaml renders and shards exactly what the demo does: 5 seeds, in the
    ≤ 14 h one run at a time on 2 CPU cores its header states (estimate), MESSy's weight tuned."""
    from synesthesia.ablate.runner import stage_one_overrides
    from synesthesia.config import replace
    from synesthesia.sources.scenes import render_config

    root = Path(__file__).resolve().parents[1] / "pipelines"
    demo = load_pipeline(root / "demo.yaml")
    cfg = load_pipeline(root / "ablation-scenes.yaml")
    assert render_config(cfg) == render_config(demo)
    assert replace(cfg, stage_one_overrides(cfg, "latent")).shard == demo.shard
    plan = Ablation(cfg, "p.yaml", shards=tmp_path, runs=tmp_path, out=tmp_path).plan()
    assert len(plan.cells) == 35 and len(plan.teachers) == 3
    assert plan.estimate_s <= 14 * 3600 and plan.tune_runs == 12
    # the variants its comments give the command for: MESSy at the paper's settings, untuned
    paper = replace(
        cfg, ["ablate.sources=[none,latent]", "ablate.methods=[ce,kd,messy,messy@paper,kd@messy]"]
    )
    ablation = Ablation(paper, "p.yaml", shards=tmp_path, runs=tmp_path, out=tmp_path)
    job = ablation.student_job("messy@paper", "latent", 0)
    assert "method.weight=null" in job.overrides and "method.name=messy" in job.overrides
    assert replace(paper, job.overrides).method.weight is None  # the method's default, w = 1
    assert [s.fields for s in ablation.settings["messy"]] == [{"weight": 0.1}, {"weight": 1.0}]
    full = load_pipeline(root / "ablation-scenes-full.yaml")
    assert len(Ablation(full, "p.yaml", shards=tmp_path, runs=tmp_path, out=tmp_path).cells) >= 3 * 5


def test_training_hash_reads_written_configs_as_this_version():
    """A run written before a field existed is the same config when the field's default keeps the old
    behaviour; a written field this version no longer has makes it unreadable (None), never equal."""
    cfg = load_pipeline(None, ["train.source=decoded", "train.epochs=3"])
    written = to_dict(cfg)
    assert training_hash(written) == training_hash(cfg)
    older = json.loads(json.dumps(written))
    del older["train"]["decoded_from"]  # as written before train.decoded_from existed
    assert training_hash(older) == training_hash(cfg)
    older["train"]["epochs"] = 4
    assert training_hash(older) != training_hash(cfg)
    removed = json.loads(json.dumps(written))
    removed["train"]["gone_option"] = 1
    assert training_hash(removed) is None
    assert training_hash(to_dict(PipelineConfig())) != training_hash(cfg)
    # how often a run checkpoints, and a student's unused teacher section, do not make another run
    assert training_hash(replace(cfg, ["train.save_every=96", "teacher.dim=48"])) == training_hash(cfg)
    assert training_hash(replace(cfg, ["train.stage=teacher", "teacher.dim=48"])) != training_hash(
        replace(cfg, ["train.stage=teacher"])
    )
