"""Segment phase: DeepLabV3+ (or MRN) trained on pseudo masks with multi-layer pseudo-supervision
(the task: `wsss_jax.tasks.segment`), validated every epoch keeping the best-mIoU checkpoint,
then the best one tested with and without the classification gate.

Sections: validation of the config -> the task -> resume or start (backbone from a
classification checkpoint) -> train with per-epoch validation -> test -> overlays and summary.
"""
from __future__ import annotations

import os

import numpy as np

from wsss_jax import atomic, metrics
from wsss_jax.data import folders, mask_files, pipeline
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.outputs import overlays
from wsss_jax.pseudo import par
from wsss_jax.tasks.common import Training
from wsss_jax.tasks.segment import (GATE_MODES, LOSSES, POOLINGS, build_training, checkpoint_meta,
                                    evaluate, load_gate_classifier, loss_kind, overlay_figure,
                                    relabel_batches, SELF_LAYER, scoring, setting, uses_labels)
from wsss_jax.train import earlier_runs, loop
from wsss_jax.train.checkpoint import Checkpointer

SUPERVISION = ("pseudo", "full")


def save_overlays(directory: str, shown, figure) -> None:
  """overlays/test.png (the figure) and test.npz: the first test tiles' image, ground truth,
  prediction, labels and names (the pipeline adds their pseudo masks)."""
  if not shown:
    return
  overlays.save(os.path.join(directory, "test.png"), figure)
  arrays = {k: np.stack([row[i] for row in shown]) for i, k in enumerate(
      ("image", "truth", "prediction", "labels", "name"))}
  with atomic.replacing(os.path.join(directory, "test.npz")) as tmp:
    np.savez_compressed(tmp, **arrays)


# --- The run ---------------------------------------------------------------------------------------------
def validate(config) -> None:
  loop.check_trainer_fields(config)
  if config.supervision not in SUPERVISION:
    raise UserError(f"supervision={config.supervision!r} is not one of {SUPERVISION}")
  if config.supervision == "pseudo" and not config.data.masks_dir:
    raise UserError("supervision='pseudo' needs data.masks_dir (a pseudo_masks workdir's masks/)")
  if config.supervision == "full":
    pipeline.check_ground_truth(config.data, "train", "supervision=full")
  if len(config.loss_weights) != len(config.data.mask_layers):
    raise UserError(f"loss_weights {tuple(config.loss_weights)} and data.mask_layers "
                    f"{tuple(config.data.mask_layers)} differ in length")
  if config.loss not in LOSSES + ("setting",):
    raise UserError(f"loss={config.loss!r} is not one of {LOSSES + ('setting',)}")
  if config.image_loss.pooling not in POOLINGS:
    raise UserError(f"image_loss.pooling={config.image_loss.pooling!r} is not one of {POOLINGS}")
  if not 0 <= config.size_prior.lower <= config.size_prior.upper <= 1:
    raise UserError(f"size_prior bounds lower={config.size_prior.lower}, "
                    f"upper={config.size_prior.upper} must satisfy 0 <= lower <= upper <= 1")
  if (config.image_loss.weight > 0 or config.size_prior.weight > 0) and (
      folders.settle(config.data).setting != "finding"):
    raise UserError("image_loss and size_prior are terms of the finding setting (a normal "
                    "image's pixels are all background); this data is a tissue map")
  if config.self_labels.write and config.supervision != "pseudo":
    raise UserError("self_labels.write relabels the training tiles of a pseudo-supervised run; "
                    "this run learns from the ground truth")
  if not 0 < config.self_labels.confidence <= 1:
    raise UserError(f"self_labels.confidence={config.self_labels.confidence} must lie in (0, 1]")
  for mode in config.gate.modes:
    if mode not in GATE_MODES:
      raise UserError(f"gate.modes: {mode!r} is not one of {GATE_MODES}")
  if len(config.data.class_names) != config.data.num_classes:
    raise UserError(f"data.class_names has {len(config.data.class_names)} names but "
                    f"data.num_classes={config.data.num_classes}")
  pipeline.check_dataset_name(config.data.name)


class BestCheckpoint:
  """best/: the step of the highest validation mIoU, kept beside the periodic checkpoints. Opened
  at the first validation, once the run has been accepted (a refused run writes nothing)."""

  def __init__(self, workdir: str, seg: Training, config, mesh, meta: dict):
    self.workdir, self.seg, self.config, self.mesh, self.meta = workdir, seg, config, mesh, meta
    self.eval_every = config.eval_every if config.eval_every > 0 else seg.steps_per_epoch
    self._checkpointer = None

  def checkpointer(self) -> Checkpointer:
    if self._checkpointer is None:
      self._checkpointer = Checkpointer(os.path.join(self.workdir, "best"), max_to_keep=1,
                                        async_save=False, best_metric="mIoU")
    return self._checkpointer

  def validation(self, step, state) -> dict:
    """loop.fit's validation hook: val scores every eval_every steps and at the end."""
    if step % self.eval_every and step != self.seg.total_steps:
      return {}
    scores = evaluate(self.seg, state, self.config, self.mesh, "val")[0]["off"]
    self.checkpointer().save(step, state, {}, self.meta, metrics={"mIoU": scores["mIoU"]})
    return {f"val/{k}": v for k, v in scores.items()}

  def restore(self, state) -> tuple:
    """(best step, the state at it)."""
    if self.checkpointer().best_step() is None:  # resumed at the end before any validation
      self.validation(self.seg.total_steps, state)
    best = self.checkpointer()
    step = best.best_step()
    fields, _ = best.restore_fields(step, parallel.replicated(self.mesh))
    best.close()
    return step, state.replace(**fields)


def phase_config(config):
  """The config the run follows: its setting settled, no masks_dir under full supervision."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data = folders.settle(config.data)
    if config.supervision == "full":
      config.data.masks_dir = ""  # MaskedSource reads the ground truth
  return config


def run(config, workdir: str) -> dict:
  validate(config)
  config = phase_config(config)
  mesh = parallel.mesh_from_config(config)
  seg = build_training(config, mesh)
  classifier = load_gate_classifier(config, mesh)  # fail fast on a mismatched classifier
  meta = checkpoint_meta(config)
  initialize = None
  if config.model.init_from:
    initialize = lambda s: earlier_runs.load_pretrained(  # noqa: E731
        s, config.model.init_from, seg.model, mesh, config.model.backbone)
  keys = ("image",) + (("context",) if config.model.name == "mrn" else ()) + tuple(
      f"mask_{layer}" for layer in config.data.mask_layers) + ("labels",) * uses_labels(config)
  best = BestCheckpoint(workdir, seg, config, mesh, meta)
  fitted = loop.fit("segment", config, workdir, seg, meta, mesh, total_steps=seg.total_steps,
                    keys=keys, initialize=initialize, eval_splits=("val", config.test_split),
                    validation=best.validation)
  best_step, best_state = best.restore(fitted.state)
  test, shown = evaluate(seg, best_state, config, mesh, config.test_split, classifier,
                         config.overlays)
  report_test(config, workdir, shown, best_step, fitted.run.writer)
  val = evaluate(seg, best_state, config, mesh, "val")[0]["off"]
  written = (write_self_labels(seg, best_state, config, mesh, workdir)
             if config.self_labels.write else None)
  summary = fitted.summary | {
      "model": config.model.name, "supervision": config.supervision, "best_step": best_step,
      "setting": setting(config), "loss": loss_kind(config),
      "steps_per_epoch": seg.steps_per_epoch, "scoring": scoring(config),
      "test_split": config.test_split, "test": test, "val": val, "self_labels": written}
  for mode, s in test.items():
    print(f"test ({mode} gate): " + " ".join(f"{k} {v:.3f}" for k, v in metrics.headline(s)),
          flush=True)
  fitted.run.writer.summary(summary)
  fitted.run.writer.close()
  return summary


def write_self_labels(seg: Training, state, config, mesh, workdir: str) -> dict:
  """self_labels/masks/self/<tile>.png: the best checkpoint's confident labels of the training
  tiles (tasks.segment.self_labels), for the next self-training round."""
  cfg = config.self_labels
  directory = os.path.join(workdir, "self_labels", "masks", SELF_LAYER)
  palette = mask_files.palette_bytes(folders.resolve(config.data, "palette", config.palette),
                                     config.data.num_classes + 1)
  par_settings = par.static_settings(par.DEFAULTS) if cfg.par else ()
  ignored = pixels = 0
  with atomic.BackgroundWrites(4) as writer:
    for names, masks in relabel_batches(seg, state, config, mesh, cfg.confidence, par_settings):
      ignored += int((masks == mask_files.IGNORE).sum())
      pixels += masks.size
      if parallel.is_main_process():
        writer.submit(mask_files.write_masks, directory, names, masks, palette)
  share = ignored / max(pixels, 1)
  print(f"self labels: {directory} ({share:.1%} of the pixels ignored, confidence "
        f"{cfg.confidence:g}{', PAR' if cfg.par else ''})", flush=True)
  return {"masks_dir": os.path.dirname(directory), "ignored_share": share}


def report_test(config, workdir: str, shown: list, step: int, writer) -> None:
  """overlays/test.png and test.npz of the first test tiles, the figure in TensorBoard too."""
  if not (parallel.is_main_process() and shown):
    return
  palette = mask_files.palette_bytes(folders.resolve(config.data, "palette", config.palette),
                                     config.data.num_classes + 1)
  names = tuple(config.data.class_names) + ("background",)
  figure = overlay_figure(shown, palette, names, f"segmenter {config.model.name} "
                          f"({config.supervision} supervision), {config.test_split} split")
  save_overlays(os.path.join(workdir, "overlays"), shown, figure)
  writer.image("segment/test", step, figure)
