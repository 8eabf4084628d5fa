"""Throughput of every stage of a reproduction on this machine (CUDA if present, else CPU), via repro itself.

Usage: python benchmarks/bench_stages.py [--out PROFILE.json] [--quick] [--tiny] [--depth-full]

Stages, each through repro's public functions on synthetic data of the real sizes (a COCO-like
folder of 640x480 JPEGs read by the real adapter; 224 px five-crops; 320 px validation crops; 27
classes; DINO ViT-S/8 and ViT-B/8 with random weights from ``init_random_checkpoint``):
prepare (img/s), depth per source (the tiny random ZoeDepth/MiDaS of ``repro weights
init-random-depth``; ``--depth-full`` adds the full-size configs with random weights, ZoeDepth =
BEiT-L), shards, training loader, exact kNN search for several n and C=384/768 with a fitted
``t = a n^b``, backbone forward at 224/320 px (fp32, bf16), one training step per profile
(paper and released fidelity of table1/depthg-vits8 and table1/stego-vits8, with and without cached
features, plus cached steps of the other step types), a validation pass (no CRF), the final
evaluation split into backbone / head / upsample+probes / CRF per probe (serial and pooled), the
whole protocol end to end, and peak memory of a training step and an evaluation batch (fresh
processes). Prints one table (with rates relative to ``--reference``) and writes the profile JSON
that ``repro plan --profile`` reads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stages_lib as L  # noqa: E402  (the helpers next to this script)

from repro.cluster.costs import PROFILE_SCHEMA  # noqa: E402

ARCHS = ("vit_small_patch8", "vit_base_patch8")
REQUIRED_TRAIN = [(e, f) for e in ("table1/depthg-vits8", "table1/stego-vits8") for f in ("paper", "released")]
EXTRA_TRAIN = [("table1/depthg-vitb8", "paper"), ("table1/depthg-vitb8", "released"), ("table1/stego-vitb8", "paper"),
               ("table1/stego-vitb8", "released"), ("table1/dino-vits8", "paper"), ("table1/dino-vitb8", "paper"),
               ("table1/depthg-lhp-vits8", "paper"), ("table1/depthg-lhp-vits8", "released"),
               ("table6/attention-lhp", "paper"), ("table2/depthg-vitb8", "paper")]
REFERENCE = "train/table1/depthg-vits8/released/nocache"
GROUPS = ("prepare", "depth", "shards", "loader", "knn", "backbone", "store", "train", "val", "eval", "memory")


def settings(args: argparse.Namespace, cuda: bool) -> dict:
    """Sizes and counts of this run (``--tiny`` shrinks every image for a smoke test)."""
    if args.tiny:
        s = {"image": (128, 96), "crop": 96, "val": 128, "n_train": 2, "n_val": 2, "knn_n": [64, 128, 256],
             "batch": 2, "eval_batch": 2, "backbone_batch": 1, "depth_batch": 1}
    else:
        knn = [16000, 32000, 64000, 128000] if cuda else [1000, 2000, 4000] if args.quick else [2000, 4000, 8000, 16000]
        s = {"image": (640, 480), "crop": 224, "val": 320, "n_train": 4 if args.quick else 8,
             "n_val": 2 if args.quick else 4, "knn_n": knn, "batch": 32 if cuda else 8,
             "eval_batch": 16 if cuda else 2, "backbone_batch": 32 if cuda else (1 if args.quick else 2),
             "depth_batch": 8 if cuda else 1}
    s["tiny"] = args.tiny
    s["min_time"] = args.min_time if args.min_time is not None else (0.0 if args.quick or args.tiny else 2.0)
    for key in ("batch", "eval_batch"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.knn_n:
        s["knn_n"] = [int(n) for n in args.knn_n.split(",")]
    return s


def crop_image(crops: Path) -> np.ndarray:
    from PIL import Image

    key = json.loads((crops / "index.json").read_text())["keys"][0]
    return np.asarray(Image.open(crops / f"{key}.img.png").convert("RGB"))


def data_stages(s: dict, tmp: Path, device: str, depth_full: bool, stages: dict) -> tuple[Path, Path, Path]:
    from repro.depth.hf import save_random_model

    root = L.write_synthetic_coco(tmp / "coco", s["n_train"], s["n_val"], s["image"])
    stages["prepare/train224-five"], crops = L.bench_prepare(root, tmp, split="train", five_crop=True, size=s["crop"],
                                                            min_time=s["min_time"])
    stages["prepare/val320"], val_crops = L.bench_prepare(root, tmp, split="val", five_crop=False, size=s["val"],
                                                         min_time=s["min_time"])
    for plane in ("image_plane", "perspective_plane"):
        stages[f"depth/{plane}/stage"], depth = L.bench_depth_stage(crops, tmp, plane, None, device)
    one_crop = crop_image(crops)
    full = L._smooth(np.random.default_rng(1), *s["image"])
    for source in ("zoedepth", "midas"):
        for model in ("tiny", "full") if depth_full else ("tiny",):
            weights = save_random_model(source, tmp / f"{source}-{model}", tiny=model == "tiny")
            if model == "tiny" and not s["tiny"]:
                stages[f"depth/{source}/tiny/stage"], _ = L.bench_depth_stage(crops, tmp, source, weights, device)
            if model == "tiny" and source == "zoedepth":
                stages.update(L.bench_image_depth(root, crops, tmp, weights, device))
            for scope, img in (("crop", one_crop), ("image", full)):
                stages[f"depth/{source}/{model}/{scope}"] = L.bench_depth_forward(
                    source, weights, img, s["depth_batch"], device, s["min_time"] if model == "tiny" else 0.0,
                    warmup=not s["tiny"])
    stages["shards/train224"], shards = L.bench_shards(crops, depth, tmp, s["min_time"])
    stages["loader/train224"] = L.bench_loader(shards, s["min_time"])
    return crops, val_crops, shards


def network_stages(s: dict, arch: str, ckpt: Path, crops: Path, val_crops: Path, device: str, first: bool,
                   stages: dict) -> None:
    from repro.config.entries import load_entry
    from repro.data.transforms import images_to_tensor
    from repro.evaluate.report import ValidationSet, evaluate_many, evaluate_parts
    from repro.models.backbone import DinoBackbone

    backbone = DinoBackbone(arch, ckpt).to(device)
    for size, tag in ((s["crop"], 224), (s["val"], 320)):
        for prec in ("fp32", "bf16"):
            stages[f"backbone/{arch}/{tag}/{prec}"] = L.bench_backbone(backbone, size, s["backbone_batch"], device,
                                                                      prec, s["min_time"])
    stages.update(L.bench_feature_store(crops, crops.parent / f"features-{arch}", backbone, arch,
                                        s["backbone_batch"], device, s["min_time"]))
    short = "vits8" if arch == ARCHS[0] else "vitb8"
    for entry, fid in [*REQUIRED_TRAIN, *([] if s.get("only_required") else EXTRA_TRAIN)]:
        cfg = load_entry(entry, [f"fidelity={fid}", f"model.checkpoint={ckpt}"])
        if cfg.model.arch != arch:
            continue
        for cached in (True, False) if (entry, fid) in REQUIRED_TRAIN else (True,):
            rec = L.bench_train(cfg, backbone, s["batch"], s["crop"], device, cached,
                                s["min_time"] if cached else 0.0)
            stages[f"train/{entry}/{fid}/{'cached' if cached else 'nocache'}"] = rec
    val = ValidationSet(val_crops)
    val.cache_features(backbone, device)
    images = np.stack([v["image"] for v in val.samples[: s["eval_batch"]]])
    with torch.no_grad():
        feats = backbone(images_to_tensor(images, device))
    for kind, entry in (("segment", f"table1/depthg-{short}"), ("dino", f"table1/dino-{short}")):
        parts = L.eval_parts(load_entry(entry, [f"model.checkpoint={ckpt}"]), backbone, device)
        stages[f"val/{arch}/{kind}"] = L.timed(
            lambda p=parts: evaluate_parts(p, backbone, val, crf=False, batch_size=s["eval_batch"], device=device),
            items=len(val), unit="img/s", where=L.device_kind(device), min_time=s["min_time"], device=device)
        for name, rec in L.bench_eval_parts(parts, feats, s["val"], device, s["min_time"]).items():
            stages[f"eval/{arch}/{kind}/{name}"] = rec
        if kind == "segment" and first:
            crf_stages(s, parts, feats, images, device, stages)
            two = {"final": parts, "best_on_val": L.eval_parts(load_entry(entry, [f"model.checkpoint={ckpt}"]),
                                                                backbone, device)}
            stages[f"eval/{arch}/segment/end_to_end"] = L.timed(
                lambda: evaluate_many(two, backbone, val, crf=True, flip=True, crf_processes=-1,
                                      batch_size=s["eval_batch"], device=device),
                items=len(val), unit="img/s", where=L.cpu_kind(len(os.sched_getaffinity(0))), min_time=0,
                warmup=False)
            stages[f"eval/{arch}/segment/end_to_end"]["note"] = ("evaluate_many: final + best-on-val in one pass, "
                                                                 "flip, CRF of both probes in the pool")


def crf_stages(s: dict, parts, feats: torch.Tensor, images: np.ndarray, device: str, stages: dict) -> None:
    from repro.evaluate.protocol import probe_log_probs, upsampled_code

    with torch.no_grad():  # the unaries the evaluation gives the CRF
        code = upsampled_code(parts.head, feats, None, images.shape[1:3])
        cluster, linear = (t.cpu() for t in probe_log_probs(parts.cluster_probe, parts.linear_probe, code))
    procs = len(os.sched_getaffinity(0))
    per = {probe: L.bench_crf(images, logits, procs, s["min_time"]) for probe, logits in
           (("cluster", cluster), ("linear", linear))}
    for mode in ("serial", "pool"):
        for probe in per:
            stages[f"eval/crf/{probe}/{mode}"] = per[probe][mode]
        items = sum(per[p][mode]["items"] for p in per)
        secs = sum(per[p][mode]["seconds"] for p in per)
        stages[f"eval/crf/{mode}"] = {**per["cluster"][mode], "rate": items / secs, "items": items, "seconds": secs}


def memory_stages(s: dict, ckpt: Path, val_crops: Path, device: str, stages: dict) -> None:
    ctx = multiprocessing.get_context("spawn")
    for what, batch, size in (("train", s["batch"], s["crop"]), ("eval", s["eval_batch"], s["val"])):
        queue = ctx.Queue()
        proc = ctx.Process(target=L.memory_probe, args=(what, "table1/depthg-vits8", str(ckpt), batch, size,
                                                        str(val_crops), device, torch.get_num_threads(),
                                                        queue))
        proc.start()
        result = queue.get(timeout=3600)
        proc.join()
        stages[f"memory/{what}"] = {"unit": "MiB", "kind": "memory", "device": device, **result}


def print_table(profile: dict, reference: str) -> None:
    stages, ref = profile["stages"], profile["stages"].get(reference, {}).get("rate")
    print(f"\nstage throughput on {profile['device']} ({profile['device_name']}, {profile['threads']} threads), "
          f"load average {profile['load_avg']} -> {profile['load_avg_after']}, {profile['elapsed_s']:.0f} s")
    print(f"{'stage':52s} {'rate':>10s} {'unit':12s} {'ms/item':>10s} {'kind':4s} {'x ref':>7s}")
    for key, rec in stages.items():
        if rec.get("kind") == "memory":
            cuda = f", CUDA peak {rec['cuda_peak_mib']:.0f}" if rec.get("cuda_peak_mib") is not None else ""
            print(f"{key:52s} peak RSS {rec['rss_peak_mib']:,.0f} MiB{cuda} (batch {rec['batch']})")
            continue
        ratio = f"{rec['rate'] / ref:7.2f}" if ref and key.startswith("train/") else ""
        print(f"{key:52s} {rec['rate']:10.4g} {rec['unit']:12s} {1000 / rec['rate']:10.4g} {rec['kind']:4s} {ratio:>7s}")
    print(f"x ref: steps/s relative to {reference}")
    for c, fit in profile["knn_fit"].items():
        print(f"kNN search C={c}: t = {fit['a']:.3g} * n^{fit['b']:.3f} s; projected at n = 248,145 COCO crops: "
              f"{fit['projected_s_248145']:,.0f} s ({fit['kind']}, {fit['cores']} cores)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the profile JSON here (input of `repro plan --profile`)")
    parser.add_argument("--quick", action="store_true", help="fewer images and repetitions; required steps only")
    parser.add_argument("--tiny", action="store_true", help="tiny images and ViT-S/8 only (smoke test)")
    parser.add_argument("--depth-full", action="store_true", help="also full-size random ZoeDepth (BEiT-L) and "
                        "MiDaS (DPT-Large): ~1.3 GB each on disk, seconds per forward on a CPU")
    parser.add_argument("--archs", default=None, help=f"comma list (default: {','.join(ARCHS)}; --tiny: ViT-S/8)")
    parser.add_argument("--batch", type=int, help="training batch (default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--eval-batch", type=int, help="evaluation batch (default 16 on CUDA, 2 on CPU)")
    parser.add_argument("--knn-n", help="comma list of n for the kNN search fit")
    parser.add_argument("--min-time", type=float, help="seconds per measurement (default 2; 0 with --quick)")
    parser.add_argument("--reference", default=REFERENCE, help=f"stage the ratios refer to (default {REFERENCE})")
    parser.add_argument("--threads", type=int, help="torch and faiss threads (default: torch's default, all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", help="folder for temporary files (default: the system temp folder)")
    args = parser.parse_args(argv)
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    device, start, load_before = args.device, time.perf_counter(), os.getloadavg()
    s = settings(args, device == "cuda")
    s["only_required"] = args.quick or args.tiny
    archs = args.archs.split(",") if args.archs else ([ARCHS[0]] if args.tiny else list(ARCHS))
    stages: dict = {}
    sections: dict[str, float] = {}

    @contextlib.contextmanager
    def section(name: str):
        begin = time.perf_counter()
        yield
        sections[name] = round(time.perf_counter() - begin, 1)
        print(f"[bench_stages] {name}: {sections[name]:.1f} s", file=sys.stderr, flush=True)

    from repro.models.backbone import init_random_checkpoint

    with tempfile.TemporaryDirectory(dir=args.work, prefix="bench-stages-") as name:
        tmp = Path(name)
        with section("checkpoints"):
            ckpts = {arch: init_random_checkpoint(arch, tmp / f"{arch}.pth") for arch in archs}
        with section("data stages"):
            crops, val_crops, _ = data_stages(s, tmp, device, args.depth_full, stages)
        with section("knn"):
            knn_stages, knn_fit = L.bench_knn(s["knn_n"], (384, 768), min_time=0.0)
        stages.update(knn_stages)
        for i, arch in enumerate(archs):
            with section(f"networks {arch}"):
                network_stages(s, arch, ckpts[arch], crops, val_crops, device, i == 0, stages)
            if device == "cuda":
                torch.cuda.empty_cache()
        with section("memory"):
            memory_stages(s, ckpts[archs[0]], val_crops, device, stages)
    profile = {
        "schema": PROFILE_SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/bench_stages.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name(),
        "cpu": _cpu_name(), "threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__, "quick": args.quick, "tiny": args.tiny,
        "depth_full": args.depth_full, "archs": archs, "settings": {k: v for k, v in s.items()},
        "load_avg": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": round(time.perf_counter() - start, 1), "reference": args.reference, "groups": list(GROUPS),
        "sections_s": sections, "stages": stages, "knn_fit": knn_fit,
    }
    print_table(profile, args.reference)
    if args.out:
        from repro.utils.files import atomic_path

        with atomic_path(args.out, suffix=".json") as tmp_out:
            Path(tmp_out).write_text(json.dumps(profile, indent=1) + "\n")
        print(f"profile written to {args.out}")
    return profile


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
