"""`synesthesia inspect PATH [--verify]`: splits, counts, modalities, latent specs, generator identity."""

from __future__ import annotations

import json
import sys

from synesthesia.shards.verify import describe, find_sets, verify


def add_arguments(parser):
    parser.add_argument("path", help="a shard set folder, or a dataset root holding several")
    parser.add_argument("--verify", action="store_true", help="re-hash every shard against its manifest")
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
            if info.get("generator"):
                print(f"  generator: {json.dumps(info['generator'], sort_keys=True)}")
            if info.get("latent_spec"):
                print(f"  latent spec: {json.dumps(info['latent_spec'], sort_keys=True)}")
            if info.get("skipped"):
                print(f"  skipped: {json.dumps(info['skipped'], sort_keys=True)}")
            if args.verify:
                print("  verify: ok" if info["verified"] else "  verify: FAILED")
                for problem in info["problems"]:
                    print(f"    {problem}", file=sys.stderr)
    return 1 if failed else 0
