#!/usr/bin/env bash
# Runs `python -m softdimo_jax.main --config=$CONFIG` on one GPU host (one process drives all its GPUs) or, with
# NUM_PROCESSES > 1, as one process of a multi-host job (run it on every host with its
# PROCESS_ID; process 0's address is COORDINATOR).
#
#   WORKDIR=/data/runs/dimo14 NUM_GPUS=8 launch/gpu_train.sh \
#     --config.teacher_checkpoint=/data/ckpt/gen14 --config.tokenizer_checkpoint=/data/ckpt/tok14
#
# Arguments are passed through to the Python entry point (config overrides).
# Environment:
#   WORKDIR (required)   local, shared or gs:// directory
#   CONFIG               default configs/maskbit_imagenet256_distill.py; its `pipeline` key picks
#                        the phase (teacher, distill per family, gan, reward, digits)
#   NUM_GPUS             GPUs of this host to use (default: all visible)
#   NUM_PROCESSES, PROCESS_ID, COORDINATOR (host:port)   multi-host only
#   PYTHON               default python3
#   DRY_RUN=1            print the command instead of running it
set -euo pipefail

: "${WORKDIR:?set WORKDIR to the run directory}"
CONFIG="${CONFIG:-configs/maskbit_imagenet256_distill.py}"
PYTHON="${PYTHON:-python3}"
NUM_PROCESSES="${NUM_PROCESSES:-1}"
DRY_RUN="${DRY_RUN:-0}"

env_vars=(
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
  "XLA_FLAGS=${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
)
if [[ -n "${NUM_GPUS:-}" ]]; then
  env_vars+=("CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((NUM_GPUS - 1)))")
fi
if (( NUM_PROCESSES > 1 )); then
  : "${PROCESS_ID:?set PROCESS_ID (0..NUM_PROCESSES-1) for this host}"
  : "${COORDINATOR:?set COORDINATOR=host:port of process 0}"
  env_vars+=(SOFTDIMO_DISTRIBUTED=1 "SOFTDIMO_COORDINATOR=$COORDINATOR"
             "SOFTDIMO_NUM_PROCESSES=$NUM_PROCESSES" "SOFTDIMO_PROCESS_ID=$PROCESS_ID")
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd=(env "${env_vars[@]}" "$PYTHON" -m softdimo_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
if [[ "$DRY_RUN" == "1" ]]; then
  printf '+ cd %q &&' "$repo_root"; printf ' %q' "${cmd[@]}"; printf '\n'
else
  cd "$repo_root"
  exec "${cmd[@]}"
fi
