"""Pseudo masks from relevance maps: the multi-layer rule and the background rules.

The multi-layer pseudo-supervision rule (Han et al. 2022): the maps of one layer, jointly min-max
normalised over classes, are resized to the tile, the classes absent from the tile's label vector
are left out, and the background channel is appended with a value above any map value wherever the
background rule says so; the mask is the argmax. Background rules:
  white (LUAD-HistoSeg): grey = 0.299 R + 0.587 G + 0.114 B > 200, then connected white regions
    smaller than 50 px (4-connectivity) removed, as the authors' OpenCV + scikit-image code;
  none (BCSS-WSSS): no background channel (white there is fat, a tissue).
In the finding setting (findings on an unlabelled background, negatives with no label) the
class maps are max-normalised per image over the present classes, M_c in [0, 1], and the
background gets a score map bg(x) from one of the map rules (REFERENCE.md section 8):
  threshold  bg = alpha                       (the CAM / VOC practice; alpha in (0, 1])
  power      bg = (1 - max_c M_c)^alpha       (AffinityNet / PSA; alpha > 0)
  otsu       bg = Otsu's threshold of max_c M_c, per image
  negatives  bg = t / peak, t the `alpha`-quantile of the raw maps of the negative training
             images and peak the image's raw maximum: "more than a normal image shows"
and a pixel is finding c where M_c > bg and M_c is the largest present class, else background.
An image rule combines with a map rule as 'white+threshold' (white glass AND the map rule).
Departures from the authors' code, on purpose: an absent class never wins the argmax (theirs lets a
zeroed absent class win ties at 0), and a tile whose label vector is empty is all background
(ignored by the segmentation loss) instead of class 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from wsss_jax.data.mask_files import IGNORE
from wsss_jax.errors import UserError

IMAGE_RULES = ("white", "none")
MAP_RULES = ("threshold", "power", "otsu", "negatives")
BACKGROUND_RULES = IMAGE_RULES + MAP_RULES + tuple(f"white+{m}" for m in MAP_RULES)
# the map rules' alpha when none is given (negatives: the quantile of the negatives' maps)
DEFAULT_ALPHA = {"threshold": 0.3, "power": 8.0, "otsu": 0.0, "negatives": 0.99}
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


def split_rule(rule: str) -> tuple[str, str | None]:
  """'white+threshold' -> ('white', 'threshold'); 'otsu' -> ('none', 'otsu'); 'white' ->
  ('white', None)."""
  check_rule(rule)
  image_rule, _, map_rule = rule.rpartition("+")
  if not image_rule:
    return (map_rule, None) if map_rule in IMAGE_RULES else ("none", map_rule)
  return image_rule, map_rule


def background_mask(image_u8: np.ndarray, rule: str = "white", threshold: int = 200,
                    min_size: int = 50) -> np.ndarray:
  """(H, W) bool: the pixels the rule's image part (white glass) assigns to background."""
  if split_rule(rule)[0] == "none":
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


def check_alpha(map_rule: str, alpha: float) -> None:
  """alpha of a map rule: in (0, 1] for threshold and negatives (a score, a quantile), > 0 for
  power (an exponent)."""
  if map_rule in ("threshold", "negatives") and not 0 < alpha <= 1:
    raise UserError(f"background.alpha={alpha} is outside (0, 1]: the {map_rule} rule's alpha is "
                    f"{'a map score' if map_rule == 'threshold' else 'a quantile'}")
  if map_rule == "power" and not alpha > 0:
    raise UserError(f"background.alpha={alpha} must be positive (the power rule's exponent)")


# --- Masks from maps (on device) ------------------------------------------------------------------
def fuse_maps(maps, size):
  """(B, K, h, w) maps, or a list of them (one per input scale), resized bilinearly to `size`
  and averaged."""
  maps_list = list(maps) if isinstance(maps, (list, tuple)) else [maps]
  b, k = maps_list[0].shape[:2]
  return sum(jax.image.resize(m.astype(jnp.float32), (b, k) + tuple(size), "bilinear")
             for m in maps_list) / len(maps_list)


def pseudo_mask(maps, labels, background, size, background_index: int, band: float = 0.0):
  """(B, K, h, w) maps (or a list of them, e.g. one per input scale) -> (B, H, W) uint8 mask at
  `size` = (H, W).

  maps are resized bilinearly (and averaged over the list); classes with label 0 cannot win;
  `background` (B, H, W) bool pixels and tiles without any positive label take
  `background_index`; with `band` > 0 a pixel whose two best present classes lie within `band`
  of each other is IGNORE (the ignore band of tissue maps)."""
  maps = fuse_maps(maps, size)
  present = labels > 0
  scores = jnp.where(present[:, :, None, None], maps, -jnp.inf)
  cls = jnp.argmax(scores, axis=1)
  fixed = background | ~present.any(axis=1)[:, None, None]
  mask = jnp.where(fixed, background_index, cls)
  if band > 0 and maps.shape[1] > 1:
    top2 = jax.lax.top_k(jnp.moveaxis(scores, 1, -1), 2)[0]
    close = (top2[..., 0] - top2[..., 1] < band) & (present.sum(axis=1) > 1)[:, None, None]
    mask = jnp.where(close & ~fixed, IGNORE, mask)
  return mask.astype(jnp.uint8)


# --- Findings against a background (on device) -----------------------------------------------------
def max_normalize(maps, present):
  """(ReLU(M_c) / peak, peak): maps (B, K, H, W) of the present classes (B, K) over their joint
  per-image maximum `peak` (B,); absent classes 0, a map-less image's scores 0."""
  maps = jnp.where(present[:, :, None, None], jax.nn.relu(maps), 0.0)
  peak = maps.max(axis=(1, 2, 3))
  return maps / jnp.where(peak > 0, peak, 1.0)[:, None, None, None], peak


def threshold_background(scores, alpha):
  """bg(x) = alpha."""
  return jnp.full(scores.shape[:1] + scores.shape[2:], alpha, jnp.float32)


def power_background(scores, alpha):
  """bg(x) = (1 - max_c M_c(x))^alpha."""
  return (1.0 - scores.max(axis=1)) ** alpha


def otsu_threshold(values, bins: int = 256):
  """Per row of `values` (B, N) in [0, 1]: Otsu's threshold, the bin edge t maximising the
  between-class variance w0(t) w1(t) (mu0(t) - mu1(t))^2 of the histogram."""
  index = jnp.clip((values * bins).astype(jnp.int32), 0, bins - 1)
  hist = jax.vmap(lambda i: jnp.zeros(bins, jnp.float32).at[i].add(1.0))(index)
  p = hist / hist.sum(axis=1, keepdims=True)
  centres = (jnp.arange(bins, dtype=jnp.float32) + 0.5) / bins
  w0 = jnp.cumsum(p, axis=1)
  m0 = jnp.cumsum(p * centres, axis=1)
  w1, total = 1.0 - w0, m0[:, -1:]
  between = (total * w0 - m0) ** 2 / jnp.maximum(w0 * w1, 1e-12)  # = w0 w1 (mu0 - mu1)^2
  between = jnp.where((w0 > 0) & (w1 > 0), between, -1.0)
  return (jnp.argmax(between, axis=1) + 1).astype(jnp.float32) / bins


def otsu_background(scores):
  """bg(x) = Otsu's threshold of max_c M_c over the image's pixels."""
  peak_map = scores.max(axis=1)
  t = otsu_threshold(peak_map.reshape(peak_map.shape[0], -1))
  return jnp.broadcast_to(t[:, None, None], peak_map.shape)


def negatives_background(scores, peak, level):
  """bg(x) = level / peak: the raw level the negative images reach, in this image's units."""
  bg = level / jnp.where(peak > 0, peak, 1.0)
  return jnp.broadcast_to(jnp.where(peak > 0, bg, 2.0)[:, None, None], scores.shape[:1] +
                          scores.shape[2:])


def background_score(map_rule: str, scores, peak, alpha, level=None):
  if map_rule == "threshold":
    return threshold_background(scores, alpha)
  if map_rule == "power":
    return power_background(scores, alpha)
  if map_rule == "otsu":
    return otsu_background(scores)
  if map_rule == "negatives":
    return negatives_background(scores, peak, level)
  raise UserError(f"{map_rule!r} is not a map background rule {MAP_RULES}")


def finding_mask(maps, labels, background, size, background_index: int, map_rule: str, alpha,
                 level=None, band: float = 0.0):
  """(B, H, W) uint8 mask of findings against a background: maps (or a list over scales) fused
  at `size`, max-normalised over the present classes, then each pixel the largest present class
  where it beats the rule's background score, else `background_index`; `background` (B, H, W)
  bool pixels (white glass) and negative images (no label) are background. With `band` > 0 a
  pixel whose score lies within `band` of the background score is IGNORE: confident finding
  above bg + band, confident background below bg - band (the PSA / IRN ignore band)."""
  scores, peak = max_normalize(fuse_maps(maps, size), labels > 0)
  bg = background_score(map_rule, scores, peak, alpha, level)
  best, cls = scores.max(axis=1), jnp.argmax(scores, axis=1)
  free = ~background & (labels > 0).any(axis=1)[:, None, None]
  mask = jnp.where((best > bg) & free, cls, background_index)
  if band > 0:
    mask = jnp.where((jnp.abs(best - bg) <= band) & free, IGNORE, mask)
  return mask.astype(jnp.uint8)


