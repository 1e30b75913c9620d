#!/usr/bin/env bash
# wsss_jax on one multi-GPU host, or on each node of a multi-node job.
#
#   launch/gpu_host.sh --config=configs/mae.py:variant=B/16,batch=2048,paper=True \
#       --config.mixed_precision=True --workdir=runs/mae_b          # one process, all GPUs
#   PROCESSES=8 launch/gpu_host.sh ARGS...                          # one process per GPU
#   sbatch --nodes=4 launch/slurm_gpu.sbatch ARGS...                # several nodes (SLURM)
#
# One process driving every local GPU is JAX's usual layout; PROCESSES=N instead starts one
# process per GPU (CUDA_VISIBLE_DEVICES=i, localhost coordinator), the layout of multi-node jobs.
# XLA's latency-hiding scheduler overlaps the FSDP all-gathers and gradient reductions with compute.
set -euo pipefail
# PYTHON: the interpreter that runs the processes (default: python3 on PATH). Give the one
# with wsss_jax installed when it is not first on PATH, e.g. PYTHON=.venv/bin/python.
python=${PYTHON:-$(command -v python3 || command -v python)}
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
n=${PROCESSES:-1}
if [[ $n == 1 ]]; then
  exec "$python" -m wsss_jax.main "$@"
fi
port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  CUDA_VISIBLE_DEVICES=$i "$python" -m wsss_jax.main --coordinator_address="localhost:$port" \
    --num_processes="$n" --process_id="$i" "$@" > >(sed "s/^/[gpu$i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
