"""``repro check-results``: RESULTS.md is current, and a fresh run of the demo-scale entry still gives its numbers.

First the staleness check (:func:`repro.results.compare.check_stale`, also ``repro compare --check``):
RESULTS.md, ``results/model-index.yml`` and the figures must be exactly what the recorded runs and
today's registry render, so a registry change that was not regenerated in the same commit fails.
Then the regression run: the recorded numbers of ``demo/nyuv2-mini`` in RESULTS.md come from a run with the random-weight
ViT-S/8 checkpoint (seed 0) that ``make demo`` writes when no real one is present; the check
re-creates that checkpoint, runs the entry from scratch in a fresh work folder and fails when
any metric moves beyond the tolerance recorded next to it. It guards the whole pipeline
(crops, depth, shards, kNN, training, CRF evaluation) against silent changes of its numbers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from repro.utils.errors import OutputExistsError

__all__ = ["check_results", "ENTRY"]

ENTRY = "demo/nyuv2-mini"


def check_results(results: str | Path, data_root: str | Path, *, work_dir: str | Path | None = None,
                  checkpoint: str | Path | None = None, quiet: bool = True) -> tuple[dict, list[str]]:
    """Run ``demo/nyuv2-mini`` afresh and compare its final summary with ``results``.

    Args:
        results: the RESULTS.md holding the recorded numbers and tolerance.
        data_root: folder holding ``nyuv2-mini/``.
        work_dir: an empty folder for the run (default: a temporary folder, removed afterwards).
        checkpoint: backbone checkpoint; default the random-weight ViT-S/8 (seed 0) the record used.
        quiet: no progress bars.

    Returns:
        ``(summary, failures)``: the fresh numbers and one message per failure: a metric out of
        tolerance, missing or not finite, or a record made with another config or fidelity
        (:func:`repro.results.document.check_against`; only the machine-readable block is read).

    Raises:
        ValueError/FileNotFoundError: if RESULTS.md has no machine-readable block.
        FileExistsError: if ``work_dir`` already holds a run (the check must not reuse one).
    """
    from repro.config.loader import load_config
    from repro.config.identity import config_hash
    from repro.models.backbone import init_random_checkpoint
    from repro.results.document import check_against, read_results
    from repro.runs.entry import run_entry

    recorded = read_results(results)
    with tempfile.TemporaryDirectory(prefix="repro-check-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        if (work / ENTRY).exists():
            raise OutputExistsError(f"{work / ENTRY} exists; check-results needs a fresh work folder")
        ckpt = Path(checkpoint) if checkpoint else init_random_checkpoint("vit_small_patch8", work / "random-vits8.pth", seed=0)
        run_dir = run_entry(ENTRY, work_dir=work, quiet=quiet,
                            overrides=[f"data.root={Path(data_root) / 'nyuv2-mini'}", f"model.checkpoint={ckpt.resolve()}"])
        summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
        config = load_config(run_dir / "config.yaml", base=None)
    return summary, check_against(recorded, ENTRY, summary, fidelity=config.fidelity, config_hash=config_hash(config))
