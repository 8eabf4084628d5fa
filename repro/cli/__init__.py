"""Floor 9: the ``repro`` command line, the only place argparse lives."""

from repro.cli.main import main

__all__ = ["main"]
