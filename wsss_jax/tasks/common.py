"""Pieces every task shares: the compute dtype, images prepared on device, epochs in steps."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from wsss_jax.data import pipeline
from wsss_jax.device import parallel
from wsss_jax.train import optim


class Training(NamedTuple):
  """What every trained phase (and the benchmark) builds from a config and a mesh."""
  model: Any
  init_state: Callable      # () -> the train state, to be jitted with `state_sharding`
  abstract_state: Any       # its shapes and dtypes
  state_sharding: Any
  train_step: Callable      # jitted (state, batch) -> (state, metrics); state donated
  total_steps: int
  steps_per_epoch: int = 0  # 0: counted in steps only (pretraining)
  predict: Callable | None = None  # jitted inference (classify: logits; segment: per pixel)


def state_sharding_of(init_state, mesh, config) -> tuple:
  """(abstract state, its sharding over `mesh` by config.parallel's rules)."""
  abstract_state = jax.eval_shape(init_state)
  return abstract_state, parallel.state_shardings(abstract_state, mesh, config.get("parallel"))


def skip_non_finite(step: Callable) -> Callable:
  """nan_policy=skip_step: a step whose loss or gradient norm is not finite leaves the state as
  it was but for its step counter (the schedule and the input move on, as in optax's
  apply_if_finite; here BatchNorm statistics and PDA's mu are kept too)."""
  def skipping(state, batch):
    new, metrics = step(state, batch)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics.get("grad_norm", metrics["loss"]))
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    return kept.replace(step=new.step), metrics
  return skipping


def jit_train_step(step: Callable, state_sharding, mesh, nan_policy: str = "stop") -> Callable:
  """The train step jitted once: state sharded and donated, the batch split over the data
  axis, the metrics replicated."""
  if nan_policy == "skip_step":
    step = skip_non_finite(step)
  return jax.jit(parallel.with_mesh(mesh, step),
                 in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
                 out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)


def backbone_head_optimizer(config, param_labels: Callable, steps: int):
  """(tx, schedule): the SGD recipe with the head's lr x optim.head_lr_mult (segmenters,
  AffinityNet)."""
  return optim.classifier_optimizer(
      config.optim, param_labels, {"backbone": 1.0, "head": config.optim.head_lr_mult},
      config.batch_size, steps)


# --- Epochs and PDA's mu --------------------------------------------------------------------------
def steps_per_epoch(config) -> int:
  return max(1, len(pipeline.build_source(config.data, "train")) // config.batch_size)


def total_steps(config, spe: int) -> int:
  """`total_steps` when positive, else `num_epochs` epochs of `spe` steps."""
  return config.total_steps if config.total_steps > 0 else config.num_epochs * spe


# --- Model, optimiser, steps ----------------------------------------------------------------------
def compute_dtype(config):
  return jnp.bfloat16 if config.mixed_precision else jnp.float32


def prepare_images(images_u8, data_cfg, dtype):
  """uint8 -> [0, 1] (the ResNet38 recipe) or (x - mean) / std with `data.normalize`."""
  if data_cfg.normalize:
    return pipeline.normalize(images_u8, tuple(data_cfg.mean), tuple(data_cfg.std), dtype)
  return (images_u8.astype(jnp.float32) / 255.0).astype(dtype)
