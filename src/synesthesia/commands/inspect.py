"""`synesthesia inspect PATH [--verify]`: splits, counts, modalities, latent specs, generator identity,
the software versions that wrote each set.

Source sets also show each split's label mixing across shards; a train split
that looks class-sorted gets a ``warning:`` line on stderr (in ``--json``
mode too, where it is also listed under ``warnings``). The path may be a local folder or any fsspec
URL (``s3://``, ``gs://``, ``hf://``; see ``synesthesia.storage``).
"""

from __future__ import annotations

import json
import sys

from synesthesia.shards.verify import describe, find_sets, verify


def add_arguments(parser):
    parser.add_argument(
        "path",
        help="a shard set folder, or a dataset root holding several: local, or an fsspec URL (s3://bucket/prefix)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-hash and re-count every shard against its manifest (exit 1 when any differs)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args) -> int:
    sets = find_sets(args.path)
    failed = 0
    summaries = []
    for directory in sets:
        info = describe(directory)
        if args.verify:
            problems = verify(directory)
            info["verified"] = not problems
            info["problems"] = problems
            failed += bool(problems)
        summaries.append(info)
    if args.json:
        for info in summaries:
            _print_warnings(info)
        print(json.dumps(summaries, indent=2, sort_keys=True))
    else:
        for info in summaries:
            splits = ", ".join(
                f"{k} {v['samples']} in {v['shards']} shards" for k, v in info["splits"].items()
            )
            print(f"{info['path']}  [{info['kind']}]  {splits}  {info['bytes'] / 1e6:.2f} MB")
            if info.get("modalities") is not None:
                print(f"  modalities: {', '.join(info['modalities']) or 'rgb only'}")
            if info.get("num_classes") is not None:
                print(f"  classes: {info['num_classes']}")
            for split, mix in info.get("label_mixing", {}).items():
                print(f"  {_mixing_line(split, mix)}")
            if info.get("generator"):
                print(f"  generator: {json.dumps(info['generator'], sort_keys=True)}")
            if info.get("latent_spec"):
                print(f"  latent spec: {json.dumps(info['latent_spec'], sort_keys=True)}")
            if info.get("software"):
                versions = ", ".join(f"{k} {v}" for k, v in info["software"].items() if v is not None)
                print(f"  written with: {versions}")
            if info.get("skipped"):
                print(f"  skipped: {json.dumps(info['skipped'], sort_keys=True)}")
            if args.verify:
                print("  verify: ok" if info["verified"] else "  verify: FAILED")
                for problem in info["problems"]:
                    print(f"    {problem}", file=sys.stderr)
            _print_warnings(info)
    return 1 if failed else 0


def _print_warnings(info: dict) -> None:
    for warning in info.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)


def _mixing_line(split: str, mix: dict) -> str:
    """One text line of a split's label mixing (see ``SplitMixing.summary``)."""
    score = "n/a" if mix["mixing"] is None else f"{mix['mixing']:.2f}"
    where = "manifest" if mix["origin"] == "manifest" else "read from shards"
    return (
        f"label mixing {split}: {score}{'  CLASS-SORTED' if mix['class_sorted'] else ''}"
        f"  (shard label entropy min {mix['entropy_min']:.2f} / mean {mix['entropy_mean']:.2f} nats,"
        f" random order {mix['expected_entropy']:.2f}; ≥ {mix['min_classes_per_shard']} of"
        f" {mix['classes']} classes per shard; {where})"
    )
