"""`synesthesia ingest PIPELINE [ingest.source=PATH ...] [--out DIR]`: an existing dataset → source shards.

Writes ``<out>/<dataset>/source/{train,val,test}-NNNNNN.tar`` and ``manifest.json``
(see ``synesthesia.sources.ingest`` for the layouts it reads).
"""

from __future__ import annotations

from synesthesia.cli import add_pipeline_arguments


def add_arguments(parser):
    add_pipeline_arguments(parser, out_default="shards")
    parser.epilog = (
        "examples: synesthesia ingest pipelines/demo.yaml ingest.source=data/photos dataset=photos; "
        "bare keys (source=..., shard_size=...) are looked up in the ingest section"
    )


def run(args) -> int:
    from synesthesia.config import load_pipeline
    from synesthesia.sources.ingest import ingest

    cfg = load_pipeline(args.pipeline, args.overrides, section="ingest")
    directory, manifest = ingest(cfg, args.out)
    counts = ", ".join(f"{split} {manifest.count(split)}" for split in manifest.splits)
    skipped = sum(manifest.skipped.values())
    modalities = ", ".join(manifest.extra.get("modalities", [])) or "rgb only"
    print(f"{directory}: {counts}; {manifest.extra['num_classes']} classes; {modalities}; skipped {skipped}")
    return 0
