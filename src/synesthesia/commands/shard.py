"""`synesthesia shard`."""

from synesthesia.cli import add_pipeline_arguments
from synesthesia.commands import not_built


def add_arguments(parser):
    add_pipeline_arguments(parser, out_default="shards")


def run(args):
    return not_built("shard", "issue 5")
