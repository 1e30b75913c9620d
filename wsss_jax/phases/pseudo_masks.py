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

from wsss_jax import crf, masks, metrics, parallel, relevance
from wsss_jax.data import pipeline
from wsss_jax.errors import UserError
from wsss_jax.models.classifier import build_classifier
from wsss_jax.phases import erasing as erasing_phase
from wsss_jax.phases import maps as maps_phase
from wsss_jax.phases.classify import prepare_images
from wsss_jax.writers import MetricWriter

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
      masks.write_mask(os.path.join(directory, layer, masks.file_stem(name) + ".png"), mask,
                       palette)


def colour(mask: np.ndarray, palette: list) -> np.ndarray:
  return np.asarray(palette, np.uint8).reshape(-1, 3)[np.minimum(mask, len(palette) // 3 - 1)]


def save_overlay(path: str, rows, palette: list) -> None:
  """Each row: the tile, its ground truth (if any), then the pseudo mask of each layer."""
  grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(grid).save(path + ".tmp.png")
  os.replace(path + ".tmp.png", path)


def table(summary: dict) -> str:
  lines = ["| layer | mIoU | FwIoU | accuracy | " + " | ".join(summary["class_names"]) + " |",
           "|---" * (4 + len(summary["class_names"])) + "|"]
  for layer, s in summary["layers"].items():
    per_class = " | ".join(f"{s[f'IoU/{c}']:.3f}" for c in summary["class_names"])
    lines.append(f"| {layer} | {s['mIoU']:.3f} | {s['FwIoU']:.3f} | {s['accuracy']:.3f} | "
                 f"{per_class} |")
  return "\n".join(lines) + "\n"


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
  masks.check_rule(config.background.rule)
  masks.palette_bytes(config.palette, 1)
  relevance.check_method(config.method.partition(":")[0])
  if config.crf.enabled:
    crf.check_settings(dict(config.crf))


def run(config, workdir: str) -> dict:
  validate(config)
  mesh = parallel.mesh_from_config(config)
  batch = parallel.eval_batch_size(config.batch_size, mesh)
  plan = None
  if config.get("erasing_workdir"):  # adversarial erasing: its rounds replace the classifier
    plan = erasing_phase.load_plan(config.erasing_workdir)
    if config.dilations:
      raise UserError("dilations and erasing_workdir do not combine; use one or the other")
  classifier_workdir = plan["rounds"][0] if plan else config.classifier_workdir
  model, variables, meta, step, classifier_data = maps_phase.load_classifier(
      classifier_workdir, mesh)
  data = maps_phase.data_config(config, classifier_data)
  if not config.data.num_train:  # 0: the classifier's own training set
    data.num_train = classifier_data.get("num_train", data.num_train)
  num_classes, names = data.num_classes, tuple(data.class_names)
  background_index = num_classes  # palette index after the classes (4 in both releases)
  palette = masks.palette_bytes(config.palette, num_classes + 1)
  if meta["model"]["backbone"] == "vit" and tuple(config.scales) != (1.0,):
    raise UserError(f"scales={tuple(config.scales)}: a ViT classifier takes only its own input "
                    f"size (fixed position embeddings); use scales=(1.0,)")
  method, options = maps_phase.method_options(config.method, config, data)
  layers = tuple(config.layers) or maps_phase.DEFAULT_LAYERS.get(meta["model"]["backbone"], ())
  def maps_fn(classifier):
    return relevance.relevance_fn(method, classifier.apply, layers=list(layers) or None,
                                  target=config.target, upsample=False,
                                  normalize=config.normalize, only_present=True,
                                  relu=None if config.relu < 0 else bool(config.relu), **options)

  fn = maps_fn(model)
  dilated = [maps_fn(m) for m in dilated_models(meta, config.dilations)]
  if plan:  # the rounds in a chain, each on its erased input; maps fused by a maximum
    rounds, round_variables = erasing_phase.load_rounds(plan["rounds"][1:], mesh, plan, maps_fn)
    rounds.insert(0, erasing_phase.round_fns(model, meta, plan, maps_fn))  # round 0: loaded above
    round_variables.insert(0, variables)
    erasing_chain = erasing_phase.chain(rounds, plan, erasing_phase.fill_value(data))
  prepare = jax.jit(lambda u8: prepare_images(u8, data, jnp.float32))
  source = pipeline.build_source(data, config.split)
  has_truth = "mask" in source[0]
  sizes = input_sizes(data.image_size, config.scales)
  inputs = {f"input_{i}": size for i, size in enumerate(sizes)}
  keys = ("image", "labels", "name", "background") + tuple(inputs) + (
      ("mask",) if has_truth else ())

  crf_cfg = dict(config.crf) if config.crf.enabled else None

  @jax.jit
  def masks_and_scores(scale_maps, labels, background, truth, valid, images):
    out, conf = {}, {}
    for layer in scale_maps[0]:
      m = [maps_at_scale[layer] for maps_at_scale in scale_maps]
      out[layer] = masks.pseudo_mask(m, labels, background, background.shape[1:], background_index)
      if crf_cfg is not None:  # dense-CRF refinement against the tile's colours
        out[layer] = crf.refine_labels(out[layer], images, labels, background, background_index,
                                       crf_cfg)
      if truth is not None:
        conf[layer] = metrics.device_confusion(out[layer], truth, num_classes, background_index,
                                               "stage1", valid)
    return out, conf

  directory = os.path.join(workdir, "masks")
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.writer_threads)
  pending, confusion, overlay, seen = [], {}, [], 0
  started, timed, first = time.perf_counter(), 0.0, True
  try:
    background = masks.BackgroundMask(config.background.rule, config.background.threshold,
                                      config.background.min_size)
    for b in pipeline.tile_batches(data, config.split, batch, inputs, keys, extra=[background]):
      t0 = time.perf_counter()
      labels = jnp.asarray(b["labels"])
      scale_maps = []
      for key in inputs:
        x = prepare(parallel.shard_identical(b[key], mesh))
        if plan:
          scale_maps.append(erasing_chain(round_variables, x, labels)[0])
          continue
        extra = [f.maps(variables, x, labels) for f in dilated]
        # multi-dilation (Wei et al. 2018): H_0 + mean_i H_i, i.e. H_0 weighs as all the others
        scale_maps += [fn.maps(variables, x, labels)] * max(1, len(extra)) + extra
      truth = parallel.shard_identical(b["mask"], mesh) if has_truth else None
      out, conf = masks_and_scores(scale_maps, labels, parallel.shard_identical(b["background"], mesh),
                                   truth, jnp.asarray(b["valid"]),
                                   parallel.shard_identical(b["image"], mesh))
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
        row = [b["image"][i]] + ([colour(b["mask"][i], palette)] if has_truth else [])
        overlay.append(row + [colour(m[i], palette) for m in host.values()])
      seen += int(valid.sum())
    for p in pending:
      p.result()
  finally:
    pool.shutdown(wait=True)
  if not seen:
    raise UserError(f"split {config.split!r} of data.name={data.name!r} has no images")
  summary = {"phase": "pseudo_masks", "classifier": os.path.abspath(classifier_workdir),
             "classifier_step": int(step), "backbone": meta["model"]["backbone"],
             "method": config.method, "split": config.split, "num_images": seen,
             "scales": list(config.scales),
             "layers_written": [layer_name(k) for k in out], "class_names": list(names),
             "background_rule": config.background.rule, "scoring": "stage1",
             "crf": dict(config.crf) if config.crf.enabled else None,
             "dilations": list(config.dilations),
             "erasing": {"workdir": os.path.abspath(config.erasing_workdir),
                         "rounds": len(plan["rounds"])} if plan else None,
             "wall_seconds": time.perf_counter() - started,
             "images_per_sec": (seen - batch) / timed if timed else None,
             "layers": {k: metrics.iou_scores(c, names) for k, c in confusion.items()}}
  writer = MetricWriter(workdir, parallel.is_main_process())
  if parallel.is_main_process():
    if overlay:
      save_overlay(os.path.join(workdir, "overlays", "pseudo_masks.png"), overlay, palette)
    if has_truth:
      with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
        f.write(table(summary))
  for layer, s in summary["layers"].items():
    print(f"pseudo masks {layer}: mIoU {s['mIoU']:.3f} FwIoU {s['FwIoU']:.3f} "
          f"accuracy {s['accuracy']:.3f}", flush=True)
  writer.summary(summary)
  writer.close()
  return summary
