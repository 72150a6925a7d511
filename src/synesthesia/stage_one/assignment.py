"""Which source shards a run does, and which part does which.

- :func:`source_tasks` - the shards of the configured splits in the run's fixed order (splits as
  configured, shards in order), each a picklable :class:`~synesthesia.stage_one.data.ShardTask`;
- :func:`pending_tasks` - those whose sidecar shard is not written yet: a shard that exists under its
  final name is complete and is skipped (that is how a run resumes).

Part *i* of *N* (:class:`synesthesia.parts.Part`: a torchrun rank, ``--part``, a Slurm array task)
takes the shards at positions *p* of :func:`source_tasks` with *p* mod *N* = *i* - over *every*
shard, not only the pending ones, so the assignment is the same however the job was started and
however much of it is done - and then skips its complete ones. Every part lists the same shards
from the same source manifest, so the split needs no communication; the set folder must be on a
file system every part sees. Within a process, the DataLoader workers split their share the same
way (:class:`~synesthesia.stage_one.data.ShardBatches`).
"""

from __future__ import annotations

from pathlib import Path

from synesthesia.shards.writer import Manifest
from synesthesia.stage_one.data import ShardTask
from synesthesia.storage import refresh


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
    for directory in (lat_dir, dec_dir):
        if directory is not None:
            refresh(directory)  # a bucket listing cached before other processes wrote
    return [
        t
        for t in tasks
        if not (lat_dir / t.name).exists() or (dec_dir is not None and not (dec_dir / t.name).exists())
    ]
