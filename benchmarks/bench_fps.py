"""Time batched farthest point sampling (DepthG sec. 3.4) at training-like sizes.

Prints the median wall time per batch (ms) of ``repro.method.sampling.farthest_point_sampling``
for B=32 depth-derived point clouds of 28x28 (P=784) and 40x40 (P=1600) cells and
n in {81, 121, 144} picks, plus the full ``fps_grid_coords`` call for reference.

Usage: ``python benchmarks/bench_fps.py [--device cuda|cpu] [--repeats 7]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from repro.method.sampling import depth_to_points, farthest_point_sampling, fps_grid_coords


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2
) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and print one line per configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"B={args.batch} repeats={args.repeats} (median ms per batch)")
    g = torch.Generator(device=device).manual_seed(0)
    for side in (28, 40):
        depth = torch.rand(args.batch, 1, side, side, device=device, generator=g)
        pts = depth_to_points(depth)
        for n_side in (9, 11, 12):
            n = n_side * n_side
            def run_fps() -> torch.Tensor:
                return farthest_point_sampling(pts, n, start=0)

            def run_grid() -> torch.Tensor:
                return fps_grid_coords(depth, n_side, start=0)

            t_fps = median_ms(run_fps, device, args.repeats)
            t_grid = median_ms(run_grid, device, args.repeats)
            print(f"P={side}x{side}={side * side:5d} n={n:4d}  "
                  f"farthest_point_sampling {t_fps:8.2f} ms   fps_grid_coords {t_grid:8.2f} ms")


if __name__ == "__main__":
    main()
