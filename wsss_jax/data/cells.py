"""Embedded fluorescence-like finding set: many small bright cells on a dark, uneven background.

The third embedded set, where an intensity threshold is strong (issue: weak masks must beat Otsu
on the image where Otsu is good). One finding class (`cell`) on an unlabelled background; images
with cells and normal images without any. What each image shows:
  a dark background under uneven illumination (a smooth vignette and a slow gradient) with
    low-frequency autofluorescent haze, in every image;
  in images with cells, 6 to 40 nuclei-like ellipses of radius 2-6% of the side, each of its own
    brightness (some dim, close to the brightest background), with a textured interior, some
    touching;
  blur by the optics and shot-like noise, in every image.
So most cells are brighter than anything around them (Otsu on the image does well), but dim
cells in a bright corner and bright haze in a dark one are where a global threshold errs.
Labels: (1,) float32, 1 where the image shows a cell. Masks: uint8, 0 = cell, 1 = background.
An image is a pure function of (seed, split, index), like the other generators.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from wsss_jax.data import synthetic

CLASS_NAMES = ("cell",)
BACKGROUND = 1
SPLITS = {"train": 20, "val": 21, "test": 22}  # streams of their own
POSITIVE_SHARE = 0.5


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
  """(H, W) in about [0.5, 1.1]: a vignette around an off-centre point and a slow gradient."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
  cy, cx = rng.uniform(0.3, 0.7, 2)
  vignette = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * rng.uniform(0.35, 0.6) ** 2))
  angle = rng.uniform(0, 2 * np.pi)
  gradient = (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) * rng.uniform(0.2, 0.5)
  return 0.55 + 0.45 * vignette + gradient


def _cells(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(mask, intensity): the cells' union and their own brightness and texture."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  mask = np.zeros((size, size), bool)
  intensity = np.zeros((size, size), np.float32)
  texture = 0.15 * synthetic.smooth_noise(rng, (size, size), max(1.0, size / 110))
  for _ in range(int(rng.integers(6, 41))):
    r = size * rng.uniform(0.02, 0.06)
    cy, cx = rng.uniform(r, size - r, 2)
    ry, rx = r, r * rng.uniform(0.7, 1.3)
    a = rng.uniform(0, np.pi)
    u = (np.cos(a) * (x - cx) + np.sin(a) * (y - cy)) / rx
    v = (np.cos(a) * (y - cy) - np.sin(a) * (x - cx)) / ry
    cell = u**2 + v**2 <= 1.0
    brightness = rng.uniform(0.3, 1.0)
    intensity = np.where(cell, np.maximum(intensity, brightness * (1.0 + texture)), intensity)
    mask |= cell
  return mask, intensity


def generate_image(seed: int, split: str, index: int, size: int = 224):
  """One sample: uint8 image (size, size, 3), uint8 mask (size, size), float32 labels (1,)."""
  rng = np.random.default_rng([seed, SPLITS[split], index])
  positive = rng.random() < POSITIVE_SHARE
  light = _illumination(rng, size)
  haze = np.clip(0.5 + 0.5 * synthetic.smooth_noise(rng, (size, size), size / 12), 0, None)
  signal = 0.06 + rng.uniform(0.08, 0.2) * haze  # autofluorescence: everywhere, uneven
  mask = np.full((size, size), BACKGROUND, np.uint8)
  if positive:
    cells, intensity = _cells(rng, size)
    signal = np.where(cells, signal + intensity, signal)
    mask[cells] = 0
  signal = ndimage.gaussian_filter(signal * light, sigma=max(0.6, size / 220))  # the optics
  counts = rng.poisson(np.clip(signal, 0, None) * 120.0) / 120.0  # shot noise
  grey = np.clip((counts + 0.01 * rng.standard_normal(counts.shape)) * 200, 0, 255)
  rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.uint8)  # one stain, shown in grey
  labels = np.array([float((mask == 0).any())], np.float32)
  return rgb, mask, labels


cached_image = synthetic.memoised(generate_image)


class SyntheticCells(synthetic.SyntheticHistology):
  """Random-access source of fluorescence-like images (a grain RandomAccessDataSource)."""
  cached = staticmethod(cached_image)
  prefix = "synthetic_cells"
