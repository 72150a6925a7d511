"""`synesthesia shard PIPELINE [key=value ...] [--out DIR] [--overwrite] [--part i/N] [--finalize]`: stage one.

Runs every generator of ``shard.generators`` over ``<out>/<dataset>/source`` and
writes one latent sidecar set per generator (plus a decoded set with
``shard.decode=true``). Distributed with ``accelerate launch -m synesthesia shard …``
or ``torchrun --nproc_per_node N -m synesthesia shard …``, or as independent parts
(``--part i/N``, a Slurm array or ``srun`` tasks, Ray tasks): each part does its
share, the last to finish writes the manifests, and ``--finalize`` writes them
from the files alone. Exit code 0 when every set is complete or waits only on
other parts; 2 for a user mistake or when a source shard failed (the other
shards are written, the set gets no manifest; a rerun completes it).
"""

from __future__ import annotations

from synesthesia.cli import add_pipeline_arguments
from synesthesia.parts import add_part_argument


def add_arguments(parser):
    add_pipeline_arguments(parser, out_default="shards")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete existing sidecar sets of the configured generators and write them again"
        " (needed when the generator or its settings changed; not with independent parts)",
    )
    add_part_argument(parser)
    parser.add_argument(
        "--finalize",
        action="store_true",
        help="no inference: write the manifests of sets whose every shard exists (what the last part"
        " does); an error naming the missing shards' parts otherwise. Safe to run any number of times",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from synesthesia import UserError
    from synesthesia.config import load_pipeline
    from synesthesia.parts import resolve_part
    from synesthesia.stage_one import finalize_stage_one, run_stage_one

    cfg = load_pipeline(args.pipeline, args.overrides, section="shard")
    if args.finalize:
        if args.overwrite or args.part is not None:
            raise UserError("--finalize runs alone: no --overwrite, no --part")
        finalize_stage_one(cfg, args.out)
        return 0
    part = resolve_part(args.part)
    run_stage_one(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress, part=part)
    return 0
