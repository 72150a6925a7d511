"""`synesthesia demo [PIPELINE]`: render → stage one → teacher → students → results table (what `make demo` runs)."""

from __future__ import annotations


def add_arguments(parser):
    parser.add_argument(
        "pipeline",
        nargs="?",
        default="pipelines/demo.yaml",
        help="pipeline YAML file (default: pipelines/demo.yaml)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides (`synesthesia config PIPELINE` lists every key)",
    )
    parser.add_argument(
        "--out", default="results", help="where summary.md goes: <out>/<name>/ (default: results)"
    )
    parser.add_argument("--shards", default="shards", help="shard root (default: shards)")
    parser.add_argument("--runs", default="runs", help="training runs root (default: runs)")
    parser.add_argument(
        "--methods",
        default="ce,kd,hallucination,messy",
        help="comma-separated student methods (default: ce,kd,hallucination,messy)",
    )


def run(args) -> int:
    from synesthesia.config import load_pipeline
    from synesthesia.demo import run_demo

    cfg = load_pipeline(args.pipeline, args.overrides)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_demo(cfg, args.pipeline, shards=args.shards, runs=args.runs, out=args.out, methods=methods)
    return 0
