"""The `synesthesia` command: --help on every verb; user mistakes are one line on stderr and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from synesthesia import __version__
from synesthesia.cli import VERBS, build_parser, main


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_on_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: synesthesia {verb}") and VERBS[verb].split()[0] in out


def test_top_level_help_version_and_no_verb(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in VERBS)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    assert main([]) == 2


def test_unknown_verb_is_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def _one_line_error(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"synesthesia {verb}: error: ")
    return err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["ingest", "missing.yaml"], "pipeline file not found"),
        (["ingest", "{pipeline}", "nokeyvalue"], "is not of the form key.sub=value"),
        (["ingest", "{pipeline}", "ingest.nope=1"], "unknown key ingest.nope"),
        (["ingest", "{pipeline}", "ingest.shard_size=many"], "expected an integer"),
        (["ingest", "{pipeline}"], "no ingest source"),
        (["ingest", "{pipeline}", "source={tmp}/nowhere"], "not found"),
        (["ingest", "{bad_yaml}"], "not valid YAML"),
        (["inspect", "{tmp}/nowhere"], "no such path"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("dataset: t\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [1, 2\n")
    args = [a.format(pipeline=pipeline, bad_yaml=bad_yaml, tmp=tmp_path) for a in args]
    assert main(args) == 2
    assert message in _one_line_error(capsys, args[0])


def test_console_script_runs_as_module(tmp_path):
    """``python -m synesthesia`` is the same entry point: a mistake gives one line and exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "synesthesia", "inspect", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"synesthesia inspect: error: no such path: {tmp_path / 'nowhere'}"
    ]
    assert "Traceback" not in proc.stderr


def test_parser_builds_every_verb():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    assert set(sub.choices) == set(VERBS)


def test_overrides_may_follow_options(capsys):
    """``key=value`` overrides after an option still count, in order; anything else stays an error."""
    from synesthesia.cli import parse_args

    parser = build_parser()
    args = parse_args(parser, ["shard", "p.yaml", "a.b=1", "--out", "o", "--no-progress", "c=2", "d.e=[x]"])
    assert (args.pipeline, args.out, args.no_progress) == ("p.yaml", "o", True)
    assert args.overrides == ["a.b=1", "c=2", "d.e=[x]"]
    for stray in (["--nope"], ["plain"]):
        with pytest.raises(SystemExit) as info:
            parse_args(parser, ["shard", "p.yaml", "--out", "o", *stray])
        assert info.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--workers", "-1"], ["--workers", "x"], ["--preview-count", "100000"]])
def test_numeric_options_are_bounded(tmp_path, capsys, option):
    """A numeric option out of range is argparse's one-line usage error (exit 2), never a traceback."""
    with pytest.raises(SystemExit) as info:
        main(["render", "--out", str(tmp_path / "out"), *option, "pipelines/demo.yaml"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"argument {option[0]}" in err
    assert not (tmp_path / "out").exists()
