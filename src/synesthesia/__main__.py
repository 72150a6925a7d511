"""`python -m synesthesia` is the same as the `synesthesia` console script."""

import sys

from synesthesia.cli import main

if __name__ == "__main__":
    sys.exit(main())
