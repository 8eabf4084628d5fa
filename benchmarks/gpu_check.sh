#!/usr/bin/env bash
# GPU check for a lent CUDA machine: the stage benchmark, `make demo`, and bf16 vs fp32 training
# (50 steps on the demo data: loss curves and final parameters), combined into one JSON.
#
# Usage (from anywhere):  benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: build/gpu-check)
# Environment: PYTHON (default .venv/bin/python, else python3), DATA (folder holding nyuv2-mini/,
# default ../shared/data), BENCH_ARGS (extra bench_stages.py arguments, e.g. "--quick"), STEPS (50).
# Writes OUT_DIR/gpu_check.json (plus profile.json, bench.txt, precision.json, demo.log). profile.json is a
# stage profile in the format of benchmarks/profiles/ (schema repro-stage-profile/1, measured, dated): it
# replaces the published estimate with `repro plan all --profile OUT_DIR/profile.json`.
# Exits 3 without a visible CUDA device; CI never runs it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${1:-build/gpu-check}
DATA=${DATA:-../shared/data}
STEPS=${STEPS:-50}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False)." >&2
    echo "gpu_check.sh: run it on a machine with a GPU (nvidia-smi should list one); nothing was measured." >&2
    exit 3
fi
mkdir -p "$OUT_DIR"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

echo "== 1/3 stage benchmark"
read -r -a bench_args <<< "${BENCH_ARGS:-}"
"$PYTHON" benchmarks/bench_stages.py --out "$OUT_DIR/profile.json" "${bench_args[@]}" 2>"$OUT_DIR/bench.err" \
    | tee "$OUT_DIR/bench.txt"

echo "== 2/3 make demo"
demo_work="$OUT_DIR/demo"
start=$(date +%s)
demo_exit=0
deps_hash=$(sha256sum requirements.lock | cut -c1-16)
if [[ -e ".venv/.deps-$deps_hash" && -e "build/.setup-$deps_hash" ]]; then  # make setup is done: make demo runs offline
    make demo DATA="$DATA" > "$OUT_DIR/demo.log" 2>&1 || demo_exit=$?
    demo_work=build/demo
else  # no .venv set up (e.g. offline): the command `make demo` runs, in this Python
    echo "(make setup is not up to date here; running the demo command of make demo with $PYTHON)"
    "$PYTHON" -m repro.cli.main demo --data "$DATA" --work-dir "$demo_work" > "$OUT_DIR/demo.log" 2>&1 || demo_exit=$?
fi
demo_wall=$(( $(date +%s) - start ))
tail -n 20 "$OUT_DIR/demo.log"

echo "== 3/3 bf16 vs fp32 training, $STEPS steps"
"$PYTHON" benchmarks/gpu_check_helper.py precision --data "$DATA" --work "$OUT_DIR/precision" \
    --steps "$STEPS" --out "$OUT_DIR/precision.json"

"$PYTHON" benchmarks/gpu_check_helper.py merge --out "$OUT_DIR/gpu_check.json" --profile "$OUT_DIR/profile.json" \
    --precision "$OUT_DIR/precision.json" --demo-metrics "$demo_work" --demo-exit "$demo_exit" --demo-wall "$demo_wall"
echo "stage profile (same format as benchmarks/profiles/*.json): $OUT_DIR/profile.json"
echo "  project the reproduction on this GPU:  repro plan all --profile $OUT_DIR/profile.json"
echo "  to ship it: cp $OUT_DIR/profile.json benchmarks/profiles/measured-<precision>-pt<torch>-<gpu>.json"
if [[ "$demo_exit" -ne 0 ]]; then
    echo "gpu_check.sh: the demo failed (exit $demo_exit); see $OUT_DIR/demo.log" >&2
    exit "$demo_exit"
fi
