"""`synesthesia shard PIPELINE [key=value ...] [--out DIR] [--overwrite]`: stage one.

Runs every generator of ``shard.generators`` over ``<out>/<dataset>/source`` and
writes one latent sidecar set per generator (plus a decoded set with
``shard.decode=true``). Distributed with ``accelerate launch -m synesthesia shard …``
or ``torchrun --nproc_per_node N -m synesthesia shard …``. Exit code 0 when every
set is complete; 2 for a user mistake or when a source shard failed (the other
shards are written, the set gets no manifest; a rerun completes it).
"""

from __future__ import annotations

from synesthesia.cli import add_pipeline_arguments


def add_arguments(parser):
    add_pipeline_arguments(parser, out_default="shards")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete existing sidecar sets of the configured generators and write them again"
        " (needed when the generator or its settings changed)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from synesthesia.config import load_pipeline
    from synesthesia.stage_one import run_stage_one

    cfg = load_pipeline(args.pipeline, args.overrides, section="shard")
    run_stage_one(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    return 0
