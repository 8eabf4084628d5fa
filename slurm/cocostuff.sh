#!/bin/bash
# COCO-Stuff-27 (DepthG Tables 1, 4, 5, 6 and supplement Tables 3, 4, 5): every entry x SEEDS seeds as one SLURM array job.
#
# Submit from the repository root (the task logic lives in slurm/array_task.sh); first the dress rehearsal
# (SCALE=smoke: every stage of every entry on a few images, one seed, minutes per task on one CPU), then the real run:
#   SCALE=smoke sbatch --gpus-per-node=0 --cpus-per-task=1 --mem=6G --time=30 slurm/cocostuff.sh
#   sbatch slurm/cocostuff.sh                # all 34 entries below x 2 fidelities x 3 seeds = 204 tasks
#   sbatch --array=0-11 --export=ALL,ENTRIES="table1/stego-vits8 table1/depthg-vits8" slurm/cocostuff.sh
#
# Task i runs entry i / (FIDELITIES x SEEDS) of the list, fidelity (i / SEEDS) % FIDELITIES and seed
# i % SEEDS (FIDELITY=both: paper, released; or one of them); with other ENTRIES, FIDELITY or SEEDS
# pass a matching --array=0-(entries x fidelities x SEEDS - 1) (extra indices exit at once).
# Environment: SCALE (full; smoke), ENTRIES, FIDELITY (both), SEEDS (3; 1 at SCALE=smoke), REPRO_WORK (./runs),
# REPRO_SIF (Apptainer image; unset: the checkout's .venv/bin/repro from `make setup`, else `repro` on PATH),
# REPRO_APPTAINER_ARGS, REPRO_SET ("key=value key=value" overrides);
# see slurm/array_task.sh. Any #SBATCH option can be overridden on the sbatch command line.
# Log of each task: logs/repro-cocostuff/<array job id>_<task index>.out (appended across requeues).
# Tasks sharing a dataset compute its crops, depth, shards and kNN once (under a file lock);
# `repro launch` instead runs those stages as separate jobs first.
# A task near its time limit checkpoints and requeues itself (--signal=B:USR1@120), then resumes.
#
#SBATCH --job-name=repro-cocostuff
#SBATCH --array=0-203%16
#SBATCH --output=logs/%x/%A_%a.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

# shellcheck disable=SC2034  # read by array_task.sh
DEFAULT_ENTRIES=(
    table1/dino-vits8
    table1/stego-vits8
    table1/depthg-vits8
    table1/depthg-lhp-vits8
    table1/dino-vitb8
    table1/stego-vitb8
    table1/depthg-vitb8
    table4/stego
    table4/depth-correlation
    table4/fps
    table4/3d-lhp
    table4/depthg
    table4/depthg-3d-lhp
    table5/zoedepth
    table5/midas
    table5/kbr
    table6/no-lhp
    table6/3d-lhp
    table6/attention-lhp
    supp3/stego-coco
    supp3/depth-map-coco
    supp3/mde-features-coco
    supp3/image-plane-coco
    supp3/perspective-plane-coco
    supp3/semseg-map-coco
    supp4/n6
    supp4/n7
    supp4/n8
    supp4/n9
    supp4/n10
    supp4/n11
    supp4/n12
    supp5/no-scheduling
    supp5/scheduling
)

task_script="${REPRO_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/array_task.sh"
if [[ ! -f "$task_script" ]]; then
    echo "cannot find $task_script: submit from the repository root or set REPRO_ROOT" >&2
    exit 2
fi
# shellcheck source=slurm/array_task.sh
source "$task_script"
