"""Figures people read: masks alpha-blended over the image at a legible size, each column
named, the classes in a legend with their colours, the method in the title."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from wsss_jax import atomic

MIN_SIDE = 192     # small tiles are enlarged (nearest) to at least this many pixels
ALPHA = 0.45       # mask opacity over the image
HEADER, GAP = 22, 6


def blend(image: np.ndarray, mask: np.ndarray, palette: list, background_index: int,
          alpha: float = ALPHA) -> np.ndarray:
  """The image with each class's colour blended in at `alpha`; background left as it is."""
  colours = np.asarray(palette, np.float32).reshape(-1, 3)
  index = np.minimum(mask, len(colours) - 1)
  painted = (1 - alpha) * image.astype(np.float32) + alpha * colours[index]
  keep = (mask == background_index)[..., None]
  return np.where(keep, image, painted).clip(0, 255).astype(np.uint8)


def heat(values):
  """[0, 1] -> RGB in [0, 1] (a blue-cyan-yellow-red ramp)."""
  v = np.clip(values, 0, 1)[..., None]
  stops = np.array([[0, 0, .5], [0, .6, 1], [1, 1, 0], [1, 0, 0]], np.float32)
  pos = v * (len(stops) - 1)
  lo = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
  frac = pos - lo
  return stops[lo[..., 0]] * (1 - frac) + stops[lo[..., 0] + 1] * frac


def _enlarge(a: np.ndarray) -> np.ndarray:
  factor = max(1, -(-MIN_SIDE // max(a.shape[:2])))
  return np.repeat(np.repeat(a, factor, 0), factor, 1)


def _font(size: int):
  """Pillow's own scalable font (FreeType); its fixed bitmap font where FreeType is missing."""
  try:
    return ImageFont.load_default(size=size)
  except (ImportError, TypeError, OSError):
    return ImageFont.load_default()


def grid_figure(rows, column_names, title: str, legend=()) -> np.ndarray:
  """rows of equal-size RGB panels -> one RGB figure with a title, column headers and a legend
  (`legend`: (name, rgb) pairs); the text grows with the figure, so that a slide overlay shown
  at page width reads as well as a row of tiles."""
  rows = [[_enlarge(p) for p in row] for row in rows]
  h, w = rows[0][0].shape[:2]
  ncol = max(len(r) for r in rows)
  width = ncol * w + (ncol + 1) * GAP
  scale = max(1.0, width / 800)            # text about 1/60 of the width on large figures
  header, text = int(round(HEADER * scale)), _font(int(round(13 * scale)))
  legend_h = header if legend else 0
  height = header * 2 + legend_h + len(rows) * (h + GAP) + GAP
  canvas = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(canvas)
  draw.text((GAP, header // 5), title, fill="black", font=text)
  x, box = GAP, int(round(14 * scale))
  for name, rgb in legend:
    top = header + (legend_h - box) // 2
    draw.rectangle([x, top, x + box, top + box], fill=tuple(int(c) for c in rgb),
                   outline="black")
    draw.text((x + box + 4 * scale, top), name, fill="black", font=text)
    x += int(box + 12 * scale + draw.textlength(name, font=text))
  top = header + legend_h + header
  for j, name in enumerate(column_names[:ncol]):
    draw.text((GAP + j * (w + GAP), top - int(0.8 * header)), name, fill="black", font=text)
  for i, row in enumerate(rows):
    for j, panel in enumerate(row):
      canvas.paste(Image.fromarray(panel), (GAP + j * (w + GAP), top + i * (h + GAP)))
  return np.asarray(canvas)


def mask_figure(items, palette: list, class_names, title: str) -> np.ndarray:
  """items: (image, truth or None, {layer: mask}) -> rows image | ground truth | each layer,
  masks blended over the image; the legend names the classes (the last one the background)."""
  k = len(palette) // 3 - 1
  colours = np.asarray(palette, np.uint8).reshape(-1, 3)
  has_truth = items[0][1] is not None
  layers = list(items[0][2])
  columns = ["image"] + (["ground truth"] if has_truth else []) + layers
  rows = []
  for image, truth, by_layer in items:
    row = [image] + ([blend(image, truth, palette, k)] if has_truth else [])
    rows.append(row + [blend(image, by_layer[l], palette, k) for l in layers])
  names = list(class_names)[:k]
  legend = [(n, colours[i]) for i, n in enumerate(names)] + [("background: unpainted",
                                                              (255, 255, 255))]
  return grid_figure(rows, columns, title, legend)


def save(path: str, figure: np.ndarray, title: str = "") -> None:
  """A PNG written to a temporary name and renamed (zlib level 3: as small as the default level
  6 on these figures, in half the time); the title also as the PNG's Title text, which viewers
  and scripts read without looking at the pixels."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  info = PngImagePlugin.PngInfo()
  if title:
    info.add_text("Title", title)
  with atomic.replacing(path) as tmp:
    Image.fromarray(figure).save(tmp, format="PNG", compress_level=3, pnginfo=info)
