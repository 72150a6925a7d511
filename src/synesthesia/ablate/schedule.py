"""The order an ablation trains its runs in: each run starts once what it needs has finished.

A teacher and a ``ce`` cell need nothing; a tuning run, and a cell of a method that is not
tuned, need their source's teacher; a cell of a tuned method needs the setting chosen on val
from all of that method's tuning runs at its source. The runner adds a run to the
:class:`Schedule` only when it is ready, with a callback (``then``) that adds the runs waiting
for it. Ready runs start best rank first: teachers, then tuning runs, then cells
lowest seed first, so a stopped ablation mostly holds whole seeds.

With ``--jobs N`` a free slot takes the best ready run at once: no step waits for the slowest
run of the one before (a lone teacher's spare cores train the ``ce`` cells; the cells of one
source start while another source's tuning runs still train). One at a time, the same order.
A run whose folder already holds a finished run is reused where it comes up, with no process.
"""

from __future__ import annotations

import heapq
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from synesthesia import UserError
from synesthesia.ablate.parallel import Task
from synesthesia.ablate.runs import TIMING, Job, _finished
from synesthesia.utils import atomic_write_text

if TYPE_CHECKING:
    from synesthesia.ablate.runner import Ablation

logger = logging.getLogger(__name__)

Then = Callable[[Job, dict[str, Any]], None]

# a ready run's rank is (stage, its seed's place in ablate.seeds): smaller starts first
TEACHERS, TUNING_RUNS, CELLS = 0, 1, 2


@dataclass(order=True)
class _Entry:
    rank: tuple[int, int]
    order: int  # ties: the order the runs were added in
    job: Job = field(compare=False)
    then: Then = field(compare=False)


class Schedule:
    """The ready runs of one ablation, trained by its pool (``--jobs``) or one by one."""

    def __init__(self, ablation: Ablation, tick: Callable[[str], None] | None = None):
        self.ablation = ablation
        self.tick = tick
        self._ready: list[_Entry] = []
        self._added = 0
        self._started: dict[str, _Entry] = {}

    def add(self, job: Job, at: tuple[int, int], then: Then) -> None:
        """``job`` is ready: train it (or reuse its finished run), then call ``then(job, result)``."""
        heapq.heappush(self._ready, _Entry(at, self._added, job, then))
        self._added += 1

    def run(self, most: int | None = None) -> None:
        """Train every run added, and every run their callbacks add; ``most`` bounds how many
        processes there will be (fewer than ``--jobs``: each gets more cores)."""
        pool = self.ablation.pool
        if pool is None:
            while self._ready:
                entry = heapq.heappop(self._ready)
                fresh = _finished(self.ablation.run_folder(entry.job.name)) is None
                self._finish(entry, self.ablation.run_job(entry.job), fresh)
            return
        pool.run(self._take, self._trained, most=most)

    def _take(self) -> Task | None:
        """The pool's next process: the best ready run that has not finished (finished ones are
        reused here, which may make more runs ready)."""
        while self._ready:
            entry = heapq.heappop(self._ready)
            if _finished(self.ablation.run_folder(entry.job.name)) is not None:
                self._finish(entry, self.ablation.run_job(entry.job), fresh=False)
                continue
            self._started[entry.job.name] = entry
            return self.ablation._task(entry.job)
        return None

    def _trained(self, task: Task, seconds: float) -> None:
        entry = self._started.pop(task.name)
        job = entry.job
        run = self.ablation.run_folder(job.name)
        if _finished(run) is None:
            raise UserError(f"training {job.name} exited 0 but left no finished run in {run}")
        record = {"seconds": seconds, "jobs": self.ablation.pool.jobs, **self.ablation._record(job)}
        atomic_write_text(run / TIMING, json.dumps(record) + "\n")
        self._finish(entry, self.ablation.run_job(job), fresh=True)

    def _finish(self, entry: _Entry, result: dict[str, Any], fresh: bool) -> None:
        entry.then(entry.job, result)
        if fresh and self.tick is not None:
            self.tick(entry.job.name)
