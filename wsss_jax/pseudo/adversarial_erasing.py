"""Adversarial erasing (Wei et al. 2017, "Object region mining with adversarial erasing"), on device.

Round t's classifier is trained on the tiles with the regions mined by rounds 0..t-1 erased
(filled with the dataset's mean colour), so it must find the object elsewhere; the maps of the
rounds, each on its own erased input, are fused by a per-pixel maximum (the union of the mined
regions). `erasing_chain` runs the rounds one after another on a batch: it gives the fused maps
for the pseudo masks and the union region that the next round's training tiles lose.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax import relevance
from wsss_jax.relevance.options import DEFAULT_LAYERS
from wsss_jax.tasks.common import prepare_images
from wsss_jax.train import earlier_runs


def erase(images, region, fill):
  """images (B, H, W, 3) with the pixels of `region` (B, H, W) bool set to `fill` (3,)."""
  return jnp.where(region[..., None], jnp.asarray(fill, images.dtype), images)


def mined_region(maps, labels, size, threshold: float):
  """(B, H, W) bool: pixels where some present class's map, per-class max-normalised and
  resized to `size` (bilinear), exceeds `threshold` (the object regions of this round)."""
  b, k = maps.shape[:2]
  maps = jax.nn.relu(maps.astype(jnp.float32))
  maps = maps / (maps.max(axis=(2, 3), keepdims=True) + 1e-8)
  maps = jax.image.resize(maps, (b, k) + tuple(size), "bilinear")
  present = (labels > 0)[:, :, None, None]
  return jnp.any(present & (maps > threshold), axis=1)


def erasing_chain(rounds: Sequence, variables: Sequence, images, labels, fill, threshold: float):
  """(fused maps {layer: (B, K, h, w)}, union region (B, H, W)) of the rounds in order.

  rounds: per round (maps_fn, region_fn), each (variables, x, labels) -> maps: maps_fn gives
  {layer: maps} (what is fused; None: nothing is, and fused maps come back None), region_fn
  (B, K, h, w) maps whose thresholded part is erased next; variables: per round, its checkpoint's. Round 0 sees the images; round t sees them with
  the union of the regions of rounds < t erased."""
  size = images.shape[1:3]
  region = jnp.zeros(images.shape[:3], bool)
  fused = None
  for (maps_fn, region_fn), v in zip(rounds, variables):
    x = erase(images, region, fill)
    if maps_fn is not None:
      maps = maps_fn(v, x, labels)
      fused = maps if fused is None else {k: jnp.maximum(fused[k], maps[k]) for k in maps}
    region = region | mined_region(region_fn(v, x, labels), labels, size, threshold)
  return fused, region


# --- Rounds of classifiers as one chain (used by the erasing and pseudo-mask phases) ---------------
def fill_value(data):
  """The dataset's mean colour as the classifier sees it (uint8, then prepared as its input)."""
  u8 = np.round(np.asarray(data.mean) * 255).astype(np.uint8).reshape(1, 1, 1, 3)
  return prepare_images(jnp.asarray(u8), data, jnp.float32).reshape(3)


def region_layer(settings: dict, backbone: str):
  """The layer whose maps are thresholded: `erasing.layer`, else the backbone's last map layer."""
  if settings["layer"]:
    return [settings["layer"]]
  default = DEFAULT_LAYERS.get(backbone, ())
  return [default[-1]] if default else None


def region_fn(settings: dict, model, backbone: str):
  """(variables, x, labels) -> (B, K, h, w) maps of the region layer (raw: thresholded later)."""
  fn = relevance.relevance_fn(settings["method"], model.apply,
                              layers=region_layer(settings, backbone), target="logit",
                              upsample=False, normalize="none", only_present=True, relu=True)

  return lambda variables, x, labels: next(iter(fn.maps(variables, x, labels).values()))


def round_fns(model, meta: dict, settings: dict, maps_fn_for=None) -> tuple:
  """(maps_fn or None, region_fn) of one round's classifier for `erasing.erasing_chain`;
  maps_fn_for(model) -> a RelevanceFn for the fused output (None: only the regions are wanted)."""
  maps_fn = maps_fn_for(model).maps if maps_fn_for else None
  return maps_fn, region_fn(settings, model, meta["model"]["backbone"])


def load_rounds(round_dirs, mesh, settings: dict, maps_fn_for=None) -> tuple[list, list]:
  """(per round (maps_fn, region_fn), per round variables) of the classifiers in `round_dirs`."""
  rounds, variables = [], []
  for directory in round_dirs:
    model, v, meta, _, _ = earlier_runs.load_classifier(directory, mesh)
    rounds.append(round_fns(model, meta, settings, maps_fn_for))
    variables.append(v)
  return rounds, variables


def chain(rounds, settings: dict, fill):
  """Jitted (variables per round, prepared images, labels) -> (fused maps, union region)."""
  return jax.jit(lambda variables, x, labels: erasing_chain(
      rounds, variables, x, labels, fill, settings["threshold"]))
