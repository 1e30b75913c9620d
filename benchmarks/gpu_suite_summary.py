"""The summary of a `benchmarks/gpu_suite.sh` results folder, as markdown: the train steps with
their goals, the attention variants, the fusion report, the top ops of the transformer steps,
the input wait and the PyTorch side by side.

  python -m benchmarks.gpu_suite_summary results/2026-12-xx_h200
"""
from __future__ import annotations

import json
import os
import sys

# The goals (one H100/H200, bf16, 224 px): checked where the suite measured them.
GOALS = {"mae": ("mfu_datasheet", 0.45, "MFU (datasheet) >= 45%"),
         "vit": ("images_per_sec", 3500.0, ">= 3,500 images/s"),
         "resnet50": ("mfu", 0.40, "MFU >= 40%")}
TORCH_RATIO_GOAL = 1.3
INPUT_WAIT_GOAL = 0.05
NAMES = {"mae": "MAE ViT-{v} (paper decoder, mask 0.75)", "vit": "ViT-{v} supervised",
         "resnet50": "ResNet-50 + PDA", "resnet38": "ResNet38 + PDA",
         "mae_cudnn": "MAE ViT-{v}, attention=cudnn", "vit_cudnn": "ViT-{v}, attention=cudnn",
         "resnet50_fed": "ResNet-50 fed by grain (PNG files)",
         "mae_b512": "MAE ViT-{v}, cudnn, batch 512", "vit_b512": "ViT-{v}, cudnn, batch 512",
         "vit_b512_remat": "ViT-{v}, cudnn, batch 512, remat=dots",
         "vit_tanh": "ViT-{v}, cudnn, gelu=tanh"}
EXTRA = ("mae_b512", "vit_b512", "vit_b512_remat", "vit_tanh")  # rows shown only when run


def _name(name: str, result) -> str:
  return NAMES[name].format(v=(result or {}).get("variant", "B/16"))


def _load(folder: str, name: str):
  try:
    with open(os.path.join(folder, name), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _pct(v):
  return "" if v is None else f"{v:.1%}"


def goal_status(name: str, result: dict) -> str:
  if name not in GOALS:
    return ""
  field, target, text = GOALS[name]
  transformer = name in ("mae", "vit")
  if result.get("image_size") != 224 or (transformer and result.get("variant") != "B/16"):
    return f"{text}: set for {'B/16 at ' if transformer else ''}224 px"
  value = result.get(field)
  if value is None:
    return f"{text}: not measured"
  return f"{text}: {'met' if value >= target else 'missed'}"


def summary(folder: str) -> str:
  lines = ["| step | batch | images/s | MFU (measured peak) | MFU (datasheet) | peak memory | goal |",
           "|---|---|---|---|---|---|---|"]
  results = {}
  for name in NAMES:
    r = _load(folder, f"{name}.json")
    results[name] = r
    if r is None and name in EXTRA and not os.path.exists(os.path.join(folder, f"{name}.txt")):
      continue
    if r is None:
      lines.append(f"| {_name(name, r)} | | not measured (see {name}.txt) | | | | |")
      continue
    memory = r.get("peak_memory_gib")
    lines.append(f"| {_name(name, r)} | {r['batch_size']} | {r['images_per_sec']:,.0f} | "
                 f"{_pct(r.get('mfu'))} | {_pct(r.get('mfu_datasheet'))} | "
                 f"{'' if memory is None else f'{memory:.1f} GiB'} | {goal_status(name, r)} |")
  fed = results.get("resnet50_fed")
  if fed and "data_wait_fraction" in fed:
    wait = fed["data_wait_fraction"]
    lines += ["", f"Input: ResNet-50 fed by grain waited {wait:.1%} of the time "
                  f"({fed['input_images_per_sec']:,.0f} images/s with input; goal < "
                  f"{INPUT_WAIT_GOAL:.0%}: {'met' if wait < INPUT_WAIT_GOAL else 'missed'})."]
  for name in ("mae", "vit"):
    r = results.get(name)
    if r and r.get("fusion"):
      lines += ["", f"Fusion report, {_name(name, r)}:", "",
                "| pass | ops in fusions | fusions | ops outside fusions | written by its fusions |",
                "|---|---|---|---|---|"]
      for pass_name, e in r["fusion"].items():
        written = ", ".join(f"{d} {n / 2**20:,.0f} MiB" for d, n in e["fusion_output_bytes"].items())
        outside = ", ".join(f"{op} {n}" for op, n in e.get("unfused_by_op", {}).items()) or "0"
        lines.append(f"| {pass_name} | {e['fused_ops']} | {e['fusions']} | {outside} | {written} |")
    profile = _load(folder, f"{name}_profile.json")
    if profile and profile.get("ops"):
      lines += ["", f"Top ops by device time, {_name(name, r)} "
                    f"({profile['device_busy_ms_per_step']:.1f} ms busy per step):", "",
                "| op | ms/step | share |", "|---|---|---|"]
      lines += [f"| {o['name'][:70]} | {o['ms_per_step']:.2f} | {o['share']:.1%} |"
                for o in profile["ops"][:8]]
  side = _load(folder, "side_by_side.json")
  if side:
    lines += ["", f"PyTorch {side.get('torch')} side by side (bf16, same batch):", "",
              "| model | JAX images/s | PyTorch runs (images/s) | JAX / fastest PyTorch | goal |",
              "|---|---|---|---|---|"]
    for row in side["rows"]:
      runs = ", ".join(f"{m} {r['images_per_sec']:,.0f}" if r else f"{m}: past its budget"
                       for m, r in row["torch"].items())
      ratio = row.get("ratio")
      goal = ("" if ratio is None else
              f">= {TORCH_RATIO_GOAL}x: {'met' if ratio >= TORCH_RATIO_GOAL else 'missed'}")
      lines.append(f"| {row['model']} | {row['jax']['images_per_sec']:,.0f} | {runs} | "
                   f"{'' if ratio is None else f'{ratio:.2f}x'} | {goal} |")
  return "\n".join(lines)


def main() -> None:
  if len(sys.argv) != 2:
    raise SystemExit(__doc__.strip().splitlines()[-1])
  print(summary(sys.argv[1]))


if __name__ == "__main__":
  main()
