"""Shard leases in an S3 bucket: the same contract as :mod:`~synesthesia.stage_one.leases`, with S3's
conditional writes in place of ``O_EXCL`` and ``rename``.

A lease is the object ``<set>/.<shard>.lease`` holding its owner as JSON; every operation on it is
one conditional request, so no two jobs can both believe they hold it:

- **claim**: ``PutObject`` with ``If-None-Match: *`` - it succeeds only when no lease exists;
- **heartbeat**: ``PutObject`` of the same owner with ``If-Match: <our ETag>``, which moves the
  object's ``LastModified`` (the heartbeat the others read) and fails once someone took it over;
- **takeover** of a stale lease: ``PutObject`` with ``If-Match: <the stale lease's ETag>``, so of
  several claimers that found it stale exactly one replaces it;
- **release**: ``DeleteObject`` with ``If-Match: <our ETag>`` (a store that does not take a
  conditional delete gets a plain one after the owner was read back as ours).

AWS S3 has had conditional writes since 2024, as have MinIO, Ceph RGW, Cloudflare R2 and moto, which
the tests start. Staleness compares this machine's clock with the ``LastModified`` the store stamped,
so clocks must agree to well within ``shard.lease_timeout_s`` (NTP does).

- :func:`supports` - whether a folder is in a store with conditional writes (``s3://``);
- :class:`ObjectLease` - one lease object: :meth:`~ObjectLease.read`, :meth:`~ObjectLease.create`,
  :meth:`~ObjectLease.replace`, :meth:`~ObjectLease.delete`.
"""

from __future__ import annotations

import errno
import json
import time
from typing import Any

MAX_LEASE_BYTES = 4096


def supports(directory: Any) -> bool:
    """Whether ``directory`` (a UPath) lives in a store whose conditional writes leases rely on."""
    fs = getattr(directory, "fs", None)
    protocol = getattr(fs, "protocol", ())
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return "s3" in protocols and hasattr(fs, "call_s3")


def _precondition_failed(exc: OSError) -> bool:
    """s3fs reports HTTP 412 as ``FileExistsError`` (If-None-Match) or ``EINVAL`` (If-Match)."""
    if isinstance(exc, FileExistsError):
        return True
    text = str(exc).lower()
    return exc.errno == errno.EINVAL and ("precondition" in text or "pre-condition" in text)


class ObjectLease:
    """The lease object of one shard: ``<directory>/.<shard>.lease`` in an S3 bucket."""

    def __init__(self, directory: Any, name: str):
        self.path = directory / name
        self.fs = directory.fs
        bucket, _, key = self.path.path.partition("/")
        self.bucket, self.key = bucket, key

    def __str__(self) -> str:
        return str(self.path)

    def _put(self, body: bytes, **condition: str) -> str | None:
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)
        except OSError as exc:
            if _precondition_failed(exc):
                return None
            raise
        return response.get("ETag")

    def _version(self) -> tuple[float, str] | None:
        try:
            info = self.fs.info(self.path.path, refresh=True)
        except FileNotFoundError:
            return None
        return info["LastModified"].timestamp(), info["ETag"]

    def read(self) -> tuple[dict[str, Any], float, str] | None:
        """(owner, last modified as a Unix time, ETag) of one version; ``None`` when there is none.

        The owner is read between two looks at the version, so it belongs to the ETag returned.
        """
        for _ in range(3):
            before = self._version()
            if before is None:
                return None
            try:
                raw = self.fs.cat_file(self.path.path, start=0, end=MAX_LEASE_BYTES + 1)
            except FileNotFoundError:
                continue
            if self._version() != before:
                continue
            try:
                owner = json.loads(raw) if len(raw) <= MAX_LEASE_BYTES else {}
            except ValueError:
                owner = {}
            return (owner if isinstance(owner, dict) else {}), before[0], before[1]
        return {}, time.time(), ""  # rewritten under us three times: a live owner's heartbeat

    def create(self, owner: dict[str, Any]) -> str | None:
        """Create the lease if there is none: our ETag, or ``None`` when another lease exists."""
        return self._put(json.dumps(owner, sort_keys=True).encode(), IfNoneMatch="*")

    def replace(self, owner: dict[str, Any], etag: str) -> str | None:
        """Overwrite the lease only if it is still the version ``etag``: the new ETag, else ``None``.

        With our own ETag this is the heartbeat; with a stale lease's, the takeover.
        """
        return self._put(json.dumps(owner, sort_keys=True).encode(), IfMatch=etag)

    def delete(self, etag: str, token: str) -> None:
        """Remove the lease if it is still version ``etag`` (ours)."""
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=etag)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if _precondition_failed(exc):
                return  # taken over: the lease is someone else's now
            if "notimplemented" not in str(exc).lower().replace(" ", ""):
                raise
        found = self.read()  # a store without conditional deletes
        if found is not None and found[0].get("token") == token:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
