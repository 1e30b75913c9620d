#!/usr/bin/env bash
# Runs one wsss_jax command as N cooperating JAX processes on this machine (localhost coordinator),
# the way it runs on N hosts: each process reads its own data shard and feeds its share of the batch.
#   launch/local_multiprocess.sh 2 --config=configs/mae.py --workdir=runs/mae_2proc
# DEVICES_PER_PROCESS (default 1) host CPU devices are given to each process.
set -euo pipefail
# PYTHON: the interpreter that runs the processes (default: python3 on PATH). Give the one
# with wsss_jax installed when it is not first on PATH, e.g. PYTHON=.venv/bin/python.
python=${PYTHON:-$(command -v python3 || command -v python)}
n=${1:?usage: $0 NUM_PROCESSES ARGS...}
shift
port=${PORT:-$((20000 + RANDOM % 20000))}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1} ${XLA_FLAGS:-}"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
pids=()
for ((i = 0; i < n; i++)); do
  "$python" -m wsss_jax.main --coordinator_address="localhost:${port}" --num_processes="$n" \
    --process_id="$i" "$@" > >(sed "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
# a SIGTERM / SIGINT to this script is passed to every process: they stop at one step (exit 75)
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
  if ((status > 128)); then wait "$pid" || status=$?; fi  # wait was cut short by the trap
done
exit $status
