#!/usr/bin/env bash
# Runs jaxvpr as NUM_PROCESSES processes on this machine (127.0.0.1, gloo CPU collectives), each
# with K simulated CPU devices: the multi-host code path of a pod, on a laptop.
#
#   bash launch/local_multiprocess.sh NUM_PROCESSES [--devices-per-process K] [--port P] [--dry-run] \
#       --config CONFIG --workdir DIR [--config.x=y ...]
#
# Process 0 is the coordinator. Waits for all processes; if one fails, the others are stopped and
# the script exits with that process's status. --dry-run prints the commands instead.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]] || usage
num_processes=$1; shift
devices=1
port=${JAXVPR_PORT:-$((20000 + RANDOM % 20000))}
dry_run=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices-per-process) devices=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    *) args+=("$1"); shift ;;
  esac
done
python=${PYTHON:-python}

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < num_processes; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${devices}"
       "JAXVPR_COORDINATOR=127.0.0.1:${port}" "JAXVPR_NUM_PROCESSES=${num_processes}" "JAXVPR_PROCESS_ID=${i}"
       "$python" -m jaxvpr.main "${args[@]}")
  if [[ $dry_run == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
  else
    "${cmd[@]}" &
    pids+=($!)
  fi
done
[[ $dry_run == 1 ]] && exit 0

status=0
live=("${pids[@]}")
while [[ ${#live[@]} -gt 0 ]]; do
  # wait -n -p (bash >= 5.1): which process ended; it is then dropped from the list (waiting on it
  # again would be "no such job").
  set +e
  wait -n -p ended "${live[@]}"
  rc=$?
  set -e
  rest=()
  for pid in "${live[@]}"; do [[ $pid != "$ended" ]] && rest+=("$pid"); done
  live=("${rest[@]}")
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "local_multiprocess: a process exited with status $rc; stopping the others" >&2
    cleanup
  fi
done
exit $status
