"""Child processes that die with their parent, and the temporary files a killed process leaves.

- :class:`DieWithParent`: a DataLoader ``worker_init_fn`` (or a process pool's ``initializer``) that
  makes the worker die when the process that built it dies, even by SIGKILL: on Linux
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, elsewhere a daemon thread that watches ``os.getppid()``.
  It calls any ``worker_init_fn`` it wraps afterwards.
- :func:`remove_stale_temps`: a command that starts writing into a set folder first removes the
  temporary files (``.<name>.<random>.tmp``, see :func:`synesthesia.utils.atomic_path`) of dead
  predecessors: those of its own outputs at once, anyone else's once older than a lease. A temporary
  file some live process holds open is never removed (checked through ``/proc`` on Linux).
"""

from __future__ import annotations

import ctypes
import fnmatch
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCH_INTERVAL_S = 1.0
LEASE_S = 3600.0  # a temporary file untouched this long belongs to a dead writer


class DieWithParent:
    """``worker_init_fn`` / pool ``initializer``: the calling process dies with the one that built this.

    Build it in the parent (it records ``os.getpid()``); the worker calls it once at start. On Linux
    the kernel sends the worker SIGKILL when its parent exits (note: when the parent *thread* that
    started it exits, so start workers from a thread that lives as long as they should); elsewhere a
    daemon thread polls ``os.getppid()`` every second. A parent that died before the worker got here
    is noticed at once. ``then`` (an existing ``worker_init_fn``) is called afterwards with the same
    arguments. Picklable, so spawned workers can receive it.
    """

    def __init__(self, then: Callable[..., None] | None = None):
        self.parent = os.getpid()
        self.then = then

    def __call__(self, *args) -> None:
        if not (sys.platform.startswith("linux") and _set_parent_death_signal()):
            threading.Thread(target=_watch_parent, args=(self.parent,), daemon=True).start()
        if os.getppid() != self.parent:  # orphaned before the signal was armed
            os._exit(1)
        if self.then is not None:
            self.then(*args)


def _set_parent_death_signal() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os._exit(1)


def is_temp_name(name: str) -> bool:
    """A hidden temporary name as this project writes them: ``.<name>.<random>.tmp``, ``.source-<random>.tmp``."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_stale_temps(
    directory: str | Path, own: Sequence[str] = (), lease_s: float = LEASE_S
) -> list[Path]:
    """Remove the temporary files and folders in ``directory`` that dead processes left; returns them.

    ``own`` are glob patterns of the temporary names the caller itself writes there (e.g.
    ``.train-*.tar.*.tmp``): since it writes those outputs, an earlier writer of them is a
    predecessor that was killed, and its temporaries go at once. Any other temporary name goes once
    nothing under it was modified for ``lease_s`` seconds. Whatever a live process holds open (on
    Linux, read from ``/proc/<pid>/fd``) stays.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    candidates = sorted(p for p in directory.iterdir() if is_temp_name(p.name))
    if not candidates:
        return []
    held = _open_paths()
    now = time.time()
    removed = []
    for path in candidates:
        real = os.path.realpath(path)
        if any(h == real or h.startswith(real + os.sep) for h in held):
            continue
        mine = any(fnmatch.fnmatchcase(path.name, pattern) for pattern in own)
        if not mine and now - _last_modified(path) < lease_s:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        logger.info(
            "removed %d temporary file(s) left by killed runs in %s: %s",
            len(removed),
            directory,
            ", ".join(p.name for p in removed),
        )
    return removed


def _last_modified(path: Path) -> float:
    """The newest mtime of ``path`` and, for a folder, anything under it (0 when it vanished)."""
    try:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for child in path.rglob("*"):
                newest = max(newest, child.lstat().st_mtime)
    except OSError:
        return 0.0
    return newest


def _open_paths() -> set[str]:
    """The files some process (of those this user may inspect) holds open; empty without ``/proc``."""
    held: set[str] = set()
    proc = Path("/proc")
    if not proc.is_dir():
        return held
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                try:
                    held.add(os.readlink(fd))
                except OSError:
                    continue
        except OSError:  # gone, or another user's
            continue
    return held
