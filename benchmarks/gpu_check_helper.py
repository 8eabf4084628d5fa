"""Helpers of ``benchmarks/gpu_check.sh``: bf16 vs fp32 training on the demo data, and the combined JSON.

``precision``: prepares the demo entry's data (``demo/nyuv2-mini`` on the real NYUv2 sample, a
random-weight ViT-S/8), then trains it twice for ``--steps`` batches with :func:`repro.training.loop.train`,
``train.precision=bf16`` and ``fp32``, each in a fresh process (Accelerate keeps one precision per
process), with the same seed, data order and random streams; it compares the loss curves (TensorBoard
scalars logged every batch) and the final parameters (``model.pt``). On a CPU both runs are fp32
(the trainer autocasts to bf16 on CUDA only), so ``--allow-cpu`` gives identical curves: a check of
the comparison itself, not of bf16.

``merge``: one JSON from the stage profile, the demo's metrics and wall time, and the precision report.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ENTRY = "demo/nyuv2-mini"


def _overrides(data: Path, ckpt: Path, steps: int, precision: str | None = None) -> list[str]:
    out = [f"data.root={data / 'nyuv2-mini'}", f"model.checkpoint={ckpt}", f"train.max_steps={steps}",
           "train.val_every=0", "train.log_every=1", "train.hist_every=0", "train.checkpoint_every=100000",
           "train.num_workers=0", "fidelity=paper"]
    return out + ([f"train.precision={precision}"] if precision else [])


def _train_one(args: argparse.Namespace) -> None:
    """Child process: one training run of the demo entry at ``--precision``."""
    from repro.runs.entry import data_paths, resolve_entry
    from repro.training.loop import train

    cfg = resolve_entry(ENTRY, overrides=_overrides(args.data, args.ckpt, args.steps, args.precision))
    paths = data_paths(cfg, args.work)
    start = time.perf_counter()
    train(cfg, args.work / f"run-{args.precision}", shards=paths.shards, knn=paths.knn, quiet=True)
    (args.work / f"run-{args.precision}" / "wall_s.txt").write_text(f"{time.perf_counter() - start:.3f}\n")


def _losses(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = sorted(run.glob("train/**/events.out.tfevents.*"))
    if not found:
        raise FileNotFoundError(f"no TensorBoard events under {run / 'train'}")
    acc = EventAccumulator(str(found[-1].parent), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith("loss/")}


def _write(path: Path, data: dict) -> None:
    from repro.utils.files import atomic_path

    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def _compare_params(a: dict, b: dict) -> dict:
    out = {}
    for part in sorted(k for k in a if k != "meta"):
        for name, ta in a[part].items():
            x, y = ta.double().flatten(), b[part][name].double().flatten()
            if x.numel() == 0 or not x.is_floating_point():
                continue
            diff = (x - y).norm().item()
            out[f"{part}.{name}"] = {"rel_l2": diff / max(x.norm().item(), 1e-12),
                                     "max_abs": (x - y).abs().max().item(),
                                     "cosine": torch.nn.functional.cosine_similarity(x, y, dim=0).item()}
    return out


def precision(args: argparse.Namespace) -> dict:
    from repro.models.backbone import init_random_checkpoint
    from repro.runs.entry import prepare_data, resolve_entry

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        raise SystemExit("gpu_check_helper precision: no CUDA device (torch.cuda.is_available() is False); "
                         "--allow-cpu compares two fp32 runs instead")
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = init_random_checkpoint("vit_small_patch8", args.work / "random-vits8.pth", seed=0)
    cfg = resolve_entry(ENTRY, overrides=_overrides(args.data, ckpt, args.steps))
    prepare_data(cfg, work_dir=args.work, quiet=True)
    report: dict = {"entry": ENTRY, "steps": args.steps, "device": "cuda" if cuda else "cpu",
                    "note": "bf16 = Accelerate autocast on CUDA; on a CPU both runs are fp32"}
    runs = {}
    for prec in ("bf16", "fp32"):
        cmd = [sys.executable, __file__, "_train", "--precision", prec, "--data", str(args.data), "--work",
               str(args.work), "--steps", str(args.steps), "--ckpt", str(ckpt)]
        subprocess.run(cmd, check=True)
        run = args.work / f"run-{prec}"
        runs[prec] = {"losses": _losses(run), "wall_s": float((run / "wall_s.txt").read_text()),
                      "params": torch.load(run / "model.pt", map_location="cpu", weights_only=True)}
    curves = {}
    for tag in sorted(runs["fp32"]["losses"]):
        a, b = runs["bf16"]["losses"].get(tag, []), runs["fp32"]["losses"][tag]
        n = min(len(a), len(b))
        diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
        curves[tag] = {"bf16": a, "fp32": b, "max_abs_diff": max(diffs) if diffs else math.nan,
                       "final_rel_diff": abs(a[n - 1] - b[n - 1]) / max(abs(b[n - 1]), 1e-12) if n else math.nan}
    params = _compare_params(runs["bf16"]["params"], runs["fp32"]["params"])
    report.update({"wall_s": {p: runs[p]["wall_s"] for p in runs}, "losses": curves, "params": params,
                   "params_worst_rel_l2": max(v["rel_l2"] for v in params.values()),
                   "params_min_cosine": min(v["cosine"] for v in params.values())})
    _write(args.out, report)
    total = curves.get("loss/total", {})
    print(f"bf16 vs fp32, {args.steps} steps: loss/total max |diff| {total.get('max_abs_diff')}, final relative "
          f"diff {total.get('final_rel_diff')}; parameters worst relative L2 {report['params_worst_rel_l2']:.3g}, "
          f"min cosine {report['params_min_cosine']:.6f}; wall {report['wall_s']}")
    return report


def merge(args: argparse.Namespace) -> None:
    def read(path: Path | None):
        return json.loads(path.read_text()) if path is not None and path.is_file() else None

    demo = None
    if args.demo_metrics is not None:
        metrics = sorted(Path(args.demo_metrics).glob("**/metrics.json"))
        demo = {"exit_code": args.demo_exit, "wall_s": args.demo_wall, "metrics_file": str(metrics[-1]) if metrics
                else None, "summary": read(metrics[-1]).get("summary") if metrics else None}
    out = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "profile": read(args.profile), "demo": demo, "precision": read(args.precision)}
    _write(args.out, out)
    print(f"gpu check written to {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("precision", help="bf16 vs fp32 training on the demo data")
    t = sub.add_parser("_train", help="(internal) one training run")
    for q in (p, t):
        q.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder holding nyuv2-mini/")
        q.add_argument("--work", type=Path, required=True)
        q.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--allow-cpu", action="store_true", help="run on a CPU (both runs fp32: checks the comparison)")
    t.add_argument("--precision", choices=["bf16", "fp32"], required=True)
    t.add_argument("--ckpt", type=Path, required=True)
    m = sub.add_parser("merge", help="combine the profile, the demo and the precision report into one JSON")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--profile", type=Path)
    m.add_argument("--precision", type=Path)
    m.add_argument("--demo-metrics", type=Path, help="folder searched for the demo's metrics.json")
    m.add_argument("--demo-exit", type=int)
    m.add_argument("--demo-wall", type=float)
    args = parser.parse_args(argv)
    {"precision": precision, "_train": _train_one, "merge": merge}[args.cmd](args)


if __name__ == "__main__":
    main()
