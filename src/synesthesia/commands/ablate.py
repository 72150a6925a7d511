"""`synesthesia ablate PIPELINE [key=value ...] [--out DIR] [--shards DIR] [--runs DIR] [--jobs N] [--plan | --report]`.

The grid of ``ablate.methods`` × privileged source (``ablate.sources``: none,
decoded, latent, real) × ``ablate.seeds``, with shards and teachers shared
across cells and KD tuned on val. Writes ``results.jsonl`` (one row per cell),
``summary.md`` and the PNG plots under ``--out`` (default
``results/<pipeline name>/``). Rerunning skips the cells already in
results.jsonl. ``--jobs N`` trains up to N runs of a step at once
(:mod:`synesthesia.ablate.parallel`). See :mod:`synesthesia.ablate.runner`.
"""

from __future__ import annotations

from synesthesia.ablate.parallel import MAX_JOBS
from synesthesia.cli import add_pipeline_arguments, int_in


def add_arguments(parser):
    add_pipeline_arguments(parser)
    parser.add_argument("--out", default=None, help="results folder (default: results/<pipeline name>/)")
    parser.add_argument("--shards", default="shards", help="shard root (default: shards)")
    parser.add_argument("--runs", default="runs", help="training runs root (default: runs)")
    parser.add_argument(
        "--jobs",
        type=int_in(1, MAX_JOBS),
        default=1,
        help="training runs at once, each a `synesthesia train` process with one GPU of the visible "
        "ones, or on a CPU its share of the cores (default 1: one run at a time, in this process)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--plan",
        action="store_true",
        help="print the grid, what is left of it and a time estimate; run nothing",
    )
    mode.add_argument(
        "--report",
        action="store_true",
        help="only rewrite summary.md and the plots from results.jsonl",
    )


def run(args) -> int:
    from synesthesia.ablate.runner import Ablation
    from synesthesia.config import load_pipeline

    cfg = load_pipeline(args.pipeline, args.overrides, section="ablate")
    ablation = Ablation(
        cfg, args.pipeline, args.overrides, shards=args.shards, runs=args.runs, out=args.out, jobs=args.jobs
    )
    if args.report:
        print(ablation.report())
        return 0
    plan = ablation.plan()
    print("\n".join(plan.lines), flush=True)
    if args.plan:
        return 0
    path = ablation.run()
    print(path.read_text())
    print(f"results: {path.parent}/ (results.jsonl, summary.md, accuracy.png, cost.png, messy_layers.png)")
    return 0
