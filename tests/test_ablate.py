import json
import math

import pytest

from synesthesia import UserError
from synesthesia.ablate.findings import findings_lines
from synesthesia.ablate.grid import (
    Cell,
    append_result,
    expand,
    method_kind,
    pending,
    read_results,
    source_kind,
    teacher_sources,
)
from synesthesia.ablate.report import aggregate, summary_markdown, write_plots, write_summary
from synesthesia.config import AblateConfig, GeneratorConfig


def test_grid_expansion_crosses_methods_sources_seeds():
    cells = expand(
        AblateConfig(methods=["ce", "kd", "messy"], sources=["none", "latent", "real"], seeds=[0, 1, 2])
    )
    assert [c for c in cells if c.method == "ce"] == [Cell("ce", "none", s) for s in (0, 1, 2)]
    assert len(cells) == 3 + 2 * 2 * 3
    assert len({c.name for c in cells}) == len(cells)
    assert teacher_sources(cells) == ["latent", "real"]


@pytest.mark.parametrize(
    "cfg, message",
    [
        (AblateConfig(sources=["latnet"]), "unknown privileged source"),
        (AblateConfig(seeds=[]), "empty"),
        (AblateConfig(seeds=[1, 1]), "duplicates"),
        (AblateConfig(sources=["latent", "latent"]), "duplicates"),
        (AblateConfig(sources=["latent@Weak"]), "unknown privileged source"),
        (AblateConfig(sources=["none@x"]), "unknown privileged source"),
        (AblateConfig(sources=["latent@"]), "unknown privileged source"),
        (AblateConfig(sources=["latent@weak"]), "give its generators as ablate.generators.latent@weak"),
        (AblateConfig(methods=["ce", "messy@w0.1"]), "give its settings as ablate.variants.messy@w0.1"),
        (AblateConfig(methods=["ce", "messy@W1"], variants={"messy@W1": {}}), "labelled method"),
        (AblateConfig(methods=["ce", "ce"]), "ablate.methods has duplicates"),
    ],
)
def test_grid_mistakes(cfg, message):
    with pytest.raises(UserError, match=message):
        expand(cfg)


def test_resume_skips_completed_cells_and_torn_lines(tmp_path):
    cells = expand(AblateConfig(methods=["ce", "kd"], sources=["none", "latent"], seeds=[0, 1]))
    append_result(tmp_path, cells[0], {"test_acc": 0.5})
    append_result(tmp_path, cells[1], {"test_acc": 0.6})
    with open(tmp_path / "results.jsonl", "a") as fh:
        fh.write('{"cell": "kd-latent-s0", "test_ac')  # killed mid-write
    done = read_results(tmp_path)
    assert set(done) == {cells[0].name, cells[1].name}
    assert pending(cells, done) == cells[2:]


def fake_rows():
    rows = []
    for seed, (ce, kd, messy) in enumerate([(0.50, 0.55, 0.60), (0.52, 0.57, 0.58), (0.48, 0.56, 0.62)]):
        common = {"seed": seed, "train_seconds": 10.0, "samples_per_s": 100.0, "command": f"cmd {seed}"}
        rows.append(
            {"method": "ce", "source": "none", "test_acc": ce, "val_acc": ce, "teacher_acc": None, **common}
        )
        rows.append(
            {"method": "kd", "source": "latent", "test_acc": kd, "val_acc": kd, "teacher_acc": 0.8, **common}
        )
        rows.append(
            {
                "method": "messy",
                "source": "latent",
                "test_acc": messy,
                "val_acc": messy,
                "teacher_acc": 0.8,
                "stage1_s_per_sample": 0.01,
                "stage1_bytes_per_sample": 4096,
                "loss_curves": {"messy/l4/depth": [1.0, 0.5, 0.25], "ce": [2.0, 1.0]},
                **common,
            }
        )
    return rows


def test_labelled_sources_are_their_own_cells_and_teachers():
    gen = [GeneratorConfig(name="latent-diffusion", modality="depth", set_name="weak-depth")]
    cfg = AblateConfig(
        methods=["ce", "messy"],
        sources=["none", "latent", "latent@weak"],
        seeds=[0, 1],
        generators={"latent@weak": gen},
    )
    cells = expand(cfg)
    assert [c.name for c in cells if c.source == "latent@weak"] == [
        "messy-latent@weak-s0",
        "messy-latent@weak-s1",
    ]
    assert teacher_sources(cells) == ["latent", "latent@weak"]
    assert source_kind("latent@weak") == "latent" and source_kind("real") == "real"


def test_labelled_methods_are_their_own_cells_and_a_ce_variant_runs_without_privileged_data():
    cfg = AblateConfig(
        methods=["ce", "messy", "messy@w0.1", "ce@ls"],
        sources=["none", "latent"],
        seeds=[0],
        variants={"messy@w0.1": {"weight": 0.1}, "ce@ls": {"options": {"label_smoothing": 0.1}}},
    )
    assert [c.name for c in expand(cfg)] == [
        "ce-none-s0",
        "messy-latent-s0",
        "messy@w0.1-latent-s0",
        "ce@ls-none-s0",
    ]
    assert method_kind("messy@w0.1") == "messy" and method_kind("kd") == "kd"


def test_aggregate_puts_a_labelled_source_after_its_kind():
    rows = fake_rows()
    extra = [
        {**r, "source": s}
        for r in rows
        if r["method"] == "messy"
        for s in ("real", "latent@weak", "latent@a")
    ]
    order = [(r["method"], r["source"]) for r in aggregate([*extra, *rows])]
    assert [s for m, s in order if m == "messy"] == ["latent", "latent@a", "latent@weak", "real"]


def test_aggregate_mean_std_and_gap_closed():
    summary = {(r["method"], r["source"]): r for r in aggregate(fake_rows())}
    messy = summary[("messy", "latent")]
    assert messy["n"] == 3
    assert messy["test_mean"] == pytest.approx(0.60)
    assert messy["test_std"] == pytest.approx(0.02)
    assert messy["gap_closed"] == pytest.approx((0.60 - 0.50) / (0.8 - 0.50))
    assert math.isnan(summary[("ce", "none")]["gap_closed"])


def test_aggregate_reports_in_grid_order_whatever_order_cells_ran():
    """A resumed ablation that re-ran one source appends its rows last; the table keeps the grid's order."""
    rows = fake_rows()
    late = [{**r, "source": "decoded"} for r in rows if r["method"] == "kd"]  # re-run, appended last
    order = [(r["method"], r["source"]) for r in aggregate([*rows, *late])]
    assert order == [("ce", "none"), ("kd", "decoded"), ("kd", "latent"), ("messy", "latent")]


def test_summary_gives_intervals_and_lists_commands(tmp_path):
    text = summary_markdown(aggregate(fake_rows()), "t", fake_rows())
    # mean 60, std 2 over 3 seeds: half-width t_{0.975,2} · 2 / √3 = 4.97
    assert "| messy | latent | 3 | 60.00 [55.03, 64.97] | 2.00 |" in text
    assert "| kd | latent | 3 | 56.00 [53.52, 58.48] | 1.00 |" in text
    assert "`cmd 0`" in text
    assert "test samples" not in text  # the rows do not say how many
    path = write_summary(tmp_path, fake_rows(), "t")
    assert path.read_text() == text


def test_summary_paired_differences_noisy_method_is_not_distinguishable():
    """messy − kd per seed: +5, +1, +6 points: +4.00 [−2.57, +10.57], which contains 0."""
    text = summary_markdown(aggregate(fake_rows()), "t")
    assert "## Paired differences (95 % interval over seeds)" in text and "paired" in text
    assert "| messy | latent | tuned kd | +4.00 [−2.57, +10.57] | 3 | not distinguishable |" in text
    assert "| messy | latent | ce (none) | +10.00 [+0.06, +19.94] | 3 | messy better |" in text
    assert "| kd | latent | ce (none) | +6.00 [+1.70, +10.30] | 3 | kd better |" in text
    assert "| kd | latent | tuned kd |" not in text  # kd against itself is skipped
    assert "**" not in text  # the best at latent is not distinguishable from the runner-up
    assert "so no cell of this source is in bold" in text


def test_summary_compares_a_method_variant_with_its_method_too():
    """messy@w0.1 − messy per seed: −10, −8, −12 points: −10.00 [−14.97, −5.03]."""
    variant = [
        {
            **r,
            "method": "messy@w0.1",
            "test_acc": r["test_acc"] - 0.10 + 0.02 * (r["seed"] == 1) - 0.02 * (r["seed"] == 2),
        }
        for r in fake_rows()
        if r["method"] == "messy"
    ]
    text = summary_markdown(aggregate([*fake_rows(), *variant]), "t")
    assert "| messy@w0.1 | latent | messy | −10.00 [−14.97, −5.03] | 3 | messy better |" in text
    assert "| messy@w0.1 | latent | tuned kd |" in text and "| messy | latent | messy |" not in text


def test_summary_bolds_best_only_when_distinguishable_from_runner_up():
    rows = [
        {**r, "test_acc": r["test_acc"] + 0.10} if r["method"] == "messy" else r for r in fake_rows()
    ]  # messy − kd per seed: +15, +11, +16 points
    text = summary_markdown(aggregate(rows), "t")
    assert "| messy | latent | 3 | **70.00 [65.03, 74.97]** |" in text
    assert "| messy | latent | tuned kd | +14.00 [+7.43, +20.57] | 3 | messy better |" in text
    assert "messy better, in bold" in text


def test_summary_one_shared_seed_has_no_interval():
    rows = [r for r in fake_rows() if r["seed"] == 0 or r["method"] == "ce"]
    text = summary_markdown(aggregate(rows), "t")
    assert "| kd | latent | ce (none) | +5.00 [no interval: 1 seed] | 1 | not distinguishable |" in text
    assert "| kd | latent | 1 | 55.00 [–, –] |" in text


def test_summary_states_test_set_size_when_rows_carry_it():
    rows = [{**r, "test_n": 100} for r in fake_rows()]
    text = summary_markdown(aggregate(rows), "t")
    # one run at 50 % on 100 samples: Wilson [40.38, 59.62], ±9.62 points
    assert "tested on 100 test samples" in text and "±9.62 points" in text


def test_plots_are_written(tmp_path):
    paths = write_plots(tmp_path, fake_rows())
    assert [p.name for p in paths] == ["accuracy.png", "cost.png", "paired.png", "messy_layers.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps([str(p) for p in paths])


def test_findings_tabulate_teacher_reliance_and_heads_r2_per_source():
    robust = {"full": 0.5284, "removed/all": 0.3912, "removed/depth": 0.3912, "shuffled/depth": 0.2816}
    rows = [
        {"method": "ce", "source": "none", "seed": 0},
        *[
            {
                "method": "messy",
                "source": "latent",
                "seed": s,
                "teacher_robustness": robust,
                "heads_r2": {"l3/depth": v},
            }
            for s, v in ((0, 0.5), (1, 0.7))
        ],
        {
            "method": "kd",
            "source": "real",
            "seed": 0,
            "teacher_robustness": {"full": 0.9, "removed/depth": 0.3},
        },
    ]
    lines = findings_lines(rows)
    assert "| latent | 52.84 | depth 39.12 | depth 28.16 | l3/depth 0.60 [0.50, 0.70] |" in lines
    assert "| real | 90.00 | depth 30.00 | – | – |" in lines
    assert not any("| none |" in line for line in lines)
    assert findings_lines([{"method": "ce", "source": "none", "seed": 0}]) == []
    # a MESSy variant beside messy: each method's heads apart, named
    variant = {**rows[1], "method": "messy@w0.1", "heads_r2": {"l3/depth": 0.2}}
    line = next(x for x in findings_lines([*rows, variant]) if x.startswith("| latent |"))
    assert line.endswith("| messy l3/depth 0.60 [0.50, 0.70]; messy@w0.1 l3/depth 0.20 [0.20, 0.20] |")


def test_logged_span_leaves_out_restarts_and_the_pauses_before_them(tmp_path):
    from synesthesia.ablate.runs import _logged_span

    def log(lines):
        (tmp_path / "logs").mkdir(exist_ok=True)
        (tmp_path / "logs" / "metrics.jsonl").write_text(
            "\n".join(json.dumps({"step": s, "time": t, "train/loss": 1.0}) for s, t in lines) + "\n"
        )

    log([(1, 100.0), (2, 110.0), (3, 120.0)])
    assert _logged_span(tmp_path) == 20.0
    # killed at step 3 with no checkpoint, started again from scratch an hour later: 1-3 in 15 s
    log([(1, 100.0), (2, 110.0), (3, 120.0), (1, 3700.0), (2, 3705.0), (3, 3715.0)])
    assert _logged_span(tmp_path) == 15.0
    # killed at step 5, resumed from the checkpoint at step 3: steps 1-3 of the first attempt count
    log([(1, 0.0), (2, 10.0), (3, 20.0), (4, 30.0), (5, 40.0), (3, 500.0), (4, 505.0), (5, 510.0)])
    assert _logged_span(tmp_path) == 20.0 + 10.0
    log([(1, 0.0)])
    assert math.isnan(_logged_span(tmp_path))
