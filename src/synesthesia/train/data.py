"""Stage-two data: source shards zipped with their sidecars, split over ranks and workers.

One epoch is one pass over a split. Its order is a pure function of
``(seed, epoch)``: the shard order is permuted with that seed, the resulting
global sample sequence is cut into ``world`` contiguous blocks whose sizes
differ by at most one (rank ``r`` takes block ``r``; a block may start or end
inside a shard, whose other samples are read past but not decoded), and each
rank's block is split into pieces over its DataLoader workers. So every sample
is seen exactly once per epoch across ranks, whatever the shard count, and a
rank reads about ``1/world`` of the bytes.

Batching happens in the main process, after the workers' streams are merged,
so the number of batches per epoch is fixed and identical on every rank
(:meth:`ShardLoader.steps_per_epoch`, from the manifests' sample counts; a
rank with one sample fewer gets a last batch one smaller). Collective ops
therefore never wait on a rank that ran out. The DataLoader is kept out of
``accelerator.prepare``: accelerate's default for an iterable dataset
(``dispatch_batches``) would read everything on rank 0 and scatter it.

Per sample (in the workers) :class:`~synesthesia.train.samples.SampleDecoder`
turns the raw merged sample into tensors (RGB view, labels, latents, decoded
signals: :mod:`synesthesia.train.samples`); the sets and sidecars come from
:func:`~synesthesia.train.sidecars.resolve_data` (:mod:`synesthesia.train.sidecars`),
and a sidecar decoded on the fly is decoded per batch in the main process
(:mod:`synesthesia.train.on_the_fly`).

A corrupt set never trains silently: each shard must yield the sample count
its manifest lists (an error naming the shard otherwise; sizes and, with
``train.verify=full``, sha256s are checked when the set is resolved), while a
single bad sample is ``train.on_error``'s to decide. Skips travel in the
stream as markers, through DataLoader workers too, and each loader counts
them in :attr:`ShardLoader.skipped` (``metrics.json``'s ``skipped``).
"""

from __future__ import annotations

import logging
import math
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from synesthesia import UserError
from synesthesia.processes import DieWithParent
from synesthesia.shards.reader import ErrorPolicy, ShardMismatchError, aligned_shards
from synesthesia.shards.schema import SchemaError
from synesthesia.shards.writer import Manifest
from synesthesia.train.on_the_fly import OnTheFlyDecoder
from synesthesia.train.samples import SampleDecoder, _rng, augment_mode, collate
from synesthesia.train.sidecars import DataSpec, read_aligned

logger = logging.getLogger(__name__)

# Markers a ShardStream puts in its stream (see ShardStream.__iter__), and how many skipped
# keys a loader keeps (metrics.json lists them).
SKIPPED = "__skipped__"
FAILED = "__failed__"
MAX_SKIPPED_KEYS = 100


# ----------------------------------------------------------------------------- epoch plan


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in _rng(seed, epoch, 0x5EED).permutation(num_shards)]


def rank_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block [start, stop) of ``total`` samples; sizes differ by at most 1."""
    return (rank * total) // world, ((rank + 1) * total) // world


def rank_pieces(counts: list[int], order: list[int], rank: int, world: int) -> list[tuple[int, int, int]]:
    """The (shard index, first sample, stop sample) pieces of rank ``rank``'s block of an epoch."""
    start, stop = rank_bounds(sum(counts), rank, world)
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            pieces.append((shard, lo - offset, hi - offset))
        offset += counts[shard]
    return pieces


def worker_pieces(
    pieces: list[tuple[int, int, int]], worker: int, workers: int
) -> list[tuple[int, int, int]]:
    """Worker ``worker``'s share of a rank's pieces: whole pieces round-robin, or, when there
    are fewer pieces than workers, equal sample ranges of them."""
    if len(pieces) >= workers:
        return pieces[worker::workers]
    flat = [(shard, i) for shard, lo, hi in pieces for i in range(lo, hi)]
    lo, hi = rank_bounds(len(flat), worker, workers)
    mine = flat[lo:hi]
    out: list[tuple[int, int, int]] = []
    for shard, i in mine:
        if out and out[-1][0] == shard and out[-1][2] == i:
            out[-1] = (shard, out[-1][1], i + 1)
        else:
            out.append((shard, i, i + 1))
    return out


def batch_sizes(num_samples: int, steps: int, batch_size: int) -> list[int]:
    """``steps`` batch sizes summing to ``num_samples``: full batches, the shortfall taken from the end."""
    sizes = [batch_size] * steps
    deficit = steps * batch_size - num_samples
    i = steps - 1
    while deficit > 0 and i >= 0:
        take = min(deficit, sizes[i] - 1)
        sizes[i] -= take
        deficit -= take
        i -= 1
    return sizes


# ----------------------------------------------------------------------------- dataset and loader


class ShardStream(IterableDataset):
    """The decoded samples of one rank's block of an epoch (this worker's share of it).

    Call :meth:`set_epoch` before creating the DataLoader iterator (workers copy
    the dataset when the iterator is created).
    """

    def __init__(
        self,
        spec: DataSpec,
        split: str,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        train: bool = True,
        augment: str = "aligned",
        shuffle_buffer: int = 1000,
        on_error: str = "warn",
    ):
        super().__init__()
        self.pairs = aligned_shards(
            spec.source_dir, {m: s.directory for m, s in spec.sidecars.items()}, split
        )
        infos = Manifest.read(spec.source_dir).splits[split]  # once: not once per shard
        self.counts = [infos[i].samples for i in range(len(self.pairs))]
        self.rank, self.world, self.seed = rank, world, seed
        self.train = train
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.on_error = on_error
        self.decoder = SampleDecoder(spec.sidecars, spec.image_size, seed, train=train, augment=augment)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def pieces(self, epoch: int) -> list[tuple[int, int, int]]:
        order = shard_order(len(self.counts), self.seed, epoch, self.train)
        return rank_pieces(self.counts, order, self.rank, self.world)

    def num_samples(self, rank: int | None = None) -> int:
        start, stop = rank_bounds(sum(self.counts), self.rank if rank is None else rank, self.world)
        return stop - start

    def _raw(self, pieces: list[tuple[int, int, int]], handler: ErrorPolicy) -> Iterator[dict[str, Any]]:
        """The raw samples of ``pieces``; a shard holding fewer samples than a piece needs, or
        more than its manifest lists (seen when a piece ends at the shard's end), is an error."""
        for shard, lo, hi in pieces:
            source, sidecars = self.pairs[shard]
            count, read = self.counts[shard], 0
            for i, sample in enumerate(read_aligned(source, sidecars, handler)):
                if i >= hi:
                    if hi == count:
                        raise ShardMismatchError(
                            f"{source}: more samples than the {count} its manifest lists"
                            f" (corrupt or replaced: run synesthesia inspect --verify)"
                        )
                    break
                read = i + 1
                if i >= lo:
                    yield sample
            if read < hi:
                raise ShardMismatchError(
                    f"{source}: {read} readable samples, its manifest lists {count}"
                    f" (truncated or corrupt: run synesthesia inspect --verify)"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Decoded samples, and markers the loader takes out of the stream (they cross worker
        processes like samples): ``{SKIPPED: key or None, "reason", "n"}`` for each bad sample
        skipped (``train.on_error``), ``{FAILED: message}`` once when the stream cannot go on."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = worker_pieces(self.pieces(self.epoch), worker, workers)
        handler = ErrorPolicy(self.on_error)
        stream: Iterator[dict[str, Any]] = self._raw(mine, handler)
        if self.shuffle_buffer > 1:
            rng = random.Random(int(_rng(self.seed, self.epoch, self.rank, worker, 0xB0F).integers(2**62)))
            stream = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(stream)
        reported: Counter[str] = Counter()  # the reader's skips (no key) already passed on
        try:
            for raw in stream:
                yield from _reader_skips(handler, reported)
                try:
                    sample = self.decoder(raw, self.epoch)
                except SchemaError as exc:
                    if self.on_error == "raise":
                        raise UserError(
                            f"sample {raw.get('__key__')!r}: {exc} (train.on_error=raise)"
                        ) from None
                    handler(exc)
                    reported[exc.__class__.__name__] += 1
                    yield {SKIPPED: raw.get("__key__"), "reason": exc.reason, "n": 1}
                    continue
                yield sample
            yield from _reader_skips(handler, reported)
        except (UserError, SchemaError, tarfile.TarError) as exc:
            yield {FAILED: str(exc)}


def _reader_skips(handler: ErrorPolicy, reported: Counter[str]) -> Iterator[dict[str, Any]]:
    """Markers for the samples the shard reader skipped since the last call (their keys unknown)."""
    for name, total in handler.counts.items():
        if total > reported[name]:
            yield {SKIPPED: None, "reason": name, "n": total - reported[name]}
            reported[name] = total


class ShardLoader:
    """Fixed-length epochs of batches for one rank: ``for batch in loader.epoch(e): ...``.

    ``steps_per_epoch`` is the same on every rank: ``ceil(ceil(N / world) / batch_size)``.
    With ``pad`` (training), a batch left short by skipped bad samples is filled
    by repeating good ones (counted in ``padded``) so every rank still takes
    ``steps_per_epoch`` steps; without it (evaluation), nothing is repeated.
    With sidecars decoded on the fly (``train.decoded_from=latents``), each batch
    yielded is decoded on ``device`` first (:class:`OnTheFlyDecoder`; batches
    skipped on resume are not), its seconds summed in :attr:`decode_s`.
    """

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        pad: bool = True,
        device: str | torch.device | None = None,
    ):
        if batch_size < 1:
            raise UserError("train.batch_size must be at least 1")
        self.stream = stream
        self.pad = pad
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.padded = 0
        # every bad sample skipped while reading (all epochs and passes): ``samples`` distinct
        # (keyed ones once, ones the reader lost without a key each time), ``reads`` every skip,
        # ``keys`` the first MAX_SKIPPED_KEYS keys, sorted, and the count per ``reasons``
        self.skipped: dict[str, Any] = {"samples": 0, "reads": 0, "unkeyed": 0, "keys": [], "reasons": {}}
        self._skipped_keys: set[str] = set()
        decoder = OnTheFlyDecoder(stream.decoder.sidecars, device, stream.decoder.aligned)
        self.decoder = decoder if decoder.sidecars else None

    @property
    def decode_s(self) -> float:
        """Seconds spent decoding latents on the fly so far (0 when nothing is decoded here)."""
        return self.decoder.seconds if self.decoder is not None else 0.0

    def _batch(self, chunk: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(chunk)
        return self.decoder(batch) if self.decoder is not None else batch

    @property
    def steps_per_epoch(self) -> int:
        largest = max(self.stream.num_samples(r) for r in range(self.stream.world))
        return math.ceil(largest / self.batch_size)

    def _samples(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The stream's samples; its markers are taken out here: a skipped sample is recorded in
        :attr:`skipped`, a failed stream raises its UserError."""
        for item in self._stream(epoch):
            if FAILED in item:
                raise UserError(item[FAILED])
            if SKIPPED in item:
                self._record_skip(item)
                continue
            yield item

    def _record_skip(self, item: dict[str, Any]) -> None:
        record, key = self.skipped, item[SKIPPED]
        record["reads"] += item["n"]
        record["reasons"][item["reason"]] = record["reasons"].get(item["reason"], 0) + item["n"]
        if key is None:
            record["unkeyed"] += item["n"]
        elif key not in self._skipped_keys:
            self._skipped_keys.add(key)
            if len(record["keys"]) < MAX_SKIPPED_KEYS:
                record["keys"] = sorted([*record["keys"], key])
        record["samples"] = len(self._skipped_keys) + record["unkeyed"]

    def _stream(self, epoch: int) -> Iterator[dict[str, Any]]:
        self.stream.set_epoch(epoch)
        if self.num_workers == 0:
            yield from self.stream
            return
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=max(2, self.batch_size // self.num_workers),
            generator=torch.Generator().manual_seed(self.stream.seed + epoch),
            worker_init_fn=DieWithParent(),  # no orphan outlives a killed run
        )
        yield from loader

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch``, the first ``skip`` of them left out (resuming mid-epoch)."""
        steps = self.steps_per_epoch
        sizes = batch_sizes(self.stream.num_samples(), steps, self.batch_size)
        samples = self._samples(epoch)
        last: list[dict[str, Any]] = []
        for step, size in enumerate(sizes):
            chunk = []
            for sample in samples:
                chunk.append(sample)
                if len(chunk) == size:
                    break
            if len(chunk) < size and not self.pad:  # evaluation: no collectives per batch, nothing repeated
                if chunk and step >= skip:
                    yield self._batch(chunk)
                continue
            if len(chunk) < size:  # bad samples were skipped: repeat good ones, all ranks take `steps` steps
                pool = chunk or last
                if not pool:
                    raise UserError(f"rank {self.stream.rank} has no readable samples in epoch {epoch}")
                logger.warning(
                    "epoch %d batch %d: %d samples short (bad samples), padded",
                    epoch,
                    step,
                    size - len(chunk),
                )
                self.padded += size - len(chunk)
                chunk = chunk + [pool[i % len(pool)] for i in range(size - len(chunk))]
            last = chunk
            if step >= skip:
                yield self._batch(chunk)
        for _ in samples:  # the rest: skip markers, and the last shard's count check
            pass

    def __len__(self) -> int:
        return self.steps_per_epoch


def build_loader(
    spec: DataSpec,
    split: str,
    train_cfg,
    *,
    rank: int = 0,
    world: int = 1,
    train: bool | None = None,
    device: str | torch.device | None = None,
) -> ShardLoader:
    """The loader of ``split`` for one rank, configured from ``TrainConfig``; ``device`` is where
    sidecars decoded on the fly are decoded (the CPU when None; batches come back on the CPU)."""
    is_train = split == "train" if train is None else train
    if spec.counts.get(split, 0) == 0:
        raise UserError(f"{spec.source_dir} has no {split} samples")
    stream = ShardStream(
        spec,
        split,
        rank=rank,
        world=world,
        seed=train_cfg.seed,
        train=is_train,
        augment=augment_mode(train_cfg.augment),
        shuffle_buffer=train_cfg.shuffle_buffer,
        on_error=train_cfg.on_error,
    )
    return ShardLoader(
        stream,
        train_cfg.batch_size,
        train_cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        pad=is_train,
        device=device,
    )
