"""How good a map is, measured on the classifier itself and against ground-truth masks.

- Deletion / insertion (Petsiuk et al. 2018, RISE): remove (insert) pixels in order of decreasing
  relevance, `steps` equal slices at a time, and follow the class's sigmoid score; the area under
  the curve (trapezoid rule over the fraction of pixels) is low for deletion and high for
  insertion when the map ranks well. Deleted pixels take the baseline (0 = the dataset mean for
  normalised inputs); insertion starts from a Gaussian-blurred image (RISE: kernel 11, sigma 5).
- Average drop and increase in confidence (Chattopadhay et al. 2018): with the map in [0, 1] as a
  soft mask, drop = mean(ReLU(Y - O) / Y), increase = fraction of cases with O > Y, where Y is the
  score of the image and O that of image * map.
- Pseudo-mask IoU: argmax over the (present) class maps, scored against the ground truth with the
  ground-truth background left out (the multi-layer pseudo-supervision paper's stage-1 rule).
Every curve runs on device: all (image, class, step) inputs of a batch as forward passes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp



def gaussian_blur(images, sigma: float = 5.0, size: int = 11):
  """Separable depthwise Gaussian blur of (B, H, W, C), edges padded by replication."""
  r, c = size // 2, images.shape[-1]
  t = jnp.arange(size, dtype=jnp.float32) - r
  k = jnp.exp(-0.5 * (t / sigma) ** 2)
  k = (k / k.sum()).astype(images.dtype)
  x = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
  for kernel in (k[:, None, None, None], k[None, :, None, None]):  # rows, then columns
    x = jax.lax.conv_general_dilated(x, jnp.tile(kernel, (1, 1, 1, c)), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=c)
  return x


def _ranks(maps):
  """Rank of every pixel in decreasing relevance, per (image, class): (B, K, H, W) ints."""
  b, k, h, w = maps.shape
  order = jnp.argsort(-maps.reshape(b, k, h * w), axis=-1, stable=True)
  return jnp.argsort(order, axis=-1).reshape(b, k, h, w)


def deletion_insertion(apply_fn, variables, images, maps, steps: int = 16, baseline: float = 0.0):
  """Scores along the deletion and insertion curves: two (B, K, steps + 1) arrays of sigmoid
  scores of class k as the fraction t / steps of its top-ranked pixels is removed / inserted."""
  b, k, h, w = maps.shape
  ranks = _ranks(maps)
  blurred = gaussian_blur(images)
  fractions = jnp.arange(steps + 1) / steps

  def scores_at(fraction):
    chosen = (ranks < jnp.round(fraction * h * w))[..., None]  # (B, K, H, W, 1)
    deleted = jnp.where(chosen, baseline, images[:, None])
    inserted = jnp.where(chosen, images[:, None], blurred[:, None])
    both = jnp.concatenate([deleted, inserted]).reshape((-1,) + images.shape[1:])
    probs = jax.nn.sigmoid(apply_fn(variables, both)).reshape(2, b, k, -1)
    return jnp.diagonal(probs, axis1=2, axis2=3)  # class k's score on its own map: (2, B, K)

  curves = jax.lax.map(scores_at, fractions)  # (steps + 1, 2, B, K)
  curves = jnp.moveaxis(curves, 0, -1)
  return curves[0], curves[1]


def area_under(curves):
  """Trapezoid area over the fractions 0..1 of (..., steps + 1) curves."""
  return (curves[..., 1:] + curves[..., :-1]).sum(-1) / (2 * (curves.shape[-1] - 1))


def confidence_change(apply_fn, variables, images, maps):
  """(drop (B, K) in [0, 1], increased (B, K) bool) with maps in [0, 1] as soft masks."""
  b, k = maps.shape[:2]
  full = jax.nn.sigmoid(apply_fn(variables, images))  # (B, K)
  masked = images[:, None] * maps[..., None]
  probs = jax.nn.sigmoid(apply_fn(variables, masked.reshape((-1,) + images.shape[1:])))
  masked_own = jnp.diagonal(probs.reshape(b, k, -1), axis1=1, axis2=2)
  return jax.nn.relu(full - masked_own) / full, masked_own > full


def pseudo_masks(maps, labels):
  """argmax over the class maps with absent classes excluded: (B, K, H, W) -> (B, H, W) int.
  Scoring leaves ground-truth background out (`metrics.confusion_matrix(...,
  ignore=background)`), the stage-1 rule."""
  present = labels[:, :, None, None] > 0
  return jnp.argmax(jnp.where(present, maps, -jnp.inf), axis=1)
