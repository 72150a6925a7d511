"""Shard leases (stage_one/leases.py): claim, skip a fresh foreign lease, take over a stale one, race,
heartbeat, release."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from synesthesia.stage_one.leases import LeaseKeeper, lease_path

SHARD = "train-000003.tar"


def _foreign(directory: Path, age_s: float, host: str = "elsewhere", pid: int = 4242) -> Path:
    path = lease_path(directory, SHARD)
    path.write_text(json.dumps({"host": host, "pid": pid, "part": "part 1/2 (--part)", "token": "f00d"}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_claimed_lease_records_its_owner_and_is_removed_on_release(tmp_path: Path):
    with LeaseKeeper("part 0/2 (--part)", timeout_s=60) as keeper:
        assert keeper.claim(tmp_path, SHARD) and keeper.claim(tmp_path, SHARD)  # idempotent
        path = lease_path(tmp_path, SHARD)
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["part"] == "part 0/2 (--part)" and owner["token"]
        assert path.name == f".{SHARD}.lease"  # hidden: readers of the set skip it
        keeper.release(tmp_path, SHARD)
        assert not path.exists()
        keeper.claim(tmp_path, SHARD)
    assert not path.exists()  # closing releases what is still held


def test_a_fresh_foreign_lease_means_the_shard_is_skipped(tmp_path: Path):
    path = _foreign(tmp_path, age_s=10)
    with LeaseKeeper("part 0/1 (single)", timeout_s=60) as keeper:
        assert not keeper.claim(tmp_path, SHARD)
        keeper.release(tmp_path, SHARD)  # not ours: left alone
    assert json.loads(path.read_text())["token"] == "f00d"


def test_a_stale_lease_is_taken_over_and_the_old_owner_logged(tmp_path: Path, caplog):
    _foreign(tmp_path, age_s=120)
    with caplog.at_level(logging.WARNING), LeaseKeeper("part 0/1 (single)", timeout_s=60) as keeper:
        assert keeper.claim(tmp_path, SHARD)
        assert json.loads(lease_path(tmp_path, SHARD).read_text())["token"] == keeper.token
    assert "taking over the lease of host elsewhere pid 4242 (part 1/2 (--part))" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing moved aside is left


def test_a_lease_of_a_dead_process_on_this_host_is_stale_at_once(tmp_path: Path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    _foreign(tmp_path, age_s=0, host=socket.gethostname(), pid=int(dead.stdout))
    with LeaseKeeper("part 0/1 (single)", timeout_s=3600) as keeper:
        assert keeper.claim(tmp_path, SHARD)
    _foreign(tmp_path, age_s=0, host=socket.gethostname(), pid=os.getppid())  # alive: fresh
    with LeaseKeeper("part 0/1 (single)", timeout_s=3600) as keeper:
        assert not keeper.claim(tmp_path, SHARD)


def _race(tmp_path: Path, claimers: int) -> list[bool]:
    keepers = [LeaseKeeper(f"part {i}/{claimers} (--part)", timeout_s=60) for i in range(claimers)]
    start = threading.Barrier(claimers)
    won = [False] * claimers

    def claim(i: int) -> None:
        start.wait()
        won[i] = keepers[i].claim(tmp_path, SHARD)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(claimers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = json.loads(lease_path(tmp_path, SHARD).read_text())["token"]
    assert [k.token == winner for k in keepers] == won
    for k in keepers:
        k.close()
    return won


def test_racing_claimers_exactly_one_wins(tmp_path: Path):
    for _ in range(20):
        assert sum(_race(tmp_path, 8)) == 1
        assert not lease_path(tmp_path, SHARD).exists()


def test_racing_takeovers_of_a_stale_lease_exactly_one_wins(tmp_path: Path):
    for _ in range(20):
        _foreign(tmp_path, age_s=120)
        assert sum(_race(tmp_path, 8)) == 1
        assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".takeover"))]


def test_a_takeover_left_by_a_dead_claimer_goes_once_stale(tmp_path: Path):
    _foreign(tmp_path, age_s=120)
    stuck = lease_path(tmp_path, SHARD).with_name(f".{SHARD}.lease.takeover")
    stuck.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "dead"}))
    os.utime(stuck, (time.time() - 120, time.time() - 120))
    with LeaseKeeper("part 0/1 (single)", timeout_s=60) as keeper:
        assert keeper.claim(tmp_path, SHARD)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_heartbeat_refreshes_the_mtime_and_notices_a_takeover(tmp_path: Path, caplog):
    with LeaseKeeper("part 0/1 (single)", timeout_s=60, interval_s=0.05) as keeper:
        assert keeper.claim(tmp_path, SHARD)
        path = lease_path(tmp_path, SHARD)
        old = time.time() - 50
        os.utime(path, (old, old))
        deadline = time.monotonic() + 10
        while path.stat().st_mtime < old + 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.time() - path.stat().st_mtime < 5  # refreshed

        path.unlink()
        _foreign(tmp_path, age_s=0)  # someone took it over (our heartbeat had stalled)
        with caplog.at_level(logging.WARNING):
            deadline = time.monotonic() + 10
            while keeper.held and time.monotonic() < deadline:
                time.sleep(0.02)
        assert not keeper.held and "lost its lease to host elsewhere" in caplog.text
    assert json.loads(path.read_text())["token"] == "f00d"  # closing left the new owner's lease


def test_sweep_removes_only_stale_leases(tmp_path: Path):
    stale = _foreign(tmp_path, age_s=120)
    keeper = LeaseKeeper("finalize", timeout_s=60)
    assert keeper.sweep(tmp_path, [SHARD, "val-000000.tar"]) == 1 and not stale.exists()
    fresh = _foreign(tmp_path, age_s=1)
    assert keeper.sweep(tmp_path, [SHARD]) == 0 and fresh.exists()


def test_a_store_without_conditional_writes_has_no_leases_and_every_claim_succeeds(caplog):
    class Bucket:  # a UPath of a store with no conditional writes (S3 buckets: tests/test_s3.py)
        protocol = "gs"

        def __str__(self) -> str:
            return "gs://bucket/set"

    with caplog.at_level(logging.WARNING), LeaseKeeper("part 0/2 (--part)", timeout_s=60) as keeper:
        assert keeper.claim(Bucket(), SHARD) and keeper.claim(Bucket(), SHARD)
        assert keeper.live(Bucket()) == [] and keeper.sweep(Bucket(), [SHARD]) == 0
        keeper.release(Bucket(), SHARD)
    assert caplog.text.count("no shard leases there") == 1
