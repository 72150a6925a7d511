"""Kills leave nothing behind: no orphaned worker, no stale temporary file, no pickle in a checkpoint.

- A SIGKILLed ``shard`` (DataLoader workers) or ``render`` (process pool) takes its workers with it
  within 5 s (Linux: the test reads ``/proc``).
- A resumed ``render`` removes the temporary files its killed predecessor left, keeps a live
  process's, and writes the same bytes as an uninterrupted run.
- A training checkpoint holds no pickle, and resuming one unpickles nothing yet gives the same
  weights as an uninterrupted run; an old (pickled) checkpoint is refused in one line.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.hostile import temp_files
from tests.stage2_shards import TINY_TRAIN, write_tiny_dataset
from torch.utils.data import DataLoader, IterableDataset

from stage_one_toy import make_source  # registers the toy generator
from synesthesia import UserError
from synesthesia.config import PipelineConfig, load_pipeline, replace
from synesthesia.processes import DieWithParent, remove_stale_temps
from synesthesia.sources.scenes import render_dataset
from synesthesia.train import run_dir, train

TESTS = Path(__file__).resolve().parent
SCENES = ["scenes.num_train=18", "scenes.num_val=9", "scenes.num_test=0", "scenes.num_paired=0"]
SCENES += ["scenes.image_size=32", "scenes.lidar_beams=8", "scenes.lidar_azimuth=32"]
SCENES += ["scenes.audio_seconds=0.1", "scenes.shard_size=7"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _children(pid: int) -> set[int]:
    """Live child processes of ``pid``, from ``/proc/*/stat``."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


# `synesthesia ARGS` whose workers take 2 s per sample (stage one's preprocessing, the scenes
# renderer), so a worker is mid-sample when its parent is killed: torch's own watchdog (it polls
# the parent every 5 s between batches) or a closed pipe would end it only long after
SLOW_WORKERS = """
import sys, time
import stage_one_toy  # registers the toy generator
from synesthesia.cli import main
from synesthesia.sources.scenes import dataset

preprocess, render_sample = stage_one_toy.ToyConv.preprocess, dataset.render_sample

def slow_preprocess(self, sample):
    time.sleep(2)
    return preprocess(self, sample)

def slow_render(*args):
    time.sleep(2)
    return render_sample(*args)

stage_one_toy.ToyConv.preprocess, dataset.render_sample = slow_preprocess, slow_render
sys.exit(main(sys.argv[1:]))
"""


def _kill_with_workers_running(tmp_path: Path, args: list[str], workers: int) -> None:
    """Run ``synesthesia ARGS`` with slow workers, SIGKILL it once ``workers`` children run, and
    require every child gone within 5 s."""
    script = tmp_path / "slow_workers.py"
    script.write_text(SLOW_WORKERS)
    cmd = [sys.executable, str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(children) < workers and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            children = _children(proc.pid)
        assert len(children) >= workers, "the workers never started"
        time.sleep(0.5)  # the workers are well into their first samples
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans = [p for p in children if _alive(p)]
        assert not orphans, f"workers {orphans} outlived their killed parent by 5 s"
    finally:
        proc.kill()
        for pid in children:  # leave nothing running, whatever the outcome
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@linux_only
def test_sigkilled_shard_takes_its_dataloader_workers_with_it(tmp_path: Path):
    import yaml

    make_source(tmp_path)
    shard = {
        "generators": [{"name": "toy-conv", "modality": "depth"}],
        "splits": ["train", "val"],
        "batch_size": 2,
        "num_workers": 2,
    }
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"dataset": "toy", "shard": shard}))
    _kill_with_workers_running(tmp_path, ["shard", pipeline, "--out", tmp_path, "--no-progress"], workers=2)


@linux_only
def test_sigkilled_render_takes_its_pool_workers_with_it(tmp_path: Path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: p\ndataset: scenes\n")
    args = ["render", pipeline, "num_train=64", "image_size=32", "--workers", "2", "--out", tmp_path]
    _kill_with_workers_running(tmp_path, args, workers=2)


class _WorkerMark(IterableDataset):
    def __iter__(self):
        yield os.environ.get("SYNESTHESIA_TEST_WORKER", "unset")


def _mark_worker(worker_id: int) -> None:
    os.environ["SYNESTHESIA_TEST_WORKER"] = f"worker {worker_id}"


def test_die_with_parent_runs_the_worker_init_fn_it_wraps():
    assert pickle.loads(pickle.dumps(DieWithParent())).parent == os.getpid()  # spawned workers get it
    loader = DataLoader(
        _WorkerMark(), batch_size=None, num_workers=1, worker_init_fn=DieWithParent(_mark_worker)
    )
    assert list(loader) == ["worker 0"]


# ----------------------------------------------------------------------------- stale temporary files


def _hold_open(path: Path) -> subprocess.Popen:
    """A live process holding ``path`` open for writing (as a writer mid-shard does)."""
    code = "import sys, time; f = open(sys.argv[1], 'ab'); print(flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    proc.stdout.readline()  # the file is open
    return proc


@linux_only
def test_resumed_render_removes_dead_writers_temporaries_and_keeps_live_ones(tmp_path: Path):
    cfg = replace(PipelineConfig(name="t", dataset="scenes"), SCENES)
    clean, _ = render_dataset(cfg, tmp_path / "clean", workers=1)
    resumed = tmp_path / "killed" / "scenes" / "source"
    resumed.mkdir(parents=True)
    # what a killed render leaves: the shards it finished, a half-written shard and manifest
    shutil.copy(clean / "train-000000.tar", resumed / "train-000000.tar")
    (resumed / ".train-000001.tar.k2j4x9_a.tmp").write_bytes((clean / "train-000001.tar").read_bytes()[:700])
    (resumed / ".manifest.json.q8w1e2r3.tmp").write_text('{"kind": "sou')
    old_foreign = resumed / ".notes.txt.zz11.tmp"  # not render's name: another writer's, past the lease
    old_foreign.write_text("x")
    os.utime(old_foreign, (time.time() - 7200, time.time() - 7200))
    fresh_foreign = resumed / ".notes.txt.yy22.tmp"  # another writer's, within the lease
    fresh_foreign.write_text("x")
    live = resumed / ".val-000000.tar.live0001.tmp"  # render's own name, but a live process writes it
    holder = _hold_open(live)
    try:
        directory, did = render_dataset(cfg, tmp_path / "killed", workers=1)
        assert did and directory == resumed
        assert temp_files(resumed) == sorted([live.name, fresh_foreign.name])
    finally:
        holder.kill()
        holder.wait()
    got = {p.name: p.read_bytes() for p in resumed.iterdir() if not p.name.endswith(".tmp")}
    want = {p.name: p.read_bytes() for p in clean.iterdir()}
    assert got == want


def test_remove_stale_temps_by_pattern_and_lease(tmp_path: Path):
    now = time.time()
    folder = tmp_path / ".source-abc.tmp"  # a killed ingest's folder: old, but a file in it is fresh
    (folder / "x").mkdir(parents=True)
    (folder / "x" / "train-000000.tar").write_bytes(b"x")
    os.utime(folder, (now - 7200, now - 7200))
    stale_folder = tmp_path / ".source-def.tmp"
    stale_folder.mkdir()
    (stale_folder / "a").write_bytes(b"a")
    for p in (stale_folder / "a", stale_folder):
        os.utime(p, (now - 7200, now - 7200))
    mine = tmp_path / ".train-000000.tar.abc.tmp"
    mine.write_bytes(b"")
    visible = tmp_path / "train-000000.tar"  # not a temporary name: never touched
    visible.write_bytes(b"")
    os.utime(visible, (now - 7200, now - 7200))
    removed = remove_stale_temps(tmp_path, own=[".train-*.tar.*.tmp"], lease_s=3600)
    assert sorted(p.name for p in removed) == [stale_folder.name, mine.name]
    assert folder.is_dir() and visible.is_file() and not stale_folder.exists()


# ----------------------------------------------------------------------------- checkpoints


def _no_unpickling(*args, **kwargs):
    raise AssertionError("a resume unpickled something")


def test_checkpoints_hold_no_pickle_and_resume_unpickles_nothing(tmp_path: Path, monkeypatch):
    shards = write_tiny_dataset(tmp_path / "shards", counts={"train": 16, "val": 4, "test": 4}, shard_size=3)
    # 8 micro-batches of 2, one per update: checkpoints at steps 3 and 6 (mid-epoch) and 8 (the end)
    overrides = [*TINY_TRAIN, f"train.shards={shards}", "train.stage=teacher", "train.epochs=1"]
    overrides += ["train.batch_size=2", "train.save_every=3", "train.keep_checkpoints=0"]
    overrides += ["teacher.adapter_dropout=0.2"]  # the RNG matters: a resume must restore it
    cfg = load_pipeline(None, overrides)
    train(cfg, tmp_path / "a")
    first = run_dir(cfg, tmp_path / "a")
    step3 = first / "checkpoints" / "step-3"
    names = sorted(str(p.relative_to(step3)) for p in step3.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith((".pkl", ".bin", ".pt", ".pth"))], names
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    assert {"model.safetensors", "optimizer.safetensors", "trainer.json", "rng-0.safetensors"} <= set(names)

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, _no_unpickling)
    train(cfg, tmp_path / "b", resume=str(step3))
    monkeypatch.undo()
    a = load_file(str(first / "checkpoints" / "step-8" / "model.safetensors"))
    b = load_file(str(run_dir(cfg, tmp_path / "b") / "checkpoints" / "step-8" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a checkpoint from before (accelerate's pickles) is refused in one line, not unpickled
    old = tmp_path / "old"
    shutil.copytree(step3, old)
    (old / "trainer.json").unlink()
    (old / "random_states_0.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserError, match="pickled checkpoint"):
        train(cfg, tmp_path / "c", resume=str(old))
    (old / "trainer.json").write_text('{"format": 1, "train_sta')  # a damaged one: one line too
    with pytest.raises(UserError, match="unreadable checkpoint"):
        train(cfg, tmp_path / "c", resume=str(old))
