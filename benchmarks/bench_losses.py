"""Time one training-loss evaluation (forward + backward) of stego_depthg_loss.

Prints milliseconds per call for the settings of the paper's table entries: batch 32,
28x28 ViT feature maps, sampled N x N (random or FPS coordinates) and the full feature
map (Cityscapes). Run: python benchmarks/bench_losses.py [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from repro.method.losses import LossWeights, stego_depthg_loss
from repro.method.sampling import fps_grid_coords, random_grid_coords

WEIGHTS = LossWeights(0.58, 0.36, 0.70, 0.07, 0.02, 0.76, lambda_depthg=0.19, b_depthg=0.03)


def time_call(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    dev, b = args.device, args.batch
    g = torch.Generator().manual_seed(0)
    for c, q, label in [(384, 70, "ViT-S/8, Q=70"), (768, 100, "ViT-B/8, Q=100")]:
        f = torch.randn(b, c, 28, 28, generator=g).to(dev)
        s = torch.randn(b, q, 28, 28, generator=g).to(dev).requires_grad_(True)
        depth = torch.rand(b, 1, 28, 28, generator=g).to(dev)
        for n in (9, 11, None):
            if n is None:
                coords = coords_knn = None
                mode = "full 28x28"
            else:
                coords = fps_grid_coords(depth, n)
                coords_knn = random_grid_coords(b, n, device=dev)
                mode = f"N={n}"

            def step():
                out = stego_depthg_loss(f, s, f, s, WEIGHTS, coords=coords, coords_knn=coords_knn, depth=depth)
                out.total.backward()

            ms = time_call(step, args.repeats, dev)
            print(f"{label:16s} {mode:11s} batch {b}: {ms:8.1f} ms per loss forward+backward ({dev})")


if __name__ == "__main__":
    main()
