"""Figures written into the workdir: MAE reconstructions as a PNG grid."""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from PIL import Image

from wsss_jax import atomic
from wsss_jax.models.mae import patchify, unpatchify


def mae_panels(images, pred, mask, patch: int, norm_pix_loss: bool, mean, std):
  """(original, masked, reconstruction) in [0, 1], each (B, H, W, 3).

  With norm_pix_loss the prediction is per-patch normalised; it is brought back with the true
  patch's mean and variance, as in the MAE visualisation. Visible patches are pasted back.
  """
  target = patchify(images, patch)
  if norm_pix_loss:
    pred = pred * jnp.sqrt(target.var(-1, keepdims=True) + 1e-6) + target.mean(-1, keepdims=True)
  m = mask[..., None]
  to_unit = lambda x: jnp.clip(unpatchify(x, patch) * jnp.asarray(std) + jnp.asarray(mean), 0, 1)
  grey = (0.5 - jnp.asarray(mean)) / jnp.asarray(std)  # a grey patch marks what was hidden
  masked = target * (1 - m) + jnp.tile(grey, patch * patch) * m
  return to_unit(target), to_unit(masked), to_unit(target * (1 - m) + pred * m)


def save_grid(panels, path: str) -> np.ndarray:
  """Rows = images, columns = panels; writes a PNG atomically and returns the uint8 grid."""
  columns = [np.concatenate(list(np.asarray(p)), axis=0) for p in panels]
  grid = (np.concatenate(columns, axis=1) * 255).round().astype(np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with atomic.replacing(path) as tmp:
    Image.fromarray(grid).save(tmp)
  return grid
