"""Training runs side by side: ``synesthesia ablate --jobs N``.

:class:`TrainPool` trains up to ``jobs`` runs at once, each as its own
``synesthesia train`` process: the command its results row records, so a run
trained here is the run that command makes. It takes either a list of tasks or a
function that hands it the next task ready to start (the ablation's
:class:`~synesthesia.ablate.schedule.Schedule`, where a finished run can make
others ready), and starts one whenever a slot is free.
Each process gets a slot: on a machine with GPUs, one GPU of the visible ones
(``CUDA_VISIBLE_DEVICES``, round robin when there are more jobs than GPUs); on
a CPU, an equal share of the cores (``OMP_NUM_THREADS``; fewer runs in all than
``jobs`` share the cores among them). Small models do not
use many cores well: two one-thread runs on a 2-core CPU trained the scenes
students 1.75× faster in total than one two-thread run (0.60 + 0.60 against
0.69 step/s).

Each process writes its output to ``<log_dir>/<job>.log``. When one fails, no
new run starts, the running ones finish (their rows are kept), and the error
names the failed run's log and its last line. An interrupt or an error in the
caller stops every running process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from synesthesia import UserError

logger = logging.getLogger(__name__)

MAX_JOBS = 64
POLL_S = 0.5


@dataclass
class Task:
    """One process to run: a name (for logs and errors), its argv and its log file."""

    name: str
    argv: list[str]
    log: Path


def visible_gpus() -> list[str]:
    """The GPUs a child may be given: ``CUDA_VISIBLE_DEVICES`` as set, else every CUDA device."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable torch.cuda: a CPU machine
        return []


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def slot_env(slot: int, jobs: int, gpus: Sequence[str], cores: int) -> dict[str, str]:
    """What the process in ``slot`` (0 ≤ slot < jobs) sees: its GPU, or its share of the cores."""
    threads = str(max(1, cores // jobs))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


class TrainPool:
    """Runs tasks, at most ``jobs`` at once, each in its slot's environment."""

    def __init__(self, jobs: int, *, gpus: Sequence[str] | None = None, cores: int | None = None):
        if not 1 <= jobs <= MAX_JOBS:
            raise UserError(f"--jobs {jobs} is outside [1, {MAX_JOBS}]")
        self.jobs = jobs
        self.gpus = list(visible_gpus() if gpus is None else gpus)
        self.cores = cpu_cores() if cores is None else cores

    def describe(self) -> str:
        if self.gpus:
            return f"{self.jobs} runs at once on GPU(s) {', '.join(self.gpus)}"
        threads = max(1, self.cores // self.jobs)
        return f"{self.jobs} runs at once, {threads} CPU thread(s) each ({self.cores} cores)"

    def run(
        self,
        tasks: Sequence[Task] | Callable[[], Task | None],
        on_done: Callable[[Task, float], None],
        *,
        most: int | None = None,
    ) -> None:
        """Run every task; ``on_done(task, wall seconds)`` is called here, as each one succeeds.

        ``tasks`` is a list, or a function returning the next task ready to start (None when none
        is ready now; it is asked again after each ``on_done``, and the pool ends when it has
        nothing and nothing runs). With fewer tasks than jobs each gets more cores: ``most`` is
        an upper bound on how many a function will hand out (its default: ``jobs``)."""
        if callable(tasks):
            take, most = tasks, self.jobs if most is None else most
        else:
            pending = list(tasks)
            take, most = (lambda: pending.pop(0) if pending else None), len(pending)
        width = max(1, min(self.jobs, most))  # fewer tasks than jobs: each gets more cores
        free = list(range(width))
        running: dict[int, tuple[Task, subprocess.Popen, float]] = {}
        failed: list[tuple[Task, int]] = []
        try:
            while True:
                while free and not failed:
                    task = take()
                    if task is None:
                        break
                    slot = free.pop(0)
                    running[slot] = (task, self._start(task, slot, width), time.perf_counter())
                if not running:
                    break
                time.sleep(POLL_S)
                for slot, (task, proc, start) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[slot]
                    free.append(slot)
                    if code == 0:
                        on_done(task, time.perf_counter() - start)
                    else:
                        failed.append((task, code))
        except BaseException:
            _stop([proc for _, proc, _ in running.values()])
            raise
        if failed:
            task, code = failed[0]
            others = f" ({len(failed) - 1} more failed)" if len(failed) > 1 else ""
            raise UserError(
                f"training {task.name} failed (exit {code}){others}: {_last_line(task.log)} "
                f"(whole log: {task.log})"
            )

    def _start(self, task: Task, slot: int, width: int) -> subprocess.Popen:
        task.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **slot_env(slot, width, self.gpus, self.cores)}
        logger.info("training %s in slot %d (log: %s)", task.name, slot, task.log)
        with open(task.log, "ab") as log:  # the child holds its own descriptor
            return subprocess.Popen(
                task.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + 30
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _last_line(log: Path) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            lines = [ln for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"
