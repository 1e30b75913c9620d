"""Masks that follow the image: the pseudo masks of one classifier with each refinement on and off
(PAR, the ignore band), scored on the test split, beside Otsu on the image.

  python -m benchmarks.refinements --classifier=runs/les/classify --workdir=runs/refine_les
  python -m benchmarks.refinements --classifier=runs/wsss/classify --variants=base,par,band0.1

Each variant runs the pseudo-mask phase as the pipeline configures it (Grad-CAM at scales
1/1.5/2; findings: alpha chosen on the val masks, the CRF kept where the val masks say) on
`--split` and adds: `par` (PAR on every layer), `par_validate` (PAR where the val masks say),
`median3` (PAR on the image's 3x3 median), `band<x>` (the ignore band of half-width x; its
pixels are left out of the scores, their share is the `ignored` column), `scales1/2/3.5` (the map scales), `scalesval` (per layer the subset of
the scales that scores best on val), joined by `+`. Otsu thresholds the grey image (bright polarity) on every test image
and, as a label oracle, on the images with a finding only. Writes <workdir>/refinements.md/.json.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from benchmarks import report
from wsss_jax import config_lib, metrics
from wsss_jax.data import pipeline
from wsss_jax.errors import UserError
from wsss_jax.pseudo import mask_rules
from wsss_jax.runner import run_phase
from wsss_jax.train import earlier_runs

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "pseudo_masks.py")
VARIANTS = ("base", "par", "par_validate", "band0.1", "par+band0.1")


def variant_config(classifier: str, split: str, num_test: int, variant: str, finding: bool):
  """The pipeline's pseudo-mask section for `classifier`, with the variant's refinements."""
  config = config_lib.sibling_config(CONFIGS, "pseudo_masks", classifier=classifier, split=split,
                                     crf=True)
  config.scales = (1.0, 1.5, 2.0)
  config.data.num_test = num_test
  if finding:  # the pipeline's finding recipe
    config.background.alpha, config.crf.validate = "auto", True
  for part in variant.split("+"):
    if part.startswith("par"):
      config.par.enabled, config.par.validate = True, part == "par_validate"
    elif part == "median3":  # PAR's colour affinities on the 3x3-median image (speckle)
      config.par.smooth = "median3"
    elif part.startswith("band"):
      config.ignore_band = float(part[len("band"):])
    elif part.startswith("scales"):  # scales1/2/3.5: these map scales; scalesval: chosen on val
      if part == "scalesval":
        config.scales_validate = True
      else:
        config.scales = tuple(float(x) for x in part[len("scales"):].split("/"))
    elif part != "base":
      raise UserError(f"variant {variant!r}: parts are base, par, par_validate, median3, "
                      f"band<x>, scales<a>/<b>/..., scalesval")
  return config


def otsu_scores(data_cfg, split: str) -> dict:
  """Finding scores of Otsu's bright threshold on every image and on the positives alone."""
  k, names = data_cfg.num_classes, tuple(data_cfg.class_names) + ("background",)
  source = pipeline.build_source(data_cfg, split)
  totals = {"all images": 0, "images with a finding (label oracle)": 0}
  for i in range(len(source)):
    ex = source[i]
    grey = ex["image"].astype(np.float32).mean(-1) / 255.0
    t = float(mask_rules.otsu_threshold(grey.reshape(1, -1))[0])
    c = metrics.confusion_matrix(np.where(grey >= t, 0, k), ex["mask"], k + 1)
    totals["all images"] = totals["all images"] + c
    if ex["labels"].any():
      totals["images with a finding (label oracle)"] += c
  return {key: metrics.iou_scores(c, names, names[:-1]) for key, c in totals.items()}


def table(results: dict) -> str:
  lines = [f"Pseudo masks on the {results['split']} split ({results['classifier']})", "",
           "| variant | layer | mIoU | finding IoU | finding Dice | ignored | refinements |",
           "|---|---|---|---|---|---|---|"]
  for variant, summary in results["runs"].items():
    for layer, s in summary["layers"].items():
      lines.append(f"| {variant} | {layer} | {s['mIoU']:.3f} | {s.get('finding_IoU', np.nan):.3f}"
                   f" | {s.get('finding_Dice', np.nan):.3f} | "
                   f"{summary['ignored_share'].get(layer, 0):.3f} | "
                   f"{'+'.join(summary['refinements'][layer]) or '-'} |")
  for key, s in results.get("otsu", {}).items():
    lines.append(f"| Otsu on the image, {key} | - | {s['mIoU']:.3f} | {s['finding_IoU']:.3f} | "
                 f"{s['finding_Dice']:.3f} | 0 | - |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--classifier", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--split", default="test")
  parser.add_argument("--num_test", type=int, default=128)
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  model_data = json.load(open(os.path.join(args.classifier, "config.json")))["data"]
  probe = config_lib.sibling_config(CONFIGS, "pseudo_masks", classifier=args.classifier)
  data = earlier_runs.data_config(probe, model_data)
  finding = data.setting == "finding"
  results = {"classifier": os.path.abspath(args.classifier), "split": args.split, "runs": {}}
  for variant in args.variants.split(","):
    config = variant_config(args.classifier, args.split, args.num_test, variant, finding)
    results["runs"][variant] = run_phase(config, os.path.join(args.workdir, variant))
  if finding:
    data.num_test = args.num_test
    results["otsu"] = otsu_scores(data, args.split)
  report(args.workdir, "refinements", results, table(results))


if __name__ == "__main__":
  main()
