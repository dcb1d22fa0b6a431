#!/usr/bin/env bash
# Runs jaxvpr on every worker of a Cloud TPU VM pod (e.g. v4-32: 4 hosts x 4 chips).
#
#   TPU_NAME=vpr-pod ZONE=us-central2-b ACCELERATOR=v4-32 \
#     bash launch/tpu_pod.sh [--dry-run] --config configs/grl_tokyo.py --workdir /mnt/shared/runs/grl_tokyo \
#       [--config.x=y ...]
#
# Environment: TPU_NAME, ZONE (required); ACCELERATOR (default v4-32) and RUNTIME (default
# tpu-ubuntu2204-base) used only when the pod does not exist yet; REPO (default: this checkout's
# origin URL) and REF (default: this checkout's commit) say what code the workers run; DATA (optional)
# is exported as JAXVPR_DATA on the workers (a mounted bucket or a disk holding the datasets).
# Steps: create the pod unless it exists, clone or update the code on all workers, install
# jaxvpr[tpu], run `python -m jaxvpr.main` on all workers at once. jax.distributed picks up the pod
# topology by itself (jaxvpr.parallel.initialize: mode "tpu"). --dry-run prints the gcloud commands.
# The workdir must be a POSIX path every worker sees (e.g. a Filestore/NFS mount): Orbax writes
# checkpoints from all hosts into it.
set -euo pipefail

dry_run=0
args=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then dry_run=1; else args+=("$a"); fi
done
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
here=$(cd "$(dirname "$0")/.." && pwd)
REPO=${REPO:-$(git -C "$here" remote get-url origin 2>/dev/null || echo "https://example.invalid/jaxvpr.git")}
REF=${REF:-$(git -C "$here" rev-parse HEAD 2>/dev/null || echo main)}

run() {
  if [[ $dry_run == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

quoted_args=$(printf '%q ' "${args[@]}"); quoted_args=${quoted_args% }
data_env=""
[[ -n "${DATA:-}" ]] && data_env="export JAXVPR_DATA=$(printf '%q' "$DATA"); "
setup="set -e; if [ -d jaxvpr ]; then git -C jaxvpr fetch -q origin; else git clone -q $(printf '%q' "$REPO") jaxvpr; fi; \
git -C jaxvpr checkout -q $(printf '%q' "$REF"); python3 -m venv ~/jaxvpr-venv; ~/jaxvpr-venv/bin/pip install -q -e './jaxvpr[tpu]'"
train="${data_env}cd jaxvpr && ~/jaxvpr-venv/bin/python -m jaxvpr.main ${quoted_args}"

if [[ $dry_run == 1 ]] || ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$setup"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$train"
