"""Pseudo-mask phase: a trained classifier's relevance maps -> one palette PNG mask per tile and
per layer, scored against the ground truth where it exists.

Sections: the classifier (rebuilt from its workdir, as the maps phase does) -> grain input (tile,
model input, background rule, computed in reader threads) -> per batch one compiled relevance call
for all layers, then masks and their stage-1 confusion matrices on device -> PNG files written by
a thread pool while the next batch computes -> summary.json, table.md, overlays.
"""
from __future__ import annotations

import concurrent.futures
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from wsss_jax import metrics, relevance
from wsss_jax.data import folders, mask_files, pipeline
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.models.classifier import build_classifier
from wsss_jax.outputs import overlays
from wsss_jax.pseudo import adversarial_erasing, crf, mask_rules
from wsss_jax.relevance.options import DEFAULT_LAYERS, method_options
from wsss_jax.tasks.common import prepare_images
from wsss_jax.train import earlier_runs
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
    os.makedirs(os.path.join(directory, layer), exist_ok=True)
    for name, mask in zip(names, m):
      mask_files.write_mask(os.path.join(directory, layer, mask_files.file_stem(name) + ".png"), mask,
                       palette)


def table(summary: dict) -> str:
  lines = ["| layer | mIoU | FwIoU | accuracy | " + " | ".join(summary["class_names"]) + " |",
           "|---" * (4 + len(summary["class_names"])) + "|"]
  for layer, s in summary["layers"].items():
    per_class = " | ".join(f"{s[f'IoU/{c}']:.3f}" for c in summary["class_names"])
    lines.append(f"| {layer} | {s['mIoU']:.3f} | {s['FwIoU']:.3f} | {s['accuracy']:.3f} | "
                 f"{per_class} |")
  return "\n".join(lines) + "\n"


# alpha values `background.alpha=auto` tries, per map rule (negatives: quantiles)
ALPHA_GRID = {"threshold": tuple(round(0.05 * i, 2) for i in range(1, 20)),
              "power": (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0),
              "negatives": (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999),
              "otsu": (0.0,)}


def parse_alpha(text, map_rule: str):
  """background.alpha: "" (the rule's default), "auto", or a number (checked for the rule)."""
  text = str(text).strip().lower()
  if text == "auto":
    return "auto"
  try:
    alpha = float(text) if text else mask_rules.DEFAULT_ALPHA[map_rule]
  except ValueError:
    raise UserError(f"background.alpha={text!r} is not a number, '' or 'auto'") from None
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
  if any("crf_mIoU" in s for s in sweep.values()):
    text += "\nDense CRF at the chosen alpha (crf.validate): " + ", ".join(
        f"{l}: {sweep[l]['crf_mIoU']:.3f} ({'kept' if sweep[l]['crf'] else 'dropped'})"
        for l in layers) + "\n"
  return text


LINE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def save_sweep_plot(path: str, sweep: dict, rule: str) -> None:
  """alpha_sweep.png: mIoU against alpha (x), one line per layer, the chosen alpha circled."""
  from PIL import ImageDraw
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
  image.save(path + ".tmp.png")
  os.replace(path + ".tmp.png", path)


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
  if config.background.rule:
    mask_rules.check_rule(config.background.rule)
  if config.palette:
    mask_files.palette_bytes(config.palette, 1)
  relevance.check_method(config.method.partition(":")[0])
  if config.crf.enabled:
    crf.check_settings(dict(config.crf))


def relu_choice(relu: int, setting: str):
  """config.relu: -2 by setting (tissue: off, the authors' Grad-CAM; finding: on, evidence
  against a finding is not a finding), -1 the method's default, 0 off, 1 on."""
  if relu == -2:
    return setting == "finding"
  return None if relu < 0 else bool(relu)


def run(config, workdir: str) -> dict:
  validate(config)
  mesh = parallel.mesh_from_config(config)
  batch = parallel.eval_batch_size(config.batch_size, mesh)
  plan = None
  if config.get("erasing_workdir"):  # adversarial erasing: its rounds replace the classifier
    plan = earlier_runs.load_erasing_plan(config.erasing_workdir)
    if config.dilations:
      raise UserError("dilations and erasing_workdir do not combine; use one or the other")
  classifier_workdir = plan["rounds"][0] if plan else config.classifier_workdir
  model, variables, meta, step, classifier_data = earlier_runs.load_classifier(
      classifier_workdir, mesh)
  data = earlier_runs.data_config(config, classifier_data)
  if not config.data.num_train:  # 0: the classifier's own training set
    data.num_train = classifier_data.get("num_train", data.num_train)
  num_classes, names = data.num_classes, tuple(data.class_names)
  background_index = num_classes  # palette index after the classes (4 in both releases)
  setting = folders.resolve(data, "setting")
  rule = folders.resolve(data, "background", config.background.rule)
  image_rule, map_rule = mask_rules.split_rule(rule)  # checks the rule
  if setting == "finding" and map_rule is None:
    raise UserError(f"background.rule={rule!r}: findings against a background need a map rule "
                    f"({', '.join(mask_rules.MAP_RULES)}, or white+<one of them>)")
  alpha = parse_alpha(config.background.alpha, map_rule) if map_rule else None
  palette_name = folders.resolve(data, "palette", config.palette)
  palette = mask_files.palette_bytes(palette_name, num_classes + 1)
  if meta["model"]["backbone"] == "vit" and tuple(config.scales) != (1.0,):
    raise UserError(f"scales={tuple(config.scales)}: a ViT classifier takes only its own input "
                    f"size (fixed position embeddings); use scales=(1.0,)")
  method, options = method_options(config.method, config, data)
  layers = tuple(config.layers) or DEFAULT_LAYERS.get(meta["model"]["backbone"], ())
  # map rules normalise by the per-image maximum themselves (mask_rules.max_normalize)
  normalize = "none" if map_rule else config.normalize
  relu = relu_choice(config.relu, setting)

  def maps_fn(classifier):
    return relevance.relevance_fn(method, classifier.apply, layers=list(layers) or None,
                                  target=config.target, upsample=False,
                                  normalize=normalize, only_present=True, relu=relu, **options)

  fn = maps_fn(model)
  dilated = [maps_fn(m) for m in dilated_models(meta, config.dilations)]
  if plan:  # the rounds in a chain, each on its erased input; maps fused by a maximum
    rounds, round_variables = adversarial_erasing.load_rounds(plan["rounds"][1:], mesh, plan, maps_fn)
    rounds.insert(0, adversarial_erasing.round_fns(model, meta, plan, maps_fn))  # round 0: loaded above
    round_variables.insert(0, variables)
    erasing_chain = adversarial_erasing.chain(rounds, plan, adversarial_erasing.fill_value(data))
  prepare = jax.jit(lambda u8: prepare_images(u8, data, jnp.float32))
  sizes = input_sizes(data.image_size, config.scales)
  inputs = {f"input_{i}": size for i, size in enumerate(sizes)}

  def batch_maps(b, labels) -> list:
    """The maps of every input scale (and dilation or erasing round) of a batch."""
    scale_maps = []
    for key in inputs:
      x = prepare(parallel.shard_identical(b[key], mesh))
      if plan:
        scale_maps.append(erasing_chain(round_variables, x, labels)[0])
        continue
      extra = [f.maps(variables, x, labels) for f in dilated]
      # multi-dilation (Wei et al. 2018): H_0 + mean_i H_i, i.e. H_0 weighs as all the others
      scale_maps += [fn.maps(variables, x, labels)] * max(1, len(extra)) + extra
    return scale_maps

  # the negatives' maps: for the negatives rule, or as alpha=auto's fallback without val masks
  val_truth = alpha == "auto" and "mask" in pipeline.build_source(data, "val")[0]
  negatives = {}
  if map_rule == "negatives" or (alpha == "auto" and not val_truth):
    negatives = negative_map_values(data, config, batch, inputs, batch_maps)
  if map_rule == "negatives" and not negatives:
    raise UserError(f"background.rule=negatives but the training split of "
                    f"data.name={data.name!r} has no negative image (all-zero labels); use "
                    f"threshold, power or otsu")
  sweep = None
  if val_truth:
    sweep = sweep_alpha(data, config, batch, inputs, batch_maps, map_rule, image_rule,
                        negatives if map_rule == "negatives" else None, background_index, mesh)
    alpha = {layer: s["best"] for layer, s in sweep.items()}
  elif alpha == "auto" and negatives:  # no ground truth: what the negatives show bounds it
    print(f"background.alpha=auto: the val split has no ground truth; using the negatives rule "
          f"(quantile {mask_rules.DEFAULT_ALPHA['negatives']})", flush=True)
    map_rule, alpha = "negatives", mask_rules.DEFAULT_ALPHA["negatives"]
  elif alpha == "auto":
    raise UserError("background.alpha=auto needs ground-truth masks on the val split or "
                    "negative training images (all-zero labels); give alpha a number")

  def alpha_of(layer):
    return alpha[layer] if isinstance(alpha, dict) else alpha

  levels = ({layer: np.quantile(v, alpha_of(layer)) for layer, v in negatives.items()}
            if map_rule == "negatives" else {})

  crf_cfg = dict(config.crf) if config.crf.enabled else None
  crf_layers = None  # None: every layer
  if crf_cfg is not None and config.crf.get("validate") and sweep:
    crf_scores = crf_val_scores(data, config, batch, inputs, batch_maps, map_rule, image_rule,
                                {l: s["best"] for l, s in sweep.items()}, levels, background_index,
                                mesh)
    crf_layers = set()
    for layer, score in crf_scores.items():
      sweep[layer].update(crf_mIoU=score, crf=score > max(sweep[layer]["mIoU"]))
      crf_layers |= {layer} if sweep[layer]["crf"] else set()
      print(f"crf.validate {layer}: val mIoU {max(sweep[layer]['mIoU']):.3f} without the CRF, "
            f"{score:.3f} with it: {'kept' if sweep[layer]['crf'] else 'dropped'}", flush=True)
  if sweep and parallel.is_main_process():
    with open(os.path.join(workdir, "alpha_sweep.md"), "w", encoding="utf-8") as f:
      f.write(sweep_table(sweep, rule))
    save_sweep_plot(os.path.join(workdir, "alpha_sweep.png"), sweep, rule)

  source = pipeline.build_source(data, config.split)
  has_truth = "mask" in source[0]
  keys = ("image", "labels", "name", "background") + tuple(inputs) + (
      ("mask",) if has_truth else ())

  convention = "finding" if setting == "finding" else "stage1"

  @jax.jit
  def masks_and_scores(scale_maps, labels, background, truth, valid, images, alphas, lvls):
    out, conf = {}, {}
    for layer in scale_maps[0]:
      m = [maps_at_scale[layer] for maps_at_scale in scale_maps]
      if map_rule:
        out[layer] = mask_rules.finding_mask(m, labels, background, background.shape[1:],
                                        background_index, map_rule, alphas.get(layer),
                                        lvls.get(layer))
      else:
        out[layer] = mask_rules.pseudo_mask(m, labels, background, background.shape[1:],
                                       background_index)
      if crf_cfg is not None and (crf_layers is None or layer_name(layer) in crf_layers):
        out[layer] = crf.refine_labels(out[layer], images, labels, background, background_index,
                                       crf_cfg, free_background=bool(map_rule))
      if truth is not None:
        conf[layer] = metrics.device_confusion(out[layer], truth, num_classes, background_index,
                                               convention, valid)
    return out, conf

  directory = os.path.join(workdir, "masks")
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.writer_threads)
  pending, confusion, overlay, seen = [], {}, [], 0
  started, timed, first = time.perf_counter(), 0.0, True
  total = len(source)
  progress = Progress("pseudo masks", total, config.get("progress_every_s", 10.0))
  try:
    background = mask_rules.BackgroundMask(rule, config.background.threshold,
                                      config.background.min_size)
    alphas = levels_arg = None
    for b in pipeline.tile_batches(data, config.split, batch, inputs, keys, extra=[background]):
      t0 = time.perf_counter()
      labels = jnp.asarray(b["labels"])
      scale_maps = batch_maps(b, labels)
      if alphas is None:
        alphas = {layer: jnp.float32(alpha_of(layer_name(layer)) or 0.0)
                  for layer in scale_maps[0]} if map_rule else {}
        levels_arg = {layer: jnp.float32(levels[layer_name(layer)])
                      for layer in scale_maps[0]} if levels else {}
      truth = parallel.shard_identical(b["mask"], mesh) if has_truth else None
      out, conf = masks_and_scores(scale_maps, labels, parallel.shard_identical(b["background"], mesh),
                                   truth, jnp.asarray(b["valid"]),
                                   parallel.shard_identical(b["image"], mesh), alphas, levels_arg)
      valid = b["valid"]
      host = {layer_name(k): np.asarray(v)[valid] for k, v in out.items()}  # waits for this batch
      if not first:
        timed += time.perf_counter() - t0
      first = False
      for k, c in conf.items():
        confusion[layer_name(k)] = confusion.get(layer_name(k), 0) + np.asarray(c, np.int64)
      if parallel.is_main_process():
        while len(pending) > 2 * config.writer_threads:  # bound the host memory held by writes
          pending.pop(0).result()
        pending.append(pool.submit(write_batch, directory, list(b["name"][valid]), host, palette))
      for i in range(min(int(valid.sum()), config.overlays - len(overlay))):
        overlay.append((b["image"][i], b["mask"][i] if has_truth else None,
                        {layer: m[i] for layer, m in host.items()}))
      seen += int(valid.sum())
      progress.update(seen)
    for p in pending:
      p.result()
  finally:
    pool.shutdown(wait=True)
  if not seen:
    raise UserError(f"split {config.split!r} of data.name={data.name!r} has no images")
  scored_names = names + (("background",) if convention == "finding" else ())
  summary = {"phase": "pseudo_masks", "classifier": os.path.abspath(classifier_workdir),
             "classifier_step": int(step), "backbone": meta["model"]["backbone"],
             "method": config.method, "split": config.split, "num_images": seen,
             "scales": list(config.scales), "setting": setting,
             "layers_written": [layer_name(k) for k in out], "class_names": list(names),
             "background_rule": rule, "scoring": convention,
             "background_alpha": ({layer_name(k): alpha_of(layer_name(k)) for k in out}
                                  if map_rule else None),
             "negatives_level": {k: float(v) for k, v in levels.items()} or None,
             "alpha_sweep": sweep, "palette": palette_name,
             "crf": dict(config.crf) if config.crf.enabled else None,
             "crf_layers": (sorted(crf_layers) if crf_layers is not None else
                            [layer_name(k) for k in out]) if crf_cfg else [],
             "dilations": list(config.dilations),
             "erasing": {"workdir": os.path.abspath(config.erasing_workdir),
                         "rounds": len(plan["rounds"])} if plan else None,
             "wall_seconds": time.perf_counter() - started,
             "images_per_sec": (seen - batch) / timed if timed else None,
             "layers": {k: metrics.iou_scores(c, scored_names) for k, c in confusion.items()}}
  writer = MetricWriter(workdir, parallel.is_main_process())
  if parallel.is_main_process():
    if overlay:
      figure = overlays.mask_figure(overlay, palette, scored_names,
                                    f"pseudo masks: {config.method}, background {rule}")
      overlays.save(os.path.join(workdir, "overlays", "pseudo_masks.png"), figure)
      writer.image("pseudo_masks", 0, figure)
    if has_truth:
      with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
        f.write(table(summary))
  for layer, s in summary["layers"].items():
    print(f"pseudo masks {layer}: mIoU {s['mIoU']:.3f} FwIoU {s['FwIoU']:.3f} "
          f"accuracy {s['accuracy']:.3f}", flush=True)
  writer.summary(summary)
  writer.close()
  return summary


def negative_map_values(data, config, batch, inputs, batch_maps) -> dict:
  """{layer: raw max_c M_c values} over the pixels (at 56 x 56) of up to
  `background.negatives_images` negative training images, each class's map taken as if present."""
  values, count = {}, 0
  limit = config.background.negatives_images
  for b in pipeline.tile_batches(data, "train", batch, inputs, ("labels",) + tuple(inputs)):
    negative = b["valid"] & ~(b["labels"] > 0).any(axis=1)
    if not negative.any():
      continue
    everything = jnp.ones(b["labels"].shape, jnp.float32)
    for layer in (scale_maps := batch_maps(b, everything))[0]:
      fused = mask_rules.fuse_maps([m[layer] for m in scale_maps], (56, 56))
      peak = np.asarray(jax.nn.relu(fused).max(axis=1))[negative]
      values.setdefault(layer_name(layer), []).append(peak.ravel())
    count += int(negative.sum())
    if count >= limit:
      break
  return {layer: np.concatenate(v) for layer, v in values.items()}


def val_confusions(data, config, batch, inputs, batch_maps, image_rule, mesh,
                   layer_confusion, with_images: bool = False) -> dict:
  """{layer: summed confusion(s)} over the val split: per batch and layer,
  layer_confusion(name, maps of every scale, labels, background, truth, valid, images) (images
  on the devices only `with_images`, else None)."""
  keys = ("image", "labels", "mask", "background") + tuple(inputs)
  white = mask_rules.BackgroundMask(image_rule, config.background.threshold, config.background.min_size)
  totals = {}
  for b in pipeline.tile_batches(data, "val", batch, inputs, keys, extra=[white]):
    labels = jnp.asarray(b["labels"])
    scale_maps = batch_maps(b, labels)
    background = parallel.shard_identical(b["background"], mesh)
    truth = parallel.shard_identical(b["mask"], mesh)
    images = parallel.shard_identical(b["image"], mesh) if with_images else None
    for layer in scale_maps[0]:
      name = layer_name(layer)
      c = layer_confusion(name, [m[layer] for m in scale_maps], labels, background, truth,
                          jnp.asarray(b["valid"]), images)
      totals[name] = totals.get(name, 0) + np.asarray(c, np.int64)
  return totals


def sweep_alpha(data, config, batch, inputs, batch_maps, map_rule, image_rule, negatives,
                background_index, mesh) -> dict:
  """{layer: {alpha: [...], mIoU: [...], best}}: the pseudo-mask mIoU (finding scoring) of the
  val split for every alpha of ALPHA_GRID[map_rule]."""
  grid = ALPHA_GRID[map_rule]
  k = data.num_classes
  names = tuple(data.class_names) + ("background",)

  @jax.jit
  def confusions(maps, labels, background, truth, valid, settings):
    def one(a, level):
      m = mask_rules.finding_mask(maps, labels, background, background.shape[1:], background_index,
                             map_rule, a, level)
      return metrics.device_confusion(m, truth, k, background_index, "finding", valid)
    return jax.vmap(one)(*settings)

  def layer_confusions(name, maps, labels, background, truth, valid, images):
    levels = (np.quantile(negatives[name], grid) if negatives is not None
              else np.zeros(len(grid)))
    settings = (jnp.asarray(grid, jnp.float32), jnp.asarray(levels, jnp.float32))
    return confusions(maps, labels, background, truth, valid, settings)

  totals = val_confusions(data, config, batch, inputs, batch_maps, image_rule, mesh,
                          layer_confusions)
  out = {}
  for name, c in totals.items():
    miou = [metrics.iou_scores(c[i], names)["mIoU"] for i in range(len(grid))]
    out[name] = {"alpha": list(grid), "mIoU": miou, "best": grid[int(np.nanargmax(miou))]}
  return out


def crf_val_scores(data, config, batch, inputs, batch_maps, map_rule, image_rule, alpha: dict,
                   levels: dict, background_index, mesh) -> dict:
  """{layer: val pseudo-mask mIoU (finding scoring) with the dense CRF at the layer's alpha}."""
  k = data.num_classes
  names = tuple(data.class_names) + ("background",)
  crf_cfg = dict(config.crf)

  @jax.jit
  def confusion(maps, labels, background, truth, valid, images, a, level):
    m = mask_rules.finding_mask(maps, labels, background, background.shape[1:], background_index,
                           map_rule, a, level)
    m = crf.refine_labels(m, images, labels, background, background_index, crf_cfg,
                          free_background=True)
    return metrics.device_confusion(m, truth, k, background_index, "finding", valid)

  def layer_confusion(name, maps, labels, background, truth, valid, images):
    return confusion(maps, labels, background, truth, valid, images, jnp.float32(alpha[name]),
                     jnp.float32(levels.get(name, 0.0)))

  totals = val_confusions(data, config, batch, inputs, batch_maps, image_rule, mesh,
                          layer_confusion, with_images=True)
  return {name: metrics.iou_scores(c, names)["mIoU"] for name, c in totals.items()}
