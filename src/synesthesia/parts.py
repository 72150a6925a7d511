"""Which part of a job this process is, when a scheduler starts many independent copies of a command.

``render``, ``ingest`` and ``shard`` split their work into ``count`` parts and do part ``index``: the
items at positions *i* with *i* mod ``count`` = ``index`` of a list every part builds the same way.
The part comes from, in this order:

1. ``--part i/N`` on the command line (any scheduler; ``i`` counts from 0); inside a process group
   of ``W`` processes, process ``r`` does part ``i * W + r`` of ``N * W``;
2. a ``torchrun`` / ``accelerate launch`` process group (``WORLD_SIZE`` > 1, rank ``RANK``): the
   processes of one job, which may wait for each other;
3. a Slurm job array (``SLURM_ARRAY_TASK_ID`` from ``SLURM_ARRAY_TASK_MIN`` in steps of
   ``SLURM_ARRAY_TASK_STEP``, ``SLURM_ARRAY_TASK_COUNT`` tasks), times the tasks of one ``srun``
   (``SLURM_PROCID`` of ``SLURM_NTASKS``) when there are several;
4. otherwise the whole job (part 0 of 1).

Parts from 1 and 3 are *independent*: they never wait for each other and may run at different times
on different machines, so whatever they share lives in files (leases, finalize). Every number read
from the environment is bounded, and a bad one is a one-line error.

- :class:`Part` - ``index``, ``count``, ``origin``; :meth:`Part.take` its share of a list;
- :func:`parse_part` - ``"i/N"`` → ``(i, N)``;
- :func:`resolve_part` - the part of this process, from the CLI value and the environment;
- :func:`add_part_argument` - the ``--part`` option of the verbs that split work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from synesthesia import UserError

T = TypeVar("T")

MAX_PARTS = 1 << 16  # more parts than this is a typo, not a cluster
MAX_ENV_INT = 1 << 31

SINGLE = "single"
CLI = "--part"
TORCH = "torch.distributed"
SLURM_ARRAY = "slurm-array"
SLURM_TASKS = "slurm-tasks"


@dataclass(frozen=True)
class Part:
    """This process is part ``index`` (from 0) of ``count``; ``origin`` says who said so."""

    index: int = 0
    count: int = 1
    origin: str = SINGLE

    @property
    def independent(self) -> bool:
        """Parts that share no process group: they coordinate through files only."""
        return self.origin in (CLI, SLURM_ARRAY, SLURM_TASKS)

    @property
    def whole(self) -> bool:
        return self.count == 1

    def take(self, items: Sequence[T]) -> list[T]:
        """This part's share: every ``count``-th item from position ``index``."""
        return list(items[self.index :: self.count])

    def __str__(self) -> str:
        return f"part {self.index}/{self.count} ({self.origin})"


def parse_part(text: str) -> tuple[int, int]:
    """``"i/N"`` with 0 ≤ i < N ≤ 65536 → ``(i, N)``; a UserError otherwise."""
    index, sep, count = str(text).strip().partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(index), int(count)
    except ValueError:
        raise UserError(f"--part {text!r}: expected i/N, e.g. 0/4 for the first of four parts") from None
    if not 1 <= n <= MAX_PARTS:
        raise UserError(f"--part {text!r}: N must be in [1, {MAX_PARTS}]")
    if not 0 <= i < n:
        raise UserError(f"--part {text!r}: i counts from 0 and must be below N ({n})")
    return i, n


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None, low: int = 0) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise UserError(f"environment variable {name}={raw[:40]!r} is not an integer") from None
    if not low <= value < MAX_ENV_INT:
        raise UserError(f"environment variable {name}={value} is outside [{low}, {MAX_ENV_INT})")
    return value


def _slurm_part(environ: Mapping[str, str]) -> Part | None:
    count = _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
    task = _env_int(environ, "SLURM_ARRAY_TASK_ID")
    array_index, array_count = 0, 1
    if count is not None and task is not None and count > 1:
        low = _env_int(environ, "SLURM_ARRAY_TASK_MIN", default=0)
        step = _env_int(environ, "SLURM_ARRAY_TASK_STEP", default=1, low=1)
        offset = task - low
        if offset < 0 or offset % step:
            raise UserError(
                f"SLURM_ARRAY_TASK_ID={task} is not in the array {low}, {low + step}, ... "
                f"({count} tasks); pass --part i/N instead"
            )
        array_index, array_count = offset // step, count
        if array_index >= array_count:
            raise UserError(
                f"SLURM_ARRAY_TASK_ID={task} is past the array's {count} tasks from {low} in steps of"
                f" {step}; pass --part i/N instead"
            )
    ntasks = _env_int(environ, "SLURM_NTASKS", default=1, low=1)
    procid = _env_int(environ, "SLURM_PROCID", default=0)
    if ntasks > 1 and procid >= ntasks:
        raise UserError(f"SLURM_PROCID={procid} is not below SLURM_NTASKS={ntasks}")
    if ntasks < 2:
        procid = 0
        ntasks = 1
    total = array_count * ntasks
    if total == 1:
        return None
    if total > MAX_PARTS:
        raise UserError(f"{total} Slurm tasks is more than the {MAX_PARTS} parts a job can have")
    return Part(array_index * ntasks + procid, total, SLURM_ARRAY if array_count > 1 else SLURM_TASKS)


def resolve_part(cli: str | None = None, environ: Mapping[str, str] | None = None) -> Part:
    """The part this process does: ``--part``, else the process group, else Slurm, else the whole job."""
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", default=1, low=1)
    rank = _env_int(environ, "RANK", default=0)
    if world > 1 and rank >= world:
        raise UserError(f"RANK={rank} is not below WORLD_SIZE={world}")
    if cli is not None:
        index, count = parse_part(cli)
        if world > 1:  # each process of the group takes its own slice of part i
            if count * world > MAX_PARTS:
                raise UserError(f"--part {cli} times {world} processes is more than {MAX_PARTS} parts")
            return Part(index * world + rank, count * world, CLI)
        return Part(index, count, CLI) if count > 1 else Part()
    if world > 1:
        array = _env_int(environ, "SLURM_ARRAY_TASK_COUNT", default=1)
        if array > 1:
            raise UserError(
                "a Slurm job array of torchrun/accelerate process groups: give each array task its"
                " part explicitly with --part i/N, or use one of the two"
            )
        return Part(rank, world, TORCH)
    return _slurm_part(environ) or Part()


def add_part_argument(parser) -> None:
    """``--part i/N``: do part ``i`` (from 0) of ``N`` independent parts."""
    parser.add_argument(
        "--part",
        default=None,
        metavar="i/N",
        help="do part i (from 0) of N independent parts, e.g. one per Slurm array task or Ray task;"
        " without it the part comes from SLURM_ARRAY_TASK_ID/COUNT or SLURM_PROCID/NTASKS, else the"
        " whole job. Every split gives the same files",
    )
