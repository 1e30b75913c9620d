"""Maps phase: relevance maps of a trained classifier over a split, with their quality measured.

Sections: the classifier (model rebuilt from its checkpoint's metadata, data fields from its
config.json) -> per method: compiled relevance over sharded batches, map files written by a
thread pool while the next batch computes, pseudo-mask IoU per layer against the ground truth,
deletion / insertion AUC and average drop / increase on the first images -> overlays ->
summary.json and table.md.
"""
from __future__ import annotations

import os
import re
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax import atomic, metrics, relevance
from wsss_jax.data import pipeline
from wsss_jax.data.synthetic import BACKGROUND
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.outputs import overlays
from wsss_jax.relevance import quality
from wsss_jax.relevance.options import layers_for, method_options, relu_flag
from wsss_jax.tasks.common import prepare_images
from wsss_jax.train import earlier_runs
from wsss_jax.train.progress import Progress
from wsss_jax.train.writers import MetricWriter


def patterns_for(config, workdir, apply_fn, variables, data, step, batches) -> dict:
  """Fitted once per classifier checkpoint on the training split; reused from the workdir."""
  meta = {"classifier": os.path.abspath(config.classifier_workdir), "step": int(step),
          "estimator": config.patterns.estimator, "num_images": config.patterns.num_images}
  directory = os.path.join(workdir, "patterns")
  saved = relevance.load_patterns(directory, meta)
  if saved is not None:
    return saved
  patterns = relevance.fit_patterns(apply_fn, variables, batches, config.patterns.estimator)
  if parallel.is_main_process():
    relevance.save_patterns(directory, patterns, meta)
  return patterns


def train_images(config, data, batch: int, prepare, mesh):
  """The first `patterns.num_images` training tiles, as prepared model inputs."""
  for i, b in enumerate(pipeline.eval_batches(data, batch, "train", keys=("image",))):
    if i * batch >= config.patterns.num_images:
      return
    yield prepare(parallel.shard_identical(b["image"], mesh))


# --- Artefacts --------------------------------------------------------------------------------------
def _file_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") + ".npz"


def write_maps(directory: str, names, maps: dict) -> None:
  """One .npz per tile: a float16 (K, H, W) array per layer, written then renamed."""
  os.makedirs(directory, exist_ok=True)
  for i, name in enumerate(names):
    path = os.path.join(directory, _file_name(name))
    with atomic.replacing(path) as tmp:
      np.savez_compressed(tmp, **{layer.replace("/", "."): m[i].astype(np.float16)
                                  for layer, m in maps.items()})


def maps_figure(images_u8, maps: dict, labels, class_names, title: str) -> np.ndarray:
  """Rows = images x layers; columns = the image, then each class's map blended over it as a
  heat map (absent classes dimmed), class names on the columns, the colour scale in the legend."""
  rows = []
  for i in range(len(images_u8)):
    image = images_u8[i].astype(np.float32) / 255
    for m in maps.values():
      panels = [images_u8[i]]
      for k in range(m.shape[1]):
        blend = 0.5 * image + 0.5 * overlays.heat(m[i, k])
        panels.append(((blend if labels[i, k] > 0 else 0.3 * blend) * 255).round()
                      .astype(np.uint8))
      rows.append(panels)
  legend = [("relevance low", overlays.heat(0.0) * 255), ("high", overlays.heat(1.0) * 255),
            ("class absent: dimmed", (77, 77, 77))]
  return overlays.grid_figure(rows, ["image"] + list(class_names), title, legend)


def table(summary: dict) -> str:
  """A markdown table, one row per method: IoU of each layer's pseudo masks and the quality
  measures of the last layer's maps."""
  head = ("| method | pseudo-mask mIoU per layer | deletion AUC (lower better) | insertion AUC | "
          "avg drop % | increase % | maps/s |")
  lines = [head, "|---|---|---|---|---|---|---|"]
  for method, s in summary["methods"].items():
    ious = ", ".join(f"{layer.split('/')[-1]} {v['mIoU']:.3f}" for layer, v in s["layers"].items())
    lines.append(f"| {method} | {ious} | {s['deletion_auc']:.3f} | {s['insertion_auc']:.3f} | "
                 f"{100 * s['average_drop']:.1f} | {100 * s['increase_in_confidence']:.1f} | "
                 f"{s['maps_per_sec']:.1f} |")
  return "\n".join(lines) + "\n"


# --- The phase --------------------------------------------------------------------------------------
def validate(config) -> None:
  if config.batch_size <= 0:
    raise UserError(f"batch_size={config.batch_size} must be positive")
  if config.split not in ("train", "val"):
    raise UserError(f"split={config.split!r} is not 'train' or 'val'")
  if not config.methods:
    raise UserError("methods is empty")
  relu_flag(config.relu)
  if config.quality.steps <= 0:
    raise UserError(f"quality.steps={config.quality.steps} must be positive")


class MapsRun(NamedTuple):
  """What every method's pass over the split shares."""
  config: Any
  workdir: str
  classifier: earlier_runs.Classifier
  data: Any
  mesh: Any
  batch: int
  prepare: Callable         # uint8 tiles -> the classifier's normalised input
  apply_fn: Callable        # one object for all methods: jit caches on it


class MethodPass(NamedTuple):
  """One method's maps over the split: scores, timing and the first tiles for the figure."""
  confusion: dict
  scores: dict
  overlay: tuple | None
  seen: int
  timed: int                # images in the timed (compiled) batches
  elapsed: float
  compile_s: float


def run(config, workdir: str) -> dict:
  validate(config)
  mesh = parallel.mesh_from_config(config)
  clf = earlier_runs.load_classifier(config.classifier_workdir, mesh)
  data = earlier_runs.data_config(config, clf.data)
  specs = [method_options(m, config, data) for m in config.methods]  # fail fast on bad names
  ctx = MapsRun(config, workdir, clf, data, mesh, parallel.eval_batch_size(config.batch_size, mesh),
                jax.jit(lambda u8: prepare_images(u8, data, jnp.float32)), clf.model.apply)
  writer = MetricWriter(workdir, parallel.is_main_process())
  summary = {"phase": "maps", "classifier": os.path.abspath(config.classifier_workdir),
             "classifier_step": int(clf.step), "backbone": clf.meta["model"]["backbone"],
             "split": config.split, "devices": int(mesh.devices.size), "methods": {}}
  with atomic.BackgroundWrites(2) as files:
    for spec, (name, options) in zip(config.methods, specs):
      done = method_pass(ctx, spec, name, options, files)
      summary["methods"][spec] = method_result(done, data.num_classes, data.class_names)
      report_method(ctx, spec, done, summary["methods"][spec], writer)
  writer.summary(summary)
  if parallel.is_main_process():
    atomic.write_text(os.path.join(workdir, "table.md"), table(summary))
  writer.close()
  return summary


def method_fn(ctx: MapsRun, name: str, options: dict):
  """The compiled relevance callable of one method (patterns fitted first where it needs them)."""
  config, clf = ctx.config, ctx.classifier
  if name in ("patternnet", "patternattribution"):
    options = dict(options, patterns=patterns_for(
        config, ctx.workdir, ctx.apply_fn, clf.variables, ctx.data, clf.step,
        train_images(config, ctx.data, ctx.batch, ctx.prepare, ctx.mesh)))
  return relevance.relevance_fn(
      name, ctx.apply_fn, layers=layers_for(name, config, clf.meta["model"]["backbone"]),
      target=config.target, normalize=config.normalize, only_present=config.only_present,
      relu=relu_flag(config.relu), **options)


def method_pass(ctx: MapsRun, spec: str, name: str, options: dict, files) -> MethodPass:
  """One method over the split: maps written off-thread, scored against the masks, timed."""
  config, data, variables = ctx.config, ctx.data, ctx.classifier.variables
  fn = method_fn(ctx, name, options)
  confusion, scores = {}, {"deletion": [], "insertion": [], "drop": [], "increase": []}
  overlay, seen, timed, elapsed, compile_s = None, 0, 0, 0.0, 0.0
  progress = Progress(f"maps {spec}", len(pipeline.build_source(data, config.split)),
                      config.get("progress_every_s", 10.0))
  progress.update(0)
  for b in pipeline.eval_batches(data, ctx.batch, config.split, keys=("image", "labels", "mask",
                                                                      "name")):
    images = ctx.prepare(parallel.shard_identical(b["image"], ctx.mesh))
    labels = jnp.asarray(b["labels"])
    t0 = time.perf_counter()
    maps = jax.device_get(fn.maps(variables, images, labels))
    if seen == 0:  # compilation; later batches time the maps alone
      compile_s = time.perf_counter() - t0
    else:
      timed, elapsed = timed + int(b["valid"].sum()), elapsed + time.perf_counter() - t0
    valid = b["valid"]
    host = {layer: m[valid] for layer, m in maps.items()}
    if config.write_maps and parallel.is_main_process():
      files.submit(write_maps, os.path.join(ctx.workdir, "maps", spec.replace(":", "_")),
                   list(b["name"][valid]), host)
    for layer, m in host.items():
      pred = quality.pseudo_masks(m, b["labels"][valid])
      confusion[layer] = confusion.get(layer, 0) + metrics.confusion_matrix(
          np.asarray(pred), b["mask"][valid], data.num_classes, ignore=BACKGROUND)
    if seen < config.quality.num_images:
      _quality(ctx.apply_fn, variables, images, maps[list(maps)[-1]], b, config, scores)
    if overlay is None:
      overlay = (b["image"][:config.overlays], {k: v[:config.overlays] for k, v in host.items()},
                 b["labels"][:config.overlays])
    seen += int(valid.sum())
    progress.update(seen)
  if not timed and seen:  # one batch, and its call compiled: time the compiled call again
    t0 = time.perf_counter()
    jax.block_until_ready(fn.maps(variables, images, labels))
    timed, elapsed = int(b["valid"].sum()), time.perf_counter() - t0
  return MethodPass(confusion, scores, overlay, seen, timed, elapsed, compile_s)


def method_result(done: MethodPass, num_classes: int, class_names) -> dict:
  return {"layers": {layer: metrics.iou_scores(c, class_names)
                     for layer, c in done.confusion.items()},
          "deletion_auc": _mean(done.scores["deletion"]),
          "insertion_auc": _mean(done.scores["insertion"]),
          "average_drop": _mean(done.scores["drop"]),
          "increase_in_confidence": _mean(done.scores["increase"]),
          "maps_per_sec": (done.timed * num_classes / done.elapsed if done.timed
                           else float("nan")),
          "compile_s": done.compile_s, "num_images": done.seen}


def report_method(ctx: MapsRun, spec: str, done: MethodPass, result: dict, writer) -> None:
  """The method's overlay figure (file and TensorBoard) and its line of scores."""
  if done.overlay is not None and parallel.is_main_process():
    layers = ", ".join(layer.split("/")[-1] for layer in done.overlay[1])
    figure = maps_figure(*done.overlay, ctx.data.class_names,
                         f"{spec} maps, {ctx.config.split} split; rows: each image at {layers}")
    overlays.save(os.path.join(ctx.workdir, "overlays", spec.replace(":", "_") + ".png"), figure)
    writer.image(f"maps/{spec}", int(ctx.classifier.step), figure)
  print(f"maps {spec}: " + ", ".join(f"{layer.split('/')[-1]} mIoU {v['mIoU']:.3f}"
                                     for layer, v in result["layers"].items())
        + f" | deletion {result['deletion_auc']:.3f} insertion {result['insertion_auc']:.3f}"
        f" | {result['maps_per_sec']:.1f} maps/s", flush=True)


def _mean(values) -> float:
  return float(np.mean(np.concatenate(values))) if values else float("nan")


def _quality(apply_fn, variables, images, maps, b, config, scores) -> None:
  """Deletion / insertion AUC and confidence change of the present classes of a batch."""
  deletion, insertion = _curves(apply_fn, variables, images, jnp.asarray(maps),
                                config.quality.steps)
  drop, increase = _confidence(apply_fn, variables, images, jnp.asarray(maps))
  keep = (b["labels"] > 0) & b["valid"][:, None]
  scores["deletion"].append(np.asarray(quality.area_under(deletion))[keep])
  scores["insertion"].append(np.asarray(quality.area_under(insertion))[keep])
  scores["drop"].append(np.asarray(drop)[keep])
  scores["increase"].append(np.asarray(increase, np.float64)[keep])


_curves = jax.jit(quality.deletion_insertion, static_argnums=(0, 4))
_confidence = jax.jit(quality.confidence_change, static_argnums=(0,))
