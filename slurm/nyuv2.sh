#!/bin/bash
# NYUv2 (DepthG supplement Table 6): every entry x SEEDS seeds as one SLURM array job.
#
# Submit from the repository root (the task logic lives in slurm/array_task.sh); first the dress rehearsal
# (SCALE=smoke: every stage of every entry on a few images, one seed, minutes per task on one CPU), then the real run:
#   SCALE=smoke sbatch --gpus-per-node=0 --cpus-per-task=1 --mem=6G --time=30 slurm/nyuv2.sh
#   sbatch slurm/nyuv2.sh                # all 2 entries below x 2 fidelities x 3 seeds = 12 tasks
#   sbatch --array=0 --export=ALL,ENTRIES="demo/nyuv2-mini",SEEDS=1,FIDELITY=paper slurm/nyuv2.sh
#
# Task i runs entry i / (FIDELITIES x SEEDS) of the list, fidelity (i / SEEDS) % FIDELITIES and seed
# i % SEEDS (FIDELITY=both: paper, released; or one of them); with other ENTRIES, FIDELITY or SEEDS
# pass a matching --array=0-(entries x fidelities x SEEDS - 1) (extra indices exit at once).
# Environment: SCALE (full; smoke), ENTRIES, FIDELITY (both), SEEDS (3; 1 at SCALE=smoke), REPRO_WORK (./runs),
# REPRO_SIF (Apptainer image; unset: the checkout's .venv/bin/repro from `make setup`, else `repro` on PATH),
# REPRO_APPTAINER_ARGS, REPRO_SET ("key=value key=value" overrides);
# see slurm/array_task.sh. Any #SBATCH option can be overridden on the sbatch command line.
# Log of each task: logs/repro-nyuv2/<array job id>_<task index>.out (appended across requeues).
# Tasks sharing a dataset compute its crops, depth, shards and kNN once (under a file lock);
# `repro launch` instead runs those stages as separate jobs first.
# A task near its time limit checkpoints and requeues itself (--signal=B:USR1@120), then resumes.
#
#SBATCH --job-name=repro-nyuv2
#SBATCH --array=0-11%16
#SBATCH --output=logs/%x/%A_%a.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

# shellcheck disable=SC2034  # read by array_task.sh
DEFAULT_ENTRIES=(
    supp6/zoedepth
    supp6/sensor
)

task_script="${REPRO_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/array_task.sh"
if [[ ! -f "$task_script" ]]; then
    echo "cannot find $task_script: submit from the repository root or set REPRO_ROOT" >&2
    exit 2
fi
# shellcheck source=slurm/array_task.sh
source "$task_script"
