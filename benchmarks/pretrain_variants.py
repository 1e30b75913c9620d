"""Pretraining variants on the embedded dataset, compared on one table by the linear probe and
the fine-tune that end every pretrain run:

  python -m benchmarks.pretrain_variants --workdir=runs/pretrain_variants
  python -m benchmarks.pretrain_variants --workdir=runs/pretrain_variants --only=mae,exemplar

Each variant is `configs/mae.py` (ViT-S/16 at 112 px, 200 steps of 32 by default) plus config
arguments and overrides (VARIANTS); `chained` starts from the `mae` run's weights;
`rotation_resnet38` is a pretext task on the pipeline's CNN (1/8-width ResNet38) instead of a ViT.
The rows `none` and `none_resnet38` train the same probe and fine-tune from a random encoder:
the floors the ViT and the CNN variants should clear. Writes <workdir>/pretrain_variants.md (and .json): pretraining images/s relative to MAE
(from the logged windows), the final pretraining loss of its own objective, and the validation
mAP / mean F1 of the probe and of the fine-tune. Every number is from this run or, for a variant
whose workdir already holds a finished run of the same steps (summary.json with its evaluation),
from that earlier run: an interrupted table resumes where it stopped.

  python -m benchmarks.pretrain_variants --workdir=runs/pretrain_variants --pipeline

also runs the weakly supervised pipeline from each variant's encoder
(`configs/pipeline.py:pretrain=<its workdir>,paper=True`: no SEAM, no CRF, in
<workdir>/pipeline/<variant>; `none`: `pretrain=scratch`, a ViT from random weights;
`none_resnet38`: the paper pipeline itself) and adds the classifier's validation mAP, the pseudo
masks' stage-1 mIoU (training tiles / test tiles; the ResNet38's bn7 layer) and the segmenter's
test mIoU with the classification gate ("exclude"): what a pretraining is for in this project.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# name -> (configs/mae.py arguments, extra overrides); "{workdir}" is this script's workdir
VARIANTS = {
    "mae": ("", []),
    "mae_block": ("sampling=block", []),
    "mae_grid": ("sampling=grid", []),
    "mae_centre": ("sampling=centre", []),
    "mae_crop_0.5": ("crop_min=0.5", []),
    "rotation": ("objective=rotation", []),
    "jigsaw": ("objective=jigsaw,jigsaw_grid=4", []),  # 3 does not divide 112 px
    "exemplar": ("objective=exemplar", []),
    "chained": ("objective=rotation,init={workdir}/mae", []),
    # a pretext task on the pipeline's CNN (its floor: `none_resnet38`, a random trunk)
    "rotation_resnet38": ("objective=rotation,encoder=resnet38", []),
}
# the floors: the same probe, fine-tune and pipeline from a random encoder of each kind
FLOORS = {"none": "vit", "none_resnet38": "resnet38"}
# the pseudo-mask layer a row reports: a ViT has one token layer; the CNN's is the paper's
# heaviest-weighted bn7 (0.6 of the segmenter's loss with paper=True)
CNN_LAYER = "bn7"


def run(cmd: list) -> None:
  print("==", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def load(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _finished(summary_path: str, steps: int) -> bool:
  """A run of `steps` steps whose end-of-run evaluation was written."""
  if not os.path.exists(summary_path):
    return False
  summary = load(summary_path)
  return summary.get("steps") == steps and "evaluation" in summary


def pretrain_variant(name: str, workdir: str, steps: int) -> dict:
  arg, overrides = VARIANTS[name]
  arg = ",".join(a for a in (arg.format(workdir=workdir), f"steps={steps}") if a)
  target = os.path.join(workdir, name)
  if not _finished(os.path.join(target, "summary.json"), steps):
    run([sys.executable, "-m", "wsss_jax.main", f"--config=configs/mae.py:{arg}",
         f"--workdir={target}"] + overrides)
  summary = load(os.path.join(target, "summary.json"))
  with open(os.path.join(target, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  rates = [r["images_per_sec"] for r in rows if "images_per_sec" in r]
  return {"variant": name, "args": arg, "images_per_sec": sum(rates) / len(rates),
          "final_loss": rows[-1]["loss"], **summary["evaluation"]}


def random_encoder(variant: str, workdir: str) -> dict:
  """The probe and fine-tune of configs/mae.py's evaluation from a random encoder (a ViT-S/16
  or the 1/8-width ResNet38 of configs/mae.py's defaults, fed as it would feed them)."""
  out = {"variant": variant, "args": "-", "images_per_sec": None, "final_loss": None}
  backbone = FLOORS[variant]
  cnn = "" if backbone == "vit" else ",pda=off,width=0.125"
  for name, probe in (("linear_probe", ",probe=True"), ("finetune", "")):
    target = os.path.join(workdir, variant, name)
    if not os.path.exists(os.path.join(target, "summary.json")):
      run([sys.executable, "-m", "wsss_jax.main",
           f"--config=configs/classify.py:backbone={backbone}{cnn},epochs=2,image_size=112"
           f"{probe}",
           f"--workdir={target}"] + ([] if probe else ["--config.optim.lr_batch_scaling=False"]))
    s = load(os.path.join(target, "summary.json"))
    out[name] = {"mAP": s["val/mAP"], "mean_f1": s["val/mean_f1"], "steps": s["steps"]}
  return out


def pipeline_scores(name: str, workdir: str) -> dict:
  """The pipeline from the variant's encoder (a finished pipeline run is read, not re-run)."""
  target = os.path.join(workdir, "pipeline", name)
  summary_path = os.path.join(target, "summary.json")
  if not os.path.exists(summary_path):
    start = {"none": ",pretrain=scratch", "none_resnet38": ""}.get(
        name, f",pretrain={os.path.join(workdir, name)}")
    run([sys.executable, "-m", "wsss_jax.main", f"--config=configs/pipeline.py:paper=True{start}",
         f"--workdir={target}"])
  result = load(summary_path)
  layers = result["pseudo_masks"]["layers"]
  layer = CNN_LAYER if CNN_LAYER in layers else next(iter(layers))  # a ViT: one token layer
  return {"classifier_mAP": result["classify"]["val/mAP"], "pseudo_layer": layer,
          "pseudo_mIoU_train": layers[layer]["mIoU"],
          "pseudo_mIoU_test": result["pseudo_masks_test"]["layers"][layer]["mIoU"],
          "segment_mIoU": result["segment"]["test"]["exclude"]["mIoU"]}


def markdown(rows: list) -> str:
  base = next((r["images_per_sec"] for r in rows if r["variant"] == "mae"), None)
  scored = all("pipeline" in r for r in rows)
  head = ["variant", "arguments", "images/s vs MAE", "final loss (own objective)", "probe mAP",
          "probe F1", "fine-tune mAP", "fine-tune F1"]
  if scored:
    head += ["pipeline classifier mAP", "pseudo mIoU (train / test)",
             "segmentation mIoU (test, gated)"]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    speed = f"{r['images_per_sec'] / base:.2f}x" if base and r["images_per_sec"] else "-"
    loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "-"
    p, f = r["linear_probe"], r["finetune"]
    cells = [r["variant"], r["args"], speed, loss, f"{p['mAP']:.3f}", f"{p['mean_f1']:.3f}",
             f"{f['mAP']:.3f}", f"{f['mean_f1']:.3f}"]
    if scored:
      q = r["pipeline"]
      cells += [f"{q['classifier_mAP']:.3f}",
                f"{q['pseudo_mIoU_train']:.3f} / {q['pseudo_mIoU_test']:.3f} "
                f"({q['pseudo_layer']})",
                f"{q['segment_mIoU']:.3f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="runs/pretrain_variants")
  parser.add_argument("--only", default=",".join([*VARIANTS, *FLOORS]))
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--pipeline", action="store_true",
                      help="also score each encoder by the pipeline's pseudo masks and segmenter")
  args = parser.parse_args()
  names = args.only.split(",")
  unknown = [n for n in names if n not in VARIANTS and n not in FLOORS]
  if unknown:
    sys.exit(f"error: unknown variant {unknown[0]!r}; known: {', '.join([*VARIANTS, *FLOORS])}")
  if "chained" in names and "mae" not in names:
    names.insert(0, "mae")  # chained starts from it
  workdir = os.path.abspath(args.workdir)
  rows = [random_encoder(n, workdir) if n in FLOORS else pretrain_variant(n, workdir, args.steps)
          for n in names]
  if args.pipeline:
    for r in rows:
      r["pipeline"] = pipeline_scores(r["variant"], workdir)
  text = markdown(rows)
  print(text)
  with open(os.path.join(workdir, "pretrain_variants.md"), "w", encoding="utf-8") as f:
    f.write(text)
  with open(os.path.join(workdir, "pretrain_variants.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
