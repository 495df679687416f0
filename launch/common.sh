#!/usr/bin/env bash
# Helpers sourced by the launch scripts: print a command shell-quoted (for --dry-run) or run it.
# (slurm_gpu.sbatch does not source this: SLURM runs a spooled copy of it, away from this folder.)

# quote WORD: print WORD, single-quoted only when a shell would need it.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@+%^-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# quote_all WORDS...: the words joined by spaces, each quoted.
quote_all() {
  local word sep=""
  for word in "$@"; do printf '%s' "$sep"; quote "$word"; sep=" "; done
}

# run CMD...: with DRY=1 print "+ CMD" (copy-pastable), else execute it.
run() {
  if [[ "${DRY:-0}" == 1 ]]; then
    printf '+ %s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}
