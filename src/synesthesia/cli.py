"""The `synesthesia` command: one entry point, each verb a thin module in `synesthesia.commands`.

Every verb takes a pipeline file and ``key.sub=value`` overrides (``synesthesia config
PIPELINE`` lists every key); verbs that write take ``--out DIR``. ``--progress bar|log|none``
(before or after the verb) chooses how long verbs show progress (see :mod:`synesthesia.progress`).
A user mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from synesthesia import UserError, __version__

# verb -> one-line help; the module synesthesia.commands.<verb> implements it.
VERBS = {
    "render": "render the procedural scenes dataset into source shards",
    "ingest": "import an image folder, webdataset tars or a saved HF dataset into source shards",
    "bootstrap": "train small image-conditioned latent diffusion generators on paired data",
    "shard": "stage one: run frozen generators over source shards, write latent sidecar shards",
    "train": "stage two: train the multimodal teacher or an RGB-only student with accelerate",
    "eval": "evaluate a trained or exported model on a split",
    "export": "a student run's timm export: --onnx adds model.onnx, --push-to-hub uploads it",
    "ablate": "run the ablation grid (method x privileged source x seeds) and write tables and plots",
    "inspect": "describe shard sets; --verify re-hashes every shard against its manifest",
    "config": "print the resolved config: every key, its value, its default and its comment",
    "demo": "render, shard, train the teacher and students, print the results table",
}


def add_pipeline_arguments(parser: argparse.ArgumentParser, out_default: str | None = None) -> None:
    """The arguments every pipeline verb shares: the file, overrides and (for writers) --out."""
    parser.add_argument("pipeline", help="pipeline YAML file (see pipelines/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. train.lr=1e-3 or stage=teacher "
        "(`synesthesia config PIPELINE` lists every key, its default and what it does)",
    )
    if out_default is not None:
        parser.add_argument(
            "--out",
            default=out_default,
            help=f"output root: a folder, or an fsspec URL such as s3://bucket/prefix (default: {out_default})",
        )


def int_in(low: int, high: int):
    """An argparse ``type``: an integer in [low, high] (else argparse's one-line error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high}]")
        return value

    return parse


def _add_progress_argument(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--progress",
        choices=("auto", "bar", "log", "none"),
        default=default,
        help="progress of long steps: a bar, a log line every 30 s (no \\r: Slurm, CI) or none "
        "(default auto: a bar on a terminal, else log)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synesthesia", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"synesthesia {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_progress_argument(parser, default=None)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, help_text in VERBS.items():
        module = importlib.import_module(f"synesthesia.commands.{verb}")
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(verb_parser)
        # also after the verb; SUPPRESS keeps a --progress given before it
        _add_progress_argument(verb_parser, default=argparse.SUPPRESS)
        verb_parser.set_defaults(run=module.run)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, with ``key=value`` overrides accepted after options too
    (``synesthesia shard p.yaml --out x train.lr=1e-3``): argparse stops filling the
    ``overrides`` positional at the first option, so what it leaves over is appended."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    from synesthesia.utils import setup_logging

    parser = build_parser()
    args = parse_args(parser, argv)
    if args.verb is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    if args.progress is not None:  # the environment, so launched and worker processes follow it too
        from synesthesia.progress import ENV_MODE

        os.environ[ENV_MODE] = args.progress
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"synesthesia {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("synesthesia").warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
