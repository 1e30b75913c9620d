"""Per-example augmentations for grain's `random_map`: they take and give numpy dicts."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter


def mask_keys(example: dict) -> list:
  """Keys of the per-pixel label maps (`mask`, `mask_<layer>`): cropped and flipped with the image,
  resized by nearest neighbour."""
  return [k for k in example if k.startswith("mask")]


def image_keys(example: dict) -> list:
  """Keys of the images (`image` and MRN's `context`)."""
  return [k for k in ("image", "context") if k in example]


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
    for k in mask_keys(example):
      out[k] = crop_resize(example[k], box, self.size, Image.NEAREST)
    if flip:
      for k in ["image"] + mask_keys(out):
        out[k] = out[k][:, ::-1]
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
    for k in mask_keys(example):
      out[k] = crop_resize(example[k], full, self.size, Image.NEAREST)
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
        for key in image_keys(out) + mask_keys(out):
          out[key] = np.flip(out[key], axis)
    return out


class RandomGaussianBlur:
  """With probability `p`, a Gaussian blur of radius U(0, max_radius) on the image(s) (the
  multi-layer pseudo-supervision stage-2 augmentation: p 0.5, radius U(0, 1))."""
  random = True

  def __init__(self, p: float = 0.5, max_radius: float = 1.0):
    self.p, self.max_radius = p, max_radius

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    if rng.random() >= self.p:
      return example
    radius = float(rng.uniform(0, self.max_radius))
    blur = ImageFilter.GaussianBlur(radius)
    return example | {k: np.asarray(Image.fromarray(np.ascontiguousarray(example[k])).filter(blur))
                      for k in image_keys(example)}


# --- MRN target / context pairs -------------------------------------------------------------------
def window(array: np.ndarray, top: int, left: int, size: int, fill) -> np.ndarray:
  """array[top:top+size, left:left+size], padded with `fill` where it leaves the array."""
  out = np.full((size, size) + array.shape[2:], fill, array.dtype)
  h, w = array.shape[:2]
  t0, l0 = max(top, 0), max(left, 0)
  t1, l1 = min(top + size, h), min(left + size, w)
  if t1 > t0 and l1 > l0:
    out[t0 - top:t1 - top, l0 - left:l1 - left] = array[t0:t1, l0:l1]
  return out


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
  """Area (box) down-sampling by an integer factor: one pyramid level per factor of 2."""
  if factor == 1:
    return image
  h, w = image.shape[:2]
  x = image.reshape(h // factor, factor, w // factor, factor, -1)
  total = x.sum(axis=(1, 3), dtype=np.uint32)  # summed in place: no float copy of the input
  return np.round(total / np.float32(factor * factor)).astype(image.dtype).reshape(
      (h // factor, w // factor) + image.shape[2:])


def cut_pair(example: dict, cy: int, cx: int, size: int, scale: int, fill=255) -> dict:
  """The target patch (size x size, full resolution) centred at (cy, cx) and its context: the
  (size * scale)^2 region around the same centre down-sampled by `scale`; masks for the target
  only. Outside the image, images are filled with `fill` (glass) and masks with 255 (ignored)."""
  half, chalf = size // 2, size * scale // 2
  out = {k: v for k, v in example.items() if k not in image_keys(example) + mask_keys(example)}
  out["image"] = window(example["image"], cy - half, cx - half, size, fill)
  out["context"] = downsample(window(example["image"], cy - chalf, cx - chalf, size * scale, fill),
                              scale)
  for k in mask_keys(example):
    out[k] = window(example[k], cy - half, cx - half, size, 255)
  return out


class RandomPair:
  """grain random_map: a (target, context) pair at a random centre whose target lies inside the
  image."""
  random = True

  def __init__(self, size: int, scale: int):
    self.size, self.scale = size, scale

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    h, w = example["image"].shape[:2]
    half = self.size // 2
    cy = int(rng.integers(half, max(half, h - (self.size - half)) + 1))
    cx = int(rng.integers(half, max(half, w - (self.size - half)) + 1))
    return cut_pair(example, cy, cx, self.size, self.scale)


def window_starts(length: int, size: int, stride: int | None = None) -> list:
  """Starts of windows of `size` covering [0, length) every `stride` (default `size`), the last
  one flush with the end (it overlaps its neighbour when the stride does not fit)."""
  if length <= size:
    return [0]
  starts = list(range(0, length - size + 1, stride or size))
  return starts if starts[-1] == length - size else starts + [length - size]


class ContextWindows(NamedTuple):
  """An image cut into MRN input pairs: windows covering it, each with its context."""
  starts: list              # (y, x) of each window
  targets: np.ndarray       # (N, size, size, 3) windows at full resolution
  contexts: np.ndarray      # (N, size, size, 3) the scale x larger regions, down-sampled


def context_windows(image: np.ndarray, size: int, scale: int) -> ContextWindows:
  """Windows of `size` covering `image` (window_starts), each with its context (cut_pair)."""
  h, w = image.shape[:2]
  starts = [(y, x) for y in window_starts(h, size) for x in window_starts(w, size)]
  pairs = [cut_pair({"image": image}, y + size // 2, x + size // 2, size, scale)
           for y, x in starts]
  return ContextWindows(starts, np.stack([p["image"] for p in pairs]),
                        np.stack([p["context"] for p in pairs]))


def stitch_windows(outputs: np.ndarray, starts: list, shape: tuple) -> np.ndarray:
  """(N, size, size, C) window outputs -> (H, W, C) at `shape`; a later window overwrites the
  overlap (the windows of window_starts overlap only at the end of a row or column)."""
  h, w = shape
  out = np.zeros((h, w, outputs.shape[-1]), np.float32)
  for o, (y, x) in zip(outputs, starts):
    out[y:y + o.shape[0], x:x + o.shape[1]] = o[:h - y, :w - x]
  return out
