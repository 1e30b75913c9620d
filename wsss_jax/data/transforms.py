"""Per-example augmentations for grain's `random_map`: they take and give numpy dicts."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """(top, left, h, w) of a crop covering `scale` of the area with aspect ratio in `ratio`.

  Same sampling as torchvision's RandomResizedCrop (log-uniform ratio, 10 attempts, then the
  central crop clamped to the ratio range).
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(image: np.ndarray, box, size: int, resample=Image.BILINEAR) -> np.ndarray:
  top, left, h, w = box
  pil = Image.fromarray(image)
  return np.asarray(pil.resize((size, size), resample, box=(left, top, left + w, top + h)))


class RandomResizedCropFlip:
  """Random-resized crop to `size` and horizontal flip with probability 1/2 (MAE's augmentation).

  A mask, when present, is cropped with the same box (nearest neighbour) and flipped alike.
  """
  random = True  # a grain random_map transform (takes an rng)

  def __init__(self, size: int, scale=(0.2, 1.0), hflip: bool = True):
    self.size, self.scale, self.hflip = size, tuple(scale), hflip

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    image = example["image"]
    box = random_resized_crop_box(rng, image.shape[0], image.shape[1], self.scale)
    flip = self.hflip and rng.random() < 0.5
    out = dict(example)
    out["image"] = crop_resize(image, box, self.size)
    if "mask" in example:
      out["mask"] = crop_resize(example["mask"], box, self.size, Image.NEAREST)
    if flip:
      out["image"] = out["image"][:, ::-1]
      if "mask" in out:
        out["mask"] = out["mask"][:, ::-1]
    return out


class Resize:
  """Deterministic resize of the whole tile to `size` (evaluation, or training without crops)."""
  random = False

  def __init__(self, size: int):
    self.size = size

  def __call__(self, example: dict) -> dict:
    if example["image"].shape[:2] == (self.size, self.size):
      return example
    out = dict(example)
    full = (0, 0) + example["image"].shape[:2]
    out["image"] = crop_resize(example["image"], full, self.size)
    if "mask" in example:
      out["mask"] = crop_resize(example["mask"], full, self.size, Image.NEAREST)
    return out


class RandomFlip:
  """Horizontal and/or vertical flips, each with probability 1/2 (image and mask alike)."""
  random = True

  def __init__(self, hflip: bool = True, vflip: bool = False):
    self.hflip, self.vflip = hflip, vflip

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    out = dict(example)
    for axis, enabled in ((1, self.hflip), (0, self.vflip)):
      if enabled and rng.random() < 0.5:
        for key in ("image", "mask"):
          if key in out:
            out[key] = np.flip(out[key], axis)
    return out
