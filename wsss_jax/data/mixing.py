"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on device, batch mode as timm's:
every image is mixed with the image at the mirrored batch position, and so are its labels
(multi-label vectors mix linearly, lam y_i + (1 - lam) y_{B-1-i})."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cutmix_box(rng, height: int, width: int, lam):
  """A box covering about 1 - lam of the image, centred uniformly, clipped to the image.

  Returns (inside (H, W) bool, lam corrected to the clipped box's area)."""
  k_y, k_x = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  return inside, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def mix_batch(rng, images, labels, mixup_alpha: float, cutmix_alpha: float,
              switch_prob: float = 0.5, prob: float = 1.0):
  """images (B, H, W, C) float, labels (B, K) -> mixed (images, labels).

  With both alphas > 0, CutMix is chosen with probability `switch_prob`; the whole batch is
  mixed with probability `prob`. lam ~ Beta(alpha, alpha).
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, labels
  k_apply, k_switch, k_lam, k_box = jax.random.split(rng, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  lam = jax.random.beta(k_lam, alpha, alpha)
  lam = jnp.where(jax.random.uniform(k_apply) < prob, lam, 1.0)
  partner = images[::-1]
  inside, lam_cut = cutmix_box(k_box, images.shape[1], images.shape[2], lam)
  cut = jnp.where(inside[None, :, :, None], partner, images)
  mixed = lam * images + (1.0 - lam) * partner
  lam = jnp.where(use_cutmix, lam_cut, lam)
  images = jnp.where(use_cutmix, cut, mixed.astype(images.dtype))
  return images, lam * labels + (1.0 - lam) * labels[::-1]


def hide_patches(rng, images, grid: int, prob: float, fill):
  """Hide-and-Seek (Singh & Lee 2017): the image is cut into grid x grid cells and each cell of
  each image is replaced by `fill` (the dataset mean, (C,)) with probability `prob`, so the
  classifier must find every part of an object, not only the most discriminative one.

  images (B, H, W, C) float; cells are rows [i H / grid, (i + 1) H / grid), likewise columns."""
  b, h, w, _ = images.shape
  hidden = jax.random.bernoulli(rng, prob, (b, grid, grid))
  cell_rows = jnp.arange(h) * grid // h
  cell_cols = jnp.arange(w) * grid // w
  pixel_hidden = hidden[:, cell_rows][:, :, cell_cols]  # (B, H, W)
  return jnp.where(pixel_hidden[..., None], jnp.asarray(fill, images.dtype), images)
