"""The data stages of the two fidelities on the NYUv2 sample: wall times and how much the crops differ.

Prints, for ``nyuv2-mini`` (10 frames -> 50 training five-crops at 224 px, 10 validation crops at 320 px):

- wall time of ``prepare`` (paper: bilinear, PNG; released: NEAREST, JPEG five-crops, void scored);
- wall time of the depth stages with a tiny random ZoeDepth (``repro weights init-random-depth``),
  test-time augmentation on: ``scope=crop`` (paper, eq. 4: 50 crop passes) vs ``scope=image``
  (released, R4: 10 full-frame passes, then cutting);
- wall time of the kNN table with and without the released Dropout2d(0.1) (random ViT-S/8);
- how many crops differ between the paper and the released profile, and by how much.

Usage: ``python benchmarks/bench_fidelity_data.py --data ../shared/data [--work /tmp/bench] [--skip-knn]``
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from repro.data import get_dataset
from repro.data.crops import iter_crops
from repro.data.image_depth import image_depth_stage
from repro.data.pipeline import depth_stage, knn_stage, prepare_stage, shards_stage
from repro.depth.hf import save_random_model
from repro.models.backbone import init_random_checkpoint


def timed(label: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"{label:58s} {time.perf_counter() - start:7.1f} s")
    return out


def compare(a: Path, b: Path, what: str) -> None:
    pairs = list(zip(iter_crops(a), iter_crops(b)))
    diff_img = [np.mean(x.image != y.image) for x, y in pairs]
    mad = [np.abs(x.image.astype(int) - y.image.astype(int)).mean() for x, y in pairs]
    lab = sum(not np.array_equal(x.label, y.label - 1) for x, y in pairs)  # released labels: void = 0
    print(f"{what}: {sum(d > 0 for d in diff_img)}/{len(pairs)} crops differ; differing pixel values "
          f"{100 * np.mean(diff_img):.1f} % on average, mean |diff| {np.mean(mad):.2f} (0..255); labels differ in "
          f"{lab} crops (void shift removed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder holding nyuv2-mini/")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--skip-knn", action="store_true")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-fidelity-"))
    try:
        root = Path(args.data) / "nyuv2-mini"
        nyu = get_dataset("nyuv2", root, "test", require_depth=True)
        crops = {}
        for fid, kw in (("paper", {"resize": "bilinear", "codec": "png"}),
                        ("released", {"resize": "nearest", "codec": "jpeg", "score_void": True})):
            crops[fid] = timed(f"prepare train 224 five-crop ({fid})", prepare_stage, nyu, work / f"crops-{fid}",
                               five_crop=True, size=224, progress=False, **kw)
            crops[fid + "-val"] = timed(f"prepare val 320 single ({fid})", prepare_stage, nyu,
                                        work / f"crops-val-{fid}", five_crop=False, size=320, progress=False,
                                        **{k: v for k, v in kw.items() if k != "codec"})
        compare(crops["paper"], crops["released"], "train crops paper vs released")
        compare(crops["paper-val"], crops["released-val"], "val crops paper vs released")

        zoe = save_random_model("zoedepth", work / "zoedepth-nyu-tiny")
        timed("depth zoedepth tiny, scope crop, float, TTA (50 crops)", depth_stage, crops["paper"],
              work / "depth-crop", source="zoedepth", weights=zoe, scope="crop", encoding="float", tta=True,
              device="cpu", progress=False)
        per_image = timed("depth zoedepth tiny, per image, uint8, TTA (10 frames)", image_depth_stage, nyu,
                          work / "depth-image", source="zoedepth", weights=zoe, tta=True, store="uint8",
                          device="cpu", progress=False)
        timed("depth zoedepth tiny, scope image: cut 50 crops", depth_stage, crops["released"], work / "depth-img",
              source="zoedepth", weights=zoe, scope="image", encoding="uint8", image_depth=per_image,
              resize="nearest", progress=False)
        per_sensor = timed("depth sensor, per image, uint8 (10 frames)", image_depth_stage, nyu,
                           work / "depth-image-sensor", source="sensor", store="uint8", progress=False)
        sensor = timed("depth sensor, scope image: cut 50 crops", depth_stage, crops["released"],
                       work / "depth-sensor-img", source="sensor", scope="image", encoding="uint8",
                       image_depth=per_sensor, resize="nearest", progress=False)
        timed("depth sensor, scope crop, float (50 crops)", depth_stage, crops["paper"], work / "depth-sensor-crop",
              source="sensor", progress=False)
        shards = timed("shards (released, uint8 depth)", shards_stage, crops["released"], sensor, work / "shards",
                       depth_source="sensor")
        if not args.skip_knn:
            ckpt = init_random_checkpoint("vit_small_patch8", work / "dino.pth")
            for p in (0.0, 0.1):
                timed(f"knn ViT-S/8 random, 50 crops, dropout {p}", knn_stage, shards, work / f"knn-{p}.npz",
                      arch="vit_small_patch8", checkpoint=ckpt, dropout=p, device="cpu")
            a, b = (np.load(work / f"knn-{p}.npz") for p in (0.0, 0.1))
            top7 = np.mean([len(set(x[1:8]) & set(y[1:8])) / 7 for x, y in zip(a["indices"], b["indices"])])
            print(f"kNN top-7 (ranks 1..7) shared between dropout 0 and 0.1: {100 * top7:.0f} %")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
