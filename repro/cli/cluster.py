"""``repro launch`` and ``repro plan``: SLURM array jobs of tables and entries, and what they cost."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from repro.cluster.costs import PlanError
from repro.cluster.launch import launch, seed_numbers
from repro.cluster.plan import DEFAULT_PROFILE, FEATURE_STORE_MODES, print_plan
from repro.cli.common import add_scale_argument
from repro.config.scales import get_scale

__all__ = ["add_launch_command", "add_plan_command", "add_prepare_data_command", "parse_seeds"]


def parse_seeds(text: str) -> int | list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a list (0,2,5), got {text!r}") from None


def _cmd_launch(args: argparse.Namespace) -> int:
    resources = {k: getattr(args, k) for k in ("gpus", "cpus", "mem_gb", "time_min") if getattr(args, k) is not None}
    launched = launch(args.targets, seeds=args.seeds, fidelity=args.fidelity, executor=args.executor,
                      work_dir=args.work_dir,
                      overrides=args.overrides, partition=args.partition, sif=args.sif, log_dir=args.log_dir,
                      wait=args.wait, resources=resources or None, array_parallelism=args.array_parallelism,
                      quiet=args.quiet, dry_run=args.dry_run, scale=args.scale or "full")
    for item in launched:
        what = item.entry if item.seed is None else f"{item.entry}/{item.fidelity} seed {item.seed}"
        job_id = "-" if item.job is None else item.job_id
        print(f"{item.kind:5s} {job_id:>14s}  {what}  [{item.data_key}]")
    if launched:
        print(f"launch record: {launched[0].record}")
    if args.dry_run and args.scale not in (None, "full"):
        print(f"\n{args.scale} scale: {get_scale(args.scale).about}; no cost plan (minutes per entry on one CPU)")
    elif args.dry_run:  # the projected cost of what would be submitted ($REPRO_PROFILE, else the default profile)
        from repro.cluster.plan import PlanError, print_plan

        print()
        try:
            print_plan(args.targets, seeds=len(seed_numbers(args.seeds)), fidelity=args.fidelity, overrides=args.overrides)
        except PlanError as exc:
            print(f"repro launch --dry-run: no cost plan: {exc}")
            return 2
    return 0


def add_launch_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``launch TARGET... [options]`` on a subparsers object.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The new sub-parser; its ``func`` default is the handler (returns the exit code).
    """
    parser = subparsers.add_parser(
        "launch", help="run tables/entries as SLURM array jobs (or locally) with requeue on time limits",
        description="Submit data-stage jobs and one array job per table (entries x seeds) via submitit. "
                    "Writes <work-dir>/launch/<timestamp>.json with the job ids.")
    parser.add_argument("targets", nargs="+", metavar="TARGET", help="table keys (table1, demo, ...) or entry names")
    parser.add_argument("--seeds", type=parse_seeds, default=1, help="number of seeds (3 -> 0,1,2) or a list (0,2,5)")
    parser.add_argument("--fidelity", choices=["paper", "released", "both"], default="both",
                        help="which profile(s) to run every entry in (default: both)")
    parser.add_argument("--executor", choices=["slurm", "local", "auto"], default="auto",
                        help="slurm, local (this machine, one job at a time) or auto (slurm if sbatch is found)")
    parser.add_argument("--work-dir", help="shared work folder (default: $REPRO_WORK or ./runs)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--sif", help="Apptainer image to run the jobs in (default: $REPRO_SIF)")
    parser.add_argument("--log-dir", help="submitit logs and pickles (default: <work-dir>/launch/logs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every entry (repeatable)")
    add_scale_argument(parser)
    parser.add_argument("--gpus", type=int, help="GPUs per job: 1 (default) or 0; N > 1 is refused (one process per job)")
    parser.add_argument("--cpus", type=int, help="CPUs per job (default 8)")
    parser.add_argument("--mem-gb", type=int, help="memory per job in GB (default: by dataset)")
    parser.add_argument("--time-min", type=int, help="time limit per job slice in minutes (default: by dataset/arch)")
    parser.add_argument("--array-parallelism", type=int, help="most tasks of an array running at once")
    parser.add_argument("--wait", action="store_true", help="wait for every job; exit non-zero if one failed")
    parser.add_argument("--dry-run", action="store_true", help="plan and write the record, submit nothing")
    parser.add_argument("--progress", dest="quiet", action="store_false",
                        help="progress bars in the job logs (default: quiet logs)")
    parser.set_defaults(func=_cmd_launch)
    return parser




def _cmd_plan(args: argparse.Namespace) -> int:
    try:
        print_plan(args.targets, seeds=args.seeds, fidelity=args.fidelity, overrides=args.overrides,
                   profile=args.profile, json_out=args.json, feature_store=args.feature_store)
    except PlanError as exc:
        print(f"repro plan: {exc}")
        return 2
    return 0


def add_plan_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``plan TARGET... [--profile FILE] [--seeds N] [--fidelity F]`` on a subparsers object.

    Returns:
        The new sub-parser; its ``func`` default is the handler (exit code 0, or 2 for a bad profile).
    """
    parser = subparsers.add_parser(
        "plan", help="projected GPU- and CPU-hours of tables/entries from a measured stage profile",
        description="Project the cost of running tables or entries (every fidelity, every seed) from a stage "
                    "profile written by benchmarks/bench_stages.py. 'all' = every table of make reproduce-all.")
    parser.add_argument("targets", nargs="+", metavar="TARGET", help="all, table keys (table1, supp4, ...) or entries")
    parser.add_argument("--profile", metavar="NAME|FILE",
                        help="stage profile of the target hardware: a JSON file (benchmarks/gpu_check.sh writes one) or "
                             "the name of one in benchmarks/profiles/ (published-amp-pt240-rtx4090, "
                             "published-amp-pt240-rtx3090, published-fp32-v100, cpu-2core); default: $REPRO_PROFILE, "
                             f"else {DEFAULT_PROFILE[:-5]} (published figures, said in the output)")
    parser.add_argument("--feature-store", choices=FEATURE_STORE_MODES, default="auto",
                        help="train.feature_store for every entry: auto (the cheaper, named with its --set), on, off, "
                             "or config (as each entry says)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per entry and fidelity (default 3)")
    parser.add_argument("--fidelity", choices=["paper", "released", "both"], default="both")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every entry (repeatable), as for repro launch")
    parser.add_argument("--json", help="also write the plan as JSON to this file")
    parser.set_defaults(func=_cmd_plan)
    return parser


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    from repro.runs.entry import prepare_data

    paths = prepare_data(args.entry, work_dir=args.work_dir, overrides=args.overrides, quiet=args.quiet)
    print(json.dumps({k: None if v is None else str(v) for k, v in asdict(paths).items()}))
    return 0


def add_prepare_data_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``prepare-data ENTRY [--work-dir W] [--set K=V]... [--quiet]``: the data job of ``repro launch``.

    Runs the shared data stages of one entry (those already done are skipped) and prints the data
    paths as one JSON object; the data job runs it inside the Apptainer image.
    """
    parser = subparsers.add_parser("prepare-data", help="the shared data stages of one entry (the data job of a launch)")
    parser.add_argument("entry")
    parser.add_argument("--work-dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=_cmd_prepare_data)
    return parser
