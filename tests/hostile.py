"""Shared checks for the hostile-input tests (tests/test_hostile_*.py, tests/test_kills.py).

A hostile input must end in one of two ways: refused (exit code 2 and one
``synesthesia <verb>: error: ...`` line on stderr, no traceback) or skipped and
counted (exit 0 with a warning). Either way nothing may be written outside
``--out`` and no temporary file may be left behind.
"""

from __future__ import annotations

from pathlib import Path

from synesthesia.cli import main

TEMP_MARKERS = (".tmp", ".partial", ".incomplete")


def tree(root: Path) -> set[str]:
    """Every file and folder under ``root``, as paths relative to it."""
    return {str(p.relative_to(root)) for p in Path(root).rglob("*")}


def temp_files(root: Path) -> list[str]:
    """Leftover temporary files or folders under ``root`` (any name carrying a temp marker)."""
    return sorted(
        str(p.relative_to(root)) for p in Path(root).rglob("*") if any(m in p.name for m in TEMP_MARKERS)
    )


def run(capsys, args: list[str]) -> tuple[int, list[str]]:
    """``synesthesia ARGS`` in this process: (exit code, stderr lines). An uncaught exception — a
    traceback for a user — fails the calling test by propagating."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(capsys, args: list[str], root: Path, out: Path, message: str = "") -> str:
    """``args`` must exit 2 with one error line (containing ``message``), write nothing under
    ``root`` outside ``out`` and leave no temporary file; returns the error line."""
    before = tree(root)
    code, err = run(capsys, args)
    verb = str(args[0])
    errors = [line for line in err if line.startswith(f"synesthesia {verb}: error: ")]
    assert code == 2, (code, err)
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert message in errors[0], (message, errors[0])
    assert_contained(root, out, before)
    return errors[0]


def assert_contained(root: Path, out: Path, before: set[str]) -> None:
    """Nothing new under ``root`` outside ``out``, and no temporary file anywhere under ``root``."""
    out_rel = str(Path(out).resolve().relative_to(Path(root).resolve()))
    new = {p for p in tree(root) - before if p != out_rel and not p.startswith(out_rel + "/")}
    assert not new, f"written outside --out: {sorted(new)}"
    assert not temp_files(root), temp_files(root)
