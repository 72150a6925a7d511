"""One module per CLI verb: ``add_arguments(parser)`` and ``run(args) -> exit code``."""

import sys


def not_built(verb: str, issue: str) -> int:
    """What a verb that is not built yet does: say so in one line, exit code 2."""
    print(f"synesthesia {verb}: not built yet ({issue})", file=sys.stderr)
    return 2
