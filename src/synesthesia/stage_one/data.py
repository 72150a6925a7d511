"""Stage one, reading side: source shards → per-shard batches, built in DataLoader workers.

The unit of work is one source shard. A worker reads the shard - a local file or an fsspec URL
(``synesthesia.storage.open_input``) - as a stream
(hashing the bytes as they pass, so a shard that differs from its manifest is
caught without a second read), groups tar members into samples with
webdataset's own ``tar_file_iterator``/``group_by_keys``, runs the generator's
``preprocess`` hook on each sample and yields batches of ``batch_size``
consecutive samples. Batches never cross a shard boundary, so the batch
composition of shard *i* - and hence its fp32 numerics - is the same on every
run, whatever the number of workers or processes.

Each yielded item is a plain dict (collated by the DataLoader's
``default_convert``: numpy arrays become tensors, everything else passes):

``split``, ``index``  which shard; ``keys`` every sample key of the batch, in
order; ``good`` positions (into ``keys``) of the samples that were preprocessed,
whose arrays are stacked in ``arrays``; ``flags`` one reason per key ("" when
fine, ``bad_input`` when ``preprocess`` raised ``SchemaError``); ``last`` true
on the shard's final batch, which is yielded only after the shard's sha256 and
sample count were checked against the source manifest; ``read_s`` seconds spent
reading and preprocessing; ``error`` a one-line message (and nothing else) when
the shard could not be read - the consumer then discards that shard.

- :class:`ShardTask` - one source shard to turn into sidecar shards (picklable);
- :class:`ShardBatches` - the ``IterableDataset`` of those batches; worker *w* of
  *W* reads tasks *w*, *w+W*, …;
- :func:`iter_tar_samples`, :func:`read_shard_samples` - the samples of a tar
  (and, read in one pass, its sha256 and size), also used to re-read written sets;
- :class:`SourceShardError` - a source shard that fails (the other shards go on);
- ``BAD_INPUT``, ``NONFINITE`` - the flag reasons a sample can carry.
"""

from __future__ import annotations

import logging
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from synesthesia.shards.schema import SchemaError
from synesthesia.shards.verify import HashingReader, iter_tar_samples
from synesthesia.storage import open_input
from synesthesia.utils import UnsafeFile

logger = logging.getLogger(__name__)

BAD_INPUT = "bad_input"
NONFINITE = "nonfinite_latent"


@dataclass(frozen=True)
class ShardTask:
    """One source shard to turn into sidecar shards (everything a worker needs, picklable)."""

    split: str
    index: int  # position of the shard within its split
    name: str  # file name, the same in the source and in every sidecar set
    path: str  # source shard path or URL (``s3://…``: credentials come from the environment)
    samples: int  # sample count in the source manifest
    sha256: str  # sha256 in the source manifest


class SourceShardError(Exception):
    """A source shard that cannot be read or does not match its manifest (the shard fails, others go on)."""


def read_shard_samples(path: str | Path) -> tuple[list[dict[str, Any]], str, int]:
    """All samples of a shard (local or an fsspec URL), its sha256 and its size in bytes (one read)."""
    with open_input(path) as fh:
        reader = HashingReader(fh)
        samples = list(iter_tar_samples(reader, str(path)))
        reader.drain()
    return samples, reader.hash.hexdigest(), reader.size


def _stack(arrays: list[dict[str, np.ndarray]], task: ShardTask) -> dict[str, np.ndarray]:
    names = list(arrays[0])
    out = {}
    for name in names:
        shapes = {tuple(np.shape(a.get(name))) for a in arrays}
        if len(shapes) != 1 or any(name not in a for a in arrays):
            raise SourceShardError(
                f"{task.name}: preprocessed '{name}' differs in shape within one batch ({sorted(shapes)});"
                " give the generator a fixed input size"
            )
        out[name] = np.ascontiguousarray(np.stack([a[name] for a in arrays]))
    return out


class ShardBatches(IterableDataset):
    """Per-shard batches of preprocessed samples; worker w of W reads tasks w, w+W, …

    ``preprocess`` is the generator's ``preprocess`` hook (numpy only, run in
    the worker). ``on_error="skip"`` flags a sample whose ``preprocess`` raises
    ``SchemaError`` (it gets a zero latent and a flag later); ``"raise"`` fails
    the shard instead.
    """

    def __init__(
        self,
        tasks: list[ShardTask],
        preprocess: Callable[[dict[str, Any]], dict[str, np.ndarray]],
        batch_size: int,
        on_error: str = "skip",
    ):
        super().__init__()
        self.tasks = list(tasks)
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.on_error = on_error

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        tasks = self.tasks if info is None else self.tasks[info.id :: info.num_workers]
        for task in tasks:
            yield from self._shard(task)

    def _batch(self, task: ShardTask, samples: list[dict[str, Any]], read_s: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        keys, good, flags, arrays = [], [], [], []
        for sample in samples:
            key = sample["__key__"]
            keys.append(key)
            try:
                arrays.append(self.preprocess(sample))
            except SchemaError as exc:
                if self.on_error == "raise":
                    raise SourceShardError(f"{task.name}: sample {key}: {exc}") from None
                logger.warning("%s: sample %s flagged (%s)", task.name, key, exc)
                flags.append(BAD_INPUT)
                continue
            good.append(len(keys) - 1)
            flags.append("")
        stacked = _stack(arrays, task) if arrays else {}
        return {
            "split": task.split,
            "index": task.index,
            "keys": keys,
            "good": good,
            "flags": flags,
            "arrays": stacked,
            "last": False,
            "read_s": read_s + time.perf_counter() - t0,
            "error": "",
        }

    def _shard(self, task: ShardTask) -> Iterator[dict[str, Any]]:
        pending: dict[str, Any] | None = None
        chunk: list[dict[str, Any]] = []
        count = 0
        t0 = time.perf_counter()
        try:
            with open_input(task.path) as fh:
                reader = HashingReader(fh)
                samples = iter_tar_samples(reader, task.path)
                while True:
                    try:
                        sample = next(samples)
                    except StopIteration:
                        break
                    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
                        raise SourceShardError(
                            f"{task.name}: unreadable tar ({exc.__class__.__name__}: {exc})"
                        ) from None
                    count += 1
                    chunk.append(sample)
                    if len(chunk) == self.batch_size:
                        item = self._batch(task, chunk, time.perf_counter() - t0)
                        chunk = []
                        if pending is not None:
                            yield pending
                        pending = item
                        t0 = time.perf_counter()
                reader.drain()
            if reader.hash.hexdigest() != task.sha256:
                raise SourceShardError(
                    f"{task.name}: sha256 differs from the source manifest (corrupt or replaced)"
                )
            if count != task.samples:
                raise SourceShardError(
                    f"{task.name}: {count} samples, the source manifest says {task.samples}"
                )
            if chunk:
                if pending is not None:
                    yield pending
                pending = self._batch(task, chunk, time.perf_counter() - t0)
            elif pending is None:  # an empty shard still completes
                pending = {**self._batch(task, [], time.perf_counter() - t0)}
            pending["last"] = True
            yield pending
        except (SourceShardError, OSError, UnsafeFile) as exc:
            message = str(exc) if isinstance(exc, SourceShardError) else f"{task.name}: {exc}"
            yield {"split": task.split, "index": task.index, "error": message}
