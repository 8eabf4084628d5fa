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


def _cmd_weights_init_depth(args: argparse.Namespace) -> int:
    from repro.depth.hf import save_random_model

    path = save_random_model(args.kind, args.out, seed=args.seed)
    print(f"wrote a tiny random-weight {args.kind} model (NOT pretrained) to {path}")
    return 0


def _cmd_data_verify(args: argparse.Namespace) -> int:
    from repro.data.manifest import verify_dataset

    report = verify_dataset(args.dataset, args.root)
    print("\n".join(report.lines))
    return 0 if report.ok else 1


def _cmd_prepare(args: argparse.Namespace) -> int:
    from repro.data import get_dataset
    from repro.data.pipeline import prepare_stage

    dataset = get_dataset(args.dataset, args.root, args.split)
    out = prepare_stage(dataset, args.out, five_crop=not args.no_five_crop, size=args.size, progress=not args.quiet)
    print(f"crops: {out}")
    return 0


def _cmd_depth(args: argparse.Namespace) -> int:
    from repro.data.pipeline import depth_stage

    out = depth_stage(args.crops, args.out, source=args.source, weights=args.weights, batch_size=args.batch_size,
                      device=args.device, progress=not args.quiet)
    print(f"depth: {out}")
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    from repro.data.pipeline import shards_stage

    out = shards_stage(args.crops, args.depth, args.out, shard_size=args.shard_size, depth_source=args.depth_source)
    print(f"shards: {out}")
    return 0


def _cmd_knn(args: argparse.Namespace) -> int:
    from repro.data.pipeline import knn_stage

    out = knn_stage(args.shards, args.out, arch=args.arch, checkpoint=args.checkpoint, k=args.k,
                    batch_size=args.batch_size, device=args.device)
    print(f"knn table: {out}")
    return 0


def _entry_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("entry", help="registered entry (see `repro list`, e.g. table1/depthg-vits8) or a YAML file")
    parser.add_argument("--seed", type=int, help="overrides train.seed")
    parser.add_argument("--work-dir", help="work folder (default: $REPRO_WORK or ./runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set train.max_steps=100 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _resolved(args: argparse.Namespace):
    from repro.run import default_work_dir, resolve_entry

    config = resolve_entry(args.entry, seed=args.seed, overrides=args.overrides)
    return config, args.work_dir or default_work_dir()


def _cmd_train(args: argparse.Namespace) -> int:
    from repro.run import run_entry

    config, work_dir = _resolved(args)
    run_dir = run_entry(config, work_dir=work_dir, quiet=args.quiet, until="train")
    print(f"trained: {run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from repro.evaluate.report import format_metrics
    from repro.run import eval_entry

    config, work_dir = _resolved(args)
    if args.crf is not None or args.flip is not None:
        ev = dataclasses.replace(config.eval, crf=config.eval.crf if args.crf is None else args.crf,
                                 flip=config.eval.flip if args.flip is None else args.flip)
        config = dataclasses.replace(config, eval=ev)
    metrics, path = eval_entry(config, work_dir=work_dir, quiet=args.quiet)
    print(format_metrics(metrics))
    print(f"metrics: {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import json

    from repro.evaluate.report import format_metrics
    from repro.run import run_entry

    config, work_dir = _resolved(args)
    run_dir = run_entry(config, work_dir=work_dir, quiet=args.quiet, until=args.until)
    metrics = run_dir / "metrics.json"
    if args.until is None and metrics.is_file():
        print(format_metrics(json.loads(metrics.read_text())))
    print(f"run folder: {run_dir}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from repro.demo import run_demo

    run_demo(args.data, args.work_dir, checkpoint=args.checkpoint or None, quiet=args.quiet)
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
    init_depth = weights.add_parser("init-random-depth", help="write a tiny random-weight depth model (tests, demos)")
    init_depth.add_argument("--kind", required=True, choices=["zoedepth", "midas"])
    init_depth.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    init_depth.add_argument("--seed", type=int, default=0)
    init_depth.set_defaults(func=_cmd_weights_init_depth)

    data = commands.add_parser("data", help="dataset checks").add_subparsers(dest="data_command", required=True,
                                                                             metavar="ACTION")
    verify = data.add_parser("verify", help="check a local dataset copy against data_manifests/")
    verify.add_argument("dataset", choices=["cocostuff27", "cityscapes27", "potsdam3", "nyuv2"])
    verify.add_argument("--root", required=True)
    verify.set_defaults(func=_cmd_data_verify)

    prepare = commands.add_parser("prepare", help="crop a dataset split (five-crop, resize, centre crop)")
    prepare.add_argument("dataset", choices=["cocostuff27", "cityscapes27", "potsdam3", "nyuv2"])
    prepare.add_argument("--root", required=True)
    prepare.add_argument("--split", required=True)
    prepare.add_argument("--out", required=True)
    prepare.add_argument("--size", type=int, default=224, help="224 for training, 320 for validation")
    prepare.add_argument("--no-five-crop", action="store_true", help="one centre crop per image (validation, Potsdam)")
    prepare.add_argument("--quiet", action="store_true")
    prepare.set_defaults(func=_cmd_prepare)

    depth = commands.add_parser("depth", help="a normalised [0, 1] depth map per crop")
    depth.add_argument("--crops", required=True)
    depth.add_argument("--out", required=True)
    depth.add_argument("--source", required=True,
                       choices=["sensor", "zoedepth", "midas", "image_plane", "perspective_plane"])
    depth.add_argument("--weights", help="local weights folder of the depth estimator")
    depth.add_argument("--batch-size", type=int, default=8)
    depth.add_argument("--device")
    depth.add_argument("--quiet", action="store_true")
    depth.set_defaults(func=_cmd_depth)

    shards = commands.add_parser("shards", help="pack crops and depth into WebDataset shards")
    shards.add_argument("--crops", required=True)
    shards.add_argument("--depth")
    shards.add_argument("--depth-source", default="")
    shards.add_argument("--out", required=True)
    shards.add_argument("--shard-size", type=int, default=1000)
    shards.set_defaults(func=_cmd_shards)

    knn = commands.add_parser("knn", help="top-k neighbour table of the training crops (faiss)")
    knn.add_argument("--shards", required=True)
    knn.add_argument("--out", required=True)
    knn.add_argument("--arch", required=True, choices=["vit_small_patch8", "vit_base_patch8"])
    knn.add_argument("--checkpoint", required=True)
    knn.add_argument("--k", type=int, default=30)
    knn.add_argument("--batch-size", type=int, default=32)
    knn.add_argument("--device")
    knn.set_defaults(func=_cmd_knn)

    run = commands.add_parser("run", help="every stage of one table entry: prepare, depth, shards, knn, train, eval")
    _entry_args(run)
    run.add_argument("--until", choices=["prepare", "depth", "shards", "knn", "train", "eval"],
                     help="stop after this stage")
    run.set_defaults(func=_cmd_run)
    train = commands.add_parser("train", help="the data stages and training of one entry (resumes)")
    _entry_args(train)
    train.set_defaults(func=_cmd_train)
    evaluate = commands.add_parser(
        "eval", help="evaluate a trained run (final and best-on-val) -> metrics.json",
        description="Evaluate a trained run folder. With the run's own config the result goes to metrics.json; "
                    "with other evaluation settings (--crf/--flip, --set eval.*) to metrics.<setting>.json beside "
                    "it; a config that differs in what was trained is refused.")
    _entry_args(evaluate)
    evaluate.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None, help="DenseCRF (config: eval.crf)")
    evaluate.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="flip averaging")
    evaluate.set_defaults(func=_cmd_eval)

    demo = commands.add_parser("demo", help="the pipeline end to end on the 10-image NYUv2 sample (make demo)")
    demo.add_argument("--data", required=True, help="folder holding nyuv2-mini/")
    demo.add_argument("--work-dir", default="build/demo")
    demo.add_argument("--checkpoint", help="DINO ViT-S/8 checkpoint (default: weights folder, else random weights)")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_cmd_demo)

    from repro.config.registry import add_list_command
    from repro.launch import add_launch_command
    from repro.results import add_compare_command

    from repro.regression import add_check_command

    add_list_command(commands)
    add_check_command(commands)
    add_compare_command(commands)
    add_launch_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repro`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
