"""Affinity phase (AffinityNet + random walk; `wsss_jax.tasks.affinity`): between the pseudo
masks and the segmenter.

Trains AffinityNet (the classifier's ResNet38 trunk plus projections) on the pairs of a pseudo-mask
layer's confident pixels (its ignore band gives no pair), resumable like every trained phase; then
for each training tile propagates the classifier's maps of that layer, with the background score
of the pseudo-mask run's rule and alpha, by the random walk over the learnt affinities, and writes
masks/rw/<tile>.png (the segmenter's `data.mask_layers=("rw",)`), scored where the split has
ground truth. Tissue maps keep the pseudo masks' background (white glass).
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax import atomic, metrics, relevance
from wsss_jax.data import folders, mask_files, pipeline
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.pseudo import mask_rules
from wsss_jax.tasks import affinity as task
from wsss_jax.tasks.common import prepare_images
from wsss_jax.train import earlier_runs, loop
from wsss_jax.train.progress import Progress

RW_LAYER = "rw"  # the mask layer this phase writes


def validate(config) -> None:
  loop.check_trainer_fields(config)
  if config.radius < 2:
    raise UserError(f"radius={config.radius} must be at least 2 (pairs within it)")
  if config.beta <= 0 or config.log2_steps < 0:
    raise UserError(f"beta={config.beta} must be positive and log2_steps={config.log2_steps} "
                    f">= 0")
  if config.data.image_size % task.STRIDE:
    raise UserError(f"data.image_size={config.data.image_size} must be a multiple of "
                    f"{task.STRIDE} (the trunk's output stride)")
  if len(config.data.mask_layers) != 1:
    raise UserError(f"data.mask_layers={tuple(config.data.mask_layers)}: AffinityNet learns from "
                    f"one pseudo-mask layer")


def pseudo_rule(config, layer: str) -> tuple:
  """(map rule, alpha, negatives level) the pseudo-mask run used for `layer`."""
  path = os.path.join(os.path.expanduser(config.pseudo_workdir), "summary.json")
  try:
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
  except (OSError, ValueError):
    raise UserError(f"pseudo_workdir={config.pseudo_workdir}: no finished pseudo-mask run there "
                    f"({path} is missing or unreadable)") from None
  if layer not in summary.get("layers_written", []):
    raise UserError(f"data.mask_layers=({layer!r},): the pseudo-mask run in "
                    f"{config.pseudo_workdir} wrote {summary.get('layers_written')}")
  map_rule = mask_rules.split_rule(summary["background_rule"])[1]
  alpha = (summary.get("background_alpha") or {}).get(layer) or 0.0
  level = (summary.get("negatives_level") or {}).get(layer, 0.0)
  return map_rule, alpha, level


def run(config, workdir: str) -> dict:
  validate(config)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data = folders.settle(config.data)
  layer = config.data.mask_layers[0]
  rule = pseudo_rule(config, layer)
  mesh = parallel.mesh_from_config(config)
  k = config.data.num_classes
  training = task.build_training(config, mesh, background=k)
  initialize = None
  if config.init:
    initialize = lambda s: earlier_runs.load_pretrained(  # noqa: E731
        s, config.classifier_workdir, training.model, mesh, "resnet38",
        field="classifier_workdir")
  meta = {"phase": "affinity", "model": dict(config.model), "image_size": config.data.image_size,
          "num_classes": k}
  fitted = loop.fit("affinity", config, workdir, training, meta, mesh,
                    total_steps=training.total_steps, keys=("image", f"mask_{layer}"),
                    initialize=initialize)
  started = time.perf_counter()
  scores, changed = write_walked_masks(config, training, fitted.state, mesh, workdir, rule)
  summary = fitted.summary | {"layer": layer, "masks_dir": os.path.join(workdir, "masks"),
                              "mask_layer": RW_LAYER, "setting": config.data.setting,
                              "walk_seconds": time.perf_counter() - started, "scores": scores,
                              "changed_share": changed,
                              "class_names": list(config.data.class_names)}
  if scores:
    print(f"random-walk masks ({layer}): " + " ".join(
        f"{n} {v:.3f}" for n, v in metrics.headline(scores)), flush=True)
  fitted.run.writer.summary(summary)
  fitted.run.writer.close()
  return summary


def classifier_maps(config, mesh, layer: str, finding: bool) -> tuple[Callable, int, dict]:
  """(jitted (variables, u8 inputs, labels) -> the layer's maps (B, K, h, w), classifier input
  size, variables)."""
  clf = earlier_runs.load_classifier(config.classifier_workdir, mesh)
  fn = relevance.relevance_fn(config.method, clf.model.apply, layers=[layer], target="logit",
                              upsample=False, normalize="none" if finding else "joint",
                              only_present=True, relu=finding)
  data = earlier_runs.data_config(config, clf.data)

  def maps(variables, u8, labels):
    return next(iter(fn.maps(variables, prepare_images(u8, data, jnp.float32), labels).values()))
  return maps, int(clf.meta["image_size"]), clf.variables


@functools.partial(jax.jit, static_argnames=("size", "map_rule", "finding", "walk"))
def walked_masks(maps, features, labels, previous, alpha, level, size: tuple,
                 map_rule: str | None, finding: bool, walk: tuple):
  """(B, H, W) uint8 masks at tile `size`: the present classes' maps resized to the feature
  grid and propagated by the random walk (`walk` = radius, beta, log2_steps); then findings:
  the pseudo-mask run's background rule on the walked maps (the walk lowers a map's peaks, so
  the rule's scale is taken after it, as AffinityNet applies its background after the walk);
  tissue maps: the best present class, the pseudo masks' background (white glass) kept."""
  present = labels > 0
  k = labels.shape[1]
  scores = (mask_rules.max_normalize(maps, present)[0] if finding
            else jnp.where(present[:, :, None, None], maps, 0.0))
  b, c = scores.shape[:2]
  grid = jax.image.resize(scores.astype(jnp.float32), (b, c) + features.shape[1:3], "bilinear")
  walked = task.random_walk(grid, features, *walk)
  if finding:
    return mask_rules.finding_mask([walked], labels, jnp.zeros((b,) + size, bool), size, k,
                                   map_rule, alpha, level)
  up = jax.image.resize(walked, (b, c) + size, "bilinear")
  mask = jnp.argmax(jnp.where(present[:, :, None, None], up, -jnp.inf), axis=1)
  fixed = ~present.any(axis=1)[:, None, None] | (previous == k)
  return jnp.where(fixed, k, mask).astype(jnp.uint8)


def write_walked_masks(config, training, state, mesh, workdir: str, rule: tuple) -> tuple:
  """masks/rw/<tile>.png for every training tile; ({scores} where the split has ground truth,
  or {}, the share of pixels the walk changed from the pseudo masks)."""
  layer, k = config.data.mask_layers[0], config.data.num_classes
  finding = config.data.setting == "finding"
  map_rule, alpha, level = rule
  maps_fn, clf_size, clf_variables = classifier_maps(config, mesh, layer, finding)
  tiles = pipeline.build_source(config.data, "train")
  has_truth = "mask" in tiles[0]
  inputs = {"cls_input": clf_size, "aff_input": config.data.image_size}
  keys = ("image", "labels", "name", f"mask_{layer}") + tuple(inputs) + ("mask",) * has_truth
  palette = mask_files.palette_bytes(folders.resolve(config.data, "palette", config.palette),
                                     k + 1)
  batch = parallel.eval_batch_size(config.batch_size, mesh)
  confusion, changed, pixels = 0, 0, 0
  progress = Progress("random walk", len(tiles), config.get("progress_every_s", 10.0))
  done = 0
  with atomic.BackgroundWrites(4) as writer:
    for b in pipeline.tile_batches(config.data, "train", batch, inputs, keys):
      labels = jnp.asarray(b["labels"])
      maps = maps_fn(clf_variables, parallel.shard_identical(b["cls_input"], mesh), labels)
      features = training.predict(state.params, state.batch_stats,
                                  parallel.shard_identical(b["aff_input"], mesh))
      masks = walked_masks(maps, features, labels, jnp.asarray(b[f"mask_{layer}"]),
                           jnp.float32(alpha), jnp.float32(level), b["image"].shape[1:3],
                           map_rule if finding else None, finding,
                           (config.radius, config.beta, config.log2_steps))
      valid = b["valid"]
      host = np.asarray(masks)[valid]
      changed += int((host != b[f"mask_{layer}"][valid]).sum())
      pixels += host.size
      if has_truth:
        confusion = confusion + np.asarray(metrics.device_confusion(
            masks, jnp.asarray(b["mask"]), k, k, "finding" if finding else "stage1",
            jnp.asarray(valid)), np.int64)
      if parallel.is_main_process():
        writer.submit(mask_files.write_masks, os.path.join(workdir, "masks", RW_LAYER),
                      list(b["name"][valid]), host, palette)
      done += int(valid.sum())
      progress.update(done)
  names = tuple(config.data.class_names) + ("background",) * finding
  scores = (metrics.iou_scores(confusion, names, names[:-1] if finding else ())
            if has_truth else {})
  return scores, changed / max(pixels, 1)
