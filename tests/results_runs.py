"""Run folders as ``repro run`` leaves them, for the tests of ``repro compare``.

Layout and files as written by ``repro.runs.entry.run_entry`` (``<work>/<entry>/<fidelity>/seed<S>/``):
``config.yaml`` (the resolved config), ``env.json`` (``repro.utils.env.collect_env`` plus the fidelity and the
backbone file record), ``status.json`` (state, stage, log, updated, per-stage timings), ``metrics.json``
(entry, seed, fidelity, config hash, ``final`` / ``best_on_val`` / ``summary``, env, timings) and
``train/summary.json`` (steps, processes). Smoke runs (brief contract 1) live under ``<work>/smoke/``,
their ``config.yaml`` says ``scale: smoke`` and their ``metrics.json`` ``"scale": "smoke"``; the
published checkpoint's score is ``<entry>/released-checkpoint/metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from repro.config.loader import save_config
from repro.config.entries import load_entry
from repro.config.identity import config_hash

ENV = {"repro_version": "0.1.0", "python": "3.11.9", "platform": "Linux-5.14.0-x86_64-with-glibc2.34",
       "hostname": "node1", "git_sha": "0123abcd", "git_dirty": False,
       "packages": {"torch": "2.4.1", "torchvision": "0.19.1", "numpy": "2.1.0"},
       "cuda_available": True, "cuda_version": "12.4", "cudnn_version": 90100, "device_count": 1,
       "devices": ["NVIDIA H100 80GB HBM3"], "slurm_job_id": "123", "slurm_array_job_id": None,
       "slurm_array_task_id": None, "slurm_job_name": None, "slurm_nodelist": None, "container": None}
BACKBONE_SHA = "5b8a2e0c7f1d4a3b9e6c2d1f0a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b"
TIMINGS = {"prepare": 0.0, "depth": 0.0, "shards": 0.0, "knn": 0.0, "train": 5400.0, "eval": 1800.0}


def numbers(acc: float, miou: float = 20.0) -> dict[str, float]:
    return {"unsup_acc": acc, "unsup_miou": miou, "linear_acc": 70.0, "linear_miou": 30.0}


def write_run(work: Path, entry: str, seed: int, state: str, summary: dict | None = None, best: dict | None = None, *,
              log: str | None = None, fidelity: str = "paper", overrides=(), config: bool = True, env: dict | None = None,
              processes: int = 1, smoke: bool = False, updated: str = "2024-06-01T12:00:00+00:00",
              error: str | None = None) -> Path:
    """Write one run folder; ``summary`` None leaves out metrics.json (a run that did not finish)."""
    root = work / "smoke" if smoke else work
    run = root / entry / fidelity / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    cfg = load_entry(entry, [f"fidelity={fidelity}", f"train.seed={seed}", *overrides])
    if config:
        save_config(cfg, run / "config.yaml")
        if smoke:
            with open(run / "config.yaml", "a") as fh:
                fh.write("scale: smoke\n")
    env = ENV if env is None else env
    (run / "env.json").write_text(json.dumps({**env, "fidelity": fidelity, "fidelity_deviations": {},
                                              "backbone_checkpoint": {"path": "/weights/dino.pth", "name": "dino.pth",
                                                                      "bytes": 1, "sha256": BACKBONE_SHA}}))
    status = {"state": state, "stage": "eval" if state == "done" else "train",
              "log": log or str(run / "logs" / "run.log"), "updated": updated, "timings": TIMINGS}
    if error:
        status["error"] = error
    (run / "status.json").write_text(json.dumps(status))
    if summary is not None:
        best = best or {}
        metrics = {"entry": entry, "seed": seed, "fidelity": fidelity, "config_hash": config_hash(cfg),
                   "final": {"step": 7000, "summary": summary}, "best_on_val": {"step": 3500, "summary": best},
                   "summary": summary, "env": env, "timings_s": TIMINGS}
        if smoke:
            metrics["scale"] = "smoke"
        (run / "metrics.json").write_text(json.dumps(metrics))
        (run / "train").mkdir(exist_ok=True)
        (run / "train" / "summary.json").write_text(json.dumps({"step": 7000, "processes": processes}))
    return run


def write_checkpoint_score(work: Path, entry: str, summary: dict, sha: str, file: str = "published.ckpt",
                           smoke: bool = False) -> Path:
    """``<work>/<entry>/released-checkpoint/metrics.json`` as ``repro eval-released`` writes it."""
    folder = (work / "smoke" if smoke else work) / entry / "released-checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    data = {"entry": entry, "seed": None, "label": "released-checkpoint", "summary": summary,
            "checkpoint": {"file": file, "sha256": sha}}
    if smoke:
        data["scale"] = "smoke"
    (folder / "metrics.json").write_text(json.dumps(data))
    return folder
