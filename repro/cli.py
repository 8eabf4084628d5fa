"""The ``repro`` command line: thin argument parsing that calls library functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from repro import __version__

__all__ = ["main", "build_parser"]


def _cmd_weights_init_random(args: argparse.Namespace) -> int:
    from repro.models.backbone import init_random_checkpoint

    path = init_random_checkpoint(args.arch, args.out, seed=args.seed)
    print(f"wrote random-weight {args.arch} checkpoint (DINO format, NOT pretrained) to {path}")
    return 0


def _cmd_weights_info(args: argparse.Namespace) -> int:
    from repro.models.backbone import ARCHS, default_weights_dir

    for arch in ARCHS.values():
        path = default_weights_dir() / arch.filename
        state = "present" if path.is_file() else "missing"
        print(f"{arch.name:18s} {state:8s} {path}\n{'':18s} fetch: wget -O {path} {arch.url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``repro`` command."""
    parser = argparse.ArgumentParser(prog="repro", description=__doc__)
    parser.add_argument("--version", action="version", version=f"repro {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    weights = commands.add_parser("weights", help="backbone weight files").add_subparsers(
        dest="weights_command", required=True, metavar="ACTION"
    )
    init = weights.add_parser("init-random", help="write a random-weight checkpoint in the official DINO format")
    init.add_argument("--arch", required=True, choices=["vit_small_patch8", "vit_base_patch8"])
    init.add_argument("--out", required=True, help="output .pth file")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=_cmd_weights_init_random)
    info = weights.add_parser("info", help="where weights are looked for and how to fetch them")
    info.set_defaults(func=_cmd_weights_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repro`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
