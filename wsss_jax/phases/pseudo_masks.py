"""Pseudo-mask phase: a trained classifier's relevance maps -> one palette PNG mask per tile and
per layer, scored against the ground truth where it exists.

Sections: the classifier (rebuilt from its workdir, as the maps phase does) -> grain input (tile,
model input, background rule, computed in reader threads) -> per batch one compiled relevance call
for all layers, then masks and their stage-1 confusion matrices on device -> PNG files written by
a thread pool while the next batch computes -> summary.json, table.md, overlays.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from wsss_jax import atomic, metrics, relevance
from wsss_jax.data import folders, mask_files, pipeline
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.models.classifier import build_classifier
from wsss_jax.outputs import overlays
from wsss_jax.pseudo import adversarial_erasing, crf, mask_rules, par
from wsss_jax.relevance.options import DEFAULT_LAYERS, method_options, relu_flag
from wsss_jax.tasks.common import prepare_images
from wsss_jax.train import earlier_runs, preemption
from wsss_jax.train.progress import Progress
from wsss_jax.train.writers import MetricWriter

SPLITS = ("train", "val", "test")


def input_sizes(image_size: int, scales) -> list:
  """Classifier input sizes of the multi-scale maps (scale 1 = the classifier's own size)."""
  if not scales or min(scales) <= 0:
    raise UserError(f"scales={tuple(scales)} must be positive factors, e.g. (1.0,) or (1.0, 1.5)")
  return [max(8, int(round(image_size * s))) for s in scales]


def layer_name(path: str) -> str:
  return path.split("/")[-1]


def write_batch(directory: str, names, layer_masks: dict, palette: list) -> None:
  for layer, m in layer_masks.items():
    mask_files.write_masks(os.path.join(directory, layer), names, m, palette)


def table(summary: dict) -> str:
  """Markdown: each layer's scores (the findings' own IoU and Dice where scored), the share in
  the ignore band, the IoU per class."""
  names = summary["class_names"]
  heads = [name for name, _ in metrics.headline(next(iter(summary["layers"].values())))]
  lines = ["| layer | " + " | ".join(heads + ["ignored"] + names) + " |",
           "|---" * (2 + len(heads) + len(names)) + "|"]
  for layer, s in summary["layers"].items():
    cells = [f"{v:.3f}" for _, v in metrics.headline(s)]
    cells.append(f"{summary.get('ignored_share', {}).get(layer, 0.0):.3f}")
    cells += [f"{s[f'IoU/{c}']:.3f}" for c in names]
    lines.append(f"| {layer} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# alpha values `background.alpha=auto` tries, per map rule (negatives: quantiles)
ALPHA_GRID = {"threshold": tuple(round(0.05 * i, 2) for i in range(1, 20)),
              "power": (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0),
              "negatives": (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999),
              "otsu": (0.0,)}


def parse_alpha(text, map_rule: str):
  """background.alpha: "default" (the rule's), "auto", or a number (checked for the rule)."""
  text = str(text).strip().lower()
  if text == "auto":
    return "auto"
  try:
    alpha = mask_rules.DEFAULT_ALPHA[map_rule] if text == "default" else float(text)
  except ValueError:
    raise UserError(f"background.alpha={text!r} is not a number, 'default' or 'auto'") from None
  mask_rules.check_alpha(map_rule, alpha)
  return alpha


def sweep_table(sweep: dict, rule: str) -> str:
  """Markdown: pseudo-mask mIoU on the validation split for each alpha (rows) and layer."""
  layers = list(sweep)
  lines = [f"background.rule={rule}: pseudo-mask mIoU (findings and background) on the "
           f"validation split per alpha", "", "| alpha | " + " | ".join(layers) + " |",
           "|---" * (1 + len(layers)) + "|"]
  for i, alpha in enumerate(next(iter(sweep.values()))["alpha"]):
    lines.append(f"| {alpha:g} | " + " | ".join(f"{sweep[l]['mIoU'][i]:.3f}" for l in layers)
                 + " |")
  best = ", ".join(f"{l}: {sweep[l]['best']:g}" for l in layers)
  text = "\n".join(lines) + f"\n\nChosen (best mIoU): {best}\n"
  for name, title in (("par", "PAR (par.validate)"), ("crf", "Dense CRF (crf.validate)")):
    if any(f"{name}_mIoU" in s for s in sweep.values()):
      text += f"\n{title} at the chosen alpha: " + ", ".join(
          f"{l}: {sweep[l][f'{name}_mIoU']:.3f} ({'kept' if sweep[l][name] else 'dropped'})"
          for l in layers) + "\n"
  return text


LINE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def save_sweep_plot(path: str, sweep: dict, rule: str) -> None:
  """alpha_sweep.png: mIoU against alpha (x), one line per layer, the chosen alpha circled."""
  w, h, left, right, top, bottom = 640, 420, 70, 150, 40, 60
  image = Image.new("RGB", (w, h), "white")
  draw = ImageDraw.Draw(image)
  alphas = next(iter(sweep.values()))["alpha"]
  lo, hi = min(alphas), max(alphas)
  span = (hi - lo) or 1.0
  def xy(a, v):
    return (left + (a - lo) / span * (w - left - right), top + (1 - v) * (h - top - bottom))
  draw.rectangle([left, top, w - right, h - bottom], outline="black")
  for v in (0.0, 0.25, 0.5, 0.75, 1.0):
    y = xy(lo, v)[1]
    draw.line([left - 4, y, left, y], fill="black")
    draw.text((left - 36, y - 6), f"{v:.2f}", fill="black")
  for a in alphas[::max(1, len(alphas) // 8)]:
    x = xy(a, 0)[0]
    draw.line([x, h - bottom, x, h - bottom + 4], fill="black")
    draw.text((x - 10, h - bottom + 8), f"{a:g}", fill="black")
  draw.text((left, 12), f"background.alpha sweep, rule '{rule}': pseudo-mask mIoU (val)",
            fill="black")
  draw.text(((w - right + left) // 2 - 20, h - 24), "alpha", fill="black")
  draw.text((6, top - 16), "mIoU", fill="black")
  for i, (layer, s) in enumerate(sweep.items()):
    colour = LINE_COLOURS[i % len(LINE_COLOURS)]
    points = [xy(a, v) for a, v in zip(s["alpha"], s["mIoU"])]
    draw.line(points, fill=colour, width=2)
    bx, by = xy(s["best"], s["mIoU"][list(s["alpha"]).index(s["best"])])
    draw.ellipse([bx - 5, by - 5, bx + 5, by + 5], outline=colour, width=2)
    ly = top + 18 * i
    draw.line([w - right + 12, ly + 6, w - right + 36, ly + 6], fill=colour, width=3)
    draw.text((w - right + 42, ly), f"{layer} (best {s['best']:g})", fill="black")
  with atomic.replacing(path) as tmp:
    image.save(tmp)


def dilated_models(meta: dict, dilations) -> list:
  """The classifier rebuilt with its last block at each rate of `dilations` (same weights)."""
  if not dilations:
    return []
  if meta["model"]["backbone"] != "resnet38":
    raise UserError(f"dilations={tuple(dilations)} needs a ResNet38 classifier (its b7 block), "
                    f"not {meta['model']['backbone']!r}")
  if min(dilations) <= 0:
    raise UserError(f"dilations={tuple(dilations)} must be positive integers")
  models = []
  for rate in dilations:
    cfg = ml_collections.ConfigDict(dict(meta["model"], last_dilation=int(rate)))
    models.append(build_classifier(cfg, meta["image_size"], meta["num_classes"]))
  return models


def validate(config) -> None:
  if config.split not in SPLITS:
    raise UserError(f"split={config.split!r} is not one of {SPLITS}")
  if config.batch_size <= 0:
    raise UserError(f"batch_size={config.batch_size} must be positive")
  if config.background.rule != folders.FROM_DATASET:
    mask_rules.check_rule(config.background.rule)
  if config.palette != folders.FROM_DATASET:
    mask_files.palette_bytes(config.palette, 1)
  relevance.check_method(config.method.partition(":")[0])
  relu_choice(config.relu, "tissue")  # refuses an unknown mode before the classifier loads
  if config.crf.enabled:
    crf.check_settings(dict(config.crf))
  if config.par.enabled:
    par.check_settings(dict(config.par))
  if config.scales_validate and (config.dilations or config.get("erasing_workdir")):
    raise UserError("scales_validate chooses among plain multi-scale maps and does not combine "
                    "with dilations or erasing: set scales_validate=False (in the pipeline: "
                    "--config.pseudo_masks.scales_validate=False)")
  if not 0 <= config.ignore_band < 1:
    raise UserError(f"ignore_band={config.ignore_band} must lie in [0, 1) (map scores are in "
                    f"[0, 1])")


def relu_choice(relu: str, setting: str):
  """config.relu: "setting" (tissue: off, the authors' Grad-CAM; finding: on, evidence against
  a finding is not a finding), "method" (the method's default), "off" or "on"."""
  if relu == "setting":
    return setting == "finding"
  return relu_flag(relu, extra_modes=("setting",))


# --- One mask rule, one jitted mask function ----------------------------------------------------
class MaskRule(NamedTuple):
  """How a layer's maps become a mask and how it is scored (static under jit, so hashable)."""
  map_rule: str | None      # None: the tissue rule (argmax of the present classes, image background)
  num_classes: int
  convention: str           # metrics.device_confusion's convention for the scores
  crf: tuple = ()           # dense-CRF settings as (name, value) pairs; () = off
  par: tuple = ()           # PAR settings as (name, value) pairs; () = off
  band: float = 0.0         # the ignore band's half-width in map scores; 0 = off

  @property
  def background_index(self) -> int:
    return self.num_classes  # the palette index after the classes

  def refinements(self) -> tuple:
    """The refinements this rule applies when none were validated: PAR on the maps, the CRF
    on the mask."""
    return ("par",) * bool(self.par) + ("crf",) * bool(self.crf)


def rule_mask(rule: MaskRule, maps, labels, background, alpha, level, band: float):
  """(B, H, W) uint8 mask of one layer's maps (a list over scales) under the background rule."""
  size = background.shape[1:]
  if rule.map_rule:
    return mask_rules.finding_mask(maps, labels, background, size, rule.background_index,
                                   rule.map_rule, alpha, level, band)
  return mask_rules.pseudo_mask(maps, labels, background, size, rule.background_index, band)


class TileImages(NamedTuple):
  """A batch's tiles on the devices and what every layer's refinement shares: PAR's affinity
  weights (computed once per batch, not per layer), or None."""
  u8: Any
  par_weights: Any


@functools.partial(jax.jit, static_argnames=("rule",))
def tile_images(rule: MaskRule, images_u8) -> TileImages:
  settings = dict(rule.par)
  weights = par.affinity(images_u8, tuple(settings["dilations"]), settings["w_rgb"],
                         settings["w_pos"], settings["pos_weight"],
                         settings["smooth"]) if rule.par else None
  return TileImages(images_u8, weights)


def par_maps(rule: MaskRule, maps, images: TileImages, size) -> list:
  """PAR on the maps fused at tile size, with the batch's affinity weights."""
  settings = dict(rule.par)
  return [par.propagate(mask_rules.fuse_maps(maps, size), images.par_weights,
                        tuple(settings["dilations"]), int(settings["iterations"]))]


def layer_mask(rule: MaskRule, maps, labels, background, images: TileImages, alpha, level,
               refine: tuple):
  """The mask of one layer under `rule`, with the refinements named in `refine`: "par" on the
  maps (fused at tile size), "crf" on the mask; the ignore band marked last."""
  if "par" in refine:
    maps = par_maps(rule, maps, images, background.shape[1:])
  mask = rule_mask(rule, maps, labels, background, alpha, level, 0.0)
  if "crf" in refine:
    mask = crf.refine_labels(mask, images.u8, labels, background, rule.background_index,
                             dict(rule.crf), free_background=bool(rule.map_rule))
  if rule.band > 0:  # uncertain pixels stay ignored whatever the CRF made of them
    banded = rule_mask(rule, maps, labels, background, alpha, level, rule.band)
    mask = jnp.where(banded == mask_files.IGNORE, banded, mask)
  return mask


@functools.partial(jax.jit, static_argnames=("rule", "refine"))
def mask_and_confusion(rule: MaskRule, maps, labels, background, truth, valid, images, alpha,
                       level, refine: tuple = ()):
  """The mask of one layer and, where `truth` is given, its confusion matrix on device (the
  ignored band is not scored)."""
  mask = layer_mask(rule, maps, labels, background, images, alpha, level, refine)
  if truth is None:
    return mask, None
  return mask, metrics.device_confusion(mask, truth, rule.num_classes, rule.background_index,
                                        rule.convention, valid)


@functools.partial(jax.jit, static_argnames=("rule", "refine"))
def sweep_confusions(rule: MaskRule, maps, labels, background, truth, valid, images, alphas,
                     levels, refine: tuple = ()):
  """(A, M, M) confusions of one layer for every (alpha, negatives level) pair."""
  if "par" in refine:  # the refined maps do not depend on alpha: once for the sweep
    maps = par_maps(rule, maps, images, background.shape[1:])

  def one(alpha, level):
    return mask_and_confusion(rule, maps, labels, background, truth, valid, images, alpha, level,
                              tuple(r for r in refine if r != "par"))[1]
  return jax.vmap(one)(alphas, levels)


# --- The classifier's maps ----------------------------------------------------------------------
class MapSource(NamedTuple):
  """The classifier's maps of a batch, and what every pass over a split needs to compute them."""
  data: ml_collections.ConfigDict
  batch: int                # global batch size
  inputs: dict              # grain key -> classifier input size, one per scale
  batch_maps: Callable      # (batch, labels) -> [{layer: maps}] over scales, dilations, rounds
  mesh: Any
  classifier: earlier_runs.Classifier
  classifier_workdir: str
  plan: dict | None         # the adversarial-erasing plan, or None


def map_source(config, mesh) -> MapSource:
  """The classifier (or the erasing rounds) rebuilt from its workdir, with its maps function."""
  plan = None
  if config.get("erasing_workdir"):  # adversarial erasing: its rounds replace the classifier
    plan = earlier_runs.load_erasing_plan(config.erasing_workdir)
    if config.dilations:
      raise UserError("dilations and erasing_workdir do not combine; use one or the other")
  workdir = plan["rounds"][0] if plan else config.classifier_workdir
  clf = earlier_runs.load_classifier(workdir, mesh)
  data = earlier_runs.data_config(config, clf.data)
  if not config.data.num_train:  # 0: the classifier's own training set
    data.num_train = clf.data.get("num_train", data.num_train)
  if clf.meta["model"]["backbone"] == "vit" and tuple(config.scales) != (1.0,):
    raise UserError(f"scales={tuple(config.scales)}: a ViT classifier takes only its own input "
                    f"size (fixed position embeddings); use scales=(1.0,)")
  maps_fn = classifier_maps_fn(config, data, clf.meta)
  inputs = {f"input_{i}": size for i, size in enumerate(input_sizes(data.image_size,
                                                                    config.scales))}
  batch = parallel.eval_batch_size(config.batch_size, mesh)
  batch_maps = scale_maps_fn(config, data, clf, plan, maps_fn, inputs, mesh)
  return MapSource(data, batch, inputs, batch_maps, mesh, clf, workdir, plan)


def classifier_maps_fn(config, data, meta: dict) -> Callable:
  """classifier module -> its compiled relevance callable for the configured layers."""
  method, options = method_options(config.method, config, data)
  layers = tuple(config.layers) or DEFAULT_LAYERS.get(meta["model"]["backbone"], ())
  map_rule = mask_rules.split_rule(folders.resolve(data, "background", config.background.rule))[1]
  # map rules normalise by the per-image maximum themselves (mask_rules.max_normalize)
  normalize = "none" if map_rule else config.normalize
  relu = relu_choice(config.relu, data.setting)
  return lambda classifier: relevance.relevance_fn(
      method, classifier.apply, layers=list(layers) or None, target=config.target,
      upsample=False, normalize=normalize, only_present=True, relu=relu, **options)


def scale_maps_fn(config, data, clf, plan, maps_fn, inputs: dict, mesh) -> Callable:
  """(batch, labels) -> the maps of every input scale (and dilation or erasing round)."""
  fn = maps_fn(clf.model)
  dilated = [maps_fn(m) for m in dilated_models(clf.meta, config.dilations)]
  if plan:  # the rounds in a chain, each on its erased input; maps fused by a maximum
    rounds, round_variables = adversarial_erasing.load_rounds(plan["rounds"][1:], mesh, plan,
                                                              maps_fn)
    rounds.insert(0, adversarial_erasing.round_fns(clf.model, clf.meta, plan, maps_fn))
    round_variables.insert(0, clf.variables)  # round 0: the classifier loaded above
    erasing_chain = adversarial_erasing.chain(rounds, plan, adversarial_erasing.fill_value(data))
  prepare = jax.jit(lambda u8: prepare_images(u8, data, jnp.float32))

  def batch_maps(b, labels) -> list:
    scale_maps = []
    for key in inputs:
      x = prepare(parallel.shard_identical(b[key], mesh))
      if plan:
        scale_maps.append(erasing_chain(round_variables, x, labels)[0])
        continue
      extra = [f.maps(clf.variables, x, labels) for f in dilated]
      # multi-dilation (Wei et al. 2018): H_0 + mean_i H_i, i.e. H_0 weighs as all the others
      scale_maps += [fn.maps(clf.variables, x, labels)] * max(1, len(extra)) + extra
    return scale_maps
  return batch_maps


# --- The background rule and its alpha ----------------------------------------------------------
class Background(NamedTuple):
  """The background rule's settings chosen before the masks are written."""
  map_rule: str | None
  alpha: Any                # None, a number, or {layer: alpha} chosen on the val split
  levels: dict              # {layer: raw negatives level} for the negatives rule, else {}
  sweep: dict | None        # the val alpha sweep, when one ran
  refine: dict | None       # {layer: refinements kept on the val masks} (None: the rule's)
  scales: dict | None = None  # {layer: indices of the scales whose maps it fuses} (None: all)

  def maps_of(self, layer: str, maps: list) -> list:
    return maps if self.scales is None else [maps[i] for i in self.scales[layer]]

  def alpha_of(self, layer: str):
    return self.alpha[layer] if isinstance(self.alpha, dict) else self.alpha

  def refinements(self, rule: MaskRule, layer: str) -> tuple:
    return rule.refinements() if self.refine is None else self.refine[layer]


def choose_background(config, source: MapSource, rule: MaskRule, image_rule: str) -> Background:
  """alpha as given, swept on the val masks (alpha=auto) or bounded by the negatives."""
  map_rule = rule.map_rule
  alpha = parse_alpha(config.background.alpha, map_rule) if map_rule else None
  val_truth = alpha == "auto" and has_val_truth(source)
  negatives = {}
  if map_rule == "negatives" or (alpha == "auto" and not val_truth):
    negatives = negative_map_values(source, config)
  if map_rule == "negatives" and not negatives:
    raise UserError(f"background.rule=negatives but the training split of "
                    f"data.name={source.data.name!r} has no negative image (all-zero labels); "
                    f"use threshold, power or otsu")
  sweep = None
  if val_truth:
    sweep = sweep_alpha(source, config, rule, image_rule,
                        negatives if map_rule == "negatives" else None,
                        ("par",) * bool(rule.par and not config.par.validate))
    alpha = {layer: s["best"] for layer, s in sweep.items()}
  elif alpha == "auto" and negatives:  # no ground truth: what the negatives show bounds it
    print(f"background.alpha=auto: the val split has no ground truth; using the negatives rule "
          f"(quantile {mask_rules.DEFAULT_ALPHA['negatives']})", flush=True)
    map_rule, alpha = "negatives", mask_rules.DEFAULT_ALPHA["negatives"]
  elif alpha == "auto":
    raise UserError("background.alpha=auto needs ground-truth masks on the val split or "
                    "negative training images (all-zero labels); give alpha a number")
  chosen = Background(map_rule, alpha, {}, sweep, None)
  if map_rule == "negatives":
    chosen = chosen._replace(levels={layer: np.quantile(v, chosen.alpha_of(layer))
                                     for layer, v in negatives.items()})
  return chosen


def validate_refinements(config, source: MapSource, rule: MaskRule, image_rule: str,
                         chosen: Background) -> Background:
  """par.validate / crf.validate: each refinement (PAR, then the CRF) kept for the layers whose
  val mIoU it raises at their chosen alpha; the others keep what they had."""
  rule = rule._replace(map_rule=chosen.map_rule)
  checked = [name for name in rule.refinements() if config[name].get("validate")]
  base = tuple(r for r in rule.refinements() if r not in checked)
  kept = {}
  scores = refined_val_scores(source, config, rule, image_rule, chosen,
                              lambda layer: kept.get(layer, base))
  for name in checked:
    tried = refined_val_scores(source, config, rule, image_rule, chosen,
                               lambda layer: kept.get(layer, base) + (name,))  # noqa: B023
    for layer, score in tried.items():
      better = score > scores[layer]
      if chosen.sweep:
        chosen.sweep[layer].update({f"{name}_mIoU": score, name: better})
      print(f"{name}.validate {layer}: val mIoU {scores[layer]:.3f} without {name}, "
            f"{score:.3f} with it: {'kept' if better else 'dropped'}", flush=True)
      kept[layer] = kept.get(layer, base) + (name,) * better
      scores[layer] = max(score, scores[layer])
      if chosen.sweep:
        chosen.sweep[layer]["refined_mIoU"] = scores[layer]
  return chosen._replace(refine=kept)


def choose_scales(config, source: MapSource, rule: MaskRule, image_rule: str,
                  chosen: Background) -> Background:
  """scales_validate: per layer, the subset of config.scales (each with the first scale) whose
  fused maps give the best val mIoU at the layer's alpha and refinements."""
  rule = rule._replace(map_rule=chosen.map_rule)
  rest = range(1, len(config.scales))
  subsets = [(0,) + tuple(i for i in rest if mask >> (i - 1) & 1)
             for mask in range(2 ** len(rest))]
  scores = {s: refined_val_scores(source, config, rule, image_rule, chosen,
                                  lambda layer: chosen.refinements(rule, layer), s)
            for s in subsets}
  best = {}
  named = lambda s: "/".join(f"{config.scales[i]:g}" for i in s)  # noqa: E731
  for layer in scores[subsets[0]]:
    best[layer] = max(subsets, key=lambda s: scores[s][layer])  # noqa: B023
    print(f"scales_validate {layer}: " + ", ".join(
        f"{named(s)} {scores[s][layer]:.3f}" for s in subsets) + f": {named(best[layer])} kept",
        flush=True)
    if chosen.sweep:  # the layer's val score is now its kept scales' (segment_layer, sides)
      chosen.sweep[layer]["scales_mIoU"] = {named(s): scores[s][layer] for s in subsets}
      chosen.sweep[layer]["refined_mIoU"] = scores[best[layer]][layer]
  return chosen._replace(scales=best)


# --- The phase ----------------------------------------------------------------------------------
def run(config, workdir: str) -> dict:
  validate(config)
  started = time.perf_counter()
  mesh = parallel.mesh_from_config(config)
  source = map_source(config, mesh)
  data = source.data
  setting = data.setting
  rule_name = folders.resolve(data, "background", config.background.rule)
  image_rule, map_rule = mask_rules.split_rule(rule_name)  # checks the rule
  if setting == "finding" and map_rule is None:
    raise UserError(f"background.rule={rule_name!r}: findings against a background need a map "
                    f"rule ({', '.join(mask_rules.MAP_RULES)}, or white+<one of them>)")
  palette_name = folders.resolve(data, "palette", config.palette)
  palette = mask_files.palette_bytes(palette_name, data.num_classes + 1)
  rule = mask_rule(config, map_rule, data.num_classes, setting)
  chosen = choose_background(config, source, rule, image_rule)
  if any(config[name].get("validate") for name in rule.refinements()) and has_val_truth(source):
    chosen = validate_refinements(config, source, rule, image_rule, chosen)
  if config.scales_validate and len(config.scales) > 1 and has_val_truth(source):
    chosen = choose_scales(config, source, rule, image_rule, chosen)
  if chosen.sweep and parallel.is_main_process():
    write_sweep(workdir, chosen.sweep, rule_name)
  rule = rule._replace(map_rule=chosen.map_rule)
  written = write_masks(config, source, rule, chosen, rule_name, palette, workdir)
  summary = summarize(config, source, rule, chosen, written, rule_name, palette_name, setting)
  summary["wall_seconds"] = time.perf_counter() - started
  report(summary, written.overlay, palette, workdir, config.method)
  return summary


def mask_rule(config, map_rule: str | None, num_classes: int, setting: str) -> MaskRule:
  """The configured rule: scoring by setting, the CRF's and PAR's settings where enabled."""
  return MaskRule(map_rule, num_classes, "finding" if setting == "finding" else "stage1",
                  par.static_settings(config.crf, crf.DEFAULTS) if config.crf.enabled else (),
                  par.static_settings(config.par) if config.par.enabled else (),
                  float(config.ignore_band))


def has_val_truth(source: MapSource) -> bool:
  return pipeline.has_masks(source.data, "val")


def write_sweep(workdir: str, sweep: dict, rule_name: str) -> None:
  atomic.write_text(os.path.join(workdir, "alpha_sweep.md"), sweep_table(sweep, rule_name))
  save_sweep_plot(os.path.join(workdir, "alpha_sweep.png"), sweep, rule_name)


class Written(NamedTuple):
  """What the pass that writes the masks saw."""
  confusion: dict           # {layer: summed confusion} where the split has ground truth
  overlay: list             # (tile, truth or None, {layer: mask}) for the overlay figure
  seen: int
  layers: list              # layer names written
  images_per_sec: float | None
  ignored: dict             # {layer: share of the pixels in the ignore band}


PROGRESS_FILE = "masks.progress.npz"  # where a preempted pass stopped, for its re-run


class Tally:
  """What the mask-writing pass has seen so far: scores, the overlay's tiles, the ignore band's
  pixels. Saved when a preemption notice stops the pass (`save`), read back by its re-run
  (`resume`) when the run's settings are the same (`key`)."""

  def __init__(self, key: str):
    self.key, self.seen, self.layers, self.timed = key, 0, [], 0.0
    self.confusion, self.ignored, self.pixels, self.overlay = {}, {}, {}, []

  def add(self, host: dict, conf: dict, b: dict, has_truth: bool, keep: int) -> None:
    self.layers = list(host)
    for k, m in host.items():
      self.ignored[k] = self.ignored.get(k, 0) + int((m == mask_files.IGNORE).sum())
      self.pixels[k] = self.pixels.get(k, 0) + m.size
    for k, c in conf.items():
      self.confusion[k] = self.confusion.get(k, 0) + np.asarray(c, np.int64)
    valid = int(b["valid"].sum())
    for j in range(min(valid, keep - len(self.overlay))):
      self.overlay.append((b["image"][j], b["mask"][j] if has_truth else None,
                           {layer: m[j] for layer, m in host.items()}))
    self.seen += valid

  def save(self, path: str) -> None:
    arrays = {"key": np.asarray(self.key), "seen": np.asarray(self.seen),
              "layers": np.asarray(self.layers), "timed": np.asarray(self.timed)}
    for k in self.layers:
      arrays[f"ignored/{k}"] = np.asarray([self.ignored[k], self.pixels[k]])
      if k in self.confusion:
        arrays[f"confusion/{k}"] = self.confusion[k]
    for n, (image, truth, masks) in enumerate(self.overlay):
      arrays[f"overlay/{n}/image"] = image
      if truth is not None:
        arrays[f"overlay/{n}/truth"] = truth
      arrays |= {f"overlay/{n}/mask/{k}": m for k, m in masks.items()}
    with atomic.replacing(path) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, **arrays)

  def resume(self, path: str) -> bool:
    """Takes up a saved tally of the same settings; False (a fresh start) otherwise."""
    try:
      saved = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError):
      return False
    if str(saved.pop("key")) != self.key:
      return False
    self.seen, self.timed = int(saved.pop("seen")), float(saved.pop("timed"))
    self.layers = [str(k) for k in saved.pop("layers")]
    for name, value in saved.items():
      kind, _, rest = name.partition("/")
      if kind == "ignored":
        self.ignored[rest], self.pixels[rest] = int(value[0]), int(value[1])
      elif kind == "confusion":
        self.confusion[rest] = value
    shown = sorted({int(n.split("/")[1]) for n in saved if n.startswith("overlay/")})
    self.overlay = [(saved[f"overlay/{n}/image"], saved.get(f"overlay/{n}/truth"),
                     {k: saved[f"overlay/{n}/mask/{k}"] for k in self.layers
                      if f"overlay/{n}/mask/{k}" in saved}) for n in shown]
    return True


def tally_key(config, source: MapSource) -> str:
  """The settings a saved tally belongs to: this config (the runner's report_dir aside), the
  classifier's step and the chosen alpha and refinements."""
  settings = json.loads(config.to_json_best_effort())
  settings.get("data", {}).pop("report_dir", None)
  text = json.dumps([settings, int(source.classifier.step)], sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_masks(config, source: MapSource, rule: MaskRule, chosen: Background, rule_name: str,
                palette: list, workdir: str) -> Written:
  """Every tile's masks, PNGs written by a thread pool while the next batch computes. A SIGTERM /
  SIGINT stops the pass after a batch (its masks and tally kept); the re-run goes on from there."""
  tiles = pipeline.build_source(source.data, config.split)
  has_truth = "mask" in tiles[0]
  keys = (("image", "labels", "name", "background") + tuple(source.inputs)
          + (("mask",) if has_truth else ()))
  background = mask_rules.BackgroundMask(rule_name, config.background.threshold,
                                         config.background.min_size)
  directory, record = os.path.join(workdir, "masks"), os.path.join(workdir, PROGRESS_FILE)
  tally, total = Tally(tally_key(config, source)), len(tiles)
  if tally.resume(record):
    print(f"pseudo masks: resuming after {tally.seen} of {total} tiles", flush=True)
  first = tally.seen
  progress = Progress("pseudo masks", total, config.get("progress_every_s", 10.0))
  progress.update(first)
  with preemption.StopSignal() as stop, atomic.BackgroundWrites(config.writer_threads) as writer:
    for i, b in enumerate(pipeline.tile_batches(source.data, config.split, source.batch,
                                                source.inputs, keys, extra=[background],
                                                start=first)):
      t0 = time.perf_counter()
      host, conf = batch_masks(source, rule, chosen, b, has_truth)
      tally.timed += (time.perf_counter() - t0) if i else 0.0  # the first batch compiles
      if parallel.is_main_process():
        writer.submit(write_batch, directory, list(b["name"][b["valid"]]), host, palette)
      tally.add(host, conf, b, has_truth, config.overlays)
      progress.update(tally.seen)
      if stop.reached(i) and tally.seen < total:
        writer.wait()
        tally.save(record)
        raise preemption.Preempted(
            f"preempted (SIGTERM or SIGINT): pseudo masks stopped after {tally.seen} of "
            f"{total} tiles, written; run the same command again to resume there")
  if not tally.seen:
    raise UserError(f"split {config.split!r} of data.name={source.data.name!r} has no images")
  if os.path.exists(record):
    os.remove(record)
  computed = tally.seen - first - source.batch
  rate = computed / tally.timed if tally.timed and computed > 0 else None
  return Written(tally.confusion, tally.overlay, tally.seen, tally.layers, rate,
                 {k: v / max(tally.pixels[k], 1) for k, v in tally.ignored.items()})


def batch_masks(source: MapSource, rule: MaskRule, chosen: Background, b: dict,
                has_truth: bool) -> tuple[dict, dict]:
  """({layer: valid rows' masks on the host}, {layer: confusion on device}) of one batch."""
  mesh = source.mesh
  labels = jnp.asarray(b["labels"])
  scale_maps = source.batch_maps(b, labels)
  truth = parallel.shard_identical(b["mask"], mesh) if has_truth else None
  background = parallel.shard_identical(b["background"], mesh)
  uses_par = chosen.refine is None or any("par" in r for r in chosen.refine.values())
  images = tile_images(rule if uses_par else rule._replace(par=()),
                       parallel.shard_identical(b["image"], mesh))
  masks, confusion = {}, {}
  for layer in scale_maps[0]:
    name = layer_name(layer)
    level = jnp.float32(chosen.levels[name]) if chosen.levels else None
    masks[name], c = mask_and_confusion(
        rule, chosen.maps_of(name, [m[layer] for m in scale_maps]), labels, background, truth,
        jnp.asarray(b["valid"]),
        images, jnp.float32(chosen.alpha_of(name) or 0.0), level,
        refine=chosen.refinements(rule, name))
    if c is not None:
      confusion[name] = c
  valid = b["valid"]
  return {k: np.asarray(v)[valid] for k, v in masks.items()}, confusion  # waits for the batch


def summarize(config, source: MapSource, rule: MaskRule, chosen: Background, written: Written,
              rule_name: str, palette_name: str, setting: str) -> dict:
  names = tuple(source.data.class_names)
  scored_names = names + (("background",) if rule.convention == "finding" else ())
  clf, plan = source.classifier, source.plan
  return {"phase": "pseudo_masks", "classifier": os.path.abspath(source.classifier_workdir),
          "classifier_step": int(clf.step), "backbone": clf.meta["model"]["backbone"],
          "method": config.method, "split": config.split, "num_images": written.seen,
          "scales": list(config.scales), "setting": setting,
          "layers_written": written.layers, "class_names": list(names),
          "background_rule": rule_name, "scoring": rule.convention,
          "background_alpha": ({k: chosen.alpha_of(k) for k in written.layers}
                               if chosen.map_rule else None),
          "negatives_level": {k: float(v) for k, v in chosen.levels.items()} or None,
          "alpha_sweep": chosen.sweep, "palette": palette_name,
          "crf": dict(config.crf) if config.crf.enabled else None,
          "par": dict(config.par) if config.par.enabled else None,
          "refinements": {k: list(chosen.refinements(rule, k)) for k in written.layers},
          "crf_layers": [k for k in written.layers if "crf" in chosen.refinements(rule, k)],
          "ignore_band": rule.band,
          "scales_kept": ({k: [config.scales[i] for i in chosen.scales[k]]
                           for k in written.layers} if chosen.scales else None),
          "ignored_share": written.ignored,
          "dilations": list(config.dilations),
          "erasing": {"workdir": os.path.abspath(config.erasing_workdir),
                      "rounds": len(plan["rounds"])} if plan else None,
          "images_per_sec": written.images_per_sec,
          "layers": {k: metrics.iou_scores(c, scored_names, names * (rule.convention == "finding"))
                     for k, c in written.confusion.items()}}


def report(summary: dict, overlay: list, palette: list, workdir: str, method: str) -> None:
  """overlays/pseudo_masks.png, table.md, the scores printed, summary.json."""
  writer = MetricWriter(workdir, parallel.is_main_process())
  scored_names = summary["class_names"] + (["background"] if summary["scoring"] == "finding"
                                           else [])
  if parallel.is_main_process():
    if overlay:
      figure = overlays.mask_figure(overlay, palette, scored_names,
                                    f"pseudo masks: {method}, background "
                                    f"{summary['background_rule']}")
      overlays.save(os.path.join(workdir, "overlays", "pseudo_masks.png"), figure)
      writer.image("pseudo_masks", 0, figure)
    if summary["layers"]:
      atomic.write_text(os.path.join(workdir, "table.md"), table(summary))
  for layer, s in summary["layers"].items():
    print(f"pseudo masks {layer}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.headline(s)),
          flush=True)
  writer.summary(summary)
  writer.close()


# --- Passes over other splits: the negatives, the val sweep, the CRF check ----------------------
def negative_map_values(source: MapSource, config) -> dict:
  """{layer: raw max_c M_c values} over the pixels (at 56 x 56) of up to
  `background.negatives_images` negative training images, each class's map taken as if present."""
  values, count = {}, 0
  limit = config.background.negatives_images
  keys = ("labels",) + tuple(source.inputs)
  for b in pipeline.tile_batches(source.data, "train", source.batch, source.inputs, keys):
    negative = b["valid"] & ~(b["labels"] > 0).any(axis=1)
    if not negative.any():
      continue
    everything = jnp.ones(b["labels"].shape, jnp.float32)
    for layer in (scale_maps := source.batch_maps(b, everything))[0]:
      fused = mask_rules.fuse_maps([m[layer] for m in scale_maps], (56, 56))
      peak = np.asarray(jax.nn.relu(fused).max(axis=1))[negative]
      values.setdefault(layer_name(layer), []).append(peak.ravel())
    count += int(negative.sum())
    if count >= limit:
      break
  return {layer: np.concatenate(v) for layer, v in values.items()}


def val_confusions(source: MapSource, config, image_rule: str, layer_confusion,
                   with_images: MaskRule | None = None) -> dict:
  """{layer: summed confusion(s)} over the val split: per batch and layer,
  layer_confusion(name, maps of every scale, labels, background, truth, valid, images) (the
  TileImages of `with_images`'s rule on the devices, else None)."""
  keys = ("image", "labels", "mask", "background") + tuple(source.inputs)
  white = mask_rules.BackgroundMask(image_rule, config.background.threshold,
                                    config.background.min_size)
  totals, mesh = {}, source.mesh
  for b in pipeline.tile_batches(source.data, "val", source.batch, source.inputs, keys,
                                 extra=[white]):
    labels = jnp.asarray(b["labels"])
    scale_maps = source.batch_maps(b, labels)
    background = parallel.shard_identical(b["background"], mesh)
    truth = parallel.shard_identical(b["mask"], mesh)
    images = (tile_images(with_images, parallel.shard_identical(b["image"], mesh))
              if with_images else None)
    for layer in scale_maps[0]:
      name = layer_name(layer)
      c = layer_confusion(name, [m[layer] for m in scale_maps], labels, background, truth,
                          jnp.asarray(b["valid"]), images)
      totals[name] = totals.get(name, 0) + np.asarray(c, np.int64)
  return totals


def sweep_alpha(source: MapSource, config, rule: MaskRule, image_rule: str,
                negatives: dict | None, refine: tuple = ()) -> dict:
  """{layer: {alpha: [...], mIoU: [...], best}}: the pseudo-mask mIoU (finding scoring, no
  ignore band) of the val split for every alpha of ALPHA_GRID[rule.map_rule], the maps refined
  by PAR where `refine` names it."""
  grid = ALPHA_GRID[rule.map_rule]
  scoring = rule._replace(convention="finding", crf=(), band=0.0)
  names = tuple(source.data.class_names) + ("background",)

  def layer_confusions(name, maps, labels, background, truth, valid, images):
    levels = (np.quantile(negatives[name], grid) if negatives is not None
              else np.zeros(len(grid)))
    return sweep_confusions(scoring, maps, labels, background, truth, valid, images,
                            jnp.asarray(grid, jnp.float32), jnp.asarray(levels, jnp.float32),
                            refine)

  out = {}
  for name, c in val_confusions(source, config, image_rule, layer_confusions,
                                with_images=scoring if refine else None).items():
    miou = [metrics.iou_scores(c[i], names)["mIoU"] for i in range(len(grid))]
    out[name] = {"alpha": list(grid), "mIoU": miou, "best": grid[int(np.nanargmax(miou))]}
  return out


def refined_val_scores(source: MapSource, config, rule: MaskRule, image_rule: str,
                       chosen: Background, refine_of: Callable, subset: tuple | None = None) -> dict:
  """{layer: val pseudo-mask mIoU (no ignore band) at the layer's alpha with the refinements
  `refine_of(layer)`, from the maps of the scales chosen (or of the indices in `subset`)}."""
  scoring = rule._replace(band=0.0)
  names = tuple(source.data.class_names) + ("background",) * (rule.convention == "finding")

  def layer_confusion(name, maps, labels, background, truth, valid, images):
    maps = [maps[i] for i in subset] if subset is not None else chosen.maps_of(name, maps)
    return mask_and_confusion(scoring, maps, labels, background, truth, valid, images,
                              jnp.float32(chosen.alpha_of(name) or 0.0),
                              jnp.float32(chosen.levels.get(name, 0.0)),
                              refine=refine_of(name))[1]

  totals = val_confusions(source, config, image_rule, layer_confusion, with_images=scoring)
  return {name: metrics.iou_scores(c, names)["mIoU"] for name, c in totals.items()}
