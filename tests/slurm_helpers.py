"""Stand-ins for ``run_entry``/``prepare_data`` and for the ``repro``/``apptainer`` commands.

They keep the contracts the real ones keep (run folder with ``status.json`` and
``metrics.json``; on SIGUSR1/SIGTERM save progress, then hand the signal to the handler
installed before), but cost seconds, so the SLURM tests can exercise signals, requeues and
resumption. Jobs import this module by name: the tests put ``tests/`` on the jobs' PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

STEP_S = 0.2
MAX_WAIT_S = 150  # a first attempt that is never signalled fails after this long
MORE_STEPS = 5


def run_dir_of(work_dir: str, entry: str, seed: int, overrides=()) -> Path:
    """The run folder the real ``run_entry`` uses: ``<work>/<entry>/<fidelity>/seed<S>`` (fidelity from overrides)."""
    fidelity = next((o.split("=", 1)[1] for o in overrides if o.startswith("fidelity=")), "paper")
    return Path(work_dir) / entry / fidelity / f"seed{seed}"


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def interruptible_run(entry: str, *, seed: int, work_dir: str, overrides=(), quiet: bool = False) -> Path:
    """Fake ``run_entry``: the first attempt works until a signal arrives, later ones finish.

    Each 0.2 s step is saved to ``progress.json``. On SIGUSR1/SIGTERM the step is saved, the
    previous handler (submitit's requeue handler) is called, and if it returns the signal is
    re-raised with its default action, as the trainer does. An attempt after the first does
    :data:`MORE_STEPS` steps and writes ``metrics.json`` and a ``done`` status.
    """
    run_dir = run_dir_of(work_dir, entry, seed, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    progress_file = run_dir / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {"step": 0, "attempts": 0}
    progress["attempts"] += 1
    _save(progress_file, progress)
    target = progress["step"] + MORE_STEPS if progress["attempts"] > 1 else None
    _save(run_dir / "status.json", {"state": "running", "stage": "train"})
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGUSR1, signal.SIGTERM)}
    start = time.monotonic()
    try:
        while target is None or progress["step"] < target:
            if target is None and time.monotonic() - start > MAX_WAIT_S:
                raise RuntimeError("no signal arrived")
            time.sleep(STEP_S)
            progress["step"] += 1
            _save(progress_file, progress)
            if caught:
                progress.setdefault("signals", []).append(signal.Signals(caught[0]).name)
                _save(progress_file, progress)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                handler = previous[caught[0]]
                if callable(handler):
                    handler(caught[0], None)
                signal.signal(caught[0], signal.SIG_DFL)
                os.kill(os.getpid(), caught[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _save(run_dir / "metrics.json", {"entry": entry, "seed": seed, "steps": progress["step"],
                                     "attempts": progress["attempts"]})
    _save(run_dir / "status.json", {"state": "done", "stage": "eval"})
    return run_dir


def quick_run(entry: str, *, seed: int, work_dir: str, overrides=(), quiet: bool = False) -> Path:
    """Fake ``run_entry`` that finishes at once and records whether the data stage ran before it."""
    data = Path(work_dir) / "data" / "prepared.txt"
    run_dir = run_dir_of(work_dir, entry, seed, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    _save(run_dir / "metrics.json", {"entry": entry, "seed": seed, "data_ready": data.is_file()})
    _save(run_dir / "status.json", {"state": "done", "stage": "eval"})
    return run_dir


def failing_run(entry: str, *, seed: int, work_dir: str, overrides=(), quiet: bool = False) -> Path:
    """Fake ``run_entry`` that always fails."""
    raise ValueError(f"planned failure of {entry} seed {seed}")


def quick_prepare(entry: str, *, work_dir: str, overrides=(), quiet: bool = False) -> None:
    """Fake ``prepare_data``: appends the entry to ``<work_dir>/data/prepared.txt``."""
    data = Path(work_dir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "prepared.txt", "a") as fh:
        fh.write(entry + "\n")


FAKE_REPRO = r"""#!/bin/bash
# fake `repro run ENTRY --fidelity F --seed S --work-dir W [--set k=v]...`: the first attempt counts
# until SIGUSR1/SIGTERM (then saves and exits 138), later attempts count 5 more steps and finish;
# with FAKE_REPRO_QUICK=1 every attempt finishes at once.
[[ "$1" == run ]] || { echo "fake repro: only 'run' is supported" >&2; exit 2; }
entry=$2; fidelity=$4; seed=$6; work=$8
dir="$work/$entry/$fidelity/seed$seed"; mkdir -p "$dir"
step=$(cat "$dir/progress" 2> /dev/null || echo 0)
attempt=$(( $(cat "$dir/attempts" 2> /dev/null || echo 0) + 1 ))
echo "$attempt" > "$dir/attempts"
echo "$*" > "$dir/argv"
stop=""
trap 'stop=1' USR1 TERM
target=$(( attempt > 1 ? step + 5 : 1000000 ))
[[ -n "${FAKE_REPRO_QUICK:-}" ]] && target=$step
started=$SECONDS
while (( step < target )); do
    sleep 0.2
    step=$(( step + 1 )); echo "$step" > "$dir/progress"
    if [[ -n "$stop" ]]; then echo "fake repro: checkpoint at step $step"; exit 138; fi
    if (( SECONDS - started > 150 )); then echo "fake repro: no signal arrived" >&2; exit 3; fi
done
echo "{\"state\": \"done\"}" > "$dir/status.json"
echo "{\"steps\": $step, \"attempts\": $attempt}" > "$dir/metrics.json"
"""

FAKE_APPTAINER = r"""#!/bin/bash
# fake `apptainer exec [--nv] [--bind DIR] ... IMAGE CMD...`: records the call, runs CMD here.
# `repro prepare-data ENTRY --work-dir W ...` (the data job) only writes a marker.
echo "$*" >> "${FAKE_APPTAINER_LOG:-/dev/null}"
[[ "$1" == exec ]] || exit 2
shift
while [[ "$1" == --* ]]; do
    case "$1" in --bind|-B) shift 2 ;; *) shift ;; esac
done
shift  # the image
if [[ "$1" == repro && "$2" == prepare-data ]]; then
    mkdir -p "$5/data" && echo "$3" >> "$5/data/prepared.txt"
    exit 0
fi
exec "$@"
"""


def write_fake_tools(bin_dir: Path) -> Path:
    """Write executable fake ``repro`` and ``apptainer`` into ``bin_dir``; return it."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("repro", FAKE_REPRO), ("apptainer", FAKE_APPTAINER)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir
