#!/usr/bin/env bash
# Run one experiment on the GPUs of this host, as one process or several, alone or as one
# host of a multi-host job.
#
# Usage:
#   experiments/gpu_host.sh [OPTIONS] EXPERIMENT CONFIG WORKDIR [EXTRA_FLAG ...]
#
#   EXPERIMENT  the experiment script, e.g. experiments/sft.py
#   CONFIG      its config file (ml_collections config flag), optionally 'file.py:arg'
#   WORKDIR     checkpoints and metrics; with several hosts, a path all hosts share
#               (gs://..., or a network file system)
#   EXTRA_FLAG  passed to the experiment unchanged, e.g. --config.train.steps=1000
#
# Options:
#   --processes N      processes on this host (default 1: one process drives every local
#                      GPU); the local GPUs are split evenly, process i of this host gets
#                      the i-th contiguous block (RLHF_JAX_LOCAL_DEVICE_IDS, counted
#                      from 0 among the visible GPUs)
#   --num-hosts H      hosts in the job (default 1); run this script on each of them
#   --host-id I        this host's index, 0 <= I < H (default 0)
#   --coordinator A    host:port of the process 0's host, reachable from every host;
#                      required when H > 1, default 127.0.0.1:$PORT on one host
#   --port P           coordinator port on one host (default 12355)
#   --log-dir D        where per-process logs go (default ./logs)
#   --mesh D,F,T       device mesh axis sizes (data, fsdp, tensor) over every GPU of the
#                      job, passed as --config.mesh.data/fsdp/tensor; one size may be -1
#                      (the rest). Default: the config's (data parallelism over all GPUs)
#
# With one host and one process the experiment simply runs (no coordinator). Otherwise
# each process gets RLHF_JAX_COORDINATOR, RLHF_JAX_NUM_PROCESSES (= H * N),
# RLHF_JAX_PROCESS_ID (= I * N + i) and RLHF_JAX_LOCAL_DEVICE_IDS, which
# rlhf_jax.parallel.multihost.initialize_from_env hands to jax.distributed.initialize;
# the global mesh then spans every GPU of every host (experiments/common.py calls
# initialize_from_env before touching a device). If any process fails, the others of this
# host are stopped and the script exits non-zero.
#
# The GPUs are those in CUDA_VISIBLE_DEVICES when it is set, else every GPU nvidia-smi
# lists.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "error: $*" >&2
  exit 2
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

PROCESSES=1
NUM_HOSTS=1
HOST_ID=0
COORDINATOR=""
PORT=12355
LOG_DIR=./logs
MESH=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --processes) PROCESSES=${2:?--processes needs a value}; shift 2 ;;
    --num-hosts) NUM_HOSTS=${2:?--num-hosts needs a value}; shift 2 ;;
    --host-id) HOST_ID=${2:?--host-id needs a value}; shift 2 ;;
    --coordinator) COORDINATOR=${2:?--coordinator needs a value}; shift 2 ;;
    --port) PORT=${2:?--port needs a value}; shift 2 ;;
    --log-dir) LOG_DIR=${2:?--log-dir needs a value}; shift 2 ;;
    --mesh) MESH=${2:?--mesh needs a value}; shift 2 ;;
    -h | --help) usage ;;
    --*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 3 ]] || usage
EXPERIMENT=$1
CONFIG=$2
WORKDIR=$3
shift 3
EXTRA_FLAGS=("$@")

is_count "$PROCESSES" || die "--processes $PROCESSES is not a positive integer"
is_count "$NUM_HOSTS" || die "--num-hosts $NUM_HOSTS is not a positive integer"
if ! [[ $HOST_ID =~ ^[0-9]+$ ]] || ((HOST_ID >= NUM_HOSTS)); then
  die "--host-id $HOST_ID must be in [0, $NUM_HOSTS)"
fi
is_count "$PORT" || die "--port $PORT is not a positive integer"
[[ -f $EXPERIMENT ]] || die "EXPERIMENT $EXPERIMENT is not a file"
[[ -f ${CONFIG%%:*} ]] || die "CONFIG ${CONFIG%%:*} is not a file"
[[ -n $WORKDIR ]] || die "WORKDIR is empty"
if ((NUM_HOSTS > 1)); then
  [[ $COORDINATOR == ?*:[0-9]* ]] || die "--coordinator host:port is required with --num-hosts $NUM_HOSTS"
fi
COORDINATOR=${COORDINATOR:-127.0.0.1:$PORT}
MESH_FLAGS=()
if [[ -n $MESH ]]; then
  [[ $MESH =~ ^(-1|[1-9][0-9]*),(-1|[1-9][0-9]*),(-1|[1-9][0-9]*)$ ]] \
    || die "--mesh $MESH must be three sizes D,F,T (positive, or -1 for one of them)"
  MESH_FLAGS=(
    "--config.mesh.data=${BASH_REMATCH[1]}"
    "--config.mesh.fsdp=${BASH_REMATCH[2]}"
    "--config.mesh.tensor=${BASH_REMATCH[3]}"
  )
fi

if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -r -a GPUS <<<"$CUDA_VISIBLE_DEVICES"
else
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found and CUDA_VISIBLE_DEVICES unset"
  mapfile -t GPUS < <(nvidia-smi --query-gpu=index --format=csv,noheader)
fi
NUM_GPUS=${#GPUS[@]}
((NUM_GPUS > 0)) || die "no GPUs found"
((NUM_GPUS % PROCESSES == 0)) \
  || die "$NUM_GPUS GPUs cannot be split evenly over --processes $PROCESSES"
PER_PROCESS=$((NUM_GPUS / PROCESSES))

RUN=(python3 "$EXPERIMENT" --config="$CONFIG" --workdir="$WORKDIR" "${MESH_FLAGS[@]}"
  "${EXTRA_FLAGS[@]}")

if ((NUM_HOSTS == 1 && PROCESSES == 1)); then
  exec "${RUN[@]}"
fi

mkdir -p "$LOG_DIR"
PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT INT TERM

for ((i = 0; i < PROCESSES; i++)); do
  process_id=$((HOST_ID * PROCESSES + i))
  # Local device ids count the GPUs this script sees (after CUDA_VISIBLE_DEVICES), from 0.
  device_ids=$(seq -s, $((i * PER_PROCESS)) $(((i + 1) * PER_PROCESS - 1)))
  log=$LOG_DIR/process_$process_id.log
  echo "process $process_id: GPUs $device_ids, log $log"
  RLHF_JAX_COORDINATOR=$COORDINATOR \
    RLHF_JAX_NUM_PROCESSES=$((NUM_HOSTS * PROCESSES)) \
    RLHF_JAX_PROCESS_ID=$process_id \
    RLHF_JAX_LOCAL_DEVICE_IDS=$device_ids \
    "${RUN[@]}" >"$log" 2>&1 &
  PIDS+=("$!")
done

status=0
for ((i = 0; i < PROCESSES; i++)); do
  if ! wait -n; then
    status=1
    echo "error: a process failed; stopping the others (see $LOG_DIR)" >&2
    break
  fi
done
exit "$status"
