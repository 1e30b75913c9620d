"""Pretrain phase: masked-autoencoder pretraining of a ViT encoder, or a pretext task (rotation,
jigsaw, exemplar) on a ViT or on a ResNet38 / ResNet-50 trunk (`model.encoder`).

Sections: the task (`wsss_jax.tasks.pretrain`: model, optimiser, jitted step) -> state (fresh
or resumed) -> input -> loop (metrics, checkpoints, reconstruction figures) -> summary, then the
end-of-run probe and fine-tune (classify runs through the runner). The step is one `jax.jit` with explicit
shardings: state replicated or FSDP-split (parallel.py), batch split over all devices, state
donated.
"""
from __future__ import annotations

import os
from typing import Callable

import jax

from wsss_jax.data import pipeline
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.models import pretext
from wsss_jax.models.mae import MaskedAutoencoder
from wsss_jax.outputs import mae_grid
from wsss_jax.tasks.common import compute_dtype
from wsss_jax.tasks.pretrain import (build_training, checkpoint_meta, encoder_name, load_chained,
                                     make_reconstruct_fn)
from wsss_jax.train import loop

EVALUATION_RUNS = {"both": ("linear_probe", "finetune"), "probe": ("linear_probe",),
                   "finetune": ("finetune",), "none": ()}


def evaluate_representation(config, workdir: str, dispatch) -> dict:
  """The end-of-run check of the encoder: each classify run of `config.evaluation.runs` starts
  from this workdir (its own workdir: <workdir>/eval/<name>; resumed, so a finished one only
  re-validates) and reports its validation scores. `dispatch`: the runner's (run, validate)."""
  results = {}
  for name in EVALUATION_RUNS[config.evaluation.runs]:
    cls = config.evaluation[name].copy_and_resolve_references()
    with cls.unlocked():
      cls.data.image_size = config.data.image_size
      if encoder_name(config) == "vit":
        cls.model.variant = config.model.variant
      else:  # the classifier of the pretrained trunk, fed as the trunk was
        cls.model.backbone, cls.model.width = encoder_name(config), config.model.width
        cls.data.normalize = config.data.normalize
      cls.model.init_from, cls.seed = workdir, config.seed
      cls.num_devices, cls.parallel = config.num_devices, config.parallel
    summary = dispatch.run(cls, os.path.join(workdir, "eval", name))
    results[name] = {k[len("val/"):]: v for k, v in summary.items()
                     if k in ("val/mAP", "val/mean_f1", "val/exact_match")}
    results[name]["steps"] = summary["steps"]
  return results


def validate(config, dispatch=None) -> None:
  if config.total_steps <= 0:
    raise UserError(f"total_steps={config.total_steps} must be a positive integer")
  loop.check_trainer_fields(config)
  pipeline.check_dataset_name(config.data.name)
  objective = config.get("objective", "mae")
  if objective not in pretext.OBJECTIVES:
    raise UserError(f"objective={objective!r} is not one of {pretext.OBJECTIVES}")
  encoder = encoder_name(config)
  if encoder not in pretext.ENCODERS:
    raise UserError(f"model.encoder={encoder!r} is not one of {pretext.ENCODERS}")
  if encoder != "vit" and objective == "mae":
    raise UserError(f"model.encoder={encoder!r}: MAE pretrains a ViT; a CNN trunk takes a "
                    f"pretext task (objective=rotation, jigsaw or exemplar)")
  if encoder != "vit" and config.model.width <= 0:
    raise UserError(f"model.width={config.model.width} must be positive")
  if objective == "jigsaw":
    pretext.check_jigsaw(config.data.image_size, config.jigsaw.grid)
  if objective == "exemplar":
    pretext.check_exemplar(config.exemplar, config.batch_size)
  evaluation = config.get("evaluation")
  if evaluation and evaluation.runs not in EVALUATION_RUNS:
    raise UserError(f"evaluation.runs={evaluation.runs!r} is not one of "
                    f"{tuple(EVALUATION_RUNS)}")
  runs = EVALUATION_RUNS[evaluation.runs] if evaluation else ()
  if runs and dispatch is None:
    raise ValueError("pretrain's evaluation runs classify runs: run it through "
                     "wsss_jax.runner.run_phase, or with dispatch=runner.DISPATCH")
  for name in runs:  # fail before pretraining, not after it
    dispatch.validate(evaluation[name])
  lo, hi = config.data.crop_scale
  if not 0 < lo <= hi <= 1:
    raise UserError(f"data.crop_scale={tuple(config.data.crop_scale)} must satisfy "
                    f"0 < low <= high <= 1")


def run(config, workdir: str, *, step_callback: Callable | None = None, dispatch=None) -> dict:
  """Trains until `config.total_steps`, resuming from the latest checkpoint in `workdir`;
  `dispatch` (the runner's run / validate) runs the evaluation's classify runs."""
  validate(config, dispatch)
  mesh = parallel.mesh_from_config(config)
  t = build_training(config, mesh)
  initialize = None
  if config.model.get("init_from"):  # chained pretraining: start from another run's weights
    initialize = lambda state: load_chained(state, config.model.init_from,  # noqa: E731
                                               bool(config.model.get("scan_blocks")), mesh)
  mae = isinstance(t.model, MaskedAutoencoder)
  reconstruct, eval_images = None, None
  if mae:  # reconstruction figures of the first validation tiles at every checkpoint
    reconstruct = jax.jit(make_reconstruct_fn(t.model, tuple(config.data.mean),
                                              tuple(config.data.std), compute_dtype(config),
                                              config.seed),
                          out_shardings=parallel.replicated(mesh))
    eval_images = parallel.replicate(
        pipeline.eval_examples(config.data, config.num_figure_images)["image"], mesh)

  def figure(job, step, state):
    if not mae:
      return
    panels = parallel.to_host(reconstruct(state.params, eval_images))  # on every process
    if job.writer.enabled:
      grid = mae_grid.save_grid(panels, os.path.join(workdir, "figures", f"recon_{step:07d}.png"))
      job.writer.image("reconstruction", step, grid)

  fitted = loop.fit("pretrain", config, workdir, t, checkpoint_meta(config), mesh,
                    total_steps=config.total_steps, initialize=initialize, after_save=figure,
                    step_callback=step_callback)
  summary, writer = fitted.summary, fitted.run.writer
  writer.summary(summary)  # written before the evaluation runs, and again with them
  if config.get("evaluation") and config.evaluation.runs != "none":
    summary["evaluation"] = evaluate_representation(config, workdir, dispatch)
  writer.summary(summary)
  writer.close()
  return summary
