"""Progress of the long verbs: a tqdm bar on a terminal, else a log line every so often.

:func:`progress` wraps an iterable (or counts to a total by ``update``) and gives
n/N, the rate and the time left either way. The mode is ``SYNESTHESIA_PROGRESS``
(what ``synesthesia --progress`` sets, so launched and worker processes inherit it):

- ``auto`` (default): a bar when stderr is a terminal (or in a notebook), else ``log``;
- ``bar``: a tqdm bar on stderr;
- ``log``: one ``INFO`` line (``desc: n/N unit (p%), r unit/s, ETA h:mm:ss``) every
  ``SYNESTHESIA_PROGRESS_INTERVAL`` seconds (default 30) and one at the end: no ``\\r``
  in a Slurm or CI log;
- ``none``: nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

MODES = ("auto", "bar", "log", "none")
ENV_MODE = "SYNESTHESIA_PROGRESS"
ENV_INTERVAL = "SYNESTHESIA_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0

logger = logging.getLogger("synesthesia.progress")


def mode() -> str:
    """The progress mode this process uses (``auto`` resolved against stderr)."""
    chosen = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if chosen not in MODES:
        chosen = "auto"
    if chosen == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        terminal = isatty is not None and isatty()
        chosen = "bar" if terminal or "ipykernel" in sys.modules else "log"  # a notebook: tqdm's widget
    return chosen


def progress(
    iterable: Iterable[Any] | int | None = None,
    desc: str = "",
    unit: str = "it",
    *,
    total: int | None = None,
    initial: int = 0,
    disable: bool = False,
    interval: float | None = None,
) -> Any:
    """A progress counter over ``iterable`` (or, given an int, to that total): a tqdm bar or a
    :class:`LogProgress`, as :func:`mode` says. Both iterate, ``update(n)``, ``set_postfix(**kw)``
    and ``close()``; ``disable`` (e.g. on every rank but the main one) shows nothing."""
    if isinstance(iterable, int):
        iterable, total = None, iterable
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    chosen = "none" if disable else mode()
    if chosen == "bar":
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, dynamic_ncols=True)
    if interval is None:
        try:
            interval = float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL_S))
        except ValueError:
            interval = DEFAULT_INTERVAL_S
    return LogProgress(
        iterable, desc, unit, total=total, initial=initial, interval=interval, quiet=chosen == "none"
    )


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LogProgress:
    """Progress as log lines: n/N, percent, rate and ETA every ``interval`` seconds and at the end."""

    def __init__(
        self,
        iterable: Iterable[Any] | None,
        desc: str,
        unit: str,
        *,
        total: int | None,
        initial: int = 0,
        interval: float = DEFAULT_INTERVAL_S,
        quiet: bool = False,
    ):
        self.iterable, self.desc, self.unit, self.total = iterable, desc, unit, total
        self.n = self.initial = initial
        self.interval, self.quiet = interval, quiet
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("progress() over a total is counted with update(), not iterated")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._log(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.initial:
                self._log(time.monotonic())

    def line(self, now: float | None = None) -> str:
        """``desc: n/N unit (p%), rate unit/s, ETA h:mm:ss[, postfix]``."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [
            f"{self.desc}: {done} {self.unit}"
            + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")
        ]
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(
                f"ETA {_clock((self.total - self.n) / rate)}"
                if self.n < self.total
                else f"took {_clock(elapsed)}"
            )
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _log(self, now: float) -> None:
        if not self.quiet:
            logger.info("%s", self.line(now))
