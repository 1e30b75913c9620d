#!/usr/bin/env bash
# One GPU-host session's measurements: the input wait of MAE pretraining and of the ResNet-50 step
# (the fastest) fed from PNG files by the real grain pipeline, and profiles of the MAE and
# ViT-B/16 train steps. Results go to $1.
#   bash benchmarks/gpu_input_and_profile.sh results/  (WORKERS grain processes, default 12)
set -uo pipefail
out=${1:?usage: $0 OUT_DIR}; mkdir -p "$out"
py=${PYTHON:-python}
workers=${WORKERS:-12}
work=$(mktemp -d)
# a LUAD-HistoSeg-shaped folder of 512 embedded tiles, and its decode + augment speed
$py -m wsss_jax.main --config=configs/dataset.py:action=input,threads=16 --workdir="$work/input" \
  2>&1 | tail -5 | tee "$out/input.txt"
# MAE ViT-B/16 (paper recipe, bf16) fed from those PNGs: step time and data_wait_fraction
$py -m wsss_jax.main --config=configs/mae.py:variant=B/16,paper=True,batch=256,steps=60,dataset=luad_histoseg,root="$work/input/release" \
  --config.mixed_precision=True --config.data.num_workers="$workers" --config.log_every=10 \
  --config.checkpoint_every=1000 --workdir="$work/mae" 2>&1 | grep -E "step|wait|Error" | tail -12 | tee "$out/mae_input_wait.txt"
# the benchmark's compiled step fed by grain from the same PNG folder
$py -m wsss_jax.main --config="configs/benchmark.py:model=mae,variant=B/16,batch=256,bf16=True,matmul=8192,real_input=True,workers=$workers,threads=4" \
  --config.data.name=luad_histoseg --config.data.root="$work/input/release" --config.data.num_classes=4 \
  --workdir="$work/real_input" 2>&1 | grep -v "^{" | tail -3 | tee "$out/real_input.txt"
# the project's fastest train step (ResNet-50, about 5,200 images/s on an H100) fed the same way
$py -m wsss_jax.main --config="configs/benchmark.py:model=resnet50,batch=256,bf16=True,matmul=8192,real_input=True,workers=$workers,threads=4" \
  --config.data.name=luad_histoseg --config.data.root="$work/input/release" --config.data.num_classes=4 \
  --workdir="$work/real_input_r50" 2>&1 | grep -v "^{" | tail -3 | tee "$out/real_input_resnet50.txt"
for spec in "model=mae,variant=B/16,batch=256,bf16=True,matmul=8192,profile=True" \
            "model=vit,variant=B/16,batch=256,bf16=True,matmul=8192,profile=True"; do
  name=$(echo "$spec" | cut -d, -f1 | cut -d= -f2)
  rm -rf "$work/bench"; mkdir -p "$work/bench"
  $py -m wsss_jax.main --config="configs/benchmark.py:$spec" --workdir="$work/bench" 2>&1 \
    | grep -v "^{" | tail -60 | tee "$out/profile_$name.txt"
  cp "$work/bench/profile_summary.json" "$out/profile_$name.json" 2>/dev/null
done
