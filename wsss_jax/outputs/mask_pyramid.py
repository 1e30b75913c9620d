"""A slide's class-index mask written while it is predicted, in bounded memory.

Rows of the level-0 mask arrive in order (`add_rows`). Each row goes to a raw file (so a killed
run can replay what it had), and into one band buffer per pyramid level (level f keeps every
f-th row and column: nearest down-sampling); a band full of rows is cut into tiles that are
zlib-encoded at once and appended to a spill file. `close()` then only copies the encoded tiles
into a tiled pyramidal TIFF (level 0, then each half-size level as a SubIFD, the palette as
colour map), so the work left after the last row is I/O of the compressed mask. Host memory is
one band per level and a small view of the mask (at most `view_side` px a side, for the
GeoJSON and the overlay), whatever the slide's size: nothing is mapped to memory, as mapped
pages would count in the process's resident memory.
"""
from __future__ import annotations

import math
import os
import zlib

import numpy as np
import tifffile

from wsss_jax import atomic


def pyramid_factors(height: int, width: int, tile: int) -> list[int]:
  """Level 0 and each further level half the size, down to about one tile."""
  factors = [1]
  while max(height // (factors[-1] * 2), width // (factors[-1] * 2)) >= tile:
    factors.append(factors[-1] * 2)
  return factors


def palette_colourmap(palette: list) -> np.ndarray:
  """TIFF colour map (3, 256) uint16 from a flat [r, g, b, ...] byte palette."""
  colourmap = np.zeros((3, 256), np.uint16)
  rgb = np.asarray(palette, np.uint16).reshape(-1, 3)
  colourmap[:, :len(rgb)] = rgb.T * 257
  return colourmap


class _Level:
  """One pyramid level's band of rows waiting to be cut into tiles, and its encoded tiles."""

  def __init__(self, factor: int, height: int, width: int, tile: int):
    self.factor, self.tile = factor, tile
    self.shape = (math.ceil(height / factor), math.ceil(width / factor))
    self.band = np.zeros((tile, self.shape[1]), np.uint8)
    self.filled = 0        # rows in the band
    self.rows = 0          # rows of this level already in encoded tiles
    self.tiles: list[tuple[int, int]] = []   # (offset, length) in the spill file, row-major


RAW_FILE = "mask.level0.u8"  # the rows so far, in the output directory until the TIFF is made


class MaskPyramid:

  def __init__(self, directory: str, height: int, width: int, tile: int, palette: list,
               view_side: int = 2048, resume_rows: int = 0):
    """`resume_rows`: rows an earlier run left in the raw file, replayed (they are final);
    with 0 the raw file starts empty."""
    self.height, self.width, self.tile = height, width, tile
    self.palette = palette
    self.raw_path = os.path.join(directory, RAW_FILE)
    self.spill_path = os.path.join(directory, "mask.tiles.tmp")
    self.levels = [_Level(f, height, width, tile) for f in pyramid_factors(height, width, tile)]
    self.view_step = max(1, math.ceil(max(height, width) / view_side))
    self.view = np.zeros((math.ceil(height / self.view_step), math.ceil(width / self.view_step)),
                         np.uint8)
    self.rows = 0
    self._raw = open(self.raw_path, "r+b" if resume_rows else "w+b")
    self._spill = open(self.spill_path, "w+b")  # encoded tiles are redone on every run
    self._replay(resume_rows)

  def _replay(self, rows: int, band: int = 1024) -> None:
    for r0 in range(0, rows, band):
      n = min(band, rows - r0)
      data = os.pread(self._raw.fileno(), n * self.width, r0 * self.width)
      if len(data) != n * self.width:
        raise OSError(f"{self.raw_path} holds fewer rows than its progress record says")
      self._add(r0, np.frombuffer(data, np.uint8).reshape(n, self.width), write_raw=False)

  def add_rows(self, r0: int, rows: np.ndarray) -> None:
    """Rows r0 .. r0 + len(rows) of level 0; rows must arrive in order."""
    self._add(r0, np.asarray(rows, np.uint8), write_raw=True)

  def _add(self, r0: int, rows: np.ndarray, write_raw: bool) -> None:
    if r0 != self.rows:
      raise ValueError(f"rows must arrive in order: got {r0}, expected {self.rows}")
    if write_raw:
      os.pwrite(self._raw.fileno(), np.ascontiguousarray(rows).tobytes(), r0 * self.width)
    for level in self.levels:
      f = level.factor
      taken = rows[(-r0) % f::f, ::f]  # the rows r with r % f == 0, every f-th column
      while len(taken):
        n = min(level.tile - level.filled, len(taken))
        level.band[level.filled:level.filled + n] = taken[:n]
        level.filled += n
        taken = taken[n:]
        if level.filled == level.tile:
          self._encode_band(level)
    s = self.view_step
    picked = rows[(-r0) % s::s, ::s]
    first = math.ceil(r0 / s)
    self.view[first:first + len(picked)] = picked
    self.rows = r0 + len(rows)

  def _encode_band(self, level: _Level) -> None:
    """The band's tiles (zero-padded at the right edge and below the last row) to the spill."""
    t = level.tile
    level.band[level.filled:] = 0
    for x in range(0, level.shape[1], t):
      block = np.zeros((t, t), np.uint8)
      part = level.band[:, x:x + t]
      block[:, :part.shape[1]] = part
      data = zlib.compress(block.tobytes(), 6)
      level.tiles.append((self._spill.tell(), len(data)))
      self._spill.write(data)
    level.rows += level.filled
    level.filled = 0

  def _encoded(self, level: _Level):
    self._spill.flush()
    fd = self._spill.fileno()
    for offset, length in level.tiles:
      yield os.pread(fd, length, offset)

  def close(self, path: str) -> None:
    """Writes the TIFF to `path` (through a temporary name) once every row has arrived."""
    if self.rows != self.height:
      raise ValueError(f"{self.rows} of {self.height} rows arrived")
    for level in self.levels:
      if level.filled:
        self._encode_band(level)
    options = dict(tile=(self.tile, self.tile), dtype=np.uint8, photometric="palette",
                   colormap=palette_colourmap(self.palette), compression="zlib")
    with atomic.replacing(path) as tmp, \
         tifffile.TiffWriter(tmp, bigtiff=self.height * self.width > 2**31) as tif:
      base, *smaller = self.levels
      tif.write(self._encoded(base), shape=base.shape, subifds=len(smaller), **options)
      for level in smaller:
        tif.write(self._encoded(level), shape=level.shape, subfiletype=1, **options)
    self.discard()

  def discard(self) -> None:
    """Closes the files and removes the raw and spill files (after the TIFF is in place)."""
    self.release()
    for p in (self.raw_path, self.spill_path):
      if os.path.exists(p):
        os.remove(p)

  def release(self) -> None:
    """Closes the files and keeps them: a later run resumes from the raw file."""
    for f in (self._raw, self._spill):
      if not f.closed:
        f.close()
