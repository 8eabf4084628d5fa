"""``python -m repro.cli``: the same command line as the ``repro`` console script."""

import sys

from repro.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
