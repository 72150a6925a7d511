"""Stage one as independent parts on Ray: one remote task per part, then ``synesthesia shard --finalize``.

    python examples/ray/shard_parts.py PIPELINE [key=value ...] --out /shared/shards --parts 8 \
        [--address auto] [--cpus-per-part 4] [--gpus-per-part 1]

Each Ray task runs ``python -m synesthesia shard PIPELINE --out OUT --part i/N`` in a subprocess of
its worker (a fresh process: CUDA, the DataLoader workers and the logging behave as on the command
line, and a crash of one part takes nothing else down). The parts share nothing but the output
folder, which every node must see at the same path (NFS, Lustre, ...): part *i* computes the shards
at positions *i*, *i + N*, ... and leases each one (``.<shard>.lease``), so a part Ray retries
after a node failure never computes a shard twice - it skips those still leased by the lost attempt
until their heartbeat is ``shard.lease_timeout_s`` old. The last part to finish writes the
manifests; the final ``--finalize`` then checks that, and says which parts to rerun if shards are
missing. Rerunning this script resumes: complete shards are skipped.

Without ``--address`` a local Ray is started here (``--num-cpus`` of this machine), which is how
``tests/test_examples_ray.py`` runs it. Needs the ``ray`` extra: ``pip install 'synesthesia[ray]'``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

import ray

logger = logging.getLogger("shard_parts")
MAX_PARTS = 1 << 16


@ray.remote
def run_part(args: list[str]) -> tuple[int, str]:
    """``python -m synesthesia ARGS`` on this worker: (exit code, the tail of its stderr)."""
    proc = subprocess.run([sys.executable, "-m", "synesthesia", *args], capture_output=True, text=True)
    return proc.returncode, proc.stderr[-4000:]


def shard_args(pipeline: str, overrides: list[str], out: str, *extra: str) -> list[str]:
    return ["shard", pipeline, *overrides, "--out", out, "--no-progress", *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="synesthesia shard as N independent parts on Ray")
    parser.add_argument("pipeline", help="pipeline YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for synesthesia shard")
    parser.add_argument("--out", default="shards", help="output root every node sees (default: shards)")
    parser.add_argument("--parts", type=int, default=4, help="number of independent parts (default: 4)")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address ('auto': the running cluster); default: a local Ray",
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (no --address)")
    parser.add_argument("--cpus-per-part", type=float, default=1.0, help="CPUs Ray reserves per part")
    parser.add_argument("--gpus-per-part", type=float, default=0.0, help="GPUs Ray reserves per part")
    args = parser.parse_args(argv)
    if not 1 <= args.parts <= MAX_PARTS:
        parser.error(f"--parts must be in [1, {MAX_PARTS}]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the tasks may run in other folders, or on other machines: give them absolute paths
    pipeline, out = os.path.abspath(args.pipeline), os.path.abspath(args.out)

    if args.address is None:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=args.address, log_to_driver=False)
    try:
        task = run_part.options(num_cpus=args.cpus_per_part, num_gpus=args.gpus_per_part)
        futures = [
            task.remote(shard_args(pipeline, args.overrides, out, "--part", f"{i}/{args.parts}"))
            for i in range(args.parts)
        ]
        results = ray.get(futures)
    finally:
        ray.shutdown()

    failed = [i for i, (code, _) in enumerate(results) if code != 0]
    for i in failed:
        logger.error("part %d/%d exited %d:\n%s", i, args.parts, results[i][0], results[i][1])
    if failed:
        logger.error(
            "%d of %d parts failed; fix the cause and rerun (complete shards are kept)",
            len(failed),
            args.parts,
        )
        return 1
    logger.info("%d parts done; finalizing", args.parts)
    final = subprocess.run(
        [sys.executable, "-m", "synesthesia", *shard_args(pipeline, args.overrides, out, "--finalize")]
    )
    return final.returncode


if __name__ == "__main__":
    sys.exit(main())
