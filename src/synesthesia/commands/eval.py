"""`synesthesia eval PIPELINE [key=value ...] [--model PATH] [--split test] [--runs runs]`.

Evaluates a trained model on a split of the pipeline's dataset and prints JSON:
a student export folder or student run (the exported student), or a teacher
run (its selected weights, with every modality and with each one missing;
for a teacher trained with a teacher objective, through the objective's
``predict``, e.g. basis-realloc's fusion head with missing-modality substitution).
Without ``--model``, the run the pipeline's ``train`` section would write.
With ``--heads``, a MESSy student run's heads are scored instead: their R² per
layer and modality on the split (``synesthesia.train.probe``).
"""

from __future__ import annotations

import json

from synesthesia.cli import add_pipeline_arguments


def add_arguments(parser):
    add_pipeline_arguments(parser, out_default=None)
    parser.add_argument("--model", default=None, help="export folder, student run or teacher run folder")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument(
        "--runs", default="runs", help="runs root used when --model is not given (default: runs)"
    )
    parser.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    parser.add_argument(
        "--heads",
        action="store_true",
        help="for a MESSy student run: its heads' R² per layer and modality on --split "
        "(how predictable the teacher's modality features are from the student; use --split val)",
    )


def run(args) -> int:
    from pathlib import Path

    from synesthesia.config import load_pipeline
    from synesthesia.train.checkpoint import run_dir
    from synesthesia.train.evaluate import evaluate_model

    cfg = load_pipeline(args.pipeline, args.overrides, section="train")
    model = Path(args.model) if args.model else run_dir(cfg, args.runs)
    if args.heads:
        from synesthesia.train.probe import messy_head_r2

        # the run's own shard root unless train.shards is given here
        given = any(o.split("=", 1)[0] in ("train.shards", "shards") for o in args.overrides)
        result = messy_head_r2(model, args.split, shards=cfg.train.shards if given else None)
    else:
        result = evaluate_model(cfg, model, args.split)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    return 0
