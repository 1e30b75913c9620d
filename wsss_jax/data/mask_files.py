"""Mask files: palette PNGs of class indices (pseudo masks, ground truth), binary region PNGs,
the palettes of the public releases, and file-safe names. Every write goes to a temporary name
and is renamed, so no reader sees half a file; every read is checked (size, index range) and a
bad file is one error naming it."""
from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from wsss_jax import atomic
from wsss_jax.errors import UserError

# Mask palettes of the public releases, index 4 = background (white). `finding`: up to four
# finding colours; its background (index K, whatever K is) is black.
PALETTES = {
    "luad": ((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255)),
    "bcss": ((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)),
    "finding": ((255, 48, 48), (255, 214, 0), (0, 200, 255), (200, 80, 255), (0, 0, 0)),
}


def file_stem(name: str) -> str:
  """An example name ('synthetic/train/17', 'img-[1 0 0 1]') -> a safe file stem."""
  return re.sub(r"[^A-Za-z0-9._\[\]+-]+", "_", name).strip("_")


# A pseudo-mask pixel in the uncertain band: every loss and score skips it (the VOC convention)
IGNORE = 255
SELF_LAYER = "self"  # the mask layer of a segmenter's self labels, which the next round learns from
IGNORE_COLOUR = (160, 160, 160)


def palette_bytes(palette: str, num_colours: int) -> list:
  if palette not in PALETTES:
    raise UserError(f"palette={palette!r} is not one of {sorted(PALETTES)}")
  colours = list(PALETTES[palette])[:num_colours]
  if palette == "finding":  # the background (last index) is black whatever K is
    colours = colours[:-1] + [PALETTES[palette][-1]]
  return [c for rgb in colours for c in rgb]


def write_mask(path: str, mask: np.ndarray, palette: list) -> None:
  """An indexed PNG, written to a temporary name and renamed (never half-written)."""
  image = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
  image.putpalette(list(palette) + [0] * (3 * IGNORE - len(palette)) + list(IGNORE_COLOUR))
  with atomic.replacing(path) as tmp:
    image.save(tmp, format="PNG")


def write_masks(directory: str, names, masks, palette: list) -> None:
  """One mask PNG per example name in `directory` (names made file stems, as readers expect)."""
  os.makedirs(directory, exist_ok=True)
  for name, mask in zip(names, masks):
    write_mask(os.path.join(directory, file_stem(name) + ".png"), mask, palette)


def read_mask(path: str, size: tuple[int, int], max_index: int) -> np.ndarray:
  """(H, W) uint8 palette indices of a mask PNG, checked: readable, `size`, indices <= max_index
  or IGNORE (the uncertain band of a pseudo mask)."""
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
  labelled = mask[mask != IGNORE]
  top = int(labelled.max()) if labelled.size else 0
  if top > max_index:
    raise UserError(f"mask {path} has palette index {top}, outside the class range 0..{max_index}")
  return mask


def write_binary(path: str, region: np.ndarray) -> None:
  """A greyscale PNG, 255 inside `region` (bool), written then renamed."""
  with atomic.replacing(path) as tmp:
    Image.fromarray(np.asarray(region, np.uint8) * 255, mode="L").save(tmp, format="PNG")


def read_binary(path: str, size: tuple[int, int]) -> np.ndarray:
  """(H, W) bool of a region PNG written by `write_binary`, checked as `read_mask` checks."""
  return read_mask(path, size, 255) > 0
