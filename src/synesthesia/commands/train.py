"""`synesthesia train PIPELINE [key=value ...] [--out runs] [--resume [CHECKPOINT]]`.

Stage two: trains the multimodal teacher (``stage=teacher``) or an RGB-only
student (``stage=student``, the default) as the pipeline's ``train`` section
says, into ``<out>/<pipeline name>/<run name>/``. Runs on one process, or on
several under ``accelerate launch -m synesthesia train ...`` (GPUs, nodes) or
``torchrun --nproc_per_node N -m synesthesia train ...`` (CPU: gloo).
"""

from __future__ import annotations

import json
import os

from synesthesia.cli import add_pipeline_arguments


def add_arguments(parser):
    add_pipeline_arguments(parser, out_default="runs")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the run's latest checkpoint, or from this run or checkpoint folder",
    )


def run(args) -> int:
    from synesthesia.config import load_pipeline
    from synesthesia.train.loop import train

    cfg = load_pipeline(args.pipeline, args.overrides, section="train")
    metrics = train(cfg, args.out, resume=args.resume)
    summary = {k: metrics.get(k) for k in ("run", "stage", "method", "source", "seed", "steps")}
    summary["val_accuracy"] = (metrics.get("best") or {}).get("accuracy")
    summary["test_accuracy"] = (metrics.get("test") or {}).get("accuracy")
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line per launch, not per process
        print(json.dumps(summary, sort_keys=True))
    return 0
