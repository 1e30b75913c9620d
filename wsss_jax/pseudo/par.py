"""Pixel-adaptive refinement (PAR; Ru et al., AFA, CVPR 2022, also in ToCo, CVPR 2023): maps made
to follow the image, with nothing learnt (REFERENCE.md section 10).

For each pixel i and its 8 neighbours j at every dilation d (edges replicated):
  kappa_rgb(i, j) = -(|I_i - I_j| / (w_rgb sigma_i))^2, averaged over the channels, sigma_i the
                    standard deviation of the neighbours' intensities (per channel);
  kappa_pos(i, j) = -(|P_i - P_j| / (w_pos sigma_pos))^2, |P_i - P_j| = d or d sqrt(2);
  a(i, j) = softmax_j kappa_rgb + pos_weight softmax_j kappa_pos;
and each iteration replaces the maps by their affinity-weighted neighbour sum. The weights sum to
1 + pos_weight, a common factor every later rule normalises away (max or min-max normalisation).
Speckle enters kappa_rgb directly, so `smooth="median3"` first takes each channel's 3x3 median.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from wsss_jax.errors import UserError

EIGHT = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
SMOOTHING = ("none", "median3")
# AFA's settings: dilations 1-24, 10 iterations, w_rgb 0.3 (also its position scale), 0.01
DEFAULTS = dict(dilations=(1, 2, 4, 8, 12, 24), iterations=10, w_rgb=0.3, w_pos=0.3,
                pos_weight=0.01, smooth="none")


def check_settings(settings: dict) -> None:
  """Refuses settings PAR cannot run with, naming the field."""
  unknown = set(settings) - set(DEFAULTS) - {"enabled", "validate"}
  if unknown:
    raise UserError(f"par: unknown field(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
  dilations = tuple(settings.get("dilations", DEFAULTS["dilations"]))
  if not dilations or any(int(d) != d or d < 1 for d in dilations):
    raise UserError(f"par.dilations={dilations} must be positive integers")
  if int(settings.get("iterations", 1)) < 1:
    raise UserError(f"par.iterations={settings['iterations']} must be at least 1")
  for field in ("w_rgb", "w_pos"):
    if not settings.get(field, 1.0) > 0:
      raise UserError(f"par.{field}={settings[field]} must be positive")
  if settings.get("pos_weight", 0.0) < 0:
    raise UserError(f"par.pos_weight={settings['pos_weight']} must be >= 0")
  if settings.get("smooth", "none") not in SMOOTHING:
    raise UserError(f"par.smooth={settings['smooth']!r} is not one of {SMOOTHING}")


def static_settings(settings: dict, known=DEFAULTS) -> tuple:
  """The `known` fields of a settings section as sorted (name, value) pairs, lists made tuples:
  hashable, for jit's static arguments (PAR's and the CRF's)."""
  return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                      for k, v in dict(settings).items() if k in known))


def offsets(dilations) -> list:
  """(dy, dx) of the 8 neighbours at each dilation, dilation by dilation."""
  return [(dy * int(d), dx * int(d)) for d in dilations for dy, dx in EIGHT]


def shifted(x, dy: int, dx: int, radius: int):
  """x (B, C, H, W) read at (y + dy, x + dx), edges replicated (`radius` >= |dy|, |dx|)."""
  h, w = x.shape[-2:]
  padded = jnp.pad(x, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="edge")
  return padded[:, :, radius + dy:radius + dy + h, radius + dx:radius + dx + w]


def median3(images):
  """(B, C, H, W) -> each channel's 3x3 median (edges replicated): speckle off, edges kept."""
  stack = jnp.stack([shifted(images, dy, dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
  return jnp.median(stack, axis=0)


def position_weights(dilations, w_pos: float):
  """softmax_j kappa_pos: one weight per neighbour, the same at every pixel."""
  dist = jnp.array([d * (math.sqrt(2.0) if dy and dx else 1.0)
                    for d in dilations for dy, dx in EIGHT], jnp.float32)
  sigma = jnp.std(dist, ddof=1)
  return jax.nn.softmax(-(dist / (sigma + 1e-8) / w_pos) ** 2)


def affinity(images, dilations, w_rgb: float, w_pos: float, pos_weight: float,
             smooth: str = "none"):
  """(B, N, H, W) weights a(i, j) of the N = 8 x len(dilations) neighbours of every pixel of
  `images` (B, H, W, C), uint8 or float."""
  x = jnp.moveaxis(images.astype(jnp.float32), -1, 1)
  if smooth == "median3":
    x = median3(x)
  offs = offsets(dilations)
  radius = max(int(d) for d in dilations)
  near = jnp.stack([shifted(x, dy, dx, radius) for dy, dx in offs], axis=2)  # B C N H W
  sigma = jnp.std(near, axis=2, keepdims=True, ddof=1)
  kappa = -(jnp.abs(near - x[:, :, None]) / (sigma + 1e-8) / w_rgb) ** 2
  colour = jax.nn.softmax(kappa.mean(axis=1), axis=1)
  return colour + pos_weight * position_weights(dilations, w_pos)[None, :, None, None]


def propagate(maps, weights, dilations, iterations: int):
  """maps (B, K, H, W) replaced `iterations` times by sum_j a(i, j) maps(j)."""
  offs = offsets(dilations)
  radius = max(int(d) for d in dilations)

  def step(_, m):
    return sum(weights[:, None, j] * shifted(m, dy, dx, radius) for j, (dy, dx) in enumerate(offs))
  return jax.lax.fori_loop(0, iterations, step, maps.astype(jnp.float32))


def refine(maps, images, dilations=DEFAULTS["dilations"], iterations=DEFAULTS["iterations"],
           w_rgb=DEFAULTS["w_rgb"], w_pos=DEFAULTS["w_pos"], pos_weight=DEFAULTS["pos_weight"],
           smooth=DEFAULTS["smooth"]):
  """PAR: maps (B, K, H, W) at the size of `images` (B, H, W, C) made to follow the image."""
  weights = affinity(images, tuple(dilations), w_rgb, w_pos, pos_weight, smooth)
  return propagate(maps, weights, tuple(dilations), int(iterations))
