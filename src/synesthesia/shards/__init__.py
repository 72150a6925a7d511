"""Shard format v1: schema, atomic writer and manifest, aligned reader, inspect/verify, and the
dataset card that makes a dataset root loadable with ``datasets.load_dataset`` (``card``)."""

from synesthesia.shards.reader import ErrorPolicy, ShardMismatchError, iter_aligned, iter_shard, shard_paths
from synesthesia.shards.schema import SCHEMA_VERSION, SchemaError, decode_npy, encode_npy, shard_name
from synesthesia.shards.writer import Manifest, ShardInfo, SplitWriter, check_sample, write_shard

__all__ = [
    "SCHEMA_VERSION",
    "ErrorPolicy",
    "Manifest",
    "SchemaError",
    "ShardInfo",
    "ShardMismatchError",
    "SplitWriter",
    "check_sample",
    "decode_npy",
    "encode_npy",
    "iter_aligned",
    "iter_shard",
    "shard_name",
    "shard_paths",
    "write_shard",
]
