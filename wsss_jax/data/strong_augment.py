"""Strong augmentation on device, per image, inside the jitted step (instance discrimination).

The SimCLR recipe (Chen et al. 2020, appendix A) in jax.numpy: random-resized crop, horizontal
and vertical flips (histology has no up), colour jitter with probability p (brightness, contrast,
saturation, hue, in that fixed order), grayscale with probability p and Gaussian blur with
probability p. Images are float (B, H, W, 3) in [0, 1]; every draw is independent per image.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LUMA = jnp.array([0.299, 0.587, 0.114])  # ITU-R 601 weights, as PIL's convert("L")
RGB_TO_YIQ = jnp.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]])


def crop_boxes(rng, batch: int, height: int, width: int, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3)):
  """(top, left, h, w) per image, float: area uniform in `scale` of the image, aspect ratio
  log-uniform in `ratio`, sides clipped to the image (no rejection loop on device)."""
  k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
  area = height * width * jax.random.uniform(k_area, (batch,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (batch,), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
  h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
  top = jax.random.uniform(k_top, (batch,)) * (height - h)
  left = jax.random.uniform(k_left, (batch,)) * (width - w)
  return top, left, h, w


def resized_crops(images, top, left, h, w):
  """Each image's box resampled (bilinear) to the full image size."""
  size = images.shape[1:3]

  def one(image, t, l, hh, ww):
    scale = jnp.stack([size[0] / hh, size[1] / ww])
    return jax.image.scale_and_translate(image, image.shape, (0, 1), scale,
                                         -jnp.stack([t, l]) * scale, "linear", antialias=False)

  return jax.vmap(one)(images, top, left, h, w)


def _per_image(rng, batch: int, prob: float):
  """Bernoulli(prob) per image, shaped to broadcast over (H, W, C)."""
  return (jax.random.uniform(rng, (batch,)) < prob)[:, None, None, None]


def flips(rng, images):
  """Horizontal and vertical flips, each with probability 1/2 per image."""
  k_h, k_v = jax.random.split(rng)
  b = images.shape[0]
  images = jnp.where(_per_image(k_h, b, 0.5), images[:, :, ::-1], images)
  return jnp.where(_per_image(k_v, b, 0.5), images[:, ::-1], images)


def grayscale(images):
  return jnp.repeat((images @ LUMA)[..., None], 3, axis=-1)


def rotate_hue(images, angle):
  """Rotates the chroma (I, Q) of the YIQ colour space by `angle` radians per image; luma kept."""
  cos, sin = jnp.cos(angle)[:, None, None], jnp.sin(angle)[:, None, None]
  yiq = images @ RGB_TO_YIQ.T
  i = yiq[..., 1] * cos - yiq[..., 2] * sin
  q = yiq[..., 1] * sin + yiq[..., 2] * cos
  return jnp.stack([yiq[..., 0], i, q], -1) @ jnp.linalg.inv(RGB_TO_YIQ).T


def colour_jitter(rng, images, strength: float):
  """SimCLR's jitter of strength s: brightness, contrast, saturation factors uniform in
  [1 - 0.8 s, 1 + 0.8 s], hue turned by up to 0.2 s of a full turn; clipped to [0, 1]."""
  k_b, k_c, k_s, k_h = jax.random.split(rng, 4)
  b, s = images.shape[0], 0.8 * strength

  def factor(key):
    return jax.random.uniform(key, (b,), minval=1 - s, maxval=1 + s)[:, None, None, None]

  x = jnp.clip(images * factor(k_b), 0, 1)
  mean_luma = (x @ LUMA).mean((1, 2))[:, None, None, None]
  x = jnp.clip((x - mean_luma) * factor(k_c) + mean_luma, 0, 1)
  gray = (x @ LUMA)[..., None]
  x = jnp.clip((x - gray) * factor(k_s) + gray, 0, 1)
  angle = 2 * jnp.pi * jax.random.uniform(k_h, (b,), minval=-0.2 * strength,
                                          maxval=0.2 * strength)
  return jnp.clip(rotate_hue(x, angle), 0, 1)


def gaussian_blur(rng, images, sigma_range, radius: int):
  """Separable Gaussian blur with sigma uniform in `sigma_range` per image; reflected borders."""
  b = images.shape[0]
  sigma = jax.random.uniform(rng, (b,), minval=sigma_range[0], maxval=sigma_range[1])
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (taps[None] / sigma[:, None])**2)
  kernel = kernel / kernel.sum(1, keepdims=True)  # (B, 2r + 1)
  pad = ((0, 0), (radius, radius), (radius, radius), (0, 0))
  x = jnp.pad(images, pad, mode="reflect")
  h, w = images.shape[1:3]
  x = sum(kernel[:, k, None, None, None] * x[:, k:k + h] for k in range(2 * radius + 1))
  return sum(kernel[:, k, None, None, None] * x[:, :, k:k + w] for k in range(2 * radius + 1))


def strong_view(rng, images, cfg):
  """One strongly augmented view of each image (float (B, H, W, 3) in [0, 1]); `cfg` holds
  crop_min, colour_strength, colour_p, grayscale_p, blur_p (SimCLR: 0.08, 1.0, 0.8, 0.2, 0.5)."""
  keys = jax.random.split(rng, 8)
  b, h, w, _ = images.shape
  x = resized_crops(images, *crop_boxes(keys[0], b, h, w, (cfg.crop_min, 1.0)))
  x = flips(keys[1], x)
  if cfg.colour_p > 0 and cfg.colour_strength > 0:
    x = jnp.where(_per_image(keys[2], b, cfg.colour_p),
                  colour_jitter(keys[3], x, cfg.colour_strength), x)
  if cfg.grayscale_p > 0:
    x = jnp.where(_per_image(keys[4], b, cfg.grayscale_p), grayscale(x), x)
  if cfg.blur_p > 0:  # sigma 0.1-2.0 at 224 px (kernel 10% of the side), scaled to this size
    sigma_hi = 2.0 * h / 224
    blurred = gaussian_blur(keys[6], x, (0.1 * h / 224, sigma_hi), max(1, math.ceil(3 * sigma_hi)))
    x = jnp.where(_per_image(keys[5], b, cfg.blur_p), blurred, x)
  return jnp.clip(x, 0, 1)
