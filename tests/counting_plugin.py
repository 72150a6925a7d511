"""A counting generator for tests/test_parts.py (and the Ray example's test); not part of the package.

``counting-toy`` is the toy conv of ``stage_one_toy`` that also appends ``<pid> <key>`` for every key
it encodes to the file named by ``$SYNESTHESIA_TEST_COUNT_LOG`` (when set), so a test can count how
often each shard was inferred across independent processes. Import it (``PYTHONPATH=tests``) before
``synesthesia.cli.main`` to register it.
"""

from __future__ import annotations

import os

import torch

from stage_one_toy import ToyConv
from synesthesia.generators.base import GENERATORS

LOG_ENV = "SYNESTHESIA_TEST_COUNT_LOG"


@GENERATORS.register("counting-toy")
class CountingToy(ToyConv):
    name = "counting-toy"

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        log = os.environ.get(LOG_ENV)
        if log:
            with open(log, "a") as fh:  # one short append per batch: whole lines even with several writers
                fh.write("".join(f"{os.getpid()} {key}\n" for key in keys))
        return super().forward(batch, keys)


def encoded(log: str | os.PathLike) -> list[tuple[int, str]]:
    """The ``(pid, key)`` pairs logged so far (empty when nothing was encoded)."""
    if not os.path.exists(log):
        return []
    with open(log) as fh:
        return [(int(pid), key) for pid, key in (line.split() for line in fh if line.strip())]
