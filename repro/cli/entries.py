"""``repro list``: the registered table entries with the papers' numbers."""

from __future__ import annotations

import argparse

from repro.config.entries import TABLES, format_entry, list_entries, load_entry, natural_order

__all__ = ["add_list_command"]


def _cmd_list(args: argparse.Namespace) -> int:
    """Handler of ``repro list [TABLE]``: print one line per entry, grouped by table."""
    for key in [args.table] if args.table else list(TABLES):
        names = sorted(list_entries(key), key=natural_order)
        if names:
            print(f"# {key}: {TABLES[key]}")
        for name in names:
            print(format_entry(name, load_entry(name)))
    print("Every entry runs in two fidelities: paper (as written) and released (as the public code ran; "
          "`repro fidelity` lists the differences).")
    return 0


def add_list_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``list [TABLE]`` on a subparsers object.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The new sub-parser; its ``func`` default is the handler (returns the exit code 0).
    """
    parser = subparsers.add_parser("list", help="list the experiment entries (one per paper table row)",
                                   description="List the registered experiments with the paper's numbers.")
    parser.add_argument("table", nargs="?", choices=list(TABLES), metavar="TABLE",
                        help=f"one table only: {', '.join(TABLES)}")
    parser.set_defaults(func=_cmd_list)
    return parser
