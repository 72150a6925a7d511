"""`synesthesia render PIPELINE [key=value ...] [--out DIR] [--part i/N] [--preview PNG]`: the scenes dataset.

Writes ``<out>/<dataset>/source/{train,val,test,paired}-NNNNNN.tar`` and
``manifest.json`` from the pipeline's ``scenes:`` section (bare overrides such
as ``num_train=100`` go to that section). A verified render of the same config
is kept unless ``--force``. With ``--part i/N`` (or a Slurm array task) only that
part's shards are rendered; the last part to find every shard writes the
manifest, the same bytes as one process.
"""

from __future__ import annotations

import logging
import time

from synesthesia.cli import add_pipeline_arguments, int_in
from synesthesia.config import load_pipeline
from synesthesia.parts import add_part_argument

logger = logging.getLogger("synesthesia.render")


def add_arguments(parser):
    add_pipeline_arguments(parser, out_default="shards")
    parser.add_argument(
        "--workers",
        type=int_in(0, 1024),
        default=None,
        help="rendering processes (default: scenes.workers; 0 = one per core)",
    )
    parser.add_argument(
        "--force", action="store_true", help="render again even if a verified render exists (not with parts)"
    )
    add_part_argument(parser)
    parser.add_argument(
        "--preview",
        default=None,
        metavar="PNG",
        help="also write a grid of samples: RGB, depth, LiDAR, spectrogram",
    )
    parser.add_argument(
        "--preview-count", type=int_in(1, 256), default=8, help="samples in the preview grid (default: 8)"
    )


def run(args) -> int:
    from synesthesia.parts import resolve_part
    from synesthesia.sources.scenes import render_dataset, write_preview

    cfg = load_pipeline(args.pipeline, args.overrides, section="scenes")
    part = resolve_part(args.part)
    start = time.perf_counter()
    directory, rendered = render_dataset(cfg, args.out, workers=args.workers, force=args.force, part=part)
    if rendered:
        logger.info("wrote %s in %.1f s", directory, time.perf_counter() - start)
    if args.preview:
        path = write_preview(directory, args.preview, count=args.preview_count)
        logger.info("preview: %s", path)
    print(directory)
    return 0
