#!/usr/bin/env bash
# Runs the same command as NUM_PROCESSES processes on this host, joined by
# jax.distributed into one job (what a TPU pod or a multi-host GPU job does, on CPU devices):
# each process gets DEVICES_PER_PROCESS fake CPU devices and SOFTDIMO_DISTRIBUTED=1 with
# SOFTDIMO_COORDINATOR=localhost:PORT, SOFTDIMO_NUM_PROCESSES, SOFTDIMO_PROCESS_ID
# (softdimo_jax.runtime.distributed initialises jax.distributed from them, gloo collectives).
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh \
#       --config=configs/digits.py:smoke --workdir=/tmp/mp_smoke
#
# Arguments go to the Python entry point. Environment:
#   NUM_PROCESSES         default 2           DEVICES_PER_PROCESS   default 4
#   PORT                  coordinator port, default 12355 + (PID % 1000)
#   ENTRY                 python module (default softdimo_jax.main) or a path to a .py file
#   PYTHON                default python3
#   LOG_DIR               if set, process i writes its output to $LOG_DIR/process_<i>.log
#   EXTRA_XLA_FLAGS       appended to each process's XLA_FLAGS
#   DRY_RUN=1             print the commands instead of running them
# Exit status: the first non-zero status of a process (all are stopped when one fails), else 0.
# SIGTERM/SIGINT to this script are forwarded to every process (each saves and exits 0).
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PORT="${PORT:-$((12355 + $$ % 1000))}"
ENTRY="${ENTRY:-softdimo_jax.main}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
LOG_DIR="${LOG_DIR:-}"
EXTRA_XLA_FLAGS="${EXTRA_XLA_FLAGS:-}"

if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ && "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_PROCESSES and DEVICES_PER_PROCESS must be positive integers" >&2
  exit 2
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "$ENTRY" == *.py ]]; then entry=("$ENTRY"); else entry=(-m "$ENTRY"); fi

command_of() {  # the full command line of process $1
  printf '%s\0' env JAX_PLATFORMS=cpu \
    "XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS${EXTRA_XLA_FLAGS:+ $EXTRA_XLA_FLAGS}" \
    SOFTDIMO_DISTRIBUTED=1 "SOFTDIMO_COORDINATOR=localhost:$PORT" \
    "SOFTDIMO_NUM_PROCESSES=$NUM_PROCESSES" "SOFTDIMO_PROCESS_ID=$1" \
    "$PYTHON" "${entry[@]}" "${ARGS[@]}"
}
ARGS=("$@")

if [[ "$DRY_RUN" == "1" ]]; then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    mapfile -d '' cmd < <(command_of "$i")
    printf '+ cd %q &&' "$repo_root"; printf ' %q' "${cmd[@]}"; printf '\n'
  done
  exit 0
fi

cd "$repo_root"
[[ -n "$LOG_DIR" ]] && mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  mapfile -d '' cmd < <(command_of "$i")
  if [[ -n "$LOG_DIR" ]]; then
    "${cmd[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  else
    "${cmd[@]}" &
  fi
  pids+=("$!")
done

forward() { for p in "${pids[@]}"; do kill -s "$1" "$p" 2>/dev/null || true; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
live=("${pids[@]}")
while (( ${#live[@]} > 0 )); do
  done_pid=""
  set +e
  wait -n -p done_pid "${live[@]}"
  rc=$?
  set -e
  if [[ -z "${done_pid:-}" ]]; then
    (( rc != 127 )) && continue  # woken by a forwarded signal
    # 127 and no pid: bash had already reaped a child, and `wait -n` would return this at
    # once forever (a busy loop deaf to TERM behind its trap). Find the exited one instead.
    for p in "${live[@]}"; do
      if ! kill -0 "$p" 2>/dev/null; then
        set +e; wait "$p"; rc=$?; set -e
        (( rc == 127 )) && rc=1  # its status is lost: count it as a failure
        done_pid=$p
        break
      fi
    done
    [[ -z "$done_pid" ]] && { sleep 0.2; continue; }
  fi
  rest=()
  for p in "${live[@]}"; do [[ "$p" != "$done_pid" ]] && rest+=("$p"); done
  live=("${rest[@]+"${rest[@]}"}")
  if (( rc != 0 && status == 0 )); then
    status=$rc
    echo "local_multiprocess: process $done_pid exited with status $rc; stopping the others" >&2
    for p in "${live[@]+"${live[@]}"}"; do kill -s KILL "$p" 2>/dev/null || true; done
  fi
done
exit "$status"
