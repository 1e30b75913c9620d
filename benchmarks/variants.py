"""The weakly supervised pipeline on the embedded dataset once per variant, side by side:

  python -m benchmarks.variants --workdir=runs/variants                 # every variant
  python -m benchmarks.variants --workdir=runs/variants --only=baseline,crf

Each variant is `configs/pipeline.py:paper=True` (the authors' method alone: the baseline) plus
config overrides (VARIANTS); `seam_crf_b4_5` is the pipeline's default. A variant that changes
only the pseudo masks starts from a copy of the baseline's classifier, so the difference is its
own. Writes <workdir>/variants.md (and .json): the classifier's training images/s relative to the
baseline, the pseudo masks' stage-1 mIoU per layer (training tiles, then test tiles), and the
segmenter's test mIoU with the classification gate ("exclude"). Every number is from this run;
a variant that does not help shows as such.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

# name -> (overrides, reuses the baseline classifier)
VARIANTS = {
    "baseline": ([], False),
    "hide_and_seek": (["--config.classify.hide_and_seek.prob=0.5"], False),
    "mixup": (["--config.classify.mixup_alpha=0.8"], False),
    "crf": (["--config.pseudo_masks.crf.enabled=True"], True),
    "seam": (["--config.classify.equivariance.weight=1.0"], False),
    "seam_crf": (["--config.classify.equivariance.weight=1.0",  # the two that helped, together
                  "--config.pseudo_masks.crf.enabled=True"], False),
    # configs/pipeline.py's default: as seam_crf, the segmenter on the b4_5 masks alone
    "seam_crf_b4_5": (["--config.classify.equivariance.weight=1.0",
                       "--config.pseudo_masks.crf.enabled=True",
                       "--config.segment.data.mask_layers=('b4_5',)",
                       "--config.segment.loss_weights=(1.0,)"], False),
    "multi_dilation": (["--config.pseudo_masks.dilations=(8, 12)"], True),
    # the baseline's classifier is round 0; up to 2 more rounds train on erased tiles
    "erasing": (["--config.run_erasing=True", "--config.erasing.erasing.rounds=3"], True),
    # smaller mined regions (max-normalised map > 0.8): fewer tiles hit the max_erased stop
    "erasing_t0.8": (["--config.run_erasing=True", "--config.erasing.erasing.rounds=3",
                      "--config.erasing.erasing.threshold=0.8"], True),
}


def run_variant(name: str, workdir: str, base: str) -> dict:
  overrides, reuse = VARIANTS[name]
  target = os.path.join(workdir, name)
  if reuse and not os.path.exists(os.path.join(target, "classify")):
    shutil.copytree(os.path.join(base, "classify"), os.path.join(target, "classify"))
  cmd = [sys.executable, "-m", "wsss_jax.main", "--config=configs/pipeline.py:paper=True",
         f"--workdir={target}"] + overrides
  print("==", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=os.path.join(os.path.dirname(__file__), ".."))
  with open(os.path.join(target, "summary.json"), encoding="utf-8") as f:
    return json.load(f)


def classify_images_per_sec(target: str) -> float:
  """Mean of the logged training windows (a resumed run's summary has no throughput)."""
  with open(os.path.join(target, "classify", "metrics.jsonl"), encoding="utf-8") as f:
    rates = [r["images_per_sec"] for r in map(json.loads, f) if "images_per_sec" in r]
  return sum(rates) / len(rates)


def row(name: str, result: dict, base: dict) -> dict:
  pm, pm_test = result["pseudo_masks"]["layers"], result["pseudo_masks_test"]["layers"]
  reused = VARIANTS[name][1]  # the baseline's classifier: its cost is the baseline's
  return {"variant": name, "overrides": " ".join(VARIANTS[name][0]) or "-",
          "classify_images_per_sec_rel": 1.0 if reused else (
              classify_images_per_sec(result["workdir"])
              / classify_images_per_sec(base["workdir"])),
          "pseudo_masks_tiles_per_sec_rel": (result["pseudo_masks"]["images_per_sec"]
                                             / base["pseudo_masks"]["images_per_sec"]),
          # erasing trains a classifier per round (each at the baseline's step cost)
          "classifiers_trained": len(result["erasing"]["report"]) if "erasing" in result else 1,
          "pseudo_mIoU_train": {k: v["mIoU"] for k, v in pm.items()},
          "pseudo_mIoU_test": {k: v["mIoU"] for k, v in pm_test.items()},
          "segment_mIoU": result["segment"]["test"]["exclude"]["mIoU"]}


def markdown(rows: list) -> str:
  layers = list(rows[0]["pseudo_mIoU_train"])
  head = ("| variant | classifier images/s vs baseline | classifiers trained | "
          "pseudo-mask tiles/s vs baseline | "
          + " | ".join(f"pseudo mIoU {k} (train / test)" for k in layers)
          + " | segmentation mIoU (test, gated) |")
  lines = [head, "|---" * (5 + len(layers)) + "|"]
  for r in rows:
    cells = " | ".join(f"{r['pseudo_mIoU_train'][k]:.3f} / {r['pseudo_mIoU_test'][k]:.3f}"
                       for k in layers)
    lines.append(f"| {r['variant']} | {r['classify_images_per_sec_rel']:.2f}x | "
                 f"{r['classifiers_trained']} | "
                 f"{r['pseudo_masks_tiles_per_sec_rel']:.2f}x | {cells} | "
                 f"{r['segment_mIoU']:.3f} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="runs/variants")
  parser.add_argument("--only", default=",".join(VARIANTS))
  args = parser.parse_args()
  names = ["baseline"] + [n for n in args.only.split(",") if n != "baseline"]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    sys.exit(f"error: unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
  base_dir = os.path.join(args.workdir, "baseline")
  results = {n: run_variant(n, args.workdir, base_dir) for n in names}
  rows = [row(n, results[n], results["baseline"]) for n in names]
  text = markdown(rows)
  print(text)
  with open(os.path.join(args.workdir, "variants.md"), "w", encoding="utf-8") as f:
    f.write(text)
  with open(os.path.join(args.workdir, "variants.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
