"""Embedded finding-on-background dataset: breast-ultrasound-like images, malignant or normal.

The setting of the ultrasound WSSS work: one finding class (`lesion`) on an unlabelled
background, and normal images whose label vector is all zero. Each image shows what makes the
setting hard, on purpose:
  a sector (fan) field of view on black, with a bright fan border and bright calibration marks
    outside it (bright artefacts an explanation can latch on to);
  layered tissue (skin line, fat, glandular tissue) under multiplicative speckle, attenuated with
    depth;
  hypoechoic fat lobules (dark smooth ovals) in malignant and normal images alike;
  acoustic shadows (dark bands along the beam) under bright reflectors, in both kinds of image;
  in malignant images, one irregular, spiculated hypoechoic lesion with a brighter halo and a
    posterior shadow.
So the lesion is dark, like everything an intensity threshold would also pick (outside the fan,
shadows, lobules): Otsu on the image is a baseline a weak method must beat, not a solution.
Labels: (1,) float32, 1 for malignant. Masks: uint8, 0 = lesion, 1 = background (index K).
An image is a pure function of (seed, split, index), like the histology generator.
"""
from __future__ import annotations

import numpy as np

from wsss_jax.data import synthetic

CLASS_NAMES = ("lesion",)
BACKGROUND = 1
SPLITS = {"train": 10, "val": 11, "test": 12}  # not the histology generator's streams
MALIGNANT_SHARE = 0.5


def _speckle(rng: np.random.Generator, shape, grain_px: float) -> np.ndarray:
  """Fully developed speckle: the magnitude of smoothed complex Gaussian noise (Rayleigh), mean 1."""
  re, im = synthetic.smooth_noise(rng, shape, grain_px), synthetic.smooth_noise(rng, shape, grain_px)
  amplitude = np.sqrt(re**2 + im**2)
  return amplitude / amplitude.mean()


def _fan(size: int, rng: np.random.Generator):
  """(inside, border, depth, angle): the sector scan's field of view. The apex lies above the
  image; depth runs 0 -> 1 from the fan's near arc to its far arc."""
  apex_y = -size * rng.uniform(0.3, 0.6)
  apex_x = size * rng.uniform(0.45, 0.55)
  half_angle = np.deg2rad(rng.uniform(28, 40))
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  r = np.hypot(y - apex_y, x - apex_x)
  theta = np.arctan2(x - apex_x, y - apex_y)
  r0, r1 = -apex_y + size * rng.uniform(0.0, 0.06), -apex_y + size * rng.uniform(0.9, 1.05)
  inside = (np.abs(theta) < half_angle) & (r > r0) & (r < r1)
  width = max(1.0, size / 160)
  edge = np.minimum.reduce([np.abs(np.abs(theta) - half_angle) * r, np.abs(r - r0), np.abs(r - r1)])
  border = (edge < width) & (np.abs(theta) < half_angle + 0.02) & (r > r0 - width) & (r < r1 + width)
  depth = np.clip((r - r0) / (r1 - r0), 0, 1)
  return inside, border, depth, theta, r, (apex_y, apex_x)


def _blob(shape, cy, cx, ry, rx, angle, roughness, rng, spicules: int = 0) -> np.ndarray:
  """(H, W) bool: an ellipse whose radius varies with the angle (random harmonics; spicules)."""
  y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
  dy, dx = y - cy, x - cx
  ca, sa = np.cos(angle), np.sin(angle)
  u, v = (ca * dx + sa * dy) / rx, (ca * dy - sa * dx) / ry
  rho, phi = np.hypot(u, v), np.arctan2(v, u)
  radius = np.ones_like(phi)
  for k in range(2, 7):
    radius += roughness / k * rng.uniform(-1, 1) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
  for _ in range(spicules):  # thin outward spikes: the irregular margin of a malignant mass
    centre = rng.uniform(-np.pi, np.pi)
    gap = np.angle(np.exp(1j * (phi - centre)))
    radius += rng.uniform(0.3, 0.7) * np.exp(-(gap / 0.08) ** 2)
  return rho < radius


def generate_image(seed: int, split: str, index: int, size: int = 224):
  """One sample: uint8 image (size, size, 3), uint8 mask (size, size), float32 labels (1,)."""
  rng = np.random.default_rng([seed, SPLITS[split], index])
  malignant = rng.random() < MALIGNANT_SHARE
  shape = (size, size)
  inside, border, depth, theta, r, (apex_y, apex_x) = _fan(size, rng)

  # Layered tissue: a bright skin line, dark fat, brighter glandular tissue, deeper darker.
  wobble = synthetic.smooth_noise(rng, shape, size / 10) * 0.04
  d = depth + wobble
  skin, fat_end = rng.uniform(0.03, 0.06), rng.uniform(0.2, 0.35)
  echo = np.where(d < skin, 0.95, np.where(d < fat_end, 0.38, 0.62)).astype(np.float32)
  echo += 0.12 * synthetic.smooth_noise(rng, shape, size / 18)  # glandular texture
  echo *= np.exp(-rng.uniform(0.4, 0.9) * depth)  # attenuation the gain does not undo

  lobules = np.zeros(shape, bool)  # hypoechoic fat lobules: dark, smooth, in every kind of image
  for _ in range(int(rng.integers(2, 6))):
    cy, cx = size * rng.uniform(0.15, 0.85), size * rng.uniform(0.2, 0.8)
    ry = size * rng.uniform(0.03, 0.08)
    lobules |= _blob(shape, cy, cx, ry, ry * rng.uniform(1.3, 2.2), rng.uniform(-0.3, 0.3), 0.1,
                     rng)
  echo = np.where(lobules, echo * 0.45, echo)

  shadow = np.zeros(shape, np.float32)
  for _ in range(int(rng.integers(0, 3))):  # reflector + posterior shadow along the beam
    t0, r_start = rng.uniform(-0.4, 0.4), np.quantile(r[inside], rng.uniform(0.2, 0.7))
    half = rng.uniform(0.02, 0.06)
    band = (np.abs(theta - t0) < half) & (r > r_start)
    shadow = np.maximum(shadow, band * rng.uniform(0.5, 0.8))
    echo = np.where(band & (r < r_start + size * 0.015), 1.2, echo)

  mask = np.full(shape, BACKGROUND, np.uint8)
  if malignant:
    ry = size * rng.uniform(0.08, 0.18)
    cy = size * rng.uniform(0.3, 0.7)
    cx = size * rng.uniform(0.3, 0.7)
    lesion = _blob(shape, cy, cx, ry, ry * rng.uniform(0.7, 1.2), rng.uniform(0, np.pi),
                   0.35, rng, spicules=int(rng.integers(2, 7))) & inside
    halo = _blob(shape, cy, cx, ry * 1.3, ry * 1.3, 0.0, 0.1, rng) & ~lesion
    echo = np.where(halo, echo * 1.35, echo)
    echo = np.where(lesion, 0.12 + 0.08 * synthetic.smooth_noise(rng, shape, size / 40), echo)
    r_c, theta_c = np.hypot(cy - apex_y, cx - apex_x), np.arctan2(cx - apex_x, cy - apex_y)
    below = (np.abs(theta - theta_c) < 0.7 * ry / r_c) & (r > r_c + 0.5 * ry)
    shadow = np.maximum(shadow, below * (~lesion) * rng.uniform(0.3, 0.6))
    mask[lesion] = 0
  echo *= 1 - shadow
  image = echo * _speckle(rng, shape, max(0.7, size / 180))
  image = np.where(inside, image, 0.0)
  image = np.where(border, rng.uniform(0.85, 1.0), image)
  for _ in range(int(rng.integers(1, 4))):  # calibration marks / text beside the fan
    side = rng.uniform(0, size / 8) if rng.random() < 0.5 else rng.uniform(size * 7 / 8, size)
    my, mx = int(rng.uniform(0, size * 0.95)), min(int(side), size - 2)
    mark = (slice(my, my + max(2, size // 60)), slice(mx, mx + max(2, size // 60)))
    if not inside[mark].any():
      image[mark] = 1.0
  grey = np.clip(image * 200 + 4 * rng.standard_normal(shape), 0, 255)
  tint = np.array([1.0, 1.0, rng.uniform(0.96, 1.04)], np.float32)  # scanner colour balance
  rgb = np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)
  labels = np.array([float(malignant and (mask == 0).any())], np.float32)
  return rgb, mask, labels


cached_image = synthetic.memoised(generate_image)


class SyntheticLesions(synthetic.SyntheticHistology):
  """Random-access source of ultrasound-like images (a grain RandomAccessDataSource)."""
  cached = staticmethod(cached_image)
  prefix = "synthetic_lesions"
