"""The ``repro`` command line: thin argument parsing that calls library functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from repro import __version__
from repro.cli.common import add_entry_arguments, scale_overrides
from repro.utils.errors import UserError

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
    from repro.data.datasets.manifest import verify_dataset

    report = verify_dataset(args.dataset, args.root)
    print("\n".join(report.lines))
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_data_convert_nyuv2(args: argparse.Namespace) -> int:
    from repro.data.datasets.nyuv2_convert import convert_nyuv2
    from repro.utils.errors import DatasetError
    from repro.utils.errors import MissingFileError

    try:
        result = convert_nyuv2(args.mat, args.splits, args.labels13, args.out, depth=args.depth,
                               progress=not args.quiet)
    except (DatasetError, MissingFileError) as exc:
        print(f"repro data convert nyuv2: {exc}", file=sys.stderr)
        return 1
    rate = result.written / result.seconds if result.seconds > 0 else float("nan")
    print(f"nyuv2: {result.frames} frames in {result.out} ({result.written} written, {result.skipped} already "
          f"complete) in {result.seconds:.1f} s, {rate:.1f} images/s")
    print(f"check: repro data verify nyuv2 --root {result.out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from repro.data import get_dataset
    from repro.data.pipeline import prepare_stage

    dataset = get_dataset(args.dataset, args.root, args.split)
    out = prepare_stage(dataset, args.out, five_crop=not args.no_five_crop, size=args.size, resize=args.resize,
                        codec=args.codec, score_void=args.score_void, progress=not args.quiet)
    print(f"crops: {out}")
    return 0


def _cmd_depth(args: argparse.Namespace) -> int:
    from repro.data.pipeline import depth_stage

    if args.scope == "image":
        from repro.data import get_dataset
        from repro.data.image_depth import image_depth_stage, image_depth_store

        if not (args.image_depth and args.dataset and args.root and args.split):
            raise SystemExit("--scope image needs --image-depth DIR and --dataset/--root/--split of the full images")
        kwargs = {"require_depth": True} if args.source == "sensor" else {}
        image_depth_stage(get_dataset(args.dataset, args.root, args.split, **kwargs), args.image_depth,
                          source=args.source, weights=args.weights, tta=args.tta, store=image_depth_store(args.encoding),
                          batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                          depth_files=args.depth_files)
    out = depth_stage(args.crops, args.out, source=args.source, weights=args.weights, scope=args.scope,
                      encoding=args.encoding, tta=args.tta, image_depth=args.image_depth, resize=args.resize,
                      batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                      depth_files=args.depth_files)
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
                    batch_size=args.batch_size, device=args.device, dropout=args.dropout, seed=args.dropout_seed)
    print(f"knn table: {out}")
    return 0


def _resolved(args: argparse.Namespace):
    from repro.runs.entry import default_work_dir, resolve_entry

    overrides = ([f"fidelity={args.fidelity}"] if args.fidelity else []) + scale_overrides(args) + list(args.overrides)
    config = resolve_entry(args.entry, seed=args.seed, overrides=overrides)
    return config, args.work_dir or default_work_dir()


def _cmd_train(args: argparse.Namespace) -> int:
    from repro.runs.entry import run_entry

    config, work_dir = _resolved(args)
    run_dir = run_entry(config, work_dir=work_dir, quiet=args.quiet, until="train")
    print(f"trained: {run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from repro.evaluate.report import format_metrics
    from repro.runs.entry import eval_entry

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
    from repro.runs.entry import run_entry

    config, work_dir = _resolved(args)
    run_dir = run_entry(config, work_dir=work_dir, quiet=args.quiet, until=args.until)
    metrics = run_dir / "metrics.json"
    if args.until is None and metrics.is_file():
        print(format_metrics(json.loads(metrics.read_text())))
    print(f"run folder: {run_dir}")
    return 0


def _cmd_fidelity(args: argparse.Namespace) -> int:
    from repro.config.fidelity import format_table

    print("docs/fidelity.md: what the paper says and what the released code did; each config key's value in the "
          "`paper` and the `released` profile. --set fidelity_items.R4=paper takes one item from the other profile.")
    print(format_table(args.items or None))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from repro.runs.demo import run_demo

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
    convert = data.add_parser("convert", help="convert a dataset as published into repro's layout").add_subparsers(
        dest="convert_dataset", required=True, metavar="DATASET")
    nyu = convert.add_parser(
        "nyuv2", help="nyu_depth_v2_labeled.mat + splits.mat + 13-class labels -> rgb/, depth/ (mm), label13/",
        description="Write repro's NYUv2 layout (rgb/, depth/ uint16 mm, label13/, manifest.csv with the official "
                    "split) from the files as published. Streams frame by frame; resumable; atomic per file.")
    nyu.add_argument("--mat", required=True, help="nyu_depth_v2_labeled.mat (MATLAB v7.3 / HDF5, read with h5py)")
    nyu.add_argument("--splits", required=True, help="splits.mat of the NYU toolbox (trainNdxs, testNdxs)")
    nyu.add_argument("--labels13", required=True, nargs="+", metavar="SRC",
                     help="13-class labels (Couprie et al.) from ankurhanda/nyuv2-meta-data, either its label PNGs: "
                          "train_labels_13/nyuv2_train_class13.tgz and test_labels_13/nyuv2_test_class13.tgz "
                          "(or folders of their new_nyu_class13_NNNN.png), or its class mapping: classMapping40.mat "
                          "(mapClass, 894 -> 40) and class13Mapping.mat (classMapping13.labels13, 40 -> 13) applied "
                          "to the .mat's 'labels'. The source used is recorded in manifest.csv (label13_source) "
                          "and conversion.json")
    nyu.add_argument("--out", required=True, help="output folder (a rerun skips the files already written)")
    nyu.add_argument("--depth", choices=["inpainted", "raw"], default="inpainted",
                     help="'depths' (in-painted, default: as the sample and DepthG) or 'rawDepths' (0 = no reading)")
    nyu.add_argument("--quiet", action="store_true", help="no progress bar")
    nyu.set_defaults(func=_cmd_data_convert_nyuv2)

    prepare = commands.add_parser("prepare", help="crop a dataset split (five-crop, resize, centre crop)")
    prepare.add_argument("dataset", choices=["cocostuff27", "cityscapes27", "potsdam3", "nyuv2"])
    prepare.add_argument("--root", required=True)
    prepare.add_argument("--split", required=True)
    prepare.add_argument("--out", required=True)
    prepare.add_argument("--size", type=int, default=224, help="224 for training, 320 for validation")
    prepare.add_argument("--no-five-crop", action="store_true", help="one centre crop per image (validation, Potsdam)")
    prepare.add_argument("--resize", choices=["bilinear", "nearest"], default="bilinear",
                         help="image resizing (data.resize; released: nearest, R3)")
    prepare.add_argument("--codec", choices=["png", "jpeg"], default="png",
                         help="jpeg: five-crops round-trip through JPEG before resizing (data.train_crop_codec, R3)")
    prepare.add_argument("--score-void", action="store_true", help="void becomes class 0 (data.score_void, R13)")
    prepare.add_argument("--quiet", action="store_true")
    prepare.set_defaults(func=_cmd_prepare)

    depth = commands.add_parser("depth", help="a [0, 1] depth map per crop (per crop or cut from the full image)")
    depth.add_argument("--crops", required=True)
    depth.add_argument("--out", required=True)
    depth.add_argument("--source", required=True,
                       choices=["sensor", "zoedepth", "midas", "image_plane", "perspective_plane", "kbr", "files",
                                "mde_features", "semseg"])
    depth.add_argument("--weights", help="local weights folder of the depth estimator")
    depth.add_argument("--depth-files", help="kbr / files: folder of per-image maps <image key>.npy (data.depth_files)")
    depth.add_argument("--scope", choices=["crop", "image"], default="crop",
                       help="crop: per crop (eq. 4); image: per full image, cut into the crops (data.depth_scope, R4)")
    depth.add_argument("--encoding", choices=["float", "uint8", "int_cast"], default="float",
                       help="data.depth_encoding (R4 uint8, R5 int_cast)")
    depth.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                       help="estimator test-time augmentation (ZoeDepth infer: flip + reflect padding)")
    depth.add_argument("--resize", choices=["bilinear", "nearest"], default="bilinear",
                       help="--scope image: how each cut map is resized (the crops' data.resize)")
    depth.add_argument("--image-depth", help="--scope image: per-image depth folder (created if absent)")
    depth.add_argument("--dataset", choices=["cocostuff27", "cityscapes27", "potsdam3", "nyuv2"],
                       help="--scope image: the dataset of the full images")
    depth.add_argument("--root", help="--scope image: dataset root")
    depth.add_argument("--split", help="--scope image: dataset split")
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
    knn.add_argument("--dropout", type=float, default=0.0,
                     help="Dropout2d on the features before pooling (data.knn_dropout; released: 0.1, R11)")
    knn.add_argument("--dropout-seed", type=int, default=0, help="seed of the dropout masks")
    knn.add_argument("--device")
    knn.set_defaults(func=_cmd_knn)

    run = commands.add_parser("run", help="every stage of one table entry: prepare, depth, shards, knn, train, eval")
    add_entry_arguments(run)
    run.add_argument("--until", choices=["prepare", "depth", "shards", "knn", "train", "eval"],
                     help="stop after this stage")
    run.set_defaults(func=_cmd_run)
    train = commands.add_parser("train", help="the data stages and training of one entry (resumes)")
    add_entry_arguments(train)
    train.set_defaults(func=_cmd_train)
    evaluate = commands.add_parser(
        "eval", help="evaluate a trained run (final and best-on-val) -> metrics.json",
        description="Evaluate a trained run folder. With the run's own config the result goes to metrics.json; "
                    "with other evaluation settings (--crf/--flip, --set eval.*) to metrics.<setting>.json beside "
                    "it; a config that differs in what was trained is refused.")
    add_entry_arguments(evaluate)
    evaluate.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None, help="DenseCRF (config: eval.crf)")
    evaluate.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="flip averaging")
    evaluate.set_defaults(func=_cmd_eval)

    fidelity = commands.add_parser("fidelity", help="the paper and released profiles, item by item (docs/fidelity.md)")
    fidelity.add_argument("items", nargs="*", metavar="ITEM", help="only these items, e.g. R4 R10")
    fidelity.set_defaults(func=_cmd_fidelity)

    demo = commands.add_parser("demo", help="the pipeline end to end on the 10-image NYUv2 sample (make demo)")
    demo.add_argument("--data", required=True, help="folder holding nyuv2-mini/")
    demo.add_argument("--work-dir", default="build/demo")
    demo.add_argument("--checkpoint", help="DINO ViT-S/8 checkpoint (default: weights folder, else random weights)")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_cmd_demo)

    from repro.cli.cluster import add_launch_command, add_plan_command, add_prepare_data_command
    from repro.cli.entries import add_list_command
    from repro.cli.results import add_check_command, add_compare_command


    add_list_command(commands)
    add_check_command(commands)
    add_compare_command(commands)
    add_launch_command(commands)
    from repro.cli.released import add_released_commands  # released list/import/launch, eval-released
    add_released_commands(commands)
    add_plan_command(commands)
    add_prepare_data_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repro`` console script.

    Input errors (a bad config value, a missing file, a corrupt shard, a busy run folder, ...) print
    ``repro: error: <message>`` and exit with status 2; ``REPRO_DEBUG=1`` shows the traceback too.
    """
    import os

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if os.environ.get("REPRO_DEBUG"):
            raise
        print(f"repro: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
