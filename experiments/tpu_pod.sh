#!/usr/bin/env bash
# Run one experiment on every worker of a Cloud TPU pod slice.
#
# Usage:
#   experiments/tpu_pod.sh TPU_NAME ZONE EXPERIMENT CONFIG WORKDIR [EXTRA_FLAG ...]
#
#   TPU_NAME    name of an existing TPU VM (pod slice), e.g. my-v5e-32
#   ZONE        its zone, e.g. us-west4-a
#   EXPERIMENT  the experiment script, relative to the repository root,
#               e.g. experiments/sft.py
#   CONFIG      its config file (ml_collections config flag), relative to the repository
#               root, optionally with a ':argument' suffix,
#               e.g. experiments/configs/sft.py or experiments/configs/sft.py:tiny
#   WORKDIR     a gs:// path that every worker can write (checkpoints, metrics); a local
#               path would give each worker its own half-written run
#   EXTRA_FLAG  passed to the experiment unchanged, e.g. --config.train.steps=1000
#
# Environment (optional):
#   PROJECT       Google Cloud project (passed to gcloud as --project)
#   JAX_VERSION   jax[tpu] version to install on the workers (default: the version this
#                 package requires, resolved by pip)
#   MESH          device mesh axis sizes D,F,T (data, fsdp, tensor) over every chip of
#                 the slice, passed as --config.mesh.data/fsdp/tensor; one size may be
#                 -1 (the rest), e.g. MESH=1,-1,4. Default: the config's (data
#                 parallelism over all chips)
#
# What it does:
#   1. packs the repository (tracked and untracked, not ignored, files) into a tarball;
#   2. copies it to every worker (gcloud compute tpus tpu-vm scp --worker=all);
#   3. on every worker at once (gcloud compute tpus tpu-vm ssh --worker=all --command):
#      unpacks it into ~/rlhf_jax, installs jax[tpu] and the package with pip, and runs
#      the experiment with --config, --workdir, the mesh flags and
#      RLHF_JAX_AUTO_DETECT=1, so that rlhf_jax.parallel.multihost.initialize_from_env
#      (called by experiments/common.py before anything touches a device) lets JAX
#      discover the pod's workers (jax.distributed.initialize with no arguments on
#      Cloud TPU).
#   Every worker runs the same command; the global mesh spans all their chips. Output of
#   all workers streams back here; the command fails if any worker fails.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 5 ]] || usage
TPU_NAME=$1
ZONE=$2
EXPERIMENT=$3
CONFIG=$4
WORKDIR=$5
shift 5
EXTRA_FLAGS=("$@")

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

command -v gcloud >/dev/null || { echo "error: gcloud is not on PATH" >&2; exit 2; }
[[ -n $TPU_NAME ]] || { echo "error: TPU_NAME is empty" >&2; exit 2; }
[[ -n $ZONE ]] || { echo "error: ZONE is empty" >&2; exit 2; }
[[ -f $REPO_ROOT/$EXPERIMENT ]] \
  || { echo "error: EXPERIMENT $EXPERIMENT is not a file under $REPO_ROOT" >&2; exit 2; }
[[ -f $REPO_ROOT/${CONFIG%%:*} ]] \
  || { echo "error: CONFIG ${CONFIG%%:*} is not a file under $REPO_ROOT" >&2; exit 2; }
[[ $WORKDIR == gs://?* ]] \
  || { echo "error: WORKDIR $WORKDIR must be a gs:// path shared by all workers" >&2; exit 2; }

MESH_FLAGS=()
if [[ -n ${MESH:-} ]]; then
  [[ $MESH =~ ^(-1|[1-9][0-9]*),(-1|[1-9][0-9]*),(-1|[1-9][0-9]*)$ ]] \
    || { echo "error: MESH=$MESH must be three sizes D,F,T (positive, or -1 for one)" >&2; exit 2; }
  MESH_FLAGS=(
    "--config.mesh.data=${BASH_REMATCH[1]}"
    "--config.mesh.fsdp=${BASH_REMATCH[2]}"
    "--config.mesh.tensor=${BASH_REMATCH[3]}"
  )
fi

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n ${PROJECT:-} ]] && GCLOUD_FLAGS+=(--project="$PROJECT")

TMP_DIR=$(mktemp -d)
trap 'rm -rf "$TMP_DIR"' EXIT
TARBALL=$TMP_DIR/rlhf_jax.tar.gz
(
  cd "$REPO_ROOT"
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$TARBALL"
)

gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME":rlhf_jax.tar.gz \
  --worker=all "${GCLOUD_FLAGS[@]}"

JAX_REQUIREMENT="jax[tpu]${JAX_VERSION:+==$JAX_VERSION}"
RUN=(python3 "$EXPERIMENT" --config="$CONFIG" --workdir="$WORKDIR" "${MESH_FLAGS[@]}"
  "${EXTRA_FLAGS[@]}")
REMOTE_COMMAND="set -eu
rm -rf ~/rlhf_jax && mkdir -p ~/rlhf_jax && tar -xzf ~/rlhf_jax.tar.gz -C ~/rlhf_jax
cd ~/rlhf_jax
python3 -m pip install --quiet --upgrade $(printf '%q' "$JAX_REQUIREMENT") .
RLHF_JAX_AUTO_DETECT=1 $(printf '%q ' "${RUN[@]}")"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_FLAGS[@]}" \
  --command="$REMOTE_COMMAND"
