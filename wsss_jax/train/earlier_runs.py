"""What a phase reads from an earlier run, as named records: a classifier (model, weights, its
checkpoint description and data section), pretrained weights copied into a new state, an
adversarial-erasing plan. Every error names the user's config field that pointed there.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from wsss_jax.data import folders
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.models.classifier import ViTClassifier, build_classifier
from wsss_jax.models.segmentation import build_segmenter
from wsss_jax.models.vit import unstack_blocks
from wsss_jax.train import run_record
from wsss_jax.train.checkpoint import Checkpointer, restore_latest
from wsss_jax.train.train_state import ClassifierState


class Classifier(NamedTuple):
  """A classify run's latest checkpoint."""
  model: Any        # the linen classifier rebuilt from the checkpoint's model description
  variables: dict   # params (and batch_stats)
  meta: dict        # the checkpoint's description: phase, model, image_size, num_classes
  step: int
  data: dict        # the run's data section (config.json)


# --- The classifier ---------------------------------------------------------------------------------
def load_classifier(workdir: str, mesh, field: str = "classifier_workdir") -> Classifier:
  """The latest checkpoint of a classify run, with its model rebuilt and its data section;
  errors name the user's `field`."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  fields, meta, step = restore_latest(workdir, parallel.replicated(mesh), flag=field,
                                      hint="; run the classify phase there first")
  if meta.get("phase") != "classify":
    raise UserError(f"{field}={workdir}: step {step} was written by the "
                    f"{meta.get('phase')!r} phase, not classify")
  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      data = json.load(f)["data"]
  except (OSError, ValueError, KeyError):
    raise UserError(f"{field}={workdir}: config.json with a data section is "
                    f"missing or unreadable") from None
  model = build_classifier(ml_collections.ConfigDict(meta["model"]), meta["image_size"],
                           meta["num_classes"])
  return Classifier(model, fields, meta, step, data)


DATA_FIELDS = ("name", "root", "records_dir", "seed", "tile_size", "image_size", "normalize",
               "mean", "std", "intensity",
               "num_classes", "class_names", "setting")


def data_config(config, classifier_data: dict):
  """A classifier-reading phase's data section: the classifier's input fields (its setting,
  unless this config names one), this config's split sizes; its setting settled."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  own = {"image_size": bool(config.data.get("image_size")),
         "setting": config.data.get("setting", "") not in ("", folders.FROM_DATASET)}
  for field in DATA_FIELDS:
    if field in classifier_data and not own.get(field):
      value = classifier_data[field]
      data[field] = tuple(value) if isinstance(value, list) else value
  return folders.settle(data)


# --- Pretrained weights -----------------------------------------------------------------------------
def load_pretrained(state: ClassifierState, workdir: str, model, mesh, backbone: str,
                    field: str = "model.init_from") -> ClassifierState:
  """Copies the matching parameters (and BatchNorm statistics) of `workdir`'s latest checkpoint
  into `state`.

  From a pretrain run: its encoder (`params/encoder`, and a CNN's `batch_stats/encoder`) into
  the ViT or the CNN trunk it pretrained. From a classify run: every backbone parameter and
  statistic (into a classifier or a segmenter whose backbone is the submodule `backbone`).
  Names and shapes must agree.
  """
  saved, meta, step = restore_latest(workdir, parallel.replicated(mesh), flag=field)
  where = f"{field}={workdir} (step {step}, phase {meta.get('phase')})"
  prefix = ("encoder",) if isinstance(model, ViTClassifier) else ("backbone",)
  if meta.get("phase") == "pretrain":
    pretrained = meta.get("model", {}).get("encoder", "vit")
    if pretrained != backbone:
      raise UserError(f"{where} pretrained model.encoder={pretrained!r}; it initialises "
                      f"model.backbone={pretrained!r} only")
    if prefix == ("backbone",):  # a pretext run keeps its CNN trunk under `encoder`
      saved = {k: {"backbone": v["encoder"]} for k, v in saved.items() if v and "encoder" in v}
  # a run with model.scan_blocks stores stacked blocks: back to blocks_i first
  params = _copy_matching(state.params, unstack_blocks(saved["params"]), prefix, where,
                          required=True)
  stats = state.batch_stats
  if state.batch_stats and saved.get("batch_stats"):
    stats = _copy_matching(state.batch_stats, saved["batch_stats"], prefix, where, required=False)
  return state.replace(params=params, batch_stats=stats)


def _copy_matching(ours_tree, theirs_tree, prefix: tuple, where: str, required: bool):
  """`ours_tree` with every leaf under `prefix` replaced by the same path of `theirs_tree`."""
  ours = traverse_util.flatten_dict(ours_tree)
  theirs = traverse_util.flatten_dict(theirs_tree)
  wanted = [k for k in ours if k[:1] == prefix]
  missing = [k for k in wanted if k not in theirs]
  if missing and (required or len(missing) < len(wanted)):
    raise UserError(f"{where} lacks {'/'.join(missing[0])} ({len(missing)} parameters "
                    f"missing): it was written for another model")
  if missing:
    return ours_tree
  # A parameter this model would silently drop (a learned position table, ...) is refused; the
  # encoder's final LayerNorm is the exception: global-pool heads do not use it (MAE recipe).
  extra = [k for k in theirs if k[:1] == prefix and k not in ours and k[1:2] != ("norm",)]
  if extra:
    raise UserError(f"{where} has {'/'.join(extra[0])} ({len(extra)} parameters), which this "
                    f"model lacks: it was written for another configuration")
  for k in wanted:
    if theirs[k].shape != ours[k].shape:
      raise UserError(f"{where}: {'/'.join(k)} has shape {theirs[k].shape}, this model "
                      f"needs {ours[k].shape}")
  merged = dict(ours)
  for k in wanted:
    merged[k] = jax.device_put(theirs[k], ours[k].sharding).astype(ours[k].dtype)
  return traverse_util.unflatten_dict(merged)


# --- Adversarial erasing ------------------------------------------------------------------------------
def load_erasing_plan(workdir: str, field: str = "erasing_workdir") -> dict:
  """erasing.json of a finished erasing run (read by the pseudo-mask phase)."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "erasing.json")
  try:
    with open(path, encoding="utf-8") as f:
      plan = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{field}={workdir}: no erasing.json there; run the erasing phase "
                    f"(configs/erasing.py) first") from None
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e})") from None
  return plan


# --- A segmenter -------------------------------------------------------------------------------------
class Segmenter(NamedTuple):
  """A segment run's kept checkpoint (its best validation step where it kept one)."""
  model: Any        # the linen segmenter rebuilt from the checkpoint's model description
  variables: dict   # params and batch_stats
  meta: dict        # phase, model, image_size, num_classes (outputs), setting
  step: int
  config: dict      # the run's config.json (data: classes, palette, tile size, normalisation)
  workdir: str


def _run_config(workdir: str, field: str) -> dict:
  recorded = run_record.recorded_config(workdir)
  if recorded is None:
    raise UserError(f"{field}={workdir}: no readable config.json; give a segment run's workdir")
  return recorded


def _pipeline_summary(workdir: str, field: str) -> dict:
  """The summary.json a pipeline run writes when it finishes (its segment phase included)."""
  try:
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
      summary = json.load(f)
    if isinstance(summary["segment"], dict):  # written last: the run finished
      return summary
    raise TypeError
  except (OSError, ValueError, KeyError, TypeError):
    raise UserError(f"{field}={workdir} is a pipeline run without a finished summary.json; "
                    f"finish it, or give one of its segment workdirs") from None


def pipeline_segmenter(workdir: str, field: str) -> str:
  """The segment workdir a finished pipeline run in `workdir` kept (its summary.json's
  segment.workdir: the band width and self-training round chosen on val), found under
  `workdir` wherever the run has been moved since."""
  kept = _pipeline_summary(workdir, field)["segment"].get("workdir") or "segment"
  return os.path.join(workdir, os.path.basename(os.path.normpath(kept)))


def pipeline_classifier(workdir: str, field: str) -> str:
  """The classifier whose maps gave a finished pipeline run's test pseudo masks (the input
  side chosen on val), found under `workdir` wherever the run has been moved since; one it
  was given from outside the run stays where it was recorded."""
  summary = _pipeline_summary(workdir, field)
  if not isinstance(summary.get("pseudo_masks_test"), dict):
    raise UserError(f"{field}={workdir} is a pipeline run without pseudo masks "
                    f"(supervision=full): it has no classifier maps to show")
  recorded = summary["pseudo_masks_test"]["classifier"]
  inside = os.path.relpath(recorded, summary.get("workdir") or workdir)
  return recorded if inside.startswith(os.pardir) else os.path.join(workdir, inside)


def load_segmenter(workdir: str, mesh, field: str = "model") -> Segmenter:
  """The segment run in `workdir` (or the one a pipeline run there kept): the best-mIoU step of
  `best/` when there is one, else the latest of `checkpoints/`; errors name the user's `field`."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config = _run_config(workdir, field)
  if config.get("phase") == "pipeline":
    workdir = pipeline_segmenter(workdir, field)
    print(f"{field}: the pipeline's segmenter, {workdir}", flush=True)
    config = _run_config(workdir, field)
  if config.get("phase") != "segment":
    raise UserError(f"{field}={workdir} holds a {config.get('phase')} run, not a segment run")
  best_dir = os.path.join(workdir, "best")
  fields = meta = step = None
  if os.path.isdir(best_dir):
    best = Checkpointer(best_dir, async_save=False)
    try:
      step = best.best_step() or best.latest_step()
      if step is not None:
        fields, meta = best.restore_fields(step, parallel.replicated(mesh))
    finally:
      best.close()
  if fields is None:
    fields, meta, step = restore_latest(workdir, parallel.replicated(mesh), flag=field,
                                        hint="; run the segment phase there first")
  model = build_segmenter(ml_collections.ConfigDict(meta["model"]), meta["num_classes"],
                          jnp.float32)
  return Segmenter(model, fields, meta, int(step), config, workdir)
