"""Whole-slide and large-image tiling: tiles (and MRN target/context pairs) cut from large TIFF or
PNG images, background skipped by a tissue mask.

A `Slide` reads a region at any down-sampling from the best pyramid level: the level with the
largest down-sample not above the one asked for (as OpenSlide's `get_best_level_for_downsample`),
read tile by tile from a tiled TIFF (only the TIFF tiles the region touches are decoded), then
box-averaged to the asked size. Pyramidal TIFFs (levels as SubIFDs or as reduced-resolution pages,
SVS included) come through tifffile; PNG/JPEG/plain images are decoded once and kept; any other
format goes to OpenSlide when the optional `openslide-python` is installed. Outside the image,
regions are white (glass).

The tissue mask comes from a thumbnail (at most `thumbnail_side` px): the saturation, median
filtered (7 px), above its Otsu threshold (and at least `min_saturation`), grey below 230, holes
filled, objects smaller than 1/1000 of the thumbnail removed; a tile is kept when tissue covers
at least `min_tissue` of it.
"""
from __future__ import annotations

import math
import os
import threading

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from wsss_jax.data import intensity
from wsss_jax.data.transforms import downsample as box_downsample
from wsss_jax.errors import UserError
from wsss_jax.pseudo import mask_rules

SLIDE_EXTENSIONS = (".tif", ".tiff", ".svs", ".ndpi", ".png", ".jpg", ".jpeg", ".mrxs", ".scn")
_TIFF = (".tif", ".tiff", ".svs")


class Slide:
  """A large image with its pyramid levels; `read_region` in level-0 coordinates."""

  def __init__(self, path: str, rule: intensity.IntensityRule = intensity.IntensityRule()):
    """rule: how the slide's values become 8-bit RGB (an 8-bit RGB slide is read as it is); a
    per-image rule reads its window once, from the smallest level, for every region."""
    self.path, self.name = path, os.path.splitext(os.path.basename(path))[0]
    self._lock, self._tiff, self._openslide, self._pixels = threading.Lock(), None, None, None
    self.rule, self._window = rule, None
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
      raise UserError(f"slide {path} is missing")
    try:
      if ext in _TIFF:
        self._open_tiff()
      elif ext in (".png", ".jpg", ".jpeg"):
        Image.MAX_IMAGE_PIXELS = None  # large images are the point here
        self._pixels = intensity.read_rgb8(path, rule)
        self.levels = [self._pixels.shape[:2]]
      else:
        self._open_openslide()
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001  (decoders raise many types for a bad file)
      raise UserError(f"slide {path} cannot be read ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    self.downsamples = [self.levels[0][0] / h for h, _ in self.levels]

  def _open_tiff(self) -> None:
    self._tiff = tifffile.TiffFile(self.path)
    series = self._tiff.series[0]
    self._pages = [level.keyframe for level in series.levels]
    self.levels = [intensity.plane_shape(page.shape, self.path) for page in self._pages]
    self._cache = {}
    if self._pages[0].dtype != np.uint8 or self.rule.kind not in ("auto", "full_range"):
      smallest = intensity.Raw(intensity.channels_last(self._pages[-1].asarray(), self.path))
      self._window = intensity.window_of(smallest, self.rule)

  def _rgb(self, array: np.ndarray) -> np.ndarray:
    """A decoded region or tile as (h, w, 3) uint8 by the slide's rule and window."""
    return intensity.to_rgb8(intensity.Raw(intensity.channels_last(array, self.path)),
                             self.rule, self._window)

  def _open_openslide(self) -> None:
    try:  # optional (the openslide extra): only formats tifffile does not read need it
      import openslide
    except ImportError:
      raise UserError(f"slide {self.path}: this format needs the optional openslide-python "
                      f"package") from None
    self._openslide = openslide.OpenSlide(self.path)
    self.levels = [(h, w) for w, h in self._openslide.level_dimensions]

  @property
  def shape(self) -> tuple[int, int]:
    return self.levels[0]

  def best_level(self, downsample: float) -> int:
    """The level with the largest down-sample not above `downsample` (within rounding)."""
    candidates = [i for i, d in enumerate(self.downsamples) if d <= downsample * 1.001]
    return max(candidates, key=lambda i: self.downsamples[i]) if candidates else 0

  # --- Reading one level ----------------------------------------------------------------------------
  def read_level(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 of one level, white where the region leaves the image."""
    out = np.full((height, width, 3), 255, np.uint8)
    h, w = self.levels[level]
    t0, l0, t1, l1 = max(top, 0), max(left, 0), min(top + height, h), min(left + width, w)
    if t1 <= t0 or l1 <= l0:
      return out
    if self._pixels is not None:
      out[t0 - top:t1 - top, l0 - left:l1 - left] = self._pixels[t0:t1, l0:l1]
    elif self._openslide is not None:
      d = self.downsamples[level]
      region = self._openslide.read_region((int(l0 * d), int(t0 * d)), level, (l1 - l0, t1 - t0))
      out[t0 - top:t1 - top, l0 - left:l1 - left] = np.asarray(region.convert("RGB"))
    else:
      out[t0 - top:t1 - top, l0 - left:l1 - left] = self._tiff_region(level, t0, l0, t1, l1)
    return out

  def _tiff_region(self, level: int, t0: int, l0: int, t1: int, l1: int) -> np.ndarray:
    page = self._pages[level]
    if not page.is_tiled:  # strips: the whole level, decoded once
      if level not in self._cache:
        with self._lock:
          self._cache[level] = self._rgb(page.asarray())
      return self._cache[level][t0:t1, l0:l1]
    th, tw = page.tilelength, page.tilewidth
    across = math.ceil(page.imagewidth / tw)
    region = np.empty((t1 - t0, l1 - l0, 3), np.uint8)
    for ty in range(t0 // th, (t1 - 1) // th + 1):
      for tx in range(l0 // tw, (l1 - 1) // tw + 1):
        index = ty * across + tx
        with self._lock:  # one file handle: seek + read must not interleave
          self._tiff.filehandle.seek(page.dataoffsets[index])
          data = self._tiff.filehandle.read(page.databytecounts[index])
        try:
          tile = self._rgb(page.decode(data, index, jpegtables=page.jpegtables)[0][0])
        except (ValueError, RuntimeError, OSError) as e:  # a codec missing or a broken tile
          raise UserError(f"slide {self.path}: tile {index} of level {level} cannot be decoded "
                          f"({str(e).splitlines()[0][:160]}); JPEG/JPEG 2000 slides need "
                          f"pip install -e '.[slides]'") from None
        y0, x0 = ty * th, tx * tw
        ya, yb = max(t0, y0), min(t1, y0 + th)
        xa, xb = max(l0, x0), min(l1, x0 + tw)
        region[ya - t0:yb - t0, xa - l0:xb - l0] = tile[ya - y0:yb - y0, xa - x0:xb - x0]
    return region

  # --- Regions at any down-sampling -----------------------------------------------------------------
  def read_region(self, top: int, left: int, size: int, downsample: float) -> np.ndarray:
    """(size, size, 3): the level-0 square at (top, left) of side size * downsample, shown at
    `downsample`."""
    level = self.best_level(downsample)
    factor = downsample / self.downsamples[level]
    d = self.downsamples[level]
    side = int(round(size * factor))
    pixels = self.read_level(level, int(round(top / d)), int(round(left / d)), side, side)
    if side == size:
      return pixels
    if abs(factor - round(factor)) < 1e-6:
      return box_downsample(pixels, int(round(factor)))
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BOX))

  def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
    """(image, its down-sample): the whole slide with its longer side at most `max_side`."""
    h, w = self.shape
    d = max(1.0, max(h, w) / max_side)
    level = self.best_level(d)
    lh, lw = self.levels[level]
    size = (max(1, int(round(w / d))), max(1, int(round(h / d))))
    # a level much larger than the thumbnail (a slide without small levels) is read in bands,
    # each box-down-sampled by a whole factor at once, so the level is never whole in memory
    f = max(1, int(d / self.downsamples[level]))
    if f == 1:
      pixels = self.read_level(level, 0, 0, lh, lw)
    else:
      band = f * max(1, 256 // f)
      pixels = np.concatenate([box_downsample(self.read_level(level, y, 0, band, lw // f * f), f)
                               [:math.ceil(min(band, lh - y) / f)] for y in range(0, lh, band)])
    if (lw, lh) != size:
      pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.BOX))
    return pixels, h / size[1]

  def close(self) -> None:
    if self._tiff is not None:
      self._tiff.close()
    if self._openslide is not None:
      self._openslide.close()


# --- Tissue ------------------------------------------------------------------------------------------
def otsu_threshold(values: np.ndarray) -> int:
  """Otsu's threshold of uint8 values: the t maximising the between-class variance of
  {v <= t} and {v > t}."""
  hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
  p = hist / max(hist.sum(), 1)
  omega = np.cumsum(p)
  mu = np.cumsum(p * np.arange(256))
  between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
  return int(np.argmax(between))


def saturation(image: np.ndarray) -> np.ndarray:
  """HSV saturation (max - min) / max as uint8 0..255."""
  rgb = image.astype(np.int32)
  high, low = rgb.max(-1), rgb.min(-1)
  return np.where(high > 0, (high - low) * 255 // np.maximum(high, 1), 0).astype(np.uint8)


def tissue_mask(thumbnail: np.ndarray, min_saturation: float = 0.05) -> np.ndarray:
  """(h, w) bool tissue of a thumbnail (see the module docstring)."""
  sat = ndimage.median_filter(saturation(thumbnail), size=7)  # nuclei-scale texture smoothed
  threshold = max(otsu_threshold(sat), int(min_saturation * 255))
  tissue = ndimage.binary_fill_holes((sat > threshold) & (mask_rules.grey(thumbnail) < 230))
  return mask_rules.remove_small_objects(tissue, max(1, tissue.size // 1000))


def tissue_shares(slide: Slide, origins, side: float, thumbnail_side: int = 2048) -> np.ndarray:
  """Per level-0 (top, left) in `origins`: the tissue share of the square of side `side` there,
  from the thumbnail's tissue mask (an integral image: one lookup per square)."""
  thumb, t = slide.thumbnail(thumbnail_side)
  tissue = tissue_mask(thumb)
  integral = np.pad(tissue.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  shares = []
  for top, left in origins:
    y0, x0 = int(top / t), int(left / t)
    y1 = min(max(y0 + 1, int(round((top + side) / t))), tissue.shape[0])
    x1 = min(max(x0 + 1, int(round((left + side) / t))), tissue.shape[1])
    y0, x0 = min(y0, y1 - 1), min(x0, x1 - 1)  # a square reaching past the slide's edge
    area = max((y1 - y0) * (x1 - x0), 1)
    shares.append((integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])
                  / area)
  return np.asarray(shares, np.float64)


def tile_origins(slide: Slide, tile: int, downsample: float, stride: int | None = None,
                 min_tissue: float = 0.5, thumbnail_side: int = 2048) -> list[tuple[int, int]]:
  """Level-0 (top, left) of the tiles (side `tile` at `downsample`) whose tissue share in the
  thumbnail's mask is at least `min_tissue`; `stride` in tile pixels (default: the tile)."""
  step = (stride or tile) * downsample
  side = tile * downsample
  h, w = slide.shape
  origins = [(top, left) for top in np.arange(0, max(h - side, 0) + 1, step)
             for left in np.arange(0, max(w - side, 0) + 1, step)]
  shares = (tissue_shares(slide, origins, side, thumbnail_side) if min_tissue > 0
            else np.ones(len(origins)))
  return [(int(top), int(left)) for (top, left), share in zip(origins, shares)
          if share >= min_tissue]


class SlideTiles:
  """Random-access source (grain) of the tissue tiles of a set of slides: `image` (tile px at
  `downsample`), `name` (<slide>_y<top>_x<left>), and with `context_scale` > 1 the MRN `context`:
  the same pixel size at downsample * context_scale, centred on the tile."""

  def __init__(self, paths, tile: int, downsample: float = 1.0, stride: int | None = None,
               min_tissue: float = 0.5, context_scale: int = 0,
               rule: intensity.IntensityRule = intensity.IntensityRule()):
    if not paths:
      raise UserError("no slides to tile")
    self.slides = [Slide(p, rule) for p in paths]
    self.tile, self.downsample, self.context_scale = tile, downsample, context_scale
    self.index = [(i, top, left) for i, s in enumerate(self.slides)
                  for top, left in tile_origins(s, tile, downsample, stride, min_tissue)]
    if not self.index:
      raise UserError(f"no tile of {len(self.slides)} slide(s) has tissue share >= {min_tissue} "
                      f"(e.g. {paths[0]}); lower data.min_tissue")

  def __len__(self) -> int:
    return len(self.index)

  def name(self, index: int) -> str:
    i, top, left = self.index[int(index)]
    return f"{self.slides[i].name}_y{top}_x{left}"

  def __getitem__(self, index: int) -> dict:
    i, top, left = self.index[int(index)]
    slide = self.slides[i]
    example = {"image": slide.read_region(top, left, self.tile, self.downsample),
               "name": self.name(index)}
    if self.context_scale and self.context_scale > 1:
      d = self.downsample * self.context_scale
      shift = self.tile * (d - self.downsample) / 2  # same centre, a side context_scale x longer
      example["context"] = slide.read_region(int(round(top - shift)), int(round(left - shift)),
                                             self.tile, d)
    return example

  def __repr__(self) -> str:
    return f"SlideTiles({len(self.slides)} slides, {len(self)} tiles of {self.tile} px)"


def slide_paths(root: str, split: str) -> list[str]:
  """The slides of a split: `root/<split>/` when it exists (train/, val/, test/), else every
  slide in `root` (or `root` itself when it is one file)."""
  if os.path.isfile(root):
    return [root]
  if not os.path.isdir(root):
    raise UserError(f"data.root={root!r} is neither a slide nor a folder of slides")
  folder = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
  paths = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                 if n.lower().endswith(SLIDE_EXTENSIONS) and not n.startswith("."))
  if not paths:
    raise UserError(f"{folder} holds no slides ({', '.join(SLIDE_EXTENSIONS)})")
  return paths


def slide_source(data_cfg, split: str) -> SlideTiles:
  return SlideTiles(slide_paths(data_cfg.root, split), data_cfg.slide_tile,
                    data_cfg.slide_downsample, data_cfg.get("slide_stride") or None,
                    data_cfg.min_tissue, data_cfg.get("slide_context_scale", 0),
                    intensity.parse_rule(data_cfg.get("intensity", "auto")))
