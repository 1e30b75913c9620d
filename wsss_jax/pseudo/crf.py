"""Fully connected CRF (Krähenbühl & Koltun 2011) by mean-field inference, in JAX, batched on device.

Energy E(x) = sum_i U_i(x_i) + sum_{i<j} mu(x_i, x_j) k(f_i, f_j), Potts mu = [x_i != x_j], with
  k = w_pos exp(-|p_i - p_j|^2 / 2 sxy_pos^2)                                      (smoothness)
    + w_bi  exp(-|p_i - p_j|^2 / 2 sxy_bi^2 - |I_i - I_j|^2 / 2 srgb^2)             (appearance)
p pixel positions, I RGB values in 0..255. One mean-field update (the paper's Algorithm 1):
  m_i(l) = sum_{j != i} k(f_i, f_j) Q_j(l);  Q_i(l) ∝ exp(-U_i(l) - sum_{l' != l} m_i(l')).
The smoothness term is a separable Gaussian convolution at full resolution (exact up to its
3-sigma truncation). The appearance term is computed exactly over all pairs of cells of a grid
`downsample` times coarser (each cell stands for downsample^2 pixels, with its mean colour), then
upsampled: with downsample=1 it is the exact dense sum, larger factors trade colour detail for
an N^2 cost that fits on device (224 px tiles: 56 x 56 cells at the default).

`refine_labels` is the pseudo-mask post-process: the unary of a hard mask is -log gt_prob for its
label and -log((1 - gt_prob) / (n - 1)) otherwise (pydensecrf's unary_from_labels); classes absent
from the tile's labels cannot be chosen and the background rule's pixels stay background.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from wsss_jax.errors import UserError

# pydensecrf settings of the label refinement used by SEAM / AffinityNet-style pseudo masks
DEFAULTS = dict(iterations=10, gt_prob=0.7, pos_sxy=3.0, pos_compat=3.0, bi_sxy=50.0,
                bi_srgb=5.0, bi_compat=10.0, downsample=0)
_FORBIDDEN = 1e4  # unary of a label a pixel may not take


def check_settings(cfg) -> None:
  for name in ("pos_sxy", "bi_sxy", "bi_srgb"):
    if cfg[name] <= 0:
      raise UserError(f"crf.{name}={cfg[name]} must be positive (a kernel width)")
  for name in ("pos_compat", "bi_compat"):
    if cfg[name] < 0:
      raise UserError(f"crf.{name}={cfg[name]} must be >= 0 (a kernel weight)")
  if cfg["iterations"] < 1:
    raise UserError(f"crf.iterations={cfg['iterations']} must be at least 1")
  if not 0 < cfg["gt_prob"] < 1:
    raise UserError(f"crf.gt_prob={cfg['gt_prob']} must lie in (0, 1)")
  if cfg["downsample"] < 0:
    raise UserError(f"crf.downsample={cfg['downsample']} must be >= 0 (0: automatic)")


def auto_downsample(height: int, width: int, max_cells: int = 64) -> int:
  """The smallest factor that leaves at most `max_cells` cells per side."""
  return max(1, math.ceil(max(height, width) / max_cells))


def _gaussian_blur_excluding_self(q, sxy: float):
  """sum_{j != i} exp(-|p_i - p_j|^2 / 2 sxy^2) q_j for q (L, H, W), separably."""
  radius = max(1, int(math.ceil(3 * sxy)))
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  taps = jnp.exp(-offsets**2 / (2 * sxy**2))
  x = q[:, None]  # (L, 1, H, W) as a batch of one-channel images
  dn = ("NCHW", "OIHW", "NCHW")
  x = jax.lax.conv_general_dilated(x, taps.reshape(1, 1, -1, 1), (1, 1),
                                   ((radius, radius), (0, 0)), dimension_numbers=dn)
  x = jax.lax.conv_general_dilated(x, taps.reshape(1, 1, 1, -1), (1, 1),
                                   ((0, 0), (radius, radius)), dimension_numbers=dn)
  return x[:, 0] - q  # the centre tap is exp(0) = 1


def _bilateral_kernel(image, sxy: float, srgb: float, s: int):
  """Dense (N', N') appearance kernel between the cells of the s-times coarser grid, each cell
  weighted by the s^2 pixels it stands for; and the grid shape."""
  h, w, _ = image.shape
  hc, wc = -(-h // s), -(-w // s)
  padded = jnp.pad(image, ((0, hc * s - h), (0, wc * s - w), (0, 0)), mode="edge")
  colour = padded.reshape(hc, s, wc, s, 3).mean((1, 3))
  rows, cols = jnp.meshgrid((jnp.arange(hc) + 0.5) * s - 0.5, (jnp.arange(wc) + 0.5) * s - 0.5,
                            indexing="ij")
  feats = jnp.concatenate([jnp.stack([rows, cols], -1) / sxy, colour / srgb], -1)
  feats = feats.reshape(hc * wc, 5)
  sq = jnp.sum(feats**2, -1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * feats @ feats.T, 0.0)
  return jnp.exp(-0.5 * d2) * (s * s), (hc, wc)


def _cells(q, s: int, grid):
  """(L, H, W) -> (N', L): the mean of q over each s x s cell (edge-padded)."""
  l, h, w = q.shape
  hc, wc = grid
  q = jnp.pad(q, ((0, 0), (0, hc * s - h), (0, wc * s - w)), mode="edge")
  return q.reshape(l, hc, s, wc, s).mean((2, 4)).reshape(l, hc * wc).T


def _pixels(m, s: int, grid, size):
  """(N', L) cell messages -> (L, H, W) at pixel resolution (bilinear, cell centres)."""
  hc, wc = grid
  m = m.T.reshape(-1, hc, wc)
  if s == 1:
    return m[:, :size[0], :size[1]]
  return jax.image.resize(m, (m.shape[0], hc * s, wc * s), "bilinear")[:, :size[0], :size[1]]


def mean_field(unary, image, *, iterations: int, pos_sxy: float, pos_compat: float,
               bi_sxy: float, bi_srgb: float, bi_compat: float, downsample: int = 0):
  """Q (L, H, W) of one image: unary (L, H, W) energies, image (H, W, 3) in 0..255."""
  _, h, w = unary.shape
  s = downsample or auto_downsample(h, w)
  kernel, grid = _bilateral_kernel(image.astype(jnp.float32), bi_sxy, bi_srgb, s)

  def update(q, _):
    smooth = _gaussian_blur_excluding_self(q, pos_sxy)
    # the pixel's own term (its cell's kernel value covers it once): taken out
    appearance = _pixels(kernel @ _cells(q, s, grid), s, grid, (h, w)) - q
    m = pos_compat * smooth + bi_compat * appearance
    pairwise = jnp.sum(m, 0, keepdims=True) - m  # Potts: sum over the other labels
    return jax.nn.softmax(-unary - pairwise, axis=0), None

  q0 = jax.nn.softmax(-unary, axis=0)
  q, _ = jax.lax.scan(update, q0, None, length=iterations)
  return q


def label_unary(mask, num_labels: int, gt_prob: float, allowed):
  """(H, W) int labels -> (L, H, W) unary; `allowed` (L, H, W) bool, False = forbidden."""
  onehot = jax.nn.one_hot(mask, num_labels, axis=0, dtype=jnp.float32)
  other = (1.0 - gt_prob) / max(num_labels - 1, 1)
  unary = -jnp.log(jnp.where(onehot > 0, gt_prob, other))
  return jnp.where(allowed, unary, _FORBIDDEN)


def refine_labels(masks, images, labels, background, background_index: int, cfg,
                  free_background: bool = False):
  """Batched pseudo-mask refinement: masks (B, H, W) uint8 with classes 0..K-1 and
  `background_index` (= K), images (B, H, W, 3) uint8, labels (B, K), background (B, H, W) bool.
  Absent classes stay absent; the background rule's pixels stay background. Background may
  win elsewhere only with `free_background` (findings against a background, where it is a
  label like the findings); otherwise only the image rule's pixels are background."""
  k = labels.shape[1]
  if background_index != k:
    raise ValueError(f"background_index={background_index} must follow the {k} classes")
  present = jnp.concatenate([labels > 0, jnp.ones_like(labels[:, :1], bool)], 1)  # + background

  def one(mask, image, present_i, bg):
    allowed = present_i[:, None, None] & jnp.concatenate(
        [jnp.broadcast_to(~bg, (k,) + bg.shape), bg[None] | free_background], 0)
    allowed = jnp.where(allowed.any(0, keepdims=True), allowed, True)
    unary = label_unary(mask.astype(jnp.int32), k + 1, cfg["gt_prob"], allowed)
    q = mean_field(unary, image, iterations=cfg["iterations"], pos_sxy=cfg["pos_sxy"],
                   pos_compat=cfg["pos_compat"], bi_sxy=cfg["bi_sxy"], bi_srgb=cfg["bi_srgb"],
                   bi_compat=cfg["bi_compat"], downsample=cfg["downsample"])
    refined = jnp.argmax(q, 0)
    empty = ~present_i[:k].any()
    return jnp.where(bg | empty, background_index, refined).astype(jnp.uint8)

  return jax.lax.map(lambda a: one(*a), (masks, images, present, background))
