"""Command line of the published checkpoints: ``repro released list|import|launch`` and ``repro eval-released``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from repro.cli.common import add_scale_argument, scale_overrides

__all__ = ["add_released_commands"]


def _cmd_list(args: argparse.Namespace) -> int:
    from repro.utils.files import file_sha256
    from repro.runs.released import load_registry, local_path, released_dir

    folder = Path(args.dir) if args.dir else released_dir()
    print(f"published checkpoints (data_manifests/released_checkpoints.yaml); local folder: {folder}")
    for item in load_registry():
        path = local_path(item, folder)
        if not path.is_file():
            state = "missing"
        elif not item.sha256:
            state = "present (sha256 not recorded yet: `repro released import` prints it)"
        else:
            state = "present, sha256 ok" if file_sha256(path) == item.sha256 else "present, sha256 DIFFERS"
        print(f"{item.name:26s} {item.file:28s} -> {item.entry:20s} {state}")
        if not path.is_file():
            print(f"{'':26s} fetch: {item.fetch_hint(path)}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from repro.evaluate.report import write_json
    from repro.models.bundle import save_parts
    from repro.models.lightning import load_released
    from repro.runs.released import cfg_record, describe_cfg_difference, find_published, import_summary

    start = time.perf_counter()
    model = load_released(args.file, extra_globals=args.allow_global)
    summary = import_summary(model)
    seconds = time.perf_counter() - start
    c = model.checkpoint
    print(f"{c.path.name}: {model.project} LitUnsupervisedSegmenter, {model.arch}, {model.n_classes} classes "
          f"(+{model.extra_clusters} extra clusters), code dim {model.code_dim}, LHP head "
          f"{'yes' if model.parts.projection is not None else 'no'}")
    print(f"  Lightning {c.lightning_version} ({c.layout}), global_step {c.global_step}, epoch {c.epoch}, "
          f"{c.size / 2**20:.1f} MiB")
    print(f"  sha256 {c.sha256}: {summary['sha256_status']}")
    for note in model.notes:
        print(f"  note: {note}")
    entry = args.entry or (find_published(summary["registry_name"]).entry if summary["registry_name"] else None)
    if entry:
        from repro.config.entries import load_entry

        record = cfg_record(model, load_entry(entry, ["fidelity=released"]))
        summary["cfg_vs_entry"] = record
        diffs = record["differences"]
        print(f"  saved cfg vs {entry} ({record['fidelity']}): "
              + (f"{len(diffs)} difference(s)" if diffs else "no difference in the compared keys"))
        for item in diffs:
            print(f"    {describe_cfg_difference(item)}")
    else:
        print("  saved cfg not compared: not a registered file; pass --entry ENTRY to compare it with an entry")
    print(f"  read and converted in {seconds:.1f} s")
    if args.out:
        import torch

        from repro.utils.files import atomic_path

        out = Path(args.out)
        with atomic_path(out / "backbone.pth") as tmp:
            torch.save(model.backbone_state, tmp)
        save_parts(out / "parts.pt", model.parts, {"step": c.global_step, "arch": model.arch, "source": c.path.name,
                                                   "sha256": c.sha256})
        write_json(out / "checkpoint.json", summary)
        print(f"  wrote {out}/backbone.pth (DINO format), parts.pt, checkpoint.json")
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_eval_released(args: argparse.Namespace) -> int:
    from repro.runs.released import evaluate_released
    from repro.runs.workdir import released_metrics_path

    metrics = evaluate_released(args.entry, args.checkpoint, work_dir=args.work_dir,
                                overrides=scale_overrides(args) + list(args.overrides),
                                crf=args.crf, crf_image=args.crf_image, device=args.device, quiet=args.quiet,
                                force=args.force, extra_globals=args.allow_global)
    s, c = metrics["summary"], metrics["checkpoint"]
    print(f"{metrics['entry']} released checkpoint {c['file']} (sha256 {c['sha256'][:16]}..., step {c['global_step']}): "
          f"{metrics['num_images']} val images, CRF {metrics['protocol']['crf_image'] or 'off'}, "
          f"flip {'on' if metrics['protocol']['flip'] else 'off'}")
    print(f"  unsup Acc {s['unsup_acc']:.2f}  unsup mIoU {s['unsup_miou']:.2f}  linear Acc {s['linear_acc']:.2f}  "
          f"linear mIoU {s['linear_miou']:.2f}")
    if metrics.get("paper"):
        print("  paper:   " + "  ".join(f"{k} {v}" for k, v in metrics["paper"].items()))
    print(f"metrics: {released_metrics_path(args.work_dir or _default_work(), metrics['entry'], metrics['scale'])}")
    return 0


def _default_work():
    from repro.runs.entry import default_work_dir

    return default_work_dir()


def _cmd_launch(args: argparse.Namespace) -> int:
    from repro.cluster.launch import launch_released

    resources = {k: getattr(args, k) for k in ("gpus", "cpus", "mem_gb", "time_min") if getattr(args, k) is not None}
    launched = launch_released(folder=args.dir, executor=args.executor, work_dir=args.work_dir,
                               overrides=args.overrides, partition=args.partition, sif=args.sif, log_dir=args.log_dir,
                               wait=args.wait, resources=resources or None, quiet=args.quiet, dry_run=args.dry_run,
                               scale=args.scale or "full")
    for item in launched:
        print(f"released {'-' if item.job is None else item.job_id:>14s}  {item.data_key} -> {item.entry}")
    print(f"launch record: {launched[0].record}")
    return 0


def add_released_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``released list|import|launch`` and ``eval-released`` on the ``repro`` subparsers object."""
    released = subparsers.add_parser("released", help="the published STEGO/DepthG checkpoints").add_subparsers(
        dest="released_command", required=True, metavar="ACTION")
    lst = released.add_parser("list", help="the published checkpoints, where they are published, which are present")
    lst.add_argument("--dir", help="folder of the local copies (default: $REPRO_WEIGHTS/released)")
    lst.set_defaults(func=_cmd_list)

    imp = released.add_parser("import", help="read a published Lightning checkpoint safely and convert it")
    imp.add_argument("file", help="the .ckpt file")
    imp.add_argument("--out", help="also write backbone.pth (DINO format), parts.pt and checkpoint.json here")
    imp.add_argument("--json", action="store_true", help="print the full record (with the saved hyperparameters)")
    imp.add_argument("--entry", help="compare the saved cfg with this entry's config (default: the registered "
                                     "entry of a registered file)")
    imp.add_argument("--allow-global", action="append", default=[], metavar="NAME",
                     help="read this pickle global as an inert stand-in (never runs its code; repeatable)")
    imp.set_defaults(func=_cmd_import)

    lau = released.add_parser("launch", help="evaluate every present published checkpoint as one array job")
    lau.add_argument("--dir", help="folder of the local copies (default: $REPRO_WEIGHTS/released)")
    lau.add_argument("--executor", choices=["slurm", "local", "auto"], default="auto")
    lau.add_argument("--work-dir", help="shared work folder (default: $REPRO_WORK or ./runs)")
    lau.add_argument("--partition")
    lau.add_argument("--sif", help="Apptainer image (default: $REPRO_SIF)")
    lau.add_argument("--log-dir")
    lau.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_scale_argument(lau)
    for name in ("gpus", "cpus", "mem-gb", "time-min"):
        lau.add_argument(f"--{name}", type=int, help="resource request per task (default 1 GPU, 8 CPUs, 32 GB, 120 min)")
    lau.add_argument("--wait", action="store_true")
    lau.add_argument("--dry-run", action="store_true")
    lau.add_argument("--progress", dest="quiet", action="store_false")
    lau.set_defaults(func=_cmd_launch)

    ev = subparsers.add_parser("eval-released", help="score a published checkpoint on its entry's validation set "
                                                     "in the released protocol -> metrics.json (released-checkpoint)")
    ev.add_argument("entry", help="table entry (e.g. table1/stego-vitb8) or a YAML file")
    ev.add_argument("--checkpoint", help="the .ckpt file (default: the entry's registered file in $REPRO_WEIGHTS/released)")
    ev.add_argument("--work-dir", help="work folder (default: $REPRO_WORK or ./runs)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_scale_argument(ev)
    ev.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None, help="DenseCRF (default: eval.crf)")
    ev.add_argument("--crf-image", choices=["bgr_truncated", "rgb"],
                    help="the CRF image: as the released code builds it (default, eval.crf_image) or the RGB crop")
    ev.add_argument("--device")
    ev.add_argument("--force", action="store_true", help="evaluate again even if metrics.json holds this file's result")
    ev.add_argument("--allow-global", action="append", default=[], metavar="NAME")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=_cmd_eval_released)
