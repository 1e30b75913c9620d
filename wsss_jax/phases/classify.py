"""Classify phase: multi-label patch classification (ResNet38 + PDA, ResNet-50, ViT from MAE).

Sections: validation of the config -> the task (`wsss_jax.tasks.classify`: model, optimiser,
jitted steps) -> state (fresh, from a pretrained workdir, or resumed) -> input -> loop with
validation -> summary.
"""
from __future__ import annotations

from typing import Callable

from wsss_jax.data import pipeline
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.tasks.classify import build_training, checkpoint_meta, evaluate
from wsss_jax.train import earlier_runs, loop

BOUNDS = ("clip", "check")


def validate(config) -> None:
  loop.check_trainer_fields(config)
  if config.total_steps <= 0 and config.num_epochs <= 0:
    raise UserError("set num_epochs or total_steps to a positive integer")
  pipeline.check_dataset_name(config.data.name)
  if len(config.data.class_names) != config.data.num_classes:
    raise UserError(f"data.class_names has {len(config.data.class_names)} names but "
                    f"data.num_classes={config.data.num_classes}")
  if config.pda.bound not in BOUNDS:
    raise UserError(f"pda.bound={config.pda.bound!r} is not one of {BOUNDS}")
  if not 0 < config.pda.sigma <= 1 or not 0 < config.pda.lower_bound <= 1:
    raise UserError("pda.sigma and pda.lower_bound must lie in (0, 1]")
  hs = config.get("hide_and_seek")
  if hs and (not 0 <= hs.prob < 1 or hs.grid <= 0):
    raise UserError(f"hide_and_seek.prob={hs.prob} must lie in [0, 1) and hide_and_seek.grid="
                    f"{hs.grid} be a positive integer")
  er = config.get("equivariance")
  if er and er.weight > 0:
    if config.model.backbone == "vit":
      raise UserError("equivariance.weight > 0 needs a convolutional backbone (class maps)")
    if not 0 < er.scale <= 1:
      raise UserError(f"equivariance.scale={er.scale} must lie in (0, 1]")
  if config.pda.enabled and config.model.backbone == "vit":
    raise UserError("pda.enabled=True needs a convolutional backbone; use --config.pda."
                    "enabled=False with model.backbone='vit'")


def run(config, workdir: str, *, step_callback: Callable | None = None) -> dict:
  validate(config)
  mesh = parallel.mesh_from_config(config)
  t = build_training(config, mesh)
  initialize = None
  if config.model.init_from:
    initialize = lambda state: earlier_runs.load_pretrained(  # noqa: E731
        state, config.model.init_from, t.model, mesh, config.model.backbone)
  eval_every = config.eval_every if config.eval_every > 0 else t.steps_per_epoch

  def validation(step, state):
    if step % eval_every and step != t.total_steps:
      return {}
    return {f"val/{k}": v for k, v in evaluate(t, state, config, mesh).items()}

  fitted = loop.fit("classify", config, workdir, t, checkpoint_meta(config), mesh,
                    total_steps=t.total_steps, keys=("image", "labels"), initialize=initialize,
                    eval_splits=("val",), validation=validation, step_callback=step_callback)
  state, last = fitted.state, fitted.last
  # The last step always validates; a run resumed at its end has no last step: validate now.
  val = ({k: v for k, v in last.items() if k.startswith("val/")} if last else
         validation(t.total_steps, state))
  summary = fitted.summary | {
      "backbone": config.model.backbone, "steps_per_epoch": t.steps_per_epoch,
      "final_mu": float(parallel.to_host(state.mu)), **val}
  fitted.run.writer.summary(summary)
  fitted.run.writer.close()
  return summary
