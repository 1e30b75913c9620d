"""Adversarial erasing (Wei et al. 2017, "Object region mining with adversarial erasing"), on device.

Round t's classifier is trained on the tiles with the regions mined by rounds 0..t-1 erased
(filled with the dataset's mean colour), so it must find the object elsewhere; the maps of the
rounds, each on its own erased input, are fused by a per-pixel maximum (the union of the mined
regions). `erasing_chain` runs the rounds one after another on a batch: it gives the fused maps
for the pseudo masks and the union region that the next round's training tiles lose.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def erase(images, region, fill):
  """images (B, H, W, 3) with the pixels of `region` (B, H, W) bool set to `fill` (3,)."""
  return jnp.where(region[..., None], jnp.asarray(fill, images.dtype), images)


def mined_region(maps, labels, size, threshold: float):
  """(B, H, W) bool: pixels where some present class's map, per-class max-normalised and
  resized to `size` (bilinear), exceeds `threshold` (the object regions of this round)."""
  b, k = maps.shape[:2]
  maps = jax.nn.relu(maps.astype(jnp.float32))
  maps = maps / (maps.max(axis=(2, 3), keepdims=True) + 1e-8)
  maps = jax.image.resize(maps, (b, k) + tuple(size), "bilinear")
  present = (labels > 0)[:, :, None, None]
  return jnp.any(present & (maps > threshold), axis=1)


def erasing_chain(rounds: Sequence, variables: Sequence, images, labels, fill, threshold: float):
  """(fused maps {layer: (B, K, h, w)}, union region (B, H, W)) of the rounds in order.

  rounds: per round (maps_fn, region_fn), each (variables, x, labels) -> maps: maps_fn gives
  {layer: maps} (what is fused; None: nothing is, and fused maps come back None), region_fn
  (B, K, h, w) maps whose thresholded part is erased next; variables: per round, its checkpoint's. Round 0 sees the images; round t sees them with
  the union of the regions of rounds < t erased."""
  size = images.shape[1:3]
  region = jnp.zeros(images.shape[:3], bool)
  fused = None
  for (maps_fn, region_fn), v in zip(rounds, variables):
    x = erase(images, region, fill)
    if maps_fn is not None:
      maps = maps_fn(v, x, labels)
      fused = maps if fused is None else {k: jnp.maximum(fused[k], maps[k]) for k in maps}
    region = region | mined_region(region_fn(v, x, labels), labels, size, threshold)
  return fused, region
