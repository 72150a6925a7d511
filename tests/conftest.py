"""Shared fixtures: paths to ../shared (real weights and fixtures) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from synesthesia.utils import shared_dir

os.environ.setdefault("SYNESTHESIA_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("../shared (weights and fixtures) is not beside this checkout")
    return path


@pytest.fixture(scope="session")
def fixtures(shared: Path) -> Path:
    return shared / "fixtures"
