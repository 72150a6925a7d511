"""`synesthesia ingest PIPELINE [ingest.source=PATH ...] [--out DIR]`: an existing dataset → source shards.

Writes ``<out>/<dataset>/source/{train,val,test}-NNNNNN.tar`` and ``manifest.json``
(see ``synesthesia.sources.ingest`` for the layouts it reads). With ``--part i/N`` (or a
Slurm array / torchrun environment: ``synesthesia.parts``) it writes only that part's shards; the
part that finds every shard written publishes the set.
"""

from __future__ import annotations

from synesthesia.cli import add_pipeline_arguments
from synesthesia.parts import add_part_argument


def add_arguments(parser):
    add_pipeline_arguments(parser, out_default="shards")
    add_part_argument(parser)
    parser.epilog = (
        "examples: synesthesia ingest pipelines/demo.yaml ingest.source=data/photos dataset=photos; "
        "bare keys (source=..., shard_size=...) are looked up in the ingest section"
    )


def run(args) -> int:
    from synesthesia.config import load_pipeline
    from synesthesia.parts import resolve_part
    from synesthesia.sources.ingest import ingest

    cfg = load_pipeline(args.pipeline, args.overrides, section="ingest")
    part = resolve_part(args.part)
    directory, manifest = ingest(cfg, args.out, part=part)
    if manifest is None:
        print(f"{directory}: {part} written; the set is published by the part that finishes last")
        return 0
    counts = ", ".join(f"{split} {manifest.count(split)}" for split in manifest.splits)
    skipped = sum(manifest.skipped.values())
    modalities = ", ".join(manifest.extra.get("modalities", [])) or "rgb only"
    print(f"{directory}: {counts}; {manifest.extra['num_classes']} classes; {modalities}; skipped {skipped}")
    return 0
