"""The ablation report: mean and 95 % interval per (method, source), paired differences, cost, plots.

gap closed = (student − image-only) ÷ (teacher − image-only), with image-only
the mean test accuracy of ``ce`` with no privileged data, and teacher the test
accuracy of that source's teacher. Selection is always on val; the test figures
come from one evaluation per cell at the end of its run.

The cells of a grid share seeds, so methods are compared *paired by seed*
(:func:`~synesthesia.ablate.stats.paired_difference`): every cell against ``ce``
(source none) and against tuned ``kd`` at its own source. A ranking claim (the
bold "best cell per source") is made only when the best cell's paired interval
against the runner-up at that source excludes 0. Rows may carry ``test_n`` (the
number of test samples a cell was evaluated on); the header then gives the
binomial (Wilson) uncertainty of one run's test accuracy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from synesthesia.ablate.findings import findings_lines
from synesthesia.ablate.grid import method_kind
from synesthesia.ablate.stats import (
    A_BETTER,
    B_BETTER,
    PairedDifference,
    mean_interval,
    paired_difference,
    pct,
    wilson_interval,
)
from synesthesia.ablate.tuning import describe, row_fields
from synesthesia.utils import atomic_write_text


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def _mean(members: list[dict[str, Any]], key: str, default: float | None = 0.0) -> float:
    return _mean_std([_num(r.get(key, default)) for r in members])[0]


SOURCE_ORDER = ("none", "decoded", "latent", "real")  # the default ablate.sources: cheapest evidence first


def cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The grid cells' rows (tuning runs, ``role: tune``, are reported apart)."""
    return [r for r in rows if r.get("role", "cell") == "cell"]


def total_seconds(row: dict[str, Any]) -> float:
    """What one student of a cell costs end to end: stage one of its source (whole source set),
    its teacher, tuning where there was any, and its own training."""
    parts = [row.get(k) for k in ("stage1_seconds", "teacher_seconds", "tune_seconds", "train_seconds")]
    return sum(0.0 if p is None or math.isnan(float(p)) else float(p) for p in parts)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per (method, source): methods in first-seen order, each method's sources
    in the grid's order (none, decoded, latent, real), whatever order the cells ran in."""
    rows = cells(rows)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["source"])].append(row)
    method_rank = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}

    def grid_order(key: tuple[str, str]) -> tuple[int, int, str]:
        method, source = key
        kind, _, label = source.partition("@")  # a labelled source (latent@weak) follows its kind
        rank = SOURCE_ORDER.index(kind) if kind in SOURCE_ORDER else len(SOURCE_ORDER)
        return method_rank[method], rank, label

    groups = dict(sorted(groups.items(), key=lambda item: grid_order(item[0])))
    baseline = [r["test_acc"] for r in rows if r["method"] == "ce" and r["source"] == "none"]
    base_mean = _mean_std(baseline)[0]
    out = []
    for (method, source), members in groups.items():
        test = [_num(r["test_acc"]) for r in members]
        mean, std = _mean_std(test)
        interval = mean_interval(test)
        teacher = _mean(members, "teacher_acc", None)
        gap = math.nan
        if not math.isnan(teacher) and not math.isnan(base_mean) and teacher != base_mean:
            gap = (mean - base_mean) / (teacher - base_mean)
        fields = row_fields(members[0])  # a tuned method's setting
        setting = {} if fields is None else {"setting_fields": fields}
        out.append(
            {
                "method": method,
                "source": source,
                "n": len(members),
                "test_mean": mean,
                "test_std": std,
                "test_low": interval.low,
                "test_high": interval.high,
                "test_by_seed": {r["seed"]: _num(r["test_acc"]) for r in members},
                "test_n": sorted({int(r["test_n"]) for r in members if r.get("test_n") is not None}),
                "val_mean": _mean(members, "val_acc", None),
                "teacher_acc": teacher,
                "gap_closed": gap,
                "stage1_s_per_sample": _mean(members, "stage1_s_per_sample"),
                "stage1_bytes_per_sample": _mean(members, "stage1_bytes_per_sample"),
                "train_seconds": _mean(members, "train_seconds", None),
                "samples_per_s": _mean(members, "samples_per_s", None),
                "tune_seconds": _mean(members, "tune_seconds"),
                "total_seconds": _mean_std([total_seconds(r) for r in members])[0],
                "command": members[0].get("command", ""),
                **setting,
            }
        )
    return out


def _fmt(x: float, spec: str) -> str:
    return "–" if math.isnan(x) else format(x, spec)


def _pp(x: float) -> str:
    """A signed difference in percentage points, with a typographic minus: ``+1.23``, ``−0.40``."""
    return "–" if math.isnan(x) else f"{100 * x:+.2f}".replace("-", "−")


def _difference(d: PairedDifference) -> str:
    """``+1.23 [−0.40, +2.86]``; without an interval (fewer than two shared seeds) says so."""
    if d.n == 0:
        return "– (no shared seed)"
    if not d.has_interval:
        return f"{_pp(d.mean)} [no interval: {d.n} seed]"
    return f"{_pp(d.mean)} [{_pp(d.low)}, {_pp(d.high)}]"


BASELINE = ("ce", "none")  # the image-only baseline every cell is compared with


def _verdict(d: PairedDifference, a: str, b: str) -> str:
    if d.verdict == A_BETTER:
        return f"{a} better"
    if d.verdict == B_BETTER:
        return f"{b} better"
    return d.verdict  # "not distinguishable"


def paired_comparisons(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (method, source) of :func:`aggregate` against ``ce`` (source none) and against tuned
    ``kd`` at its own source, paired by seed; the baseline and kd against itself are skipped. A
    labelled method (``messy@w0.1``) is also compared with its unlabelled one (``messy``) there.

    Each comparison: method, source, against (``ce``, ``kd`` or the unlabelled method), label (how
    the reference is named in the report) and difference (a
    :class:`~synesthesia.ablate.stats.PairedDifference` of method − reference test accuracy).
    """
    by_key = {(r["method"], r["source"]): r for r in summary}
    out = []
    for row in summary:
        key = (row["method"], row["source"])
        if key == BASELINE:
            continue
        references = [(BASELINE, "ce (none)"), (("kd", row["source"]), "tuned kd")]
        kind = method_kind(row["method"])
        if kind != row["method"] and kind != "kd":  # a variant against the method it varies (kd: above)
            references.append(((kind, row["source"]), kind))
        for reference, label in references:
            if reference == key or reference not in by_key:
                continue
            difference = paired_difference(row["test_by_seed"], by_key[reference]["test_by_seed"])
            out.append(
                {
                    "method": row["method"],
                    "source": row["source"],
                    "against": reference[0],
                    "label": label,
                    "difference": difference,
                }
            )
    return out


def rankings(summary: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per source with at least two cells: the best cell by mean test accuracy, the runner-up, their
    paired difference, and whether the best one may be called best (``bold``: the interval excludes 0)."""
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in summary:
        if not math.isnan(row["test_mean"]):
            by_source[row["source"]].append(row)
    out = {}
    for source, members in by_source.items():
        if len(members) < 2:
            continue
        best, runner_up = sorted(members, key=lambda r: r["test_mean"], reverse=True)[:2]
        difference = paired_difference(best["test_by_seed"], runner_up["test_by_seed"])
        out[source] = {
            "best": best["method"],
            "runner_up": runner_up["method"],
            "difference": difference,
            "bold": difference.verdict == A_BETTER,
        }
    return out


def _test_size_line(summary: list[dict[str, Any]]) -> list[str]:
    """What one run's test accuracy is worth on its own, when the rows carry ``test_n``."""
    sizes = sorted({n for row in summary for n in row.get("test_n", [])})
    if not sizes:
        return []
    widest = wilson_interval(0.5, sizes[0])
    half = 100 * (widest.high - widest.low) / 2
    counted = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}"
    return [
        f"Each cell was tested on {counted} test samples: one run's test accuracy alone carries",
        f"a binomial 95 % (Wilson) interval of up to ±{half:.2f} points, whatever the seed.",
    ]


def summary_markdown(
    summary: list[dict[str, Any]], title: str, rows: list[dict[str, Any]] | None = None
) -> str:
    """The summary table, the paired differences, and (with ``rows``, all of results.jsonl) the KD
    tuning runs and the teacher and stage-one commands.

    A cell is in bold only when it has the best mean at its source *and* its paired 95 % interval
    against the runner-up there excludes 0 (:func:`rankings`); otherwise no cell of that source is
    bold, and the line under the table says why.
    """
    ranked = rankings(summary)
    lines = [
        f"# {title}",
        "",
        "Test accuracy (%) as the mean over seeds with its 95 % interval (Student t over seeds; – with one",
        "seed) and the std over seeds; model selection on val only, test evaluated once per cell.",
        *_test_size_line(summary),
        "gap closed = (student − image-only) ÷ (teacher − image-only). A cell is in bold only when it is the",
        "best at its source and distinguishable from the runner-up there (paired interval excludes 0).",
        "Cost: stage-one seconds and bytes per sample of the source's sidecars; train s and samples/s of the",
        "student run; total s = stage one (whole source set) + teacher + tuning + student, per student.",
        "",
        "| method | source | seeds | test acc [95 % interval] | std | val acc | teacher | gap closed "
        "| stage-one s/sample | stage-one bytes/sample | train s | samples/s | total s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary:
        acc = f"{pct(row['test_mean'])} [{pct(row['test_low'])}, {pct(row['test_high'])}]"
        rank = ranked.get(row["source"])
        if rank is not None and rank["bold"] and rank["best"] == row["method"]:
            acc = f"**{acc}**"
        method = row["method"]
        if "setting_fields" in row:
            method = f"{method} ({describe(row['setting_fields'])})"
        lines.append(
            f"| {method} | {row['source']} | {row['n']} | {acc} | {pct(row['test_std'])} | "
            f"{pct(row['val_mean'])} | {pct(row['teacher_acc'])} | {_fmt(row['gap_closed'], '.2f')} | "
            f"{_fmt(row['stage1_s_per_sample'], '.4f')} | {_fmt(row['stage1_bytes_per_sample'], '.0f')} | "
            f"{_fmt(row['train_seconds'], '.1f')} | {_fmt(row['samples_per_s'], '.1f')} | "
            f"{_fmt(row.get('total_seconds', math.nan), '.0f')} |"
        )
    if ranked:
        lines.append("")
        for source, rank in ranked.items():
            d = rank["difference"]
            outcome = "in bold" if rank["bold"] else "so no cell of this source is in bold"
            lines.append(
                f"- {source}: best mean {rank['best']}; {rank['best']} − {rank['runner_up']} (runner-up) "
                f"{_difference(d)} points over {d.n} seeds, "
                f"{_verdict(d, rank['best'], rank['runner_up'])}, {outcome}."
            )
    comparisons = paired_comparisons(summary)
    if comparisons:
        lines += [
            "",
            "## Paired differences (95 % interval over seeds)",
            "",
            "The cells of this grid share seeds, so each difference is taken seed by seed (method − reference "
            "test accuracy, in points) and then averaged, with a Student t interval over the shared seeds.",
            "",
            "| method | source | against | difference (points) [95 % interval] | seeds | verdict |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for c in comparisons:
            d = c["difference"]
            lines.append(
                f"| {c['method']} | {c['source']} | {c['label']} | {_difference(d)} | {d.n} | "
                f"{_verdict(d, c['method'], c['against'])} |"
            )
    lines += _tuning_lines([r for r in rows or [] if r.get("role") == "tune"])
    lines += findings_lines(rows or [])
    lines += [
        "",
        "Reproduce a row (one seed shown; change train.seed and train.run_name for the others):",
        "",
    ]
    for row in summary:
        lines.append(f"- {row['method']} / {row['source']}: `{row['command']}`")
    extra = {}
    for r in cells(rows or []):
        if r.get("teacher_command"):
            extra.setdefault(f"teacher ({r['source']})", r["teacher_command"])
        if r.get("stage1_command"):
            extra.setdefault(f"stage one ({r['source']})", r["stage1_command"])
    for what, command in sorted(extra.items()):
        lines.append(f"- {what}: `{command}`")
    return "\n".join(lines) + "\n"


def _tuning_lines(tune: list[dict[str, Any]]) -> list[str]:
    """The tuning runs of each tuned method: every setting's val (what selects) and test (unused)."""
    if not tune:
        return []
    lines = [
        "",
        "## Tuning (each setting trained at one seed, the best on val then used at every seed)",
        "",
        "| method | source | setting | val acc | test acc (not used) | train s | reproduce |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    cost: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in tune:
        lines.append(
            f"| {r['method']} | {r['source']} | {describe(row_fields(r) or {})} | {pct(_num(r['val_acc']))} | "
            f"{pct(_num(r['test_acc']))} | {_fmt(_num(r['train_seconds']), '.1f')} | `{r['command']}` |"
        )
        cost[(r["method"], r["source"])].append(_num(r["train_seconds"]))
    words = ", ".join(f"{m} at {s} {sum(v):.0f} s ({len(v)} runs)" for (m, s), v in cost.items())
    return [*lines, "", f"Tuning cost: {words}."]


def write_summary(out_dir: str | Path, rows: list[dict[str, Any]], title: str) -> Path:
    summary = aggregate(rows)
    path = Path(out_dir) / "summary.md"
    atomic_write_text(path, summary_markdown(summary, title, rows))
    return path


def _half_width(row: dict[str, Any]) -> float:
    """Half the 95 % interval over seeds, in points (0 with one seed: no interval to draw)."""
    half = 100 * (row["test_high"] - row["test_mean"])
    return 0.0 if math.isnan(half) else half


def write_plots(out_dir: str | Path, rows: list[dict[str, Any]]) -> list[Path]:
    """accuracy.png (mean and 95 % interval over seeds per method × source), cost.png (accuracy vs
    cost), paired.png (paired differences to ce and to tuned kd, with a zero line), messy_layers.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    summary = aggregate(rows)
    written = []

    methods = list(dict.fromkeys(r["method"] for r in summary))
    sources = list(dict.fromkeys(r["source"] for r in summary))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(methods), 3.6))
    width = 0.8 / max(1, len(sources))
    for j, source in enumerate(sources):
        xs, ys, es = [], [], []
        for i, method in enumerate(methods):
            for row in summary:
                if row["method"] == method and row["source"] == source:
                    xs.append(i + (j - (len(sources) - 1) / 2) * width)
                    ys.append(100 * row["test_mean"])
                    es.append(_half_width(row))
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=source)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.legend(title="privileged source", fontsize=8)
    ax.set_title("RGB-only students per method × source\n(error bars: 95 % interval over seeds)", fontsize=10)
    fig.tight_layout()
    written.append(out_dir / "accuracy.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    markers = dict(zip(sources, "os^Dv<>", strict=False))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for row in summary:
        ax.errorbar(
            row["total_seconds"],
            100 * row["test_mean"],
            yerr=_half_width(row),
            fmt=markers.get(row["source"], "o"),
            color=colours[row["method"]],
            capsize=3,
            label=f"{row['method']} / {row['source']}",
        )
    ax.set_xlabel("seconds per student: stage one + teacher + tuning + training")
    ax.set_ylabel("test accuracy (%), 95 % interval over seeds")
    ax.set_title("accuracy against total cost")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "cost.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    comparisons = paired_comparisons(summary)
    if comparisons:
        references = list(dict.fromkeys(c["label"] for c in comparisons))
        fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.35 * len(comparisons)))
        for k, c in enumerate(comparisons):
            d = c["difference"]
            y = len(comparisons) - 1 - k  # first comparison on top
            colour = f"C{references.index(c['label'])}"
            if d.has_interval:
                err = [[100 * (d.mean - d.low)], [100 * (d.high - d.mean)]]
                ax.errorbar(100 * d.mean, y, xerr=err, fmt="o", color=colour, capsize=3)
            else:  # one shared seed: a point without an interval, drawn hollow
                ax.plot(100 * d.mean, y, "o", mfc="none", color=colour)
        for i, label in enumerate(references):
            ax.plot([], [], "o", color=f"C{i}", label=f"against {label}")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(
            range(len(comparisons)),
            [f"{c['method']} / {c['source']} vs {c['label']}" for c in reversed(comparisons)],
            fontsize=8,
        )
        ax.set_xlabel("test accuracy difference (points), paired by seed")
        ax.set_title(
            "paired differences with 95 % intervals over seeds\n(hollow: one seed, no interval)", fontsize=10
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "paired.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    curves = [r for r in cells(rows) if method_kind(r["method"]) == "messy" and r.get("loss_curves")]
    if curves:
        # one panel per MESSy method (variants apart) and source; each layer/modality term averaged
        # over seeds (to the shortest run)
        panels = list(dict.fromkeys((r["method"], r["source"]) for r in curves))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
        for ax, (method, source) in zip(axes[0], panels, strict=True):
            members = [r for r in curves if (r["method"], r["source"]) == (method, source)]
            terms = sorted({t for r in members for t in r["loss_curves"] if t.startswith("messy/")})
            for term in terms:
                series = [r["loss_curves"][term] for r in members if r["loss_curves"].get(term)]
                length = min(len(v) for v in series)
                mean = [sum(v[k] for v in series) / len(series) for k in range(length)]
                ax.plot(mean, label=term.removeprefix("messy/"), linewidth=1.0)
            ax.set_title(f"{method}, source {source} ({len(members)} seeds)")
            ax.set_xlabel("logged step")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("MSE to the teacher's tokens")
        fig.suptitle("MESSy per-layer, per-modality losses")
        fig.tight_layout()
        written.append(out_dir / "messy_layers.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
