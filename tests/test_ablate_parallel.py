"""`synesthesia ablate --jobs N`: runs side by side, each in its slot's environment; failures and interrupts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from synesthesia import UserError
from synesthesia.ablate.grid import read_results
from synesthesia.ablate.parallel import Task, TrainPool, slot_env
from synesthesia.ablate.planning import measured_speed
from synesthesia.ablate.runner import Ablation
from test_ablate_runner import fake_stage_one, shards, tiny_pipeline  # noqa: F401 - shards is a fixture

# A child that records when it ran and what it was given, then sleeps and exits with a code.
CHILD = """
import json, os, sys, time
out, seconds, code = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
start = time.time()
time.sleep(seconds)
keys = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
record = {"start": start, "end": time.time(), "env": {k: os.environ.get(k) for k in keys}}
open(out, "w").write(json.dumps(record))
print("child says goodbye with", code, flush=True)
sys.exit(code)
"""


def task(tmp_path: Path, name: str, seconds: float, code: int = 0) -> Task:
    argv = [sys.executable, "-c", CHILD, str(tmp_path / f"{name}.json"), str(seconds), str(code)]
    return Task(name, argv, tmp_path / "logs" / f"{name}.log")


def record(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_slot_env_shares_cores_or_gives_one_gpu_each():
    assert slot_env(0, 2, [], cores=4) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert slot_env(1, 3, [], cores=2)["OMP_NUM_THREADS"] == "1"  # never 0
    assert [slot_env(s, 3, ["4", "7"], cores=8)["CUDA_VISIBLE_DEVICES"] for s in range(3)] == ["4", "7", "4"]


def test_at_most_jobs_run_at_once_and_each_is_reported(tmp_path):
    pool = TrainPool(2, gpus=[], cores=4)
    done = []
    pool.run([task(tmp_path, f"t{i}", 0.8) for i in range(4)], lambda t, s: done.append((t.name, s)))
    assert sorted(n for n, _ in done) == ["t0", "t1", "t2", "t3"]
    assert all(s >= 0.8 for _, s in done)
    spans = [(record(tmp_path, f"t{i}")["start"], record(tmp_path, f"t{i}")["end"]) for i in range(4)]
    # at no start were more than 2 running (itself included), and at some start 2 were
    running = [sum(1 for s, e in spans if s <= start < e) for start, _ in spans]
    assert max(running) == 2
    assert {record(tmp_path, f"t{i}")["env"]["OMP_NUM_THREADS"] for i in range(4)} == {"2"}
    assert "child says goodbye" in (tmp_path / "logs" / "t0.log").read_text()


def test_a_step_with_fewer_runs_than_jobs_shares_the_cores_among_them(tmp_path):
    TrainPool(2, gpus=[], cores=4).run([task(tmp_path, "alone", 0.1)], lambda t, s: None)
    assert record(tmp_path, "alone")["env"]["OMP_NUM_THREADS"] == "4"


def test_a_failure_lets_running_runs_finish_starts_no_more_and_names_the_log(tmp_path):
    pool = TrainPool(2, gpus=["0", "1"], cores=2)
    done = []
    tasks = [task(tmp_path, "bad", 0.1, code=3), task(tmp_path, "slow", 2.0), task(tmp_path, "later", 0.1)]
    with pytest.raises(UserError) as err:
        pool.run(tasks, lambda t, s: done.append(t.name))
    message = str(err.value)
    assert "training bad failed (exit 3)" in message and "child says goodbye with 3" in message
    assert str(tmp_path / "logs" / "bad.log") in message and "\n" not in message
    assert done == ["slow"]  # the running one finished and was reported
    assert not (tmp_path / "later.json").exists()  # nothing new started after the failure
    assert {record(tmp_path, n)["env"]["CUDA_VISIBLE_DEVICES"] for n in ("bad", "slow")} == {"0", "1"}


def test_an_error_in_the_caller_stops_the_running_processes(tmp_path):
    pool = TrainPool(2, gpus=[], cores=2)

    def explode(t, s):
        raise RuntimeError("caller failed")

    with pytest.raises(RuntimeError, match="caller failed"):
        pool.run([task(tmp_path, "quick", 0.1), task(tmp_path, "long", 30.0)], explode)
    assert not (tmp_path / "long.json").exists()  # stopped, not left running for 30 s


def test_a_run_made_ready_by_another_starts_in_the_free_slot_without_a_step_barrier(tmp_path):
    """Tasks from a function: "after" is handed out only once "first" has finished, and starts
    then, while the long independent "other" still runs (no waiting for a whole step)."""
    pool = TrainPool(2, gpus=[], cores=2)
    ready = [task(tmp_path, "first", 0.3), task(tmp_path, "other", 2.5)]
    done = []

    def finished(t, seconds):
        done.append(t.name)
        if t.name == "first":
            ready.append(task(tmp_path, "after", 0.3))

    pool.run(lambda: ready.pop(0) if ready else None, finished, most=3)
    assert done == ["first", "after", "other"]
    first, other, after = (record(tmp_path, n) for n in ("first", "other", "after"))
    assert first["end"] <= after["start"] < other["end"]
    assert {r["env"]["OMP_NUM_THREADS"] for r in (first, other, after)} == {"1"}


@pytest.mark.parametrize("jobs", [0, 65])
def test_jobs_are_bounded(jobs):
    with pytest.raises(UserError, match="--jobs"):
        TrainPool(jobs)


def test_tiny_grid_with_two_jobs_trains_every_run_as_its_command(tmp_path, shards, monkeypatch):  # noqa: F811
    cfg, path = tiny_pipeline(tmp_path, sources=["latent"])
    monkeypatch.setattr("synesthesia.stage_one.run_stage_one", fake_stage_one([]))
    out, runs = tmp_path / "results", tmp_path / "runs"
    ablation = Ablation(cfg, path, shards=shards, runs=runs, out=out, jobs=2)
    assert any("--jobs: 2 runs at once" in line for line in ablation.plan().lines)
    ablation.run()  # run_job refuses a run whose written config is not this ablation's

    rows = read_results(out)
    cells = {n for n, r in rows.items() if r["role"] == "cell"}
    assert cells == {f"{m}-latent-s{s}" for m in ("kd", "messy") for s in (0, 1)}
    assert sum(1 for r in rows.values() if r["role"] == "tune") == 2
    trained = sorted(p.parent.name for p in (runs / cfg.name).glob("*/metrics.json"))
    assert len(trained) == 1 + 2 + 3  # teacher, the KD grid (one reused as kd-latent-s0), 3 cells
    for name in trained:
        assert json.loads((runs / cfg.name / name / "ablate_time.json").read_text())["jobs"] == 2
        assert (out / "logs" / f"{name}.log").is_file()
    # speeds of runs that shared the machine do not feed --plan's estimate
    assert measured_speed(runs, "cpu") == {}
    # a rerun has nothing left: every run is kept, no process starts
    monkeypatch.setattr(
        "synesthesia.ablate.parallel.TrainPool._start",
        lambda *a: pytest.fail("a finished run was trained again"),
    )
    Ablation(cfg, path, shards=shards, runs=runs, out=out, jobs=2).run()
