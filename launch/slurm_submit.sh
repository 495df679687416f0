#!/usr/bin/env bash
# Submit launch/slurm_gpu.sbatch: N nodes x G GPUs, one process per GPU or per node.
#
# usage: launch/slurm_submit.sh [options] -- COMMAND ARGS...
#   e.g. launch/slurm_submit.sh --nodes 4 --partition h100 -- \
#          train --config configs/7b.py --config.workdir=/shared/runs/sft --config.mesh.fsdp=-1
# options:
#   --nodes N (1)  --gpus-per-node G (8)  --procs-per gpu|node (gpu)  --partition P  --account A
#   --time HH:MM:SS (48:00:00)  --venv PATH (virtualenv on the shared file system)
#   --attention cudnn|xla (cudnn)  --job-name NAME (vsalmonn)
#   --dry-run      print the sbatch command and the srun line the job would run
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NODES=1 GPUS=8 PROCS_PER=gpu PARTITION="" ACCOUNT="" TIME=48:00:00 VENV="" ATTENTION=cudnn
JOB_NAME=vsalmonn DRY=0

# shellcheck source=launch/common.sh
source "$HERE/common.sh"

die() { echo "slurm_submit.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
    --procs-per) PROCS_PER="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --account) ACCOUNT="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --attention) ATTENTION="$2"; shift 2 ;;
    --job-name) JOB_NAME="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the run's own arguments go after --)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no command after -- (e.g. -- train --config configs/7b.py)"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got $NODES"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got $GPUS"
case "$PROCS_PER" in
  gpu) TASKS="$GPUS" ;;
  node) TASKS=1 ;;
  *) die "--procs-per must be gpu or node, got $PROCS_PER" ;;
esac
case "$ATTENTION" in cudnn|xla) ;; *) die "--attention must be cudnn or xla" ;; esac

SBATCH=(sbatch --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$TASKS"
        --gpus-per-node="$GPUS" --cpus-per-task="$((12 * GPUS / TASKS))" --time="$TIME"
        --export="ALL,VSALMONN_PROCS_PER=$PROCS_PER,VSALMONN_ATTENTION=$ATTENTION,VSALMONN_VENV=$VENV")
[[ -n "$PARTITION" ]] && SBATCH+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && SBATCH+=(--account="$ACCOUNT")
SBATCH+=("$HERE/slurm_gpu.sbatch" "$@")

if [[ "$DRY" == 1 ]]; then
  run "${SBATCH[@]}"
  echo "# inside the job (SLURM_JOB_ID=0 stands in for the real id):"
  DRY_RUN=1 SLURM_JOB_ID=0 SLURM_JOB_NUM_NODES="$NODES" SLURM_GPUS_PER_NODE="$GPUS" \
    SLURM_CPUS_PER_TASK="$((12 * GPUS / TASKS))" VSALMONN_PROCS_PER="$PROCS_PER" \
    VSALMONN_ATTENTION="$ATTENTION" VSALMONN_VENV="" bash "$HERE/slurm_gpu.sbatch" "$@"
  exit 0
fi
mkdir -p logs
run "${SBATCH[@]}"
