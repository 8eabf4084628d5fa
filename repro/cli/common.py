"""Arguments several commands share: an entry with its seed, fidelity, work folder and overrides; ``--scale``."""

from __future__ import annotations

import argparse

__all__ = ["add_entry_arguments", "add_scale_argument", "scale_overrides"]


def add_entry_arguments(parser: argparse.ArgumentParser) -> None:
    """``ENTRY [--seed S] [--fidelity F] [--work-dir W] [--scale S] [--set K=V]... [--quiet]`` of run/train/eval."""
    parser.add_argument("entry", help="registered entry (see `repro list`, e.g. table1/depthg-vits8) or a YAML file")
    parser.add_argument("--seed", type=int, help="overrides train.seed")
    parser.add_argument("--fidelity", choices=["paper", "released"],
                        help="paper (as written) or released (as the public code ran); default: the entry's (paper)")
    parser.add_argument("--work-dir", help="work folder (default: $REPRO_WORK or ./runs)")
    add_scale_argument(parser)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set train.max_steps=100 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_scale_argument(parser: argparse.ArgumentParser) -> None:
    """``--scale full|smoke`` (repro/config/scales.yaml); its value reaches the config as ``scale=NAME``."""
    from repro.config.scales import scales

    parser.add_argument("--scale", choices=list(scales()), default=None,
                        help="full (the registered entry, default) or smoke (a dress rehearsal of every stage on a "
                             "few images, minutes on one CPU; runs under <work>/smoke, never in a results table)")


def scale_overrides(args: argparse.Namespace) -> list[str]:
    """``["scale=NAME"]`` when ``--scale`` was given (before ``--set``, so a ``--set`` still wins)."""
    return [f"scale={args.scale}"] if getattr(args, "scale", None) else []
