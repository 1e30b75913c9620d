"""Embedded default dataset: procedural H&E-like histology tiles with exact ground truth.

Every tile is a mosaic of up to three tissue classes (LUAD-HistoSeg's TE, NEC, LYM, TAS) and
sometimes white background, laid out by a smooth random field. Each class has its own colour,
texture and morphology:
  TE  tumour epithelium: purple-pink cytoplasm, large pleomorphic nuclei in dense sheets;
  NEC necrosis: pale eosinophilic granular debris with scattered small nuclear fragments;
  LYM lymphocytes: dense small round dark-blue nuclei;
  TAS tumour-associated stroma: pink oriented fibres with sparse elongated nuclei;
  background (index 4): near-white glass.
A tile is a pure function of (seed, split, index): the same arguments give the same pixels on any
machine. Each sample carries its pixel mask (palette indices as in LUAD-HistoSeg, 4 = background)
and its image-level multi-label vector, the classes that cover at least `min_area` of the tile.
"""
from __future__ import annotations

import functools

import numpy as np

CLASS_NAMES = ("TE", "NEC", "LYM", "TAS")
BACKGROUND = 4
SPLITS = {"train": 0, "val": 1, "test": 2}
# LUAD-HistoSeg mask palette: TE, NEC, LYM, TAS, background.
PALETTE = np.array([[205, 51, 51], [0, 255, 0], [65, 105, 225], [255, 165, 0],
                    [255, 255, 255]], np.uint8)

# Per class: stroma/cytoplasm colour, nucleus colour, nucleus grid cell (px), radius range (px),
# nucleus probability per cell, elongation of nuclei.
_TISSUE = {
    0: dict(base=(196, 120, 176), nucleus=(88, 46, 132), cell=13, radius=(3.2, 4.6), p=0.85,
            elong=1.3),
    1: dict(base=(232, 176, 196), nucleus=(150, 96, 156), cell=7, radius=(0.8, 1.8), p=0.35,
            elong=1.0),
    2: dict(base=(176, 138, 200), nucleus=(48, 30, 112), cell=6, radius=(2.0, 2.8), p=0.92,
            elong=1.0),
    3: dict(base=(236, 142, 172), nucleus=(110, 60, 140), cell=17, radius=(1.5, 2.2), p=0.3,
            elong=3.0),
}


def _smooth_field(rng: np.random.Generator, size: int, coarse: int) -> np.ndarray:
  """Random field: coarse uniform noise upsampled bilinearly to (size, size)."""
  grid = rng.random((coarse + 1, coarse + 1))
  t = np.linspace(0, coarse, size, endpoint=False)
  i0 = t.astype(int)
  f = t - i0
  rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
  return (rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]).astype(np.float32)


def _nuclei(rng: np.random.Generator, size: int, cell: int, radius, p: float, elong: float,
            angle: float) -> np.ndarray:
  """Soft nucleus occupancy in [0, 1]: at most one elliptical nucleus per grid cell."""
  n = -(-size // cell)
  present = rng.random((n, n), np.float32) < p
  cy, cx = (rng.random((2, n, n), np.float32) * 0.4 + 0.3) * cell
  inv_r = 1.0 / rng.uniform(*radius, (n, n)).astype(np.float32)
  pix = np.arange(size)
  idx, offset = pix // cell, (pix % cell).astype(np.float32)
  dy = offset[:, None] - cy[idx][:, idx]
  dx = offset[None, :] - cx[idx][:, idx]
  ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
  u, v = ca * dx + sa * dy, ca * dy - sa * dx  # rotate, then stretch along u
  d = np.sqrt((u / elong) ** 2 + v**2) * inv_r[idx][:, idx]
  return np.clip(4.0 * (1.1 - d), 0.0, 1.0) * present[idx][:, idx]  # soft edge at ~r


def _texture(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
  """An RGB float tile of one tissue class."""
  spec = _TISSUE[cls]
  angle = rng.uniform(0, np.pi)
  base = np.array(spec["base"], np.float32) * rng.uniform(0.93, 1.07, 3)
  img = np.broadcast_to(base, (size, size, 3)).astype(np.float32).copy()
  if cls == 3:  # stroma: oriented wavy collagen fibres
    pix = np.arange(size, dtype=np.float32)
    phase = (np.cos(angle) * pix[None, :] + np.sin(angle) * pix[:, None]) / 3.0
    fibres = 0.5 + 0.5 * np.sin(phase + 2.5 * _smooth_field(rng, size, 6))
    img *= (0.86 + 0.14 * fibres)[..., None]
  elif cls == 1:  # necrosis: granular debris
    img *= (0.9 + 0.2 * rng.random((size, size), np.float32))[..., None]
  occ = _nuclei(rng, size, spec["cell"], spec["radius"], spec["p"], spec["elong"], angle)
  nucleus = np.array(spec["nucleus"], np.float32) * rng.uniform(0.9, 1.1, 3)
  return img * (1 - occ[..., None]) + nucleus * occ[..., None]


def generate_tile(seed: int, split: str, index: int, size: int = 224,
                  min_area: float = 0.02):
  """One sample: uint8 image (size, size, 3), uint8 mask (size, size), float32 labels (4,)."""
  rng = np.random.default_rng([seed, SPLITS[split], index])
  num_classes = len(CLASS_NAMES)
  present = rng.choice(num_classes, size=rng.integers(1, 4), replace=False)
  coarse = int(rng.integers(2, 5))
  scores = np.stack([_smooth_field(rng, size, coarse) for _ in present])
  mask = present[np.argmax(scores, axis=0)].astype(np.uint8)
  if rng.random() < 0.4:  # glass: background where another smooth field is low
    mask[_smooth_field(rng, size, coarse) < rng.uniform(0.15, 0.35)] = BACKGROUND
  image = np.full((size, size, 3), 245.0, np.float32)
  for cls in present:
    image = np.where((mask == cls)[..., None], _texture(rng, int(cls), size), image)
  image *= rng.uniform(0.92, 1.06, 3).astype(np.float32)  # stain variation per tile
  image += 4.0 * rng.standard_normal(image.shape, np.float32)
  image = np.clip(image, 0, 255).astype(np.uint8)
  area = np.bincount(mask.ravel(), minlength=BACKGROUND + 1)[:num_classes] / mask.size
  labels = (area >= min_area).astype(np.float32)
  if not labels.any():  # a tile is never label-free: keep its largest tissue class
    labels[np.argmax(area)] = 1.0
  return image, mask, labels


def smooth_noise(rng: np.random.Generator, shape, sigma_px: float) -> np.ndarray:
  """Gaussian-correlated noise, unit variance, by an FFT low-pass (periodic, fast)."""
  noise = rng.standard_normal(shape).astype(np.float32)
  fy = np.fft.fftfreq(shape[0])[:, None]
  fx = np.fft.rfftfreq(shape[1])[None, :]
  kernel = np.exp(-2 * (np.pi * sigma_px) ** 2 * (fy**2 + fx**2))
  field = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape).astype(np.float32)
  return field / (field.std() + 1e-6)


def memoised(generate):
  """`generate(seed, split, index, size)` memoised per process (about 200 KB a 224 px image):
  the phases of one pipeline and the epochs of one run read the same images, and generating
  them dominated the input time. The arrays are read-only: transforms make new ones."""
  @functools.lru_cache(maxsize=4096)
  def cached(seed: int, split: str, index: int, size: int):
    out = generate(seed, split, index, size)
    for a in out:
      a.flags.writeable = False
    return out
  return cached


cached_tile = memoised(generate_tile)


class SyntheticHistology:
  """Random-access source of procedural tiles (a grain RandomAccessDataSource). Subclasses
  name another generator (`cached`) and name prefix."""
  cached = staticmethod(cached_tile)
  prefix = "synthetic"

  def __init__(self, num_images: int, split: str = "train", seed: int = 0, size: int = 224):
    self.num_images, self.split, self.seed, self.size = num_images, split, seed, size

  def __len__(self) -> int:
    return self.num_images

  def __getitem__(self, index: int) -> dict:
    image, mask, labels = self.cached(self.seed, self.split, int(index), self.size)
    return {"image": image, "mask": mask, "labels": labels, "name": self.name(index)}

  def name(self, index: int) -> str:
    """The example's name without generating it."""
    return f"{self.prefix}/{self.split}/{int(index)}"

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(num_images={self.num_images}, split={self.split!r}, "
            f"seed={self.seed}, size={self.size})")
