"""`synesthesia demo`: the whole flow at demo scale, ending in a results table.

render (procedural scenes) → stage one (``tae`` latents of the real paired
signals, plus DLA latents from the committed latent-diffusion generators when
the pipeline configures them) → the multimodal teacher → the RGB-only students
(``ce``, ``kd``, ``hallucination``, ``messy`` by default) → a table of RGB-only
test accuracy per method, each with its 95 % Wilson interval on the test set,
the teacher's accuracy and the command that reproduces each row, printed and
written to ``<out>/<name>/summary.md``. One seed per method: the table shows
how uncertain each figure is, not which method is better (``synesthesia
ablate`` runs seeds and compares methods paired by seed).

Every step reuses what an earlier run left complete (a verified render, complete
sidecar shards, finished training runs), so a second ``make demo`` is quick.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from synesthesia.ablate.stats import wilson_interval
from synesthesia.config import (
    PipelineConfig,
    comparable,
    config_hash,
    replace,
    write_resolved,
    written_config,
)
from synesthesia.utils import atomic_write_text

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("ce", "kd", "hallucination", "messy")


def teacher_source(cfg: PipelineConfig) -> str:
    """``latent`` (DLA) when a generating generator is configured, else ``real``; ``train.source`` wins if set."""
    if cfg.train.source != "latent":
        return cfg.train.source
    generates = any(g.name == "latent-diffusion" for g in cfg.shard.generators)
    return "latent" if generates else "real"


def _finished(run: Path, cfg: PipelineConfig) -> dict[str, Any] | None:
    """A run's metrics when it finished under exactly ``cfg`` (its config.json, read by this
    version: :func:`~synesthesia.config.written_config`), else None."""
    path, written = run / "metrics.json", run / "config.json"
    if not path.is_file() or not written.is_file():
        return None
    ran = written_config(json.loads(written.read_text()).get("config") or {})
    if ran is None or config_hash(comparable(ran)) != config_hash(comparable(cfg)):
        return None
    metrics = json.loads(path.read_text())
    return metrics if (metrics.get("test") or {}).get("accuracy") is not None else None


def _train(cfg: PipelineConfig, runs: Path, overrides: list[str]) -> dict[str, Any]:
    from synesthesia.train.checkpoint import run_dir
    from synesthesia.train.loop import train

    run_cfg = replace(cfg, overrides)
    run = run_dir(run_cfg, runs)
    done = _finished(run, run_cfg)
    if done is not None:
        logger.info("%s already trained; kept", run)
        return done
    if run.exists():  # unfinished, or trained under another config: start over
        logger.info("%s is unfinished or was trained with another config; training it again", run)
        shutil.rmtree(run)
    return train(run_cfg, runs)


def _accuracy(metrics: dict[str, Any], key: str) -> float:
    return float((metrics.get(key) or {}).get("accuracy", float("nan")))


def _test_samples(metrics: dict[str, Any], manifest_count: int) -> int:
    """How many test samples a run was evaluated on: metrics.json's count, else the source manifest's."""
    return int((metrics.get("test") or {}).get("samples") or manifest_count)


def _with_interval(accuracy: float, n: int) -> str:
    """``62.50 [30.57, 86.32]``: the accuracy (%) and its 95 % Wilson interval on ``n`` test samples."""
    if n < 1 or math.isnan(accuracy):  # no test set, or no accuracy
        return f"{100 * accuracy:.2f}"
    w = wilson_interval(accuracy, n)
    return f"{100 * accuracy:.2f} [{100 * w.low:.2f}, {100 * w.high:.2f}]"


def table(rows: list[dict[str, Any]], teacher: dict[str, Any], elapsed: float) -> str:
    lines = [
        f"# {teacher['pipeline']}: RGB-only students on the procedural scenes",
        "",
        f"Teacher (RGB + {', '.join(teacher['modalities'])}, privileged source `{teacher['source']}`): "
        f"test {_with_interval(teacher['test'], teacher['test_n'])} %, val {100 * teacher['val']:.2f} %.",
        "Students see RGB only at test time. Model selection on val; test evaluated once.",
        f"Test accuracy with its 95 % Wilson interval over the {teacher['test_n']} test samples. One seed per "
        "method cannot rank methods: run `synesthesia ablate` for seeds and paired differences.",
        "",
        "| method | test acc (%) [95 % interval] | val acc (%) | train s | reproduce |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {_with_interval(row['test'], row['test_n'])} | {100 * row['val']:.2f} | "
            f"{row['seconds']:.0f} | `{row['command']}` |"
        )
    lines += ["", f"Teacher: `{teacher['command']}`", "", f"Whole demo: {elapsed / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def run_demo(
    cfg: PipelineConfig,
    pipeline_path: str,
    *,
    shards: str | Path = "shards",
    runs: str | Path = "runs",
    out: str | Path = "results",
    methods: tuple[str, ...] = DEFAULT_METHODS,
) -> Path:
    """Run the demo; returns the path of the written summary.md."""
    from synesthesia.shards.writer import Manifest
    from synesthesia.sources.scenes import render_dataset
    from synesthesia.stage_one import run_stage_one

    start = time.perf_counter()
    shards, runs, out = Path(shards), Path(runs), Path(out) / cfg.name
    base = [f"train.shards={shards}"]
    cfg = replace(cfg, base)

    logger.info("demo 1/4: render %s", cfg.dataset)
    source_dir, _ = render_dataset(cfg, shards)
    test_count = Manifest.read(source_dir).count("test")
    logger.info("demo 2/4: stage one (%d generators)", len(cfg.shard.generators))
    run_stage_one(cfg, shards)

    source = teacher_source(cfg)
    teacher_over = [f"train.source={source}"]
    logger.info("demo 3/4: teacher (source %s)", source)
    t0 = time.perf_counter()
    t_metrics = _train(cfg, runs, ["train.stage=teacher", *teacher_over])
    cmd = f"synesthesia train {pipeline_path} stage=teacher train.source={source}"
    teacher = {
        "pipeline": cfg.name,
        "source": source,
        "modalities": list(cfg.train.modalities),
        "test": _accuracy(t_metrics, "test"),
        "val": _accuracy(t_metrics, "best"),
        "test_n": _test_samples(t_metrics, test_count),
        "seconds": time.perf_counter() - t0,
        "command": cmd,
    }

    rows = []
    for i, method in enumerate(methods, 1):
        logger.info("demo 4/4: student %d of %d (%s)", i, len(methods), method)
        t0 = time.perf_counter()
        student_source = "none" if method == "ce" else source
        over = ["train.stage=student", f"method.name={method}", f"train.source={student_source}"]
        metrics = _train(cfg, runs, over)
        rows.append(
            {
                "method": method,
                "test": _accuracy(metrics, "test"),
                "val": _accuracy(metrics, "best"),
                "test_n": _test_samples(metrics, test_count),
                "seconds": time.perf_counter() - t0,
                "command": f"synesthesia train {pipeline_path} " + " ".join(over),
            }
        )

    text = table(rows, teacher, time.perf_counter() - start)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.md", text)
    atomic_write_text(
        out / "results.json", json.dumps({"teacher": teacher, "students": rows}, indent=2) + "\n"
    )
    write_resolved(cfg, out)
    print(text)
    return out / "summary.md"
