#!/usr/bin/env bash
# A Cloud TPU VM slice for wsss_jax: create it, install this checkout on every worker, run one
# command on all workers at once (JAX finds the other hosts itself), fetch results, delete it.
#
#   launch/tpu_vm.sh create                      # TPU_NAME, ZONE, ACCELERATOR, RUNTIME below
#   launch/tpu_vm.sh install                     # this checkout + jax[tpu] on every worker
#   launch/tpu_vm.sh run --config=configs/mae.py:variant=L/16,batch=4096,paper=True \
#       --config.parallel.fsdp=8 --config.mixed_precision=True --workdir=/mnt/wsss/runs/mae_l
#   launch/tpu_vm.sh keep-running --config=... --workdir=/mnt/wsss/runs/x   # spot / preemptible:
#       runs again after a preemption (the run exits 75 with a checkpoint, or the slice is gone:
#       it is created and installed again) until the run ends with 0 or a user error (2)
#   launch/tpu_vm.sh fetch /mnt/wsss/runs/mae_l runs/    # from worker 0
#   launch/tpu_vm.sh delete
#
# Every host writes its checkpoint shards and process 0 the logs, so --workdir must be one
# filesystem seen by all workers: BUCKET (a GCS bucket mounted with gcsfuse at /mnt/wsss by
# `install`) or an NFS (Filestore) mount. DRY_RUN=1 prints the gcloud commands instead.
set -euo pipefail
TPU_NAME=${TPU_NAME:-wsss-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
BUCKET=${BUCKET:-}
REMOTE_DIR=${REMOTE_DIR:-wsss_jax}

gc() {  # gcloud, or its command line under DRY_RUN=1
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf 'gcloud'; printf ' %q' "$@"; printf '\n'
  else gcloud "$@"; fi
}
on_all() { gc compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }

cmd=${1:?usage: $0 create|install|run ARGS...|keep-running ARGS...|fetch REMOTE LOCAL|delete|status}
shift
case $cmd in
  create)
    gc compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME" ;;
  install)
    root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
    archive=$(mktemp --suffix=.tar.gz)
    git -C "$root" archive --format=tar.gz -o "$archive" HEAD  # committed files only
    gc compute tpus tpu-vm scp "$archive" "$TPU_NAME:wsss_jax.tar.gz" --zone="$ZONE" --worker=all
    mount=""
    if [[ -n $BUCKET ]]; then
      mount="&& sudo mkdir -p /mnt/wsss && sudo chown \$USER /mnt/wsss && (mountpoint -q /mnt/wsss || gcsfuse --implicit-dirs $BUCKET /mnt/wsss)"
    fi
    on_all "mkdir -p $REMOTE_DIR && tar -xzf wsss_jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && python3 -m pip install -q -U pip && python3 -m pip install -q -e . 'jax[tpu]' $mount" ;;
  run)
    args=$(printf ' %q' "$@")
    # every worker runs the same command; WSSS_JAX_DISTRIBUTED=auto: jax.distributed.initialize()
    # reads the slice's topology from the TPU metadata server
    on_all "set -o pipefail; cd $REMOTE_DIR && WSSS_JAX_DISTRIBUTED=auto python3 -m wsss_jax.main$args 2>&1 | sed \"s/^/[\$(hostname)] /\"" ;;
  keep-running)
    while true; do
      status=0
      "$0" run "$@" || status=$?
      if ((status == 0 || status == 2)); then exit "$status"; fi
      echo "run ended with status $status (75: preempted); running again" >&2
      state=$(gc compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format='value(state)' \
              2>/dev/null || echo MISSING)
      if [[ $state != READY ]]; then  # a preempted spot slice: a new one, this checkout on it
        "$0" delete || true
        "$0" create && "$0" install
      fi
    done ;;
  fetch)
    remote=${1:?usage: $0 fetch REMOTE_DIR LOCAL_DIR}; local_dir=${2:-.}
    gc compute tpus tpu-vm scp --recurse "$TPU_NAME:$remote" "$local_dir" --zone="$ZONE" --worker=0 ;;
  status)
    gc compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" ;;
  delete)
    gc compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet ;;
  *) echo "unknown command $cmd: create, install, run, keep-running, fetch, status or delete" >&2
     exit 2 ;;
esac
