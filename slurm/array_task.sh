#!/bin/bash
# One array task of slurm/<dataset>.sh: picks (entry, fidelity, seed) from the task index and runs
# `repro run` on it, in the Apptainer image $REPRO_SIF or in the host environment.
# Sourced by the dataset scripts, which set DEFAULT_ENTRIES (an array) before sourcing it;
# not meant to be submitted on its own.
#
# Task index i runs entry ENTRIES[i / (F x SEEDS)] in fidelity FIDELITIES[(i / SEEDS) % F] with seed
# i % SEEDS, F = number of fidelities. Indices past the end (an --array wider than
# ENTRIES x F x SEEDS) exit at once with status 0.
#
# Environment (all optional; pass with `sbatch --export=ALL,NAME=value ...` or export first):
#   ENTRIES               space-separated entry names (default: the dataset script's list)
#   FIDELITY              paper, released or both (default both: every entry in both profiles)
#   SEEDS                 seeds per entry and fidelity (default 3)
#   REPRO_WORK            work folder shared by all tasks (default ./runs, relative to the
#                         submission folder)
#   SCALE                 full (default) or smoke: a dress rehearsal of every stage on a few images
#                         (repro/config/scales.yaml); SEEDS then defaults to 1. Ask for what it needs:
#                         SCALE=smoke sbatch --gpus-per-node=0 --cpus-per-task=1 --mem=6G --time=30 slurm/<dataset>.sh
#   VENV                  the environment `make setup VENV=...` made (default: the checkout's .venv)
#   REPRO_SIF             Apptainer image; unset: $VENV/bin/repro (`make setup`), else
#                         `repro` on PATH; when none exists the task stops at once with the fix
#   REPRO_APPTAINER_ARGS  extra `apptainer exec` options, e.g. "--bind /datasets"
#   REPRO_SET             extra config overrides, space-separated key=value pairs
#                         (e.g. "train.max_steps=100 eval.crf=false")
#
# Time limits: the dataset scripts ask for `--requeue --signal=B:USR1@120`. On USR1 this
# script forwards the signal to `repro run`, which checkpoints and exits; the task then
# requeues itself (`scontrol requeue`) and the next start resumes from the checkpoint (finished
# stages are skipped). SIGTERM (scancel, preemption) is forwarded too, without a requeue: a
# cancelled task stays cancelled, and a preempted one is requeued by SLURM itself.

set -uo pipefail

# Find repro before any work: the image, the checkout's environment, or PATH.
root=${REPRO_ROOT:-${SLURM_SUBMIT_DIR:-.}}
if [[ -n "${REPRO_SIF:-}" ]]; then
    if [[ ! -f "$REPRO_SIF" ]]; then
        echo "repro: error: REPRO_SIF=${REPRO_SIF} does not exist; build it (make sif) or unset REPRO_SIF to use ${root}/.venv" >&2
        exit 2
    fi
    if ! command -v apptainer > /dev/null; then
        echo "repro: error: REPRO_SIF is set but apptainer is not on this node's PATH; load it (e.g. module load apptainer) or unset REPRO_SIF" >&2
        exit 2
    fi
    repro_bin=repro
elif [[ -x "${VENV:-${root}/.venv}/bin/repro" ]]; then
    repro_bin=$(realpath -s "${VENV:-${root}/.venv}/bin/repro")
elif command -v repro > /dev/null; then
    repro_bin=$(command -v repro)
else
    echo "repro: error: no repro for this task: run \`make setup\` in ${root} (creates .venv/bin/repro), or set REPRO_SIF to the Apptainer image (make sif), or put repro on PATH" >&2
    exit 2
fi

if [[ -n "${ENTRIES:-}" ]]; then
    read -r -a entries <<< "$ENTRIES"
else
    entries=("${DEFAULT_ENTRIES[@]}")
fi
case "${FIDELITY:-both}" in
    both) fidelities=(paper released) ;;
    paper|released) fidelities=("$FIDELITY") ;;
    *) echo "FIDELITY must be paper, released or both, got '${FIDELITY}'" >&2; exit 2 ;;
esac
scale=${SCALE:-full}
case "$scale" in
    full) seeds=${SEEDS:-3} ;;
    smoke) seeds=${SEEDS:-1} ;;
    *) echo "repro: error: SCALE must be full or smoke, got '${scale}'" >&2; exit 2 ;;
esac
task=${SLURM_ARRAY_TASK_ID:-0}
per_entry=$(( ${#fidelities[@]} * seeds ))
total=$(( ${#entries[@]} * per_entry ))
if (( task >= total )); then
    echo "task ${task}: nothing to do (${#entries[@]} entries x ${#fidelities[@]} fidelities x ${seeds} seeds = ${total} tasks)"
    exit 0
fi
entry=${entries[task / per_entry]}
fidelity=${fidelities[(task / seeds) % ${#fidelities[@]}]}
seed=$(( task % seeds ))
work=$(realpath -m "${REPRO_WORK:-runs}")

cmd=("$repro_bin" run "$entry" --fidelity "$fidelity" --seed "$seed" --work-dir "$work" --scale "$scale")
read -r -a overrides <<< "${REPRO_SET:-}"
for kv in "${overrides[@]}"; do
    cmd+=(--set "$kv")
done
if [[ -n "${REPRO_SIF:-}" ]]; then
    read -r -a apptainer_args <<< "${REPRO_APPTAINER_ARGS:-}"
    mkdir -p "$work"
    cmd=(apptainer exec --nv --bind "$work" "${apptainer_args[@]}" "$REPRO_SIF" "${cmd[@]}")
fi

signalled=""
child=0
# shellcheck disable=SC2329  # invoked from the traps below
forward() {
    signalled=$1
    echo "$(date '+%F %T') task ${SLURM_JOB_ID:-?}: caught SIG$1, forwarding to ${cmd[0]} (pid ${child})"
    if (( child > 0 )); then
        kill -s "$1" "$child" 2> /dev/null || true
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

echo "$(date '+%F %T') task ${SLURM_ARRAY_JOB_ID:-?}_${task} (job ${SLURM_JOB_ID:-?}, restart ${SLURM_RESTART_COUNT:-0}): ${cmd[*]}"
"${cmd[@]}" &
child=$!
# `wait` returns early when a trapped signal arrives: keep waiting until the child has exited.
while true; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2> /dev/null || break
done
echo "$(date '+%F %T') ${cmd[0]} exited with status ${rc}"

if [[ "$signalled" == USR1 && "$rc" -ne 0 && -n "${SLURM_JOB_ID:-}" ]]; then
    echo "$(date '+%F %T') time limit near: requeueing job ${SLURM_JOB_ID} to resume from the checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
