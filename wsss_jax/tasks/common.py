"""Pieces every task shares: the compute dtype, images prepared on device, epochs in steps."""
from __future__ import annotations

import jax.numpy as jnp

from wsss_jax.data import pipeline


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
