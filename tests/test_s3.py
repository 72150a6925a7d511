"""Shard sets in an S3 bucket, against a real S3-compatible server (moto's server mode) on 127.0.0.1.

The server is started once per session; s3fs reaches it through ``AWS_ENDPOINT_URL`` (botocore reads
it), exactly as a user points synesthesia at MinIO or another S3-compatible store. Nothing of fsspec
or s3fs is mocked: every read and write below is an HTTP request to the server.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from stage_one_toy import make_source  # noqa: E402 - registers the toy generator
from synesthesia.cli import main  # noqa: E402
from synesthesia.shards.reader import iter_aligned, iter_shard  # noqa: E402
from synesthesia.shards.writer import Manifest, SplitWriter  # noqa: E402
from synesthesia.stage_one.data import ShardBatches, ShardTask  # noqa: E402
from synesthesia.stage_one.finalize import scan_set  # noqa: E402
from synesthesia.storage import as_path  # noqa: E402

TESTS = Path(__file__).resolve().parent
SET = "toy-conv-depth"


@pytest.fixture(scope="session")
def s3_env():
    """A moto S3 server on a free port of 127.0.0.1, and the environment that points s3fs at it."""
    import fsspec

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        fsspec.filesystem("s3").clear_instance_cache()  # an instance made before would miss the endpoint
        yield env
    server.stop()


@pytest.fixture
def buckets(s3_env, request):
    """Two fresh buckets (source and output) for one test, deleted afterwards."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=False)
    stem = re.sub(r"[^a-z0-9]", "-", request.node.name.lower())[:40].strip("-")
    names = [f"{stem}-src", f"{stem}-out"]
    for name in names:
        fs.mkdir(name)
    yield [f"s3://{name}" for name in names]
    for name in names:
        fs.rm(name, recursive=True)


def source_in(url: str, local_root: Path):
    """The toy source set (``make_source``) written locally under ``local_root`` and again, through
    SplitWriter and Manifest, under ``url``: (remote set folder, local set folder)."""
    local = make_source(local_root)
    m = Manifest.read(local)
    remote = as_path(url) / "toy" / "source"
    splits = {}
    for split, shards in m.splits.items():
        writer = SplitWriter(remote, split, shards[0].samples)
        for info in shards:
            for sample in iter_shard(local / info.name):
                writer.add(sample)
        splits[split] = writer.close()
    Manifest(kind="source", dataset=m.dataset, splits=splits, extra=m.extra).write(remote)
    return remote, local


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_source_set_in_a_bucket_reads_back_and_verifies(buckets, tmp_path: Path, capsys):
    src, _ = buckets
    remote, local = source_in(src, tmp_path)
    assert str(remote) == f"{src}/toy/source"
    assert not Path("s3:").exists()  # nothing collapsed into a local folder named "s3:"

    # byte-identical to the same set written locally, shard for shard, manifest included
    names = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in remote.iterdir()) == names
    for name in names:
        assert (remote / name).read_bytes() == (local / name).read_bytes(), name
    assert list(iter_aligned(str(remote), split="train")) == list(iter_aligned(local, split="train"))

    code, out, _ = _cli(capsys, "inspect", "--verify", f"{src}/toy/source")
    assert code == 0 and "verify: ok" in out and "train 15 in 3 shards" in out
    code, out, _ = _cli(capsys, "inspect", src)  # a dataset root in a bucket: its sets are found
    assert code == 0 and f"{src}/toy/source" in out


def test_verify_in_a_bucket_names_a_changed_or_stray_shard(buckets, tmp_path: Path, capsys):
    src, _ = buckets
    remote, _ = source_in(src, tmp_path)
    shard = remote / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    (remote / "train-000009.tar").write_bytes(b"stray")
    code, out, err = _cli(capsys, "inspect", "--verify", str(remote))
    assert code == 1 and "verify: FAILED" in out
    assert f"{remote}/train-000001.tar: sha256 differs" in err
    assert f"{remote}/train-000009.tar: not listed in the manifest" in err


def test_a_missing_or_hostile_manifest_in_a_bucket_is_one_line(buckets, capsys):
    src, _ = buckets
    code, _, err = _cli(capsys, "inspect", f"{src}/nothing")
    assert code == 2 and err.count("\n") == 1 and "no such path" in err
    (as_path(src) / "big" / "manifest.json").write_bytes(b" " * (65 << 20))
    code, _, err = _cli(capsys, "inspect", f"{src}/big")
    assert code == 2 and "larger than" in err and err.count("\n") == 1


def test_stage_one_reads_source_shards_from_a_bucket(buckets, tmp_path: Path):
    """The stage-one reader streams a bucket's shards, checking sha256 and count as it reads."""
    src, _ = buckets
    remote, local = source_in(src, tmp_path)
    m = Manifest.read(remote)
    tasks = [
        ShardTask(
            split="train", index=i, name=s.name, path=str(remote / s.name), samples=s.samples, sha256=s.sha256
        )
        for i, s in enumerate(m.splits["train"])
    ]
    batches = list(ShardBatches(tasks, lambda sample: {}, batch_size=2))
    assert not [b for b in batches if b["error"]]
    assert [k for b in batches for k in b["keys"]] == [
        s["__key__"] for info in m.splits["train"] for s in iter_shard(local / info.name)
    ]
    # a shard replaced in the bucket fails alone, with a one-line reason
    (remote / "train-000000.tar").write_bytes((local / "train-000001.tar").read_bytes())
    failed = [b for b in ShardBatches(tasks[:1], lambda sample: {}, batch_size=2) if b["error"]]
    assert len(failed) == 1 and "sha256 differs" in failed[0]["error"]


def test_scan_set_sees_shards_other_processes_wrote(buckets, tmp_path: Path):
    """The finalizer's scan refreshes the bucket listing: shards written after it was cached count."""
    src, _ = buckets
    remote, _ = source_in(src, tmp_path)
    m = Manifest.read(remote)
    side = remote.parent / "latents" / "copy"
    (side / "cache_key.json").write_text("{}")
    assert [p.name for p in side.iterdir()] == ["cache_key.json"]  # a listing cached before the shards
    # another process (its own client, whose writes this process's cached listing is not told of)
    copy = "import sys, fsspec; fs = fsspec.filesystem('s3'); [fs.put_file(a, b) for a, b in zip(*[iter(sys.argv[1:])] * 2)]"
    pairs = []
    for info in m.splits["train"]:
        (tmp_path / info.name).write_bytes((remote / info.name).read_bytes())
        pairs += [str(tmp_path / info.name), f"{side}/{info.name}"]
    subprocess.run([sys.executable, "-c", copy, *pairs], check=True, env=dict(os.environ))
    infos, _, _, _, missing = scan_set(side, m, ["train"], "depth.npy", "depth.flag.txt", False)
    assert missing == [] and [i.sha256 for i in infos["train"]] == [s.sha256 for s in m.splits["train"]]


# ----------------------------------------------------------------------------- the whole path


def test_ingest_from_a_bucket_into_a_bucket_equals_a_local_ingest(buckets, tmp_path: Path, capsys):
    """Webdataset tars in one bucket, ingested into another: the same shards as a local ingest."""
    import yaml

    src, out = buckets
    remote_raw, local_raw = source_in(f"{src}/raw", tmp_path / "raw")
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text(
        yaml.safe_dump({"dataset": "ing", "ingest": {"format": "webdataset", "shard_size": 4}})
    )
    pattern = "train-{000000..000002}.tar"
    code, _, err = _cli(
        capsys, "ingest", str(yaml_path), "--out", out, f"ingest.source={remote_raw}/{pattern}"
    )
    assert code == 0, err
    code, _, err = _cli(
        capsys,
        "ingest",
        str(yaml_path),
        "--out",
        str(tmp_path / "local"),
        f"ingest.source={local_raw}/{pattern}",
    )
    assert code == 0, err
    code, text, _ = _cli(capsys, "inspect", "--verify", f"{out}/ing/source")
    assert code == 0 and "verify: ok" in text
    got, want = _files(f"{out}/ing/source"), _files(tmp_path / "local" / "ing" / "source")
    assert sorted(got) == sorted(want)
    assert {k: v for k, v in got.items() if k.endswith(".tar")} == {
        k: v for k, v in want.items() if k.endswith(".tar")
    }
    remote_m, local_m = (
        Manifest.read(f"{out}/ing/source"),
        Manifest.read(tmp_path / "local" / "ing" / "source"),
    )
    assert remote_m.splits == local_m.splits  # the configs differ only in ingest.source


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _shard_cmd(yaml_path: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "stage_one_toy", "shard", str(yaml_path), "--out", out, "--no-progress"]


def _files(directory) -> dict[str, bytes]:
    directory = as_path(directory)
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "throughput.json"}


def test_ingest_then_shard_into_a_bucket_killed_then_resumed_equals_a_local_run(
    buckets, tmp_path: Path, capsys
):
    """The acceptance run: webdataset tars in one bucket are ingested into another; stage one
    writes the latents there, is SIGKILLed after its first shard and rerun; the set verifies and
    equals, byte for byte, the same ingest and stage one written to a local folder."""
    import yaml

    src, out = buckets
    remote_raw, _ = source_in(f"{src}/raw", tmp_path / "raw")
    yaml_path = tmp_path / "p.yaml"
    generator = {"name": "toy-conv", "modality": "depth", "options": {"delay": 0.3}}
    yaml_path.write_text(
        yaml.safe_dump(
            {
                "dataset": "toy",
                "ingest": {"source": f"{remote_raw}/*.tar", "format": "webdataset", "shard_size": 5},
                "shard": {
                    "generators": [generator],
                    "splits": ["train", "val"],
                    "batch_size": 2,
                    "num_workers": 1,
                },
            }
        )
    )
    for root in (out, str(tmp_path / "local")):  # the same config: only --out differs
        code, _, err = _cli(capsys, "ingest", str(yaml_path), "--out", root)
        assert code == 0, err
    assert _files(f"{out}/toy/source") == _files(tmp_path / "local" / "toy" / "source")
    directory = as_path(f"{out}/toy/latents/{SET}")
    proc = subprocess.Popen(_shard_cmd(yaml_path, out), env=_env(), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        directory.fs.invalidate_cache(directory.path)
        if list(directory.glob("*.tar")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    directory.fs.invalidate_cache(directory.path)
    assert 1 <= len(list(directory.glob("*.tar"))) < 4 and not (directory / "manifest.json").exists()

    resumed = subprocess.run(
        _shard_cmd(yaml_path, out), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = re.search(r"(\d+) shards to do \((\d+) complete\)", resumed.stderr)
    assert done and int(done.group(2)) >= 1
    local = subprocess.run(
        _shard_cmd(yaml_path, str(tmp_path / "local")),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert local.returncode == 0, local.stderr[-2000:]

    code, text, _ = _cli(capsys, "inspect", "--verify", str(directory))
    assert code == 0 and "verify: ok" in text
    directory.fs.invalidate_cache(directory.path)
    got, want = _files(directory), _files(tmp_path / "local" / "toy" / "latents" / SET)
    assert sorted(got) == sorted(want) and got == want
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    shutil.rmtree(tmp_path / "local")


# ----------------------------------------------------------------------------- leases in a bucket


def _lease_keepers(n: int, timeout_s: float = 60):
    from synesthesia.stage_one.leases import LeaseKeeper

    return [LeaseKeeper(f"part {i}/{n} (--part)", timeout_s=timeout_s, interval_s=3600) for i in range(n)]


def test_bucket_leases_are_exclusive_and_released(buckets):
    folder = as_path(buckets[1]) / "set"
    first, second = _lease_keepers(2)
    try:
        assert first.claim(folder, "train-000000.tar")
        assert not second.claim(folder, "train-000000.tar")  # fresh: the first job's shard
        assert second.live(folder) == ["train-000000.tar"] and first.live(folder) == []
        first.release(folder, "train-000000.tar")
        assert second.claim(folder, "train-000000.tar")
    finally:
        first.close()
        second.close()
    assert not list(folder.fs.find(folder.path, withdirs=False)), "close() left a lease in the bucket"


def test_a_stale_bucket_lease_is_taken_over_by_exactly_one_claimer(buckets, caplog):
    import socket
    import threading

    folder = as_path(buckets[1]) / "set"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process of this host that is gone: its lease is stale at once, whatever its age
    owner = {"host": socket.gethostname(), "pid": dead.pid, "part": "0/1 (--part)", "token": "dead"}
    (folder / ".val-000000.tar.lease").write_text(json.dumps(owner))
    claimers = _lease_keepers(6)
    results: list[bool] = []
    start = threading.Barrier(len(claimers))

    def claim(keeper):
        start.wait()
        results.append(keeper.claim(folder, "val-000000.tar"))

    with caplog.at_level(logging.WARNING):
        threads = [threading.Thread(target=claim, args=(k,)) for k in claimers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(results) == [False] * 5 + [True]
    assert caplog.text.count("taking over the lease of") == 1
    winner = next(k for k in claimers if k.objects)
    assert winner.token in folder.joinpath(".val-000000.tar.lease").read_text()
    for keeper in claimers:
        keeper.close()


def test_a_bucket_lease_heartbeat_moves_its_time_and_notices_a_takeover(buckets, caplog):
    folder = as_path(buckets[1]) / "set"
    (keeper,) = _lease_keepers(1)
    assert keeper.claim(folder, "test-000000.tar")
    lease = folder / ".test-000000.tar.lease"
    before = lease.fs.info(lease.path, refresh=True)["LastModified"]
    time.sleep(1.1)
    keeper.beat()
    assert lease.fs.info(lease.path, refresh=True)["LastModified"] > before
    lease.write_text('{"host": "elsewhere", "pid": 1, "part": "0/1", "token": "f00d"}')  # taken over
    with caplog.at_level(logging.WARNING):
        keeper.beat()
    assert not keeper.objects and "lost its lease" in caplog.text
    keeper.close()
    assert "f00d" in lease.read_text()  # closing left the new owner's lease alone


def test_render_into_a_bucket_as_two_parts_equals_a_local_render(buckets, tmp_path: Path, capsys):
    from tiny_scenes import tiny_scenes

    pipeline = str(TESTS.parent / "pipelines" / "demo.yaml")
    overrides = tiny_scenes(num_train=24, num_val=8, num_test=8, shard_size=8)
    local = tmp_path / "local"
    assert _cli(capsys, "render", pipeline, *overrides, "--out", str(local))[0] == 0
    for index in (1, 0):  # any order: the part that finds every shard present writes the manifest
        code, _, err = _cli(
            capsys, "render", pipeline, *overrides, "--out", buckets[1], "--part", f"{index}/2"
        )
        assert code == 0, err
    remote = as_path(buckets[1]) / "scenes" / "source"
    remote.fs.invalidate_cache()
    names = sorted(p.name for p in (local / "scenes" / "source").iterdir())
    assert sorted(p.name for p in remote.iterdir()) == names  # no lease, report or temporary left
    for name in names:
        assert (remote / name).read_bytes() == (local / "scenes" / "source" / name).read_bytes(), name
    code, out, err = _cli(capsys, "inspect", f"{buckets[1]}/scenes/source", "--verify")
    assert code == 0, err


def _read_in_child(path, queue) -> None:
    from synesthesia.storage import open_input

    try:
        with open_input(path) as fh:
            queue.put(fh.read())
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(repr(exc))


def test_a_bucket_path_made_before_a_fork_reads_in_the_child(buckets):
    """A DataLoader worker (forked) reads shards through paths its parent built and used: s3fs
    refuses a file system object from another process, so the child must get its own."""
    import multiprocessing

    path = as_path(buckets[1]) / "x.bin"
    path.write_bytes(b"made by the parent")
    assert path.read_bytes() == b"made by the parent"  # the parent's file system object exists now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(path, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert got == b"made by the parent"
