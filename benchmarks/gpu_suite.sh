#!/usr/bin/env bash
# One GPU session's measurements in under 10 minutes (one H100/H200), every stage under a time
# limit of its own so that a slow compile costs that stage only; results land in $1:
#   1. the four train steps in bf16 at 224 px (MAE ViT-B/16 paper recipe, ViT-B/16, ResNet-50,
#      ResNet38), each with the measured matmul peak and MFU; the two transformer steps with a
#      jax.profiler trace (top ops by device time) and the fusion report of LayerNorm, GELU and
#      the MAE gathers; the transformers again with cuDNN flash attention on padded tokens;
#   2. the input-wait fraction of the fastest step (ResNet-50) fed from PNG files by the real
#      grain pipeline;
#   3. PyTorch side by side: eager and torch.compile (max-autotune where it compiles within its
#      budget) against the same JAX steps.
#   bash benchmarks/gpu_suite.sh results/2026-12-xx_h200     (PYTHON=..., WORKERS=12)
# It prints a summary table at the end (benchmarks/gpu_suite_summary.py reads the results).
# EXTRA=1 adds batch 512, remat=dots and gelu=tanh (about 4 more minutes).
set -uo pipefail
out=${1:?usage: $0 OUT_DIR}; mkdir -p "$out"
py=${PYTHON:-python}
workers=${WORKERS:-12}
work=$(mktemp -d)
started=$(date +%s)
stage() { echo "== [$(( $(date +%s) - started )) s] $*" | tee -a "$out/log.txt"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  $py -c "import torch; print('torch', torch.__version__)" 2>/dev/null; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

# sizes (a CPU smoke run of the script: VARIANT=mu/8 BATCH=4 R38_BATCH=2 IMAGE=32 MATMUL=256
# SKIP_TORCH=1)
variant=${VARIANT:-B/16}; batch=${BATCH:-256}; r38_batch=${R38_BATCH:-32}
image=${IMAGE:-224}; matmul=${MATMUL:-8192}

bench() {  # name, time limit (s), benchmark-phase arguments, further flags
  local name=$1 limit=$2 spec=$3; shift 3
  stage "$name: $spec $*"
  rm -rf "$work/$name"; mkdir -p "$work/$name"
  timeout "$limit" $py -m wsss_jax.main --config="configs/benchmark.py:$spec" "$@" \
    --workdir="$work/$name" > "$out/$name.txt" 2>&1 || echo "   $name stopped (status $?)" | tee -a "$out/log.txt"
  cp "$work/$name/benchmark.json" "$out/$name.json" 2>/dev/null
  cp "$work/$name/profile_summary.json" "$out/${name}_profile.json" 2>/dev/null
  grep -E "^fusion|unfused" "$out/$name.txt" | head -12
}

common="bf16=True,matmul=$matmul,steps=12,warmup=3,image_size=$image"
vit="variant=$variant,batch=$batch"
# 1. the train steps (about 5 minutes at most)
bench mae 70 "model=mae,$vit,paper=True,profile=True,$common"
bench vit 70 "model=vit,$vit,profile=True,$common"
bench resnet50 45 "model=resnet50,batch=$batch,$common"
bench resnet38 45 "model=resnet38,batch=$r38_batch,$common"
bench mae_cudnn 45 "model=mae,$vit,paper=True,attention=cudnn,$common"
bench vit_cudnn 45 "model=vit,$vit,attention=cudnn,$common"

# 2. the fastest step fed by grain from a folder of PNG tiles (80 s at most)
stage "input: a LUAD-HistoSeg-shaped PNG folder, then ResNet-50 fed from it"
timeout 30 $py -m wsss_jax.main --config=configs/dataset.py:action=input,threads=16 \
  --workdir="$work/input" > "$out/input_folder.txt" 2>&1
bench resnet50_fed 50 "model=resnet50,batch=$batch,real_input=True,workers=$workers,threads=4,$common" \
  --config.data.name=luad_histoseg --config.data.root="$work/input/release" \
  --config.data.num_classes=4

# 3. PyTorch side by side, eager and compiled (190 s at most; rows are kept as they finish)
if [ -z "${SKIP_TORCH:-}" ] && $py -c "import torch, timm" 2>/dev/null; then
  stage "side by side with PyTorch (eager, torch.compile default and max-autotune)"
  timeout 190 $py -m benchmarks.side_by_side --models=vit,mae,resnet50 --variant="$variant" \
    --batch="$batch" --size="$image" --steps=10 --warmup=3 --bf16 \
    --torch-modes=eager,default,max-autotune --compile-budget=45 \
    --out="$out/side_by_side.json" 2>&1 | grep -vi warn | tail -4
else
  stage "PyTorch side by side skipped: pip install -e '.[test]' for torch and timm"
fi

# 4. with EXTRA=1 (a second run of about 4 minutes): batch 512, remat, the tanh GELU
if [ -n "${EXTRA:-}" ]; then
  bench mae_b512 60 "model=mae,variant=$variant,batch=512,paper=True,attention=cudnn,$common"
  bench vit_b512 60 "model=vit,variant=$variant,batch=512,attention=cudnn,$common"
  bench vit_b512_remat 60 "model=vit,variant=$variant,batch=512,attention=cudnn,remat=dots,$common"
  bench vit_tanh 50 "model=vit,$vit,attention=cudnn,gelu=tanh,$common"
fi

stage "done"
$py -m benchmarks.gpu_suite_summary "$out" | tee "$out/summary.md"
