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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repro`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
