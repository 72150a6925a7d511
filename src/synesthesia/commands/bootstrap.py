"""`synesthesia bootstrap`: train small image-conditioned latent diffusion generators on paired data."""

from __future__ import annotations

import json
import shlex
import sys


def add_arguments(parser):
    parser.add_argument("pipeline", help="pipeline YAML file (see pipelines/bootstrap-scenes.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. steps=500 or bootstrap.seed=1 "
        "(`synesthesia config PIPELINE` lists every key, its default and what it does)",
    )
    parser.add_argument(
        "--out", default=None, help="root of the model folders (default: bootstrap.out, models)"
    )
    parser.add_argument(
        "--shards", default=None, help="root holding <dataset>/source (default: bootstrap.shards, shards)"
    )
    parser.add_argument(
        "--json-out", default=None, help="also write the per-model results as JSON to this file"
    )


def run(args):
    from synesthesia.bootstrap import format_summary, run_bootstrap
    from synesthesia.config import load_pipeline

    cfg = load_pipeline(args.pipeline, args.overrides, section="bootstrap")
    command = "synesthesia bootstrap " + " ".join(
        shlex.quote(a)
        for a in [args.pipeline, *args.overrides]
        + (["--out", args.out] if args.out else [])
        + (["--shards", args.shards] if args.shards else [])
    )
    results = run_bootstrap(cfg, out=args.out, shards=args.shards, command=command)
    if args.json_out:
        from synesthesia.utils import atomic_write_text

        atomic_write_text(args.json_out, json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    print(format_summary(results), file=sys.stdout)
    return 0
