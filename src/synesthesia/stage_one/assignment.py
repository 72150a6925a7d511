"""Which source shards a run does, and which process does which.

- :func:`source_tasks` - the shards of the configured splits in the run's fixed order (splits as
  configured, shards in order), each a picklable :class:`~synesthesia.stage_one.data.ShardTask`;
- :func:`pending_tasks` - those whose sidecar shard is not written yet: a shard that exists under its
  final name is complete and is skipped (that is how a run resumes);
- :func:`tasks_for_process` - process *r* of *N* takes the pending shards at positions *i* with
  *i* mod *N* = *r*.

Every process lists the same pending shards from the same files before any of them writes, so the
split needs no communication; the set folder must be on a file system every process sees. Within a
process, the DataLoader workers split their share the same way
(:class:`~synesthesia.stage_one.data.ShardBatches`).
"""

from __future__ import annotations

from pathlib import Path

from synesthesia.shards.writer import Manifest
from synesthesia.stage_one.data import ShardTask


def source_tasks(source: Manifest, src_dir: Path, splits: list[str]) -> list[ShardTask]:
    """The shards of ``splits`` in the run's fixed order: splits as given, shards in order."""
    tasks = []
    for split in splits:
        for index, info in enumerate(source.splits.get(split, [])):
            tasks.append(
                ShardTask(
                    split=split,
                    index=index,
                    name=info.name,
                    path=str(src_dir / info.name),
                    samples=info.samples,
                    sha256=info.sha256,
                )
            )
    return tasks


def pending_tasks(tasks: list[ShardTask], lat_dir: Path, dec_dir: Path | None) -> list[ShardTask]:
    """The tasks whose latent shard (or, when ``dec_dir`` is given, decoded shard) does not exist yet."""
    return [
        t
        for t in tasks
        if not (lat_dir / t.name).exists() or (dec_dir is not None and not (dec_dir / t.name).exists())
    ]


def tasks_for_process(pending: list[ShardTask], process_index: int, num_processes: int) -> list[ShardTask]:
    """Process ``process_index`` of ``num_processes`` takes every ``num_processes``-th pending task."""
    return pending[process_index::num_processes]
