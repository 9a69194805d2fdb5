#!/usr/bin/env bash
# Runs `python -m softdimo_jax.main --config=$CONFIG` on every worker of a Cloud TPU VM
# slice: the same command on all hosts, jax.distributed.initialize() on each (through
# SOFTDIMO_DISTRIBUTED=1), checkpoints and logs in a gs:// workdir (only process 0 writes logs).
#
#   TPU_NAME=dimo ZONE=us-central2-b WORKDIR=gs://my-bucket/dimo14 \
#     launch/tpu_train.sh --config.teacher_checkpoint=gs://my-bucket/ckpt/gen14 \
#                         --config.tokenizer_checkpoint=gs://my-bucket/ckpt/tok14 \
#                         --config.distill.fsdp=4
#
# Arguments after the script name are passed through to the Python entry point (config
# overrides such as --config.distill.lr=5e-7).
# Environment:
#   TPU_NAME (required)      TPU VM name          ZONE (required)    PROJECT (optional)
#   WORKDIR (required)       gs://... directory for checkpoints, TensorBoard, grids
#   CONFIG                   default configs/maskbit_imagenet256_distill.py; its `pipeline` key picks
#                            the phase (teacher: configs/maskbit_imagenet256_teacher.py, distill per
#                            family, gan: configs/maskbit_imagenet256_gan.py, reward:
#                            configs/maskbit_imagenet256_reward.py, digits: configs/digits.py)
#   CREATE=1                 create the slice first (ACCELERATOR_TYPE, RUNTIME_VERSION, SPOT=1)
#   SYNC=1 (default)         copy this checkout (git archive of HEAD) to every worker
#   SETUP=1 (default)        pip install the package and jax[tpu]==$JAX_VERSION (+ $PIP_EXTRA) on every worker
#   REMOTE_DIR               checkout on the workers, default softdimo_jax (in $HOME)
#   DRY_RUN=1                print the commands instead of running them
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
: "${WORKDIR:?set WORKDIR to a gs:// directory}"
CONFIG="${CONFIG:-configs/maskbit_imagenet256_distill.py}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-softdimo_jax}"
CREATE="${CREATE:-0}"
SYNC="${SYNC:-1}"
SETUP="${SETUP:-1}"
DRY_RUN="${DRY_RUN:-0}"
PIP_EXTRA="${PIP_EXTRA:-}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"  # the pin of setup.cfg

case "$WORKDIR" in
  gs://*) ;;
  *) echo "error: WORKDIR must be a gs:// path that every worker can reach (got '$WORKDIR')" >&2; exit 2 ;;
esac

GCLOUD_FLAGS=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && GCLOUD_FLAGS+=(--project "$PROJECT")

run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

if [[ "$CREATE" == "1" ]]; then
  create=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
          --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")
  [[ "${SPOT:-0}" == "1" ]] && create+=(--spot)
  run "${create[@]}"
fi

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command "$1"
}

if [[ "$SYNC" == "1" ]]; then
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  tarball="$(mktemp -u /tmp/softdimo_jax.XXXXXX).tar.gz"
  run git -C "$repo_root" archive --format=tar.gz -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:softdimo_jax.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
  ssh_all "mkdir -p $(printf '%q' "$REMOTE_DIR") && tar -xzf softdimo_jax.tar.gz -C $(printf '%q' "$REMOTE_DIR")"
fi

if [[ "$SETUP" == "1" ]]; then
  ssh_all "cd $(printf '%q' "$REMOTE_DIR") && python3 -m pip install -q -e . 'jax[tpu]==${JAX_VERSION}' ${PIP_EXTRA}"
fi

# The training command, identical on every worker; overrides are quoted for the remote shell.
cmd="cd $(printf '%q' "$REMOTE_DIR") && SOFTDIMO_DISTRIBUTED=1 python3 -m softdimo_jax.main"
cmd+=" --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
for arg in "$@"; do
  cmd+=" $(printf '%q' "$arg")"
done
ssh_all "$cmd"
