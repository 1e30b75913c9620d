"""Pseudo masks from relevance maps, and the indexed (palette) PNG files that carry masks.

The multi-layer pseudo-supervision rule (Han et al. 2022): the maps of one layer, jointly min-max
normalised over classes, are resized to the tile, the classes absent from the tile's label vector
are left out, and the background channel is appended with a value above any map value wherever the
background rule says so; the mask is the argmax. Background rules:
  white (LUAD-HistoSeg): grey = 0.299 R + 0.587 G + 0.114 B > 200, then connected white regions
    smaller than 50 px (4-connectivity) removed, as the authors' OpenCV + scikit-image code;
  none (BCSS-WSSS): no background channel (white there is fat, a tissue).
Departures from the authors' code, on purpose: an absent class never wins the argmax (theirs lets a
zeroed absent class win ties at 0), and a tile whose label vector is empty is all background
(ignored by the segmentation loss) instead of class 0.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from wsss_jax.errors import UserError

BACKGROUND_RULES = ("white", "none")
# Mask palettes of the public releases, index 4 = background (white).
PALETTES = {
    "luad": ((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255)),
    "bcss": ((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)),
}
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


# --- Background --------------------------------------------------------------------------------------
def grey(image_u8: np.ndarray) -> np.ndarray:
  """OpenCV's RGB2GRAY: round(0.299 R + 0.587 G + 0.114 B) as uint8."""
  rgb = image_u8.astype(np.float32)
  return np.round(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.uint8)


def remove_small_objects(binary: np.ndarray, min_size: int) -> np.ndarray:
  """True regions (4-connected) of fewer than `min_size` pixels set to False."""
  labels, n = ndimage.label(binary, structure=_FOUR_CONNECTED)
  if n == 0:
    return binary.astype(bool)
  sizes = np.bincount(labels.ravel())
  keep = sizes >= min_size
  keep[0] = False  # label 0 is the False region
  return keep[labels]


def background_mask(image_u8: np.ndarray, rule: str = "white", threshold: int = 200,
                    min_size: int = 50) -> np.ndarray:
  """(H, W) bool: the pixels the background rule assigns to background."""
  if rule == "none":
    return np.zeros(image_u8.shape[:2], bool)
  return remove_small_objects(grey(image_u8) > threshold, min_size)


class BackgroundMask:
  """grain map transform: adds `background` (H, W) bool computed from `image` at tile size."""
  random = False

  def __init__(self, rule: str, threshold: int, min_size: int):
    check_rule(rule)
    self.rule, self.threshold, self.min_size = rule, threshold, min_size

  def __call__(self, example: dict) -> dict:
    return example | {"background": background_mask(example["image"], self.rule, self.threshold,
                                                     self.min_size)}


def check_rule(rule: str) -> None:
  if rule not in BACKGROUND_RULES:
    raise UserError(f"background.rule={rule!r} is not one of {BACKGROUND_RULES}")


# --- Masks from maps (on device) ------------------------------------------------------------------
def pseudo_mask(maps, labels, background, size, background_index: int):
  """(B, K, h, w) maps (or a list of them, e.g. one per input scale) -> (B, H, W) uint8 mask at
  `size` = (H, W).

  maps are resized bilinearly (and averaged over the list); classes with label 0 cannot win;
  `background` (B, H, W) bool pixels and tiles without any positive label take
  `background_index`."""
  maps_list = list(maps) if isinstance(maps, (list, tuple)) else [maps]
  b, k = maps_list[0].shape[:2]
  maps = sum(jax.image.resize(m.astype(jnp.float32), (b, k) + tuple(size), "bilinear")
             for m in maps_list) / len(maps_list)
  present = labels > 0
  cls = jnp.argmax(jnp.where(present[:, :, None, None], maps, -jnp.inf), axis=1)
  empty = ~present.any(axis=1)
  return jnp.where(background | empty[:, None, None], background_index, cls).astype(jnp.uint8)


# --- Palette PNG files --------------------------------------------------------------------------------
def file_stem(name: str) -> str:
  """An example name ('synthetic/train/17', 'img-[1 0 0 1]') -> a safe file stem."""
  return re.sub(r"[^A-Za-z0-9._\[\]+-]+", "_", name).strip("_")


def palette_bytes(palette: str, num_colours: int) -> list:
  if palette not in PALETTES:
    raise UserError(f"palette={palette!r} is not one of {sorted(PALETTES)}")
  colours = list(PALETTES[palette])[:num_colours]
  return [c for rgb in colours for c in rgb]


def write_mask(path: str, mask: np.ndarray, palette: list) -> None:
  """An indexed PNG, written to a temporary name and renamed (never half-written)."""
  image = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
  image.putpalette(palette)
  tmp = path + ".tmp"
  image.save(tmp, format="PNG")
  os.replace(tmp, path)


def read_mask(path: str, size: tuple[int, int], max_index: int) -> np.ndarray:
  """(H, W) uint8 palette indices of a mask PNG, checked: readable, `size`, indices <= max_index."""
  try:
    with Image.open(path) as image:
      if image.mode not in ("P", "L"):
        raise UserError(f"mask {path} is a {image.mode} image; a mask is an indexed (palette) or "
                        f"greyscale PNG of class indices")
      mask = np.asarray(image)
  except FileNotFoundError:
    raise UserError(f"mask {path} is missing") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise UserError(f"mask {path} cannot be read ({e}); it is truncated or not a PNG") from None
  if mask.shape != tuple(size):
    raise UserError(f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but its image is "
                    f"{size[0]}x{size[1]}")
  top = int(mask.max()) if mask.size else 0
  if top > max_index:
    raise UserError(f"mask {path} has palette index {top}, outside the class range 0..{max_index}")
  return mask


def write_binary(path: str, region: np.ndarray) -> None:
  """A greyscale PNG, 255 inside `region` (bool), written then renamed."""
  tmp = path + ".tmp"
  Image.fromarray(np.asarray(region, np.uint8) * 255, mode="L").save(tmp, format="PNG")
  os.replace(tmp, path)


def read_binary(path: str, size: tuple[int, int]) -> np.ndarray:
  """(H, W) bool of a region PNG written by `write_binary`, checked as `read_mask` checks."""
  return read_mask(path, size, 255) > 0
