"""Training throughput on the nyuv2-mini shards, with and without the frozen-feature cache.

Usage: python benchmarks/bench_train_step.py [--steps 40] [--data ../shared/data]
Prints steps/s of the whole loop (loading, backbone, head, FPS, losses, three optimisers) for
``train.feature_cache_gb=0`` (backbone on every crop, every step) and the default cache. The
random-weight backbone costs the same as the real one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from repro.models.backbone import init_random_checkpoint
from repro.runs.entry import prepare_data, resolve_entry
from repro.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = init_random_checkpoint("vit_small_patch8", work / "vits8.pth")
        base = [f"data.root={Path(args.data) / 'nyuv2-mini'}", f"model.checkpoint={ckpt}", "train.val_every=0",
                f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.checkpoint_every=100000",
                "train.num_workers=0"]
        paths = prepare_data(resolve_entry("demo/nyuv2-mini", overrides=base), work_dir=work, quiet=True)
        print(f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, threads {torch.get_num_threads()}, "
              f"batch {args.batch_size}, {args.steps} steps, 50 crops")
        for cache in (0.0, 4.0):
            cfg = resolve_entry("demo/nyuv2-mini", overrides=base + [f"train.feature_cache_gb={cache}"])
            start = time.perf_counter()
            out = train(cfg, work / f"run-{cache}", shards=paths.shards, knn=paths.knn, quiet=True)
            wall = time.perf_counter() - start
            meta = torch.load(out, weights_only=True)["meta"]
            print(f"feature_cache_gb={cache}: {meta['steps_per_s']:.2f} steps/s in the loop, {wall:.1f} s wall, "
                  f"cache {json.dumps(meta['feature_cache'])}")


if __name__ == "__main__":
    main()
