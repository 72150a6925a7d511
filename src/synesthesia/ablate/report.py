"""The ablation report: mean ± std per (method, source), gap closed, cost, and plots.

gap closed = (student − image-only) ÷ (teacher − image-only), with image-only
the mean test accuracy of ``ce`` with no privileged data, and teacher the test
accuracy of that source's teacher. Selection is always on val; the test figures
come from one evaluation per cell at the end of its run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from synesthesia.utils import atomic_write_text


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per (method, source), in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["source"])].append(row)
    baseline = [r["test_acc"] for r in rows if r["method"] == "ce" and r["source"] == "none"]
    base_mean = _mean_std(baseline)[0]
    out = []
    for (method, source), members in groups.items():
        test = [r["test_acc"] for r in members]
        mean, std = _mean_std(test)
        teacher = _mean_std([r["teacher_acc"] for r in members if r.get("teacher_acc") is not None])[0]
        gap = math.nan
        if not math.isnan(teacher) and not math.isnan(base_mean) and teacher != base_mean:
            gap = (mean - base_mean) / (teacher - base_mean)
        out.append(
            {
                "method": method,
                "source": source,
                "n": len(members),
                "test_mean": mean,
                "test_std": std,
                "val_mean": _mean_std([r["val_acc"] for r in members])[0],
                "teacher_acc": teacher,
                "gap_closed": gap,
                "stage1_s_per_sample": _mean_std([r.get("stage1_s_per_sample", 0.0) for r in members])[0],
                "stage1_bytes_per_sample": _mean_std(
                    [r.get("stage1_bytes_per_sample", 0.0) for r in members]
                )[0],
                "train_seconds": _mean_std([r["train_seconds"] for r in members])[0],
                "samples_per_s": _mean_std([r["samples_per_s"] for r in members])[0],
                "command": members[0].get("command", ""),
            }
        )
    return out


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.2f}"


def summary_markdown(summary: list[dict[str, Any]], title: str) -> str:
    """The summary table; the best (method, source) per source by mean test accuracy in bold."""
    best: dict[str, float] = {}
    for row in summary:
        best[row["source"]] = max(best.get(row["source"], -1.0), row["test_mean"])
    lines = [
        f"# {title}",
        "",
        "Test accuracy (%) as mean ± std over seeds; model selection on val only, test evaluated once per cell.",
        "gap closed = (student − image-only) ÷ (teacher − image-only).",
        "",
        "| method | source | seeds | test acc | val acc | teacher | gap closed | stage-one s/sample | stage-one bytes/sample | train s | samples/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary:
        acc = f"{_pct(row['test_mean'])} ± {_pct(row['test_std'])}"
        if row["test_mean"] == best[row["source"]]:
            acc = f"**{acc}**"
        gap = "–" if math.isnan(row["gap_closed"]) else f"{row['gap_closed']:.2f}"
        lines.append(
            f"| {row['method']} | {row['source']} | {row['n']} | {acc} | {_pct(row['val_mean'])} | "
            f"{_pct(row['teacher_acc'])} | {gap} | {row['stage1_s_per_sample']:.4f} | "
            f"{row['stage1_bytes_per_sample']:.0f} | {row['train_seconds']:.1f} | {row['samples_per_s']:.1f} |"
        )
    lines += ["", "Reproduce a row (one seed shown; change the seed override for the others):", ""]
    for row in summary:
        lines.append(f"- {row['method']} / {row['source']}: `{row['command']}`")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path, rows: list[dict[str, Any]], title: str) -> Path:
    summary = aggregate(rows)
    path = Path(out_dir) / "summary.md"
    atomic_write_text(path, summary_markdown(summary, title))
    return path


def write_plots(out_dir: str | Path, rows: list[dict[str, Any]]) -> list[Path]:
    """accuracy.png (error bars per method × source), cost.png (accuracy vs cost), messy_layers.png."""
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
                    es.append(100 * row["test_std"])
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=source)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(title="privileged source", fontsize=8)
    ax.set_title("RGB-only students: accuracy per method × source")
    fig.tight_layout()
    written.append(out_dir / "accuracy.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for row in summary:
        cost = row["train_seconds"] + row["stage1_s_per_sample"] * row.get("n", 1)
        ax.errorbar(cost, 100 * row["test_mean"], yerr=100 * row["test_std"], fmt="o", capsize=3)
        ax.annotate(f"{row['method']}/{row['source']}", (cost, 100 * row["test_mean"]), fontsize=7)
    ax.set_xlabel("cost: training seconds + stage-one seconds (per cell)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against cost")
    fig.tight_layout()
    written.append(out_dir / "cost.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    curves = [r for r in rows if r["method"] == "messy" and r.get("loss_curves")]
    if curves:
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        for row in curves:
            for term, values in sorted(row["loss_curves"].items()):
                if term.startswith("messy/"):
                    ax.plot(values, label=f"{row['source']} s{row['seed']} {term}", linewidth=0.8)
        ax.set_xlabel("logged step")
        ax.set_ylabel("MSE")
        ax.set_yscale("log")
        ax.set_title("MESSy per-layer, per-modality losses")
        ax.legend(fontsize=5, ncol=2)
        fig.tight_layout()
        written.append(out_dir / "messy_layers.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
