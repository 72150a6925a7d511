"""Shard leases: two jobs given the same work never both compute a shard.

Before a job computes a shard it claims it: it creates ``.<shard>.lease`` beside the set's shards
with an exclusive create (``O_CREAT | O_EXCL``), holding its owner as JSON (host, pid, part, a
random token, start time, timeout). The lease file's mtime is its heartbeat: one thread per job
touches every lease the job holds every ``timeout / 4`` seconds. The lease is removed when the job
is done with the shard (after the shard was published under its final name, or when it failed).

- a lease whose heartbeat is fresh belongs to its owner: the shard is skipped (it is that job's);
- a lease with no heartbeat for ``timeout_s`` (``shard.lease_timeout_s``) - or one whose owner ran
  on this host and whose process is gone - belongs to a dead job and is taken over: the claimer
  exclusively creates ``<lease>.takeover`` (of several claimers one gets it; the others leave the
  shard), re-reads the lease, renames it aside, checks that what it moved is the stale lease it read
  (else puts it back), deletes it, exclusively creates its own lease and drops ``.takeover``; the
  takeover is logged with the old owner. A ``.takeover`` left by a claimer that died in those few
  milliseconds is removed once it is stale itself;
- a job that finds its lease gone or replaced (its heartbeat stalled past the timeout) logs it and
  stops refreshing; it still finishes its shard - shards are written atomically and are the same
  bytes whoever writes them, so the worst case is a shard computed twice, never a wrong one.

Only ``rename``, ``O_EXCL`` creates, ``link`` and mtimes are used, so leases work on NFS and other
shared file systems. In an S3 bucket the lease is an object claimed, refreshed, taken over and
released with conditional writes (:mod:`~synesthesia.stage_one.object_leases`). Other object stores
have neither: there a claim always succeeds (logged once), and a duplicate job may compute a shard
twice - the same bytes, written atomically. Clock assumption: staleness is ``time.time()`` here minus
the mtime the file server (or the store's ``LastModified``) stamped, so the machines' clocks must
agree to well within ``timeout_s`` (NTP does).

- :func:`is_local` - whether a folder can hold leases (not a bucket URL);
- :func:`lease_path` - where the lease of a shard lives (hidden: inspect, verify and cards skip it);
- :class:`LeaseKeeper` - one job's leases: :meth:`~LeaseKeeper.claim`, :meth:`~LeaseKeeper.release`,
  :meth:`~LeaseKeeper.sweep` (stale leases of shards already complete, left by a killed job),
  :meth:`~LeaseKeeper.live` (is another job still at work here), the heartbeat thread; a context manager that releases what it still holds.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from synesthesia.stage_one.object_leases import ObjectLease, supports
from synesthesia.storage import refresh

logger = logging.getLogger(__name__)

SUFFIX = ".lease"
TAKEOVER = ".takeover"  # <lease>.takeover: held by the one claimer removing a stale lease
MAX_LEASE_BYTES = 4096  # a lease is a few hundred bytes; more is not one of ours
CLAIM_ATTEMPTS = 3  # a takeover that loses a race is retried this often before giving up


def is_local(directory: object) -> bool:
    """Whether leases work in ``directory``: a local (or NFS-mounted) folder, not a bucket URL."""
    return getattr(directory, "protocol", "") in ("", "file", "local") and "://" not in str(directory)


def lease_path(directory: str | Path, name: str) -> Path:
    """``<directory>/.<name>.lease``: hidden, so readers of the set never see it."""
    return Path(directory) / f".{name}{SUFFIX}"


def _read(path: Path) -> tuple[dict[str, Any], float] | None:
    """A lease's owner and mtime; ``None`` when there is none. An unreadable owner is ``{}``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    try:
        mtime = os.fstat(fd).st_mtime
        raw = os.read(fd, MAX_LEASE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        owner = json.loads(raw) if len(raw) <= MAX_LEASE_BYTES else {}
    except ValueError:  # being written this instant, or not ours
        owner = {}
    return (owner if isinstance(owner, dict) else {}), mtime


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "an unknown owner"
    fields = (str(owner.get(k, "?"))[:80] for k in ("host", "pid", "part"))
    return "host {} pid {} ({})".format(*fields)


def _process_gone(owner: dict[str, Any]) -> bool:
    """Whether ``owner`` ran on this host and its process no longer exists."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False
    return False


class LeaseKeeper:
    """The leases of one job (one process), kept fresh by one heartbeat thread.

    ``part`` names the job in the lease (e.g. ``part 1/3 (slurm-array)``); ``timeout_s`` is when a
    silent lease counts as dead; the heartbeat runs every ``interval_s`` (default ``timeout_s / 4``).
    """

    def __init__(self, part: str, timeout_s: float, interval_s: float | None = None):
        if not timeout_s > 0:
            raise ValueError(f"lease timeout must be positive, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s) if interval_s else self.timeout_s / 4
        self.token = secrets.token_hex(8)
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "part": part,
            "token": self.token,
            "started": round(time.time(), 3),
            "timeout_s": self.timeout_s,
        }
        self.held: set[Path] = set()
        self.objects: dict[str, tuple[ObjectLease, str]] = {}  # bucket leases held: ETag of ours
        self._warned_remote = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- claiming

    def stale(self, owner: dict[str, Any], mtime: float) -> bool:
        """A lease is stale when silent for ``timeout_s``, or its owner's process here is gone."""
        return time.time() - mtime > self.timeout_s or _process_gone(owner)

    def _create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(self.owner, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            self.held.add(path)
        self._start_heartbeat()
        return True

    @contextmanager
    def _takeover(self, path: Path) -> Iterator[bool]:
        """Hold ``<lease>.takeover`` (exclusive create) while removing someone else's lease.

        Only its holder may remove another job's lease, so two claimers never move each other's
        fresh leases around. Yields False when another claimer holds it; one left by a claimer that
        died mid-takeover (stale like a lease) is removed so that the next attempt can take it.
        """
        lock = path.with_name(path.name + TAKEOVER)
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            found = _read(lock)
            if found is not None and self.stale(*found):
                lock.unlink(missing_ok=True)
            yield False
            return
        try:
            os.write(fd, json.dumps(self.owner, sort_keys=True).encode())
        finally:
            os.close(fd)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)

    def _remove_stale(self, path: Path) -> tuple[bool | None, dict[str, Any], float]:
        """Remove the lease at ``path`` if it is stale: (True removed / False fresh or contended /
        None absent, its owner, its mtime)."""
        with self._takeover(path) as mine:
            found = _read(path)
            if found is None:
                return None, {}, 0.0
            owner, mtime = found
            if not mine or owner.get("token") == self.token or not self.stale(owner, mtime):
                return False, owner, mtime
            aside = path.with_name(f"{path.name}.{self.token}.stale.tmp")
            try:
                os.rename(path, aside)
            except FileNotFoundError:  # its owner released it this instant
                return None, owner, mtime
            moved = _read(aside)
            if moved is None or moved[0] != owner or moved[1] != mtime:
                # its owner released it and a new claimer created a fresh lease in between: put that
                # back (unless yet another claimer appeared meanwhile) and leave the shard
                try:
                    os.link(aside, path)  # exclusive: fails if a lease is there again
                except FileExistsError:
                    pass
                except OSError:  # no hard links here: a plain rename, unless a lease is there again
                    if not path.exists():
                        os.replace(aside, path)
                aside.unlink(missing_ok=True)
                return False, owner, mtime
            aside.unlink(missing_ok=True)
            return True, owner, mtime

    def _take_over(self, path: Path) -> bool | None:
        """Remove a stale lease and claim the shard: True (ours), False (someone else's), None (retry)."""
        removed, owner, mtime = self._remove_stale(path)
        if removed is False:
            return None if not owner or self.stale(owner, mtime) else False
        if removed:
            logger.warning(
                "%s: taking over the lease of %s (no heartbeat for %.0f s)",
                path.name[1 : -len(SUFFIX)],
                _describe(owner),
                time.time() - mtime,
            )
        return self._create(path)

    def sweep(self, directory: str | Path, names: list[str]) -> int:
        """Remove the stale leases of shards ``names`` (complete ones: a killed job's leftovers).

        A fresh lease stays (its live owner releases it). Returns how many were removed.
        """
        removed = 0
        if supports(directory):
            for name in names:
                lease = ObjectLease(directory, lease_path(".", name).name)
                found = lease.read()
                if found is not None and found[0].get("token") != self.token and self.stale(*found[:2]):
                    lease.delete(found[2], self.token)
                    removed += 1
        for name in names if is_local(directory) else []:
            path = lease_path(directory, name)
            found = _read(path)
            if found is None or found[0].get("token") == self.token or not self.stale(*found):
                continue
            removed += self._remove_stale(path)[0] is True
        if removed:
            logger.info("removed %d stale lease(s) of complete shards in %s", removed, directory)
        return removed

    def claim(self, directory: str | Path, name: str) -> bool:
        """Claim shard ``name`` of ``directory``: True when this job now holds its lease.

        False when another job holds it with a fresh heartbeat (the shard is that job's).
        """
        if supports(directory):
            return self._claim_object(ObjectLease(directory, lease_path(".", name).name), name)
        if not is_local(directory):
            if not self._warned_remote:
                self._warned_remote = True
                logger.warning(
                    "%s is not a local or NFS folder: no shard leases there, so two jobs given the same"
                    " part may both compute a shard (same bytes, written atomically)",
                    directory,
                )
            return True
        path = lease_path(directory, name)
        with self._lock:
            if path in self.held:
                return True
        for _ in range(CLAIM_ATTEMPTS):
            if self._create(path):
                return True
            found = _read(path)
            if found is None:  # released between our create and read: try again
                continue
            owner, mtime = found
            if owner.get("token") == self.token:
                with self._lock:
                    self.held.add(path)
                return True
            if not self.stale(owner, mtime):
                logger.info("%s: leased by %s; skipped", name, _describe(owner))
                return False
            taken = self._take_over(path)
            if taken is not None:
                return taken
        return False

    def _claim_object(self, lease: ObjectLease, name: str) -> bool:
        """:meth:`claim` in a bucket: conditional creates, and a conditional overwrite to take over."""
        with self._lock:
            if str(lease) in self.objects:
                return True
        for _ in range(CLAIM_ATTEMPTS):
            etag = lease.create(self.owner)
            if etag is None:
                found = lease.read()
                if found is None:  # released between our create and read: try again
                    continue
                owner, mtime, current = found
                if not self.stale(owner, mtime):
                    logger.info("%s: leased by %s; skipped", name, _describe(owner))
                    return False
                etag = lease.replace(self.owner, current)
                if etag is None:  # another claimer took it over first
                    continue
                logger.warning(
                    "%s: taking over the lease of %s (no heartbeat for %.0f s)",
                    name,
                    _describe(owner),
                    time.time() - mtime,
                )
            with self._lock:
                self.objects[str(lease)] = (lease, etag)
            self._start_heartbeat()
            return True
        return False

    def release(self, directory: str | Path, name: str) -> None:
        """Remove this job's lease of shard ``name`` (a lease someone took over is left alone)."""
        if supports(directory):
            key = str(ObjectLease(directory, lease_path(".", name).name))
            with self._lock:
                held = self.objects.pop(key, None)
            if held is not None:
                held[0].delete(held[1], self.token)
        elif is_local(directory):
            self._release(lease_path(directory, name))

    def _release(self, path: Path) -> None:
        with self._lock:
            self.held.discard(path)
        found = _read(path)
        if found is not None and found[0].get("token") == self.token:
            path.unlink(missing_ok=True)

    def release_all(self) -> None:
        with self._lock:
            paths = sorted(self.held)
            objects = [self.objects.pop(key) for key in sorted(self.objects)]
        for path in paths:
            self._release(path)
        for lease, etag in objects:
            lease.delete(etag, self.token)

    def live(self, directory: str | Path) -> list[str]:
        """The shards of ``directory`` with a fresh lease of another job (someone is still at work)."""
        names: list[str] = []
        if supports(directory):
            refresh(directory)
            for path in sorted(directory.glob(f".*{SUFFIX}"), key=str):
                found = ObjectLease(directory, path.name).read()
                if found is not None and found[0].get("token") != self.token and not self.stale(*found[:2]):
                    names.append(path.name[1 : -len(SUFFIX)])
            return names
        for path in sorted(Path(directory).glob(f".*{SUFFIX}")) if is_local(directory) else []:
            found = _read(path)
            if found is not None and found[0].get("token") != self.token and not self.stale(*found):
                names.append(path.name[1 : -len(SUFFIX)])
        return names

    # -- heartbeat

    def beat(self) -> None:
        """Refresh every lease still ours; forget (and log) one that was taken over or removed."""
        with self._lock:
            paths = sorted(self.held)
            objects = sorted(self.objects.items())
        for key, (lease, etag) in objects:
            new = lease.replace(self.owner, etag)
            with self._lock:
                if new is None:
                    self.objects.pop(key, None)
                elif key in self.objects:
                    self.objects[key] = (lease, new)
            if new is None:
                logger.warning("%s: lost its lease (heartbeat late); finishing it anyway (same bytes)", lease)
        for path in paths:
            found = _read(path)
            if found is None or found[0].get("token") != self.token:
                logger.warning(
                    "%s: lost its lease to %s (heartbeat late); finishing it anyway (same bytes)",
                    path.name[1 : -len(SUFFIX)],
                    "nobody" if found is None else _describe(found[0]),
                )
                with self._lock:
                    self.held.discard(path)
                continue
            try:
                os.utime(path)
            except FileNotFoundError:
                continue

    def _start_heartbeat(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._heartbeat, name="synesthesia-lease-heartbeat", daemon=True
        )
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except OSError as exc:  # a shared file system hiccup: try again next interval
                logger.warning("lease heartbeat failed: %s", exc)

    def close(self) -> None:
        """Stop the heartbeat and release every lease still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.release_all()

    def __enter__(self) -> LeaseKeeper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
