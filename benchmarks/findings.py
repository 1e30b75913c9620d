"""Findings against a background: each map method x each background rule -> pseudo-mask mIoU,
next to the intensity-threshold baseline (Otsu on the image).

  python -m benchmarks.findings --classifier=runs/les/classify --workdir=runs/findings
  python -m benchmarks.findings --classifier=... --methods=gradcam,layercam --rules=threshold,otsu

For every (method, rule) the pseudo-mask phase runs on `--split` (default test) with
`background.alpha=auto`: alpha is chosen on the validation split's masks and the masks are
scored on the test split (finding scoring: mIoU over the findings and the background), so the
choice of alpha never sees the images it is scored on. The baseline thresholds the grey image
by Otsu's method, in both polarities, and keeps the better one (an upper bound on the baseline:
it chooses the polarity with the ground truth). Writes <workdir>/findings.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

METHODS = ("cam", "gradcam", "layercam", "lrp:EpsilonPlusFlat", "lrp:EpsilonGammaBox",
           "patternattribution")
RULES = ("threshold", "power", "otsu", "negatives")
CAM_LAYER = {"resnet38": ("bn7",), "resnet50": ("layer4",)}


def otsu_baseline(data_cfg, split: str) -> dict:
  """Finding-convention scores of Otsu's threshold on the grey image, dark and bright polarity."""
  import jax.numpy as jnp

  from wsss_jax import metrics
  from wsss_jax.data import pipeline
  from wsss_jax.pseudo import mask_rules
  k = data_cfg.num_classes
  names = tuple(data_cfg.class_names) + ("background",)
  source = pipeline.build_source(data_cfg, split)
  totals = {"dark": 0, "bright": 0}
  for i in range(len(source)):
    ex = source[i]
    grey = ex["image"].astype(np.float32).mean(-1) / 255.0
    t = float(mask_rules.otsu_threshold(jnp.asarray(grey.reshape(1, -1)))[0])
    for polarity, found in (("dark", grey < t), ("bright", grey >= t)):
      pred = np.where(found, 0, k)  # the baseline's one finding is class 0
      totals[polarity] = totals[polarity] + metrics.confusion_matrix(pred, ex["mask"], k + 1)
  return {p: metrics.iou_scores(c, names) for p, c in totals.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--classifier", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--rules", default=",".join(RULES))
  parser.add_argument("--split", default="test")
  parser.add_argument("--num_test", type=int, default=128)
  args = parser.parse_args()
  from wsss_jax import config_lib
  from wsss_jax.errors import UserError
  from wsss_jax.runner import run_phase
  from wsss_jax.train import earlier_runs
  os.makedirs(args.workdir, exist_ok=True)
  backbone = json.load(open(os.path.join(args.classifier, "config.json")))["model"]["backbone"]
  results = {"classifier": os.path.abspath(args.classifier), "split": args.split, "runs": {}}
  config_file = os.path.join(os.path.dirname(__file__), "..", "configs", "pseudo_masks.py")
  for method in args.methods.split(","):
    for rule in args.rules.split(","):
      config = config_lib.sibling_config(config_file, "pseudo_masks",
                                         f"classifier={args.classifier},method={method},"
                                         f"split={args.split},background={rule}")
      config.background.alpha = "default" if rule == "otsu" else "auto"
      config.data.num_test = args.num_test
      config.overlays = 4
      if method == "cam":  # CAM reads only the layer the head pools
        config.layers = CAM_LAYER.get(backbone, ())
      out = os.path.join(args.workdir, f"{method.replace(':', '_')}_{rule}")
      try:
        summary = run_phase(config, out)
      except UserError as e:  # a method that does not apply to this classifier: say so
        print(f"{method} {rule}: not run ({e})", flush=True)
        continue
      results["runs"][f"{method}|{rule}"] = {
          layer: {"mIoU": s["mIoU"], "alpha": summary["background_alpha"][layer]}
          for layer, s in summary["layers"].items()}
      print(f"{method} {rule}: " + ", ".join(f"{l} {v['mIoU']:.3f}" for l, v in
                                             results["runs"][f"{method}|{rule}"].items()),
            flush=True)
  model_data = json.load(open(os.path.join(args.classifier, "config.json")))["data"]
  data = earlier_runs.data_config(config, model_data)
  data.num_test = args.num_test
  results["otsu_on_image"] = otsu_baseline(data, args.split)
  with open(os.path.join(args.workdir, "findings.json"), "w") as f:
    json.dump(results, f, indent=2, default=float)
  layers = list(dict.fromkeys(l for by_layer in results["runs"].values() for l in by_layer))
  lines = [f"Pseudo-mask mIoU (findings and background) on the {args.split} split; alpha chosen "
           f"on val", "", "| method | rule | " + " | ".join(layers) + " |",
           "|---|---|" + "---|" * len(layers)]
  for key, by_layer in results["runs"].items():
    method, rule = key.split("|")
    cells = [f"{by_layer[l]['mIoU']:.3f} (alpha {by_layer[l]['alpha']:g})" if l in by_layer
             else "-" for l in layers]
    lines.append(f"| {method} | {rule} | " + " | ".join(cells) + " |")
  for polarity, s in results["otsu_on_image"].items():
    lines.append(f"| Otsu on the image ({polarity}) | - | {s['mIoU']:.3f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  with open(os.path.join(args.workdir, "findings.md"), "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
