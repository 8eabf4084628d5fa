"""``repro compare`` (RESULTS.md, figures, model index) and ``repro check-results`` (the regression check)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from repro.config.entries import TABLES
from repro.results.compare import check_stale, default_outputs, render_results
from repro.results.regression import ENTRY, check_results

__all__ = ["add_compare_command", "add_check_command"]


def _cmd_compare(args: argparse.Namespace) -> int:
    """Handler of ``repro compare``."""
    if args.check:
        failures = check_stale(args.out, figures=args.figures, index=args.index)
        for failure in failures:
            print(f"STALE {failure}")
        print("compare --check: " + ("FAILED" if failures else f"{args.out}, its model index and figures are current"))
        return 1 if failures else 0
    work = None if args.record_only else Path(args.work_dir or os.environ.get("REPRO_WORK") or "runs")
    path = render_results(work, args.out, tables=args.tables, tolerance=args.tolerance, drop_stale=args.drop_stale,
                          figures=args.figures, index=args.index)
    figures, index = default_outputs(path)
    where = ("the record only" if work is None else f"runs in {work}"
             + ("" if work.is_dir() else " (no such directory: recorded numbers kept)"))
    print(f"wrote {path}, {args.index or index} and {args.figures or figures}/ from {where}")
    return 0


def add_compare_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``compare`` (render RESULTS.md) on a subparsers object.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The new sub-parser; its ``func`` default is the handler (returns the exit code).
    """
    parser = subparsers.add_parser("compare", help="paper vs reproduced numbers -> RESULTS.md, figures, model index",
                                   description="Merge <work>/<entry>/<fidelity>/seed<S>/ run directories into the "
                                               "record of RESULTS.md and render the file, one figure per table and "
                                               "results/model-index.yml from it; text outside the repro:begin/end "
                                               "markers is kept, recorded numbers are never dropped.")
    parser.add_argument("--work-dir", default=None, help="run directory root (default: $REPRO_WORK, else runs)")
    parser.add_argument("--record-only", action="store_true",
                        help="read no runs: re-render the recorded numbers against today's registry")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if RESULTS.md, the model index or a figure is not what the "
                             "record and today's registry render")
    parser.add_argument("--out", default="RESULTS.md", help="markdown file to write (default: RESULTS.md)")
    parser.add_argument("--figures", default=None, help="folder of the per-table PNGs (default: results/figures "
                                                         "beside --out)")
    parser.add_argument("--index", default=None, help="model index to write (default: results/model-index.yml "
                                                       "beside --out)")
    parser.add_argument("--tables", nargs="+", choices=list(TABLES), metavar="TABLE",
                        help=f"read and render these tables only ({', '.join(TABLES)})")
    parser.add_argument("--tolerance", type=float, default=1.0,
                        help="absolute tolerance (points) recorded for entries without one (default 1.0)")
    parser.add_argument("--drop-stale", action="store_true",
                        help="forget the superseded records instead of listing them")
    parser.set_defaults(func=_cmd_compare)
    return parser



def _cmd_check(args: argparse.Namespace) -> int:
    from repro.results.compare import check_stale

    stale = check_stale(args.results)
    for failure in stale:
        print(f"STALE {failure}")
    print(f"{args.results}: " + ("stale" if stale else "current (RESULTS.md, model index and figures render from the "
                                                        "record and today's registry)"))
    summary, failures = check_results(args.results, args.data, work_dir=args.work_dir, checkpoint=args.checkpoint,
                                      quiet=not args.progress)
    print(f"{ENTRY} (fresh run): " + ", ".join(f"{k} {float(v):.2f}" for k, v in summary.items()))
    for failure in failures:
        print(f"REGRESSION {failure}")
    ok = not failures and not stale
    print("check-results: " + (f"all metrics within the tolerance recorded in {args.results}, and it is current"
                               if ok else "FAILED"))
    return 0 if ok else 1


def add_check_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``check-results`` on a subparsers object."""
    parser = subparsers.add_parser("check-results", help="RESULTS.md is current; re-run the demo-scale entry and "
                                                          "compare with it")
    parser.add_argument("--results", default="RESULTS.md")
    parser.add_argument("--data", required=True, help="folder holding nyuv2-mini/")
    parser.add_argument("--work-dir", help="empty folder for the run (default: temporary)")
    parser.add_argument("--checkpoint", help="backbone checkpoint (default: the random ViT-S/8 the record used)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.set_defaults(func=_cmd_check)
    return parser
