"""The masks-that-follow-the-image ablation in one command: on each embedded set, the whole
pipeline with each refinement on and off, its pseudo-mask and segmenter scores, and Otsu.

  python -m benchmarks.ablation --workdir=runs/ablation
  python -m benchmarks.ablation --workdir=runs/ablation --sets=synthetic_cells --image_size=128 \
      --variants=base,par,band,par+band,image_loss,affinity,norounds,scalesval

Per set, the `base` variant is the pipeline's own recipe (`configs/pipeline.py:dataset=<set>,
upper_bound=True`); every other variant is the same pipeline with its parts changed, sharing the
base run's classifier (copied, so the pipeline resumes past it): `par` (PAR on, kept per layer by
the val masks) or `nopar` (off), `band` (ignore band 0.1) or `noband` (none; the recipe's is
band=auto, chosen on val), `image_loss` (the segmenter's LSE image-level loss, weight 0.1,
findings only), `affinity` (AffinityNet and its random walk),
`norounds` (no self-training; the recipe's is rounds=auto), `scalesval` (map scales chosen on
val), `median3` (PAR on the image's 3x3 median), joined by `+`. `--set classify.num_epochs=1`
(repeatable) changes a field of every run.
Scores: the test split; findings: the finding's IoU and Dice beside mIoU. Otsu on the grey image
(every image, and the images with a finding: a label oracle) is the intensity baseline. Writes
<workdir>/ablation.md and .json, keeping the rows of earlier invocations on the same workdir (each
row is one run's directory, <set>/<variant>); a re-run resumes every finished run.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil

import ml_collections

from benchmarks import refinements, report
from wsss_jax import config_lib
from wsss_jax.data import folders
from wsss_jax.errors import UserError
from wsss_jax.runner import run_phase

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "pipeline.py")
SETS = ("synthetic", "synthetic_lesions", "synthetic_cells")
VARIANTS = ("base", "par", "nopar", "band", "noband", "par+band", "image_loss", "affinity",
            "norounds", "scalesval")
PARTS = ("par", "nopar", "median3", "band", "noband", "image_loss", "affinity", "norounds",
         "scalesval")


def variant_config(dataset: str, variant: str, image_size, overrides=()):
  """The pipeline of `dataset` with the variant's parts changed, then `overrides` ("a.b=v")."""
  parts = [] if variant == "base" else variant.split("+")
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    raise UserError(f"variant {variant!r}: {unknown[0]!r} is not one of base, {', '.join(PARTS)}")
  args = dict(dataset=dataset, upper_bound=variant == "base", image_size=str(image_size or ""),
              affinity="affinity" in parts, rounds="0" if "norounds" in parts else "auto")
  config = config_lib.sibling_config(CONFIG, "pipeline", **args)
  pm = config.pseudo_masks
  if "par" in parts or "nopar" in parts:
    pm.par.enabled = pm.par.validate = "par" in parts
  if "band" in parts or "noband" in parts:
    config.ignore_band.width = "0.1" if "band" in parts else "0"
  if "scalesval" in parts:
    pm.scales_validate = True
  if "median3" in parts:  # PAR's colour affinities on the 3x3-median image (speckle)
    pm.par.smooth = "median3"
  if "image_loss" in parts:
    config.segment.image_loss.weight = 0.1
  for item in overrides:  # e.g. classify.num_epochs=1 for a quick look
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    try:
      config.update_from_flattened_dict({key: value})
    except (KeyError, AttributeError, TypeError) as e:
      raise UserError(f"--set {item}: {e}") from None
  return config


def run_variant(workdir: str, dataset: str, variant: str, image_size,
                overrides=()) -> tuple[dict, str]:
  """One pipeline run (resumed where it stopped), sharing the base run's classifier; (its
  summary, its workdir)."""
  config = variant_config(dataset, variant, image_size, overrides)
  out = os.path.join(workdir, dataset, variant)
  if variant != "base":
    share_classifiers(os.path.join(workdir, dataset, "base"), out)
  return run_phase(config, out), out


def share_classifiers(base: str, out: str) -> None:
  """Copies the base run's classifier at each input side it tried (classify/, and with
  image_size=auto size<N>/classify/) into `out`, where the pipeline resumes past them."""
  sides = [d for d in sorted(os.listdir(base)) if d.startswith("size")]
  for classifier in ["classify"] + [os.path.join(d, "classify") for d in sides]:
    if not os.path.exists(os.path.join(out, classifier)):
      os.makedirs(os.path.dirname(os.path.join(out, classifier)), exist_ok=True)
      shutil.copytree(os.path.join(base, classifier), os.path.join(out, classifier))


def scores(summary: dict, workdir: str) -> dict:
  """Test scores of one pipeline summary: pseudo masks of the layer the segmenter learnt from
  (AffinityNet's and self-training's are scored through their segmenter), the weak segmenter,
  and (base) the same segmenter on the ground truth."""
  learnt = summary.get("mask_layer")
  if not learnt:  # a run from before the pipeline recorded it
    with open(os.path.join(workdir, "segment", "config.json"), encoding="utf-8") as f:
      learnt = json.load(f)["data"]["mask_layers"][-1]
  test = summary["pseudo_masks_test"]["layers"]
  layer = learnt if learnt in test else next(iter(test))
  out = {"pseudo_masks": test[layer],
         "segment": summary["segment"]["test"]["off"], "layer": layer}
  if "segment_full" in summary:
    out["segment_full"] = summary["segment_full"]["test"]["off"]
  return out


def merged(earlier: dict, now: dict) -> dict:
  """The rows of an earlier invocation on the same workdir with this one's: a (set, variant)
  run now replaces its earlier row; sets and variants run only before keep theirs."""
  out = {dataset: {**runs, "variants": dict(runs.get("variants", {}))}
         for dataset, runs in earlier.items()}
  for dataset, runs in now.items():
    row = out.setdefault(dataset, {"variants": {}})
    row["variants"].update(runs["variants"])
    row.update({key: value for key, value in runs.items() if key != "variants"})  # Otsu
  return out


def earlier_results(workdir: str) -> dict:
  path = os.path.join(workdir, "ablation.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def table(results: dict) -> str:
  lines = ["| set | variant | pseudo masks (test) | weak segmenter (test) | full supervision |",
           "|---|---|---|---|---|"]
  cell = lambda s: (f"{s.get('finding_IoU', s['mIoU']):.3f} / {s.get('finding_Dice', s['mDice']):.3f}"
                    f" ({s['mIoU']:.3f})") if s else "-"
  for dataset, runs in results.items():
    for variant, r in runs.get("variants", {}).items():
      lines.append(f"| {dataset} | {variant} | {cell(r['pseudo_masks'])} | {cell(r['segment'])} "
                   f"| {cell(r.get('segment_full'))} |")
    for key, s in runs.get("otsu", {}).items():
      lines.append(f"| {dataset} | Otsu on the image, {key} | | {cell(s)} | |")
  return ("Findings: finding IoU / Dice (mIoU); tissue maps: mIoU / mDice (mIoU).\n\n"
          + "\n".join(lines) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--sets", default=",".join(SETS))
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--image_size", default="",
                      help="N or auto; empty: the pipeline's default (auto for findings)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a pipeline config field for every run, e.g. classify.num_epochs=2")
  args = parser.parse_args()
  results = {}
  for dataset in args.sets.split(","):
    runs = results.setdefault(dataset, {"variants": {}})
    for variant in ["base"] + [v for v in args.variants.split(",") if v != "base"]:
      try:
        runs["variants"][variant] = scores(*run_variant(args.workdir, dataset, variant,
                                                        args.image_size, args.set))
      except UserError as e:  # a part that does not apply to the set (image_loss on tissue)
        print(f"{dataset} {variant}: not run ({e})", flush=True)
    segment = json.load(open(os.path.join(args.workdir, dataset, "base", "segment",
                                          "config.json")))
    data = folders.settle(ml_collections.ConfigDict(segment["data"]))
    if data.setting == "finding":
      runs["otsu"] = refinements.otsu_scores(data, "test")
  results = merged(earlier_results(args.workdir), results)
  report(args.workdir, "ablation", results, table(results))


if __name__ == "__main__":
  main()
