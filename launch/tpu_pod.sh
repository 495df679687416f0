#!/usr/bin/env bash
# Launch vsalmonn-jax on a Cloud TPU VM slice: create (or reuse) the slice, install the pinned
# package on every worker, start the same command on all workers, stream the log of worker 0.
#
# usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator v5p-128 [options] -- COMMAND ARGS...
#   e.g. launch/tpu_pod.sh --name vs2 --zone us-east5-a --accelerator v5p-128 --spot -- \
#          train --config configs/7b.py --config.workdir=/mnt/BUCKET/runs/sft --config.mesh.fsdp=-1
# options:
#   --project P         gcloud project (default: gcloud's configured one)
#   --version V         TPU software version (default: derived from the accelerator generation)
#   --spot              create a spot (preemptible) slice
#   --reuse | --create  require an existing slice / always create (default: reuse if it exists)
#   --package SPEC      pip spec to install instead of a wheel built from this checkout
#   --extras LIST       extras of the built wheel (default audio,torch: decoding + tokenizer I/O)
#   --run-id ID         name of the log file on the workers (default: UTC timestamp)
#   --log-worker W      worker whose log is streamed (default 0; "all" streams every worker)
#   --no-install --no-logs  skip those steps
#   --dry-run           print every command instead of running it
# Re-running the same command after a preemption resumes: the run restores the latest checkpoint
# from --config.workdir (every worker must mount it at one path: Filestore / NFS or gcsfuse).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="" ZONE="" ACCEL="" PROJECT="" VERSION="" SPOT=0 MODE=auto PACKAGE="" DRY=0
RUN_ID="$(date -u +%Y%m%d-%H%M%S)" LOG_WORKER=0 INSTALL=1 LOGS=1 EXTRAS=audio,torch
REMOTE_DIR=vsalmonn  # on every worker, relative to the ssh user's home (its Python: .venv)
UV_VERSION=0.13.10   # installs Python 3.11 + the package into $REMOTE_DIR/.venv on each worker

# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --reuse) MODE=reuse; shift ;;
    --create) MODE=create; shift ;;
    --package) PACKAGE="$2"; shift 2 ;;
    --extras) EXTRAS="$2"; shift 2 ;;
    --run-id) RUN_ID="$2"; shift 2 ;;
    --log-worker) LOG_WORKER="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --no-logs) LOGS=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the run's own arguments go after --)" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ $# -gt 0 ]] || die "no command after -- (e.g. -- train --config configs/7b.py)"
[[ "$RUN_ID" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-id may only hold letters, digits, . _ -"

if [[ -z "$VERSION" ]]; then
  case "$ACCEL" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    "") [[ "$MODE" == create ]] && die "--accelerator is required to create a slice"; VERSION="" ;;
    *) die "unknown accelerator $ACCEL: pass --version" ;;
  esac
fi

GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")

on_workers() {  # on_workers WORKER 'remote shell command'
  run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2"
}

# 1. the slice
create_slice() {
  [[ -n "$ACCEL" ]] || die "--accelerator is required to create a slice"
  local args=(create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  [[ "$SPOT" == 1 ]] && args+=(--spot)
  run "${GCLOUD[@]}" "${args[@]}"
}
case "$MODE" in
  create) create_slice ;;
  reuse) run "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' ;;
  auto)
    if [[ "$DRY" == 1 ]]; then
      run "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)'
      echo "# (create only if the describe above fails:)"
      create_slice
    elif state="$("${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null)"; then
      case "$state" in
        READY) echo "tpu_pod.sh: reusing slice $NAME (state $state)" ;;
        PREEMPTED|TERMINATED)   # a preempted spot slice stays listed but cannot run: recreate it
          [[ -n "$ACCEL" ]] || die "slice $NAME is $state: pass --accelerator to re-create it"
          echo "tpu_pod.sh: slice $NAME is $state: deleting and re-creating it (the run resumes from its checkpoints)"
          run "${GCLOUD[@]}" delete "$NAME" "${LOC[@]}" --quiet
          create_slice
          INSTALL=1 ;;   # a new slice has nothing installed
        *) echo "tpu_pod.sh: slice $NAME is $state, not READY: wait, or delete it and run this again" >&2
           exit 3 ;;
      esac
    else
      create_slice
    fi ;;
esac

# 2. install the pinned package on every worker
if [[ "$INSTALL" == 1 ]]; then
  on_workers all "mkdir -p $REMOTE_DIR/logs"
  # configs/ travels too: `--config configs/7b.py` resolves against the workers' working directory
  run "${GCLOUD[@]}" scp --recurse "$REPO/configs" "$REPO/constraints.txt" "$NAME:vsalmonn/" \
    "${LOC[@]}" --worker=all
  if [[ -z "$PACKAGE" ]]; then
    VERSION_PKG="$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n 1)"
    WHEEL="vsalmonn_jax-$VERSION_PKG-py3-none-any.whl"
    run python3 -m pip wheel --no-deps --quiet -w "$REPO/dist" "$REPO"
    run "${GCLOUD[@]}" scp "$REPO/dist/$WHEEL" "$NAME:vsalmonn/" "${LOC[@]}" --worker=all
    PACKAGE="$REMOTE_DIR/${WHEEL}${EXTRAS:+[$EXTRAS]}"
  fi
  JAX_VERSION="$(sed -n 's/^ *"jax==\([0-9.]*\)".*/\1/p' "$REPO/pyproject.toml" | head -n 1)"
  # the package needs Python 3.11; TPU VM images ship Ubuntu 22.04's 3.10: uv provides 3.11 in a venv
  on_workers all "python3 -m pip install --quiet --user uv==$UV_VERSION && python3 -m uv venv --quiet \
--allow-existing --python 3.11 $REMOTE_DIR/.venv && python3 -m uv pip install --quiet --python \
$REMOTE_DIR/.venv/bin/python -c $REMOTE_DIR/constraints.txt '$PACKAGE' 'jax[tpu]==$JAX_VERSION'"
fi

# 3. start the run on all workers (detached, so a dropped ssh does not kill it)
ARGS=" $(quote_all "$@")"
on_workers all "cd $REMOTE_DIR && VSALMONN_CLUSTER=tpu nohup \$(test -x .venv/bin/python && echo .venv/bin/python || echo python3) -m vsalmonn_jax.distributed$ARGS \
> logs/$RUN_ID.log 2>&1 < /dev/null &"

# 4. stream the log
if [[ "$LOGS" == 1 ]]; then
  on_workers "$LOG_WORKER" "tail -n +1 -F $REMOTE_DIR/logs/$RUN_ID.log"
fi
