"""``make demo``: the DepthG pipeline end to end on the 10-image NYUv2 sample, on CPU in minutes.

Runs the registered entry ``demo/nyuv2-mini`` (sensor depth, ViT-S/8) through every stage of
``repro run`` and prints the metrics and the wall time of each stage. The sample holds ten
test images only, so training and evaluation use the same ten images: the numbers show that
the pipeline works, not how well the method generalises. Without a DINO checkpoint the demo
writes a random-weight one and says so; its numbers are then meaningless.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from repro.models.backbone import default_weights_dir, get_arch, init_random_checkpoint

__all__ = ["run_demo", "ENTRY"]

ENTRY = "demo/nyuv2-mini"
BANNER = "!" * 78


def _checkpoint(requested: str | None, work_dir: Path) -> tuple[Path, bool]:
    """The DINO ViT-S/8 checkpoint to use and whether it is a random stand-in."""
    if requested:
        path = Path(requested)
        if not path.is_file():
            raise FileNotFoundError(f"DINO_CHECKPOINT={requested} does not exist; see `repro weights info`")
        return path, False
    arch = get_arch("vit_small_patch8")
    official = default_weights_dir() / arch.filename
    if official.is_file():
        return official, False
    random_path = work_dir / f"random-{arch.filename}"
    if not random_path.is_file():
        init_random_checkpoint(arch.name, random_path, seed=0)
    print(f"{BANNER}\n  No DINO checkpoint at {official}.\n  Using RANDOM backbone weights ({random_path}):"
          f" every number below is MEANINGLESS.\n  Real weights: `repro weights info` shows the download;"
          f" then `make demo DINO_CHECKPOINT=/path/{arch.filename}`.\n{BANNER}", flush=True)
    return random_path, True


def run_demo(data_root: str | Path, work_dir: str | Path, *, checkpoint: str | None = None, quiet: bool = False) -> dict:
    """Run the demo entry and print its metrics table and per-stage wall times.

    Args:
        data_root: folder holding ``nyuv2-mini/`` (the shared sample data).
        work_dir: where data stages and the run go; random- and real-weight runs get separate subfolders.
        checkpoint: a real DINO ViT-S/8 checkpoint (``DINO_CHECKPOINT``); default: the weights
            folder, else a random stand-in.
        quiet: no progress bars.

    Returns:
        The run's ``metrics.json`` content.
    """
    from repro.evaluate.report import format_metrics
    from repro.runs.entry import run_entry

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt, random_weights = _checkpoint(checkpoint, work_dir)
    sub = work_dir / ("random-weights" if random_weights else "dino-weights")
    print("NOTE: nyuv2-mini has 10 images; the demo trains and evaluates on the SAME 10 images.", flush=True)
    print("Fidelity: paper (the method as the papers write it; `repro run demo/nyuv2-mini --fidelity released` "
          "runs it as the released code did, `repro fidelity` lists the differences).", flush=True)
    start = time.perf_counter()
    run_dir = run_entry(ENTRY, work_dir=sub, quiet=quiet,
                        overrides=[f"data.root={Path(data_root) / 'nyuv2-mini'}", f"model.checkpoint={ckpt.resolve()}"])
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    timings = json.loads((run_dir / "status.json").read_text()).get("timings", {})
    print("\n" + format_metrics(metrics))
    print("wall time per stage (s, this invocation; 0/absent = reused): "
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"; total {wall:.1f}")
    print(f"run folder: {run_dir} (metrics.json, figures/, train/ TensorBoard logs)")
    if random_weights:
        print(f"{BANNER}\n  RANDOM backbone weights: these numbers are MEANINGLESS (pipeline check only).\n{BANNER}")
    return metrics
