"""Reading shard sets: one split of a source set zipped with any number of sidecar sets.

Sidecars are aligned shard for shard and key for key with their source; a key
or count mismatch is a clear error naming the set, the shard and the key.

``iter_shard`` reads one tar (plain or gzip) itself, grouping consecutive members
by key as webdataset does, and checks what tar readers take on trust: a tar
must end in its end-of-archive marker (zero blocks) right after its last
member, so one cut inside a header, or at a member boundary, or holding a
corrupt header is reported (``TruncatedTarError``) instead of read as a shorter
tar; a member that claims more bytes than the file holds is truncation, not a
huge read. A field repeated under one key starts a new sample with that key,
so the caller sees (and reports) a duplicate key.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

from synesthesia import UserError
from synesthesia.shards.writer import Manifest
from synesthesia.storage import as_path, forward_seekable, input_size, open_input
from synesthesia.utils import UnsafeFile

logger = logging.getLogger(__name__)

POLICIES = ("raise", "skip", "warn")


class ErrorPolicy:
    """A webdataset error handler that applies a named policy and counts what it saw.

    ``raise`` re-raises, ``skip`` continues silently, ``warn`` logs one line and
    continues. ``counts`` maps exception class names to how often they occurred.
    """

    def __init__(self, policy: str = "warn"):
        if policy not in POLICIES:
            raise UserError(f"unknown error policy {policy!r}; valid: {', '.join(POLICIES)}")
        self.policy = policy
        self.counts: Counter[str] = Counter()

    def __call__(self, exn: BaseException) -> bool:
        self.counts[exn.__class__.__name__] += 1
        if self.policy == "raise":
            raise exn
        if self.policy == "warn":
            logger.warning("skipped a bad sample: %s", exn)
        return True


class ShardMismatchError(UserError):
    """A sidecar set that is not aligned with its source set."""


class TruncatedTarError(tarfile.ReadError):
    """A tar that does not end in its end-of-archive marker after its last member: cut short or corrupt."""


class OversizedMemberError(tarfile.ReadError):
    """A tar member larger than the reader's cap (its bytes are not read)."""


# webdataset's grouping: ``dir/key.field.ext`` → (``dir/key``, ``field.ext``); metadata members skipped.
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
_BLOCK = 512


def shard_paths(directory: str | Path, split: str) -> list[Path]:
    """The shards of ``split`` in a set, in order, as listed by its manifest."""
    manifest = Manifest.read(directory)
    return [as_path(directory) / info.name for info in manifest.splits.get(split, [])]


def iter_shard(
    path: str | Path,
    handler: ErrorPolicy | Callable[[BaseException], Any] | None = None,
    max_member_bytes: int | None = None,
) -> Iterator[dict[str, Any]]:
    """The raw samples (``__key__`` and ``field -> bytes``) of one tar shard, in order.

    Consecutive members ``<key>.<field>`` form a sample (field names lowercased).
    A tar that cannot be opened or read on (truncated data, a corrupt header, no
    end-of-archive marker: ``TruncatedTarError``) goes to ``handler`` once and
    ends the shard; the sample being read when it broke is dropped, since its
    remaining fields may be lost. With ``max_member_bytes``, a larger member is
    not read: it goes to ``handler`` (``OversizedMemberError``) and its sample
    is dropped. Only a regular file is opened (a FIFO or a device is an error).

    ``path`` may be local, any fsspec URL (``s3://…``) or ``pipe:COMMAND``
    (:func:`synesthesia.storage.open_input`); a pipe is read forward only, through a window that
    keeps the end-of-archive check, and a command that exits non-zero is an error at its end.
    """
    handler = handler or ErrorPolicy("raise")
    try:
        fh = _open_input(path)
    except (OSError, tarfile.TarError) as exc:
        handler(exc)
        return
    with fh:
        yield from _tar_samples(fh, str(path), handler, max_member_bytes)


def _open_input(path: str | Path):
    """``path`` opened for reading if it is a regular file; never blocks on a FIFO."""
    try:
        return open_input(path)
    except UnsafeFile:
        raise tarfile.ReadError(f"{path}: not a regular file") from None


def _tar_samples(
    fh, name: str, handler: Callable[[BaseException], Any], max_member_bytes: int | None
) -> Iterator[dict[str, Any]]:
    size = input_size(fh)
    sample: dict[str, Any] | None = None
    bad_sample = False  # the sample being read lost a member (too large)
    try:
        if size is None:  # a pipe
            fh = forward_seekable(fh)
        tar = tarfile.open(fileobj=fh, mode="r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, EOFError):
        handler(tarfile.ReadError(f"{name}: not a readable tar (empty, corrupt or not a tar)"))
        return
    except OSError as exc:
        handler(exc)
        return
    plain = tar.fileobj is fh and size is not None  # uncompressed file: offsets are file offsets
    with tar:
        try:
            while True:
                member = tar.next()
                if member is None:
                    break
                tar.members = []  # stream: keep no member list
                if plain and member.offset_data + member.size > size:
                    raise TruncatedTarError(
                        f"{name}: member {member.name!r} claims {member.size} bytes past the end of the file"
                    )
                match = _KEY_FIELD.match(member.name)
                if not member.isreg() or match is None or _META.match(member.name):
                    continue
                key, field = match.group(1), match.group(2).lower()
                if field.startswith("__"):  # would shadow __key__
                    continue
                if sample is None or key != sample["__key__"] or field in sample:
                    if sample is not None and not bad_sample:
                        yield sample
                    sample, bad_sample = {"__key__": key}, False
                if max_member_bytes is not None and member.size > max_member_bytes:
                    bad_sample = True
                    sample[field] = b""
                    handler(
                        OversizedMemberError(
                            f"{name}: member {member.name!r} of {member.size} bytes is over the"
                            f" {max_member_bytes}-byte cap"
                        )
                    )
                    continue
                extracted = tar.extractfile(member)
                sample[field] = extracted.read() if extracted is not None else b""
            _check_end(tar, name, size if plain else None)
        except (tarfile.TarError, OSError, EOFError) as exc:
            if isinstance(exc, OversizedMemberError):
                raise  # the handler raised it (policy raise): do not report it twice
            if not isinstance(exc, tarfile.ReadError):
                exc = TruncatedTarError(f"{name}: unreadable ({exc.__class__.__name__}: {exc})")
            elif not str(exc).startswith(name):
                exc = exc.__class__(f"{name}: {exc}")
            handler(exc)
            return
    if sample is not None and not bad_sample:
        yield sample


def _check_end(tar: tarfile.TarFile, name: str, size: int | None) -> None:
    """Raise TruncatedTarError unless the bytes after the last member start with the end-of-archive
    marker (zero blocks; a cut inside the marker itself loses nothing)."""
    fileobj = tar.fileobj
    fileobj.seek(tar.offset)
    rest = fileobj.read(2 * _BLOCK)
    if not rest:
        raise TruncatedTarError(
            f"{name}: ends right after a member with no end-of-archive marker (cut short at a member boundary?)"
        )
    if rest.strip(b"\0"):
        where = f"at byte {tar.offset}" + (f" of {size}" if size is not None else "")
        raise TruncatedTarError(f"{name}: truncated or corrupt header {where}")


def iter_aligned_shard(
    source: Path, sidecars: dict[str, Path], handler: ErrorPolicy | None = None, expected: int | None = None
) -> Iterator[dict[str, Any]]:
    """Samples of one source shard merged with the same-index shard of each sidecar.

    With ``expected`` (the manifest's sample count), a shard that yields fewer
    samples (cut short at a member boundary, which tar readers take for its end)
    is an error under the ``raise`` policy and is counted as ``ShortShard`` otherwise.
    """
    position = -1
    streams = {name: iter_shard(path, handler) for name, path in sidecars.items()}
    sentinel = object()
    for position, (sample, *others) in enumerate(
        zip_longest(iter_shard(source, handler), *streams.values(), fillvalue=sentinel)
    ):
        if sample is sentinel:
            raise ShardMismatchError(
                f"{source.name}: a sidecar has more samples than the source ({position}+)"
            )
        merged = dict(sample)
        for name, other in zip(streams, others, strict=True):
            if other is sentinel:
                raise ShardMismatchError(
                    f"sidecar {name} shard {sidecars[name].name} ends at sample {position}, before its source"
                )
            if other["__key__"] != sample["__key__"]:
                raise ShardMismatchError(
                    f"sidecar {name} shard {sidecars[name].name} sample {position}: key {other['__key__']!r}"
                    f" != source key {sample['__key__']!r}"
                )
            for field, value in other.items():
                if field != "__key__":
                    merged[field] = value
        yield merged
    if expected is not None and position + 1 != expected:
        error = ShardMismatchError(
            f"{source}: yielded {position + 1} samples, its manifest says {expected}"
            " (truncated or corrupt: run synesthesia inspect --verify)"
        )
        if handler is None or handler.policy == "raise":
            raise error
        handler.counts["ShortShard"] += 1
        if handler.policy == "warn":
            logger.warning("%s", error)


def aligned_shards(
    source_dir: str | Path, sidecar_dirs: dict[str, str | Path], split: str
) -> list[tuple[Path, dict]]:
    """(source shard, {sidecar name: shard}) per shard index, checked against the manifests."""
    source_dir = as_path(source_dir)
    src_manifest = Manifest.read(source_dir)
    src = src_manifest.splits.get(split, [])
    pairs: list[tuple[Path, dict]] = [(source_dir / info.name, {}) for info in src]
    for name, directory in sidecar_dirs.items():
        manifest = Manifest.read(directory)
        side = manifest.splits.get(split, [])
        if len(side) != len(src):
            raise ShardMismatchError(
                f"sidecar {name} has {len(side)} {split} shards, the source has {len(src)}"
            )
        for (_, mapping), info, src_info in zip(pairs, side, src, strict=True):
            if info.samples != src_info.samples:
                raise ShardMismatchError(
                    f"sidecar {name} shard {info.name} has {info.samples} samples, source has {src_info.samples}"
                )
            mapping[name] = as_path(directory) / info.name
    return pairs


def iter_aligned(
    source_dir: str | Path,
    sidecar_dirs: dict[str, str | Path] | None = None,
    split: str = "train",
    shard_indices: Sequence[int] | None = None,
    handler: ErrorPolicy | None = None,
) -> Iterator[dict[str, Any]]:
    """All samples of ``split`` with their sidecars' fields merged in, shard by shard."""
    pairs = aligned_shards(source_dir, sidecar_dirs or {}, split)
    counts = [info.samples for info in Manifest.read(source_dir).splits.get(split, [])]
    indices = range(len(pairs)) if shard_indices is None else shard_indices
    for i in indices:
        source, sidecars = pairs[i]
        yield from iter_aligned_shard(source, sidecars, handler, expected=counts[i])
