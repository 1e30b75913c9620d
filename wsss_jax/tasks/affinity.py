"""Affinity task: AffinityNet trained on the inter-pixel relations of the confident pseudo-mask
regions, and the random walk that propagates class maps along its affinities (Ahn & Kwak 2018;
REFERENCE.md section 10).

Pairs: every pixel i of the stride-8 feature grid with each j within `radius` (each unordered pair
once). A pair is labelled when neither pixel is in the ignore band: positive when both have the
same label (background pairs and finding / tissue pairs counted apart), negative otherwise.
Loss: 1/4 of the mean -log a over background positives + 1/4 over the other positives + 1/2 of the
mean -log(1 - a) over negatives (class-balanced as the paper).
Random walk: A = [a_ij^beta] over the same radius (a_ii = 1), T = D^-1 A, maps' = T^(2^k) maps
with k squarings of T (the paper: k = 8, t = 256 steps on a 56 x 56 grid).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wsss_jax.data import mask_files
from wsss_jax.models.affinity import AffinityNet
from wsss_jax.tasks.common import (Training, backbone_head_optimizer, compute_dtype, jit_train_step,
                                   prepare_images, state_sharding_of, steps_per_epoch, total_steps)
from wsss_jax.train.train_state import ClassifierState

STRIDE = 8  # the trunk's output stride


def half_offsets(radius: int) -> list:
  """(dy, dx) with 0 < dy^2 + dx^2 < radius^2 on one side (each unordered pair once)."""
  return [(dy, dx) for dy in range(radius) for dx in range(-radius + 1, radius)
          if 0 < dy * dy + dx * dx < radius * radius and (dy > 0 or dx > 0)]


def pair_slices(h: int, w: int, dy: int, dx: int) -> tuple:
  """(source, destination) slices of a (h, w) grid: pixel i and i + (dy, dx), both inside."""
  ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
  yd = slice(ys.start + dy, ys.stop + dy)
  xd = slice(xs.start + dx, xs.stop + dx)
  return (ys, xs), (yd, xd)


def pair_affinity(features, dy: int, dx: int):
  """a = exp(-mean_c |f_i - f_j|) of every pair (i, i + (dy, dx)) inside the grid (B, h', w')."""
  (ys, xs), (yd, xd) = pair_slices(features.shape[1], features.shape[2], dy, dx)
  return jnp.exp(-jnp.mean(jnp.abs(features[:, ys, xs] - features[:, yd, xd]), axis=-1))


def grid_labels(mask, grid: tuple):
  """(B, H, W) labels at the input -> the label at each grid cell's centre (B, h, w)."""
  sy, sx = mask.shape[1] // grid[0], mask.shape[2] // grid[1]
  return mask[:, sy // 2::sy, sx // 2::sx][:, :grid[0], :grid[1]]


def affinity_loss(features, labels, background: int, radius: int):
  """(loss, parts): the class-balanced pair loss of the module docstring; labels (B, h, w) at the
  grid, IGNORE for the band."""
  sums = {"bg": 0.0, "fg": 0.0, "neg": 0.0}
  counts = {"bg": 0.0, "fg": 0.0, "neg": 0.0}
  h, w = labels.shape[1:]
  for dy, dx in half_offsets(radius):
    a = pair_affinity(features, dy, dx)
    (ys, xs), (yd, xd) = pair_slices(h, w, dy, dx)
    li, lj = labels[:, ys, xs], labels[:, yd, xd]
    valid = (li != mask_files.IGNORE) & (lj != mask_files.IGNORE)
    same = valid & (li == lj)
    kinds = {"bg": same & (li == background), "fg": same & (li != background),
             "neg": valid & (li != lj)}
    for kind, chosen in kinds.items():
      value = -jnp.log(a + 1e-5) if kind != "neg" else -jnp.log(1.0 + 1e-5 - a)
      sums[kind] = sums[kind] + jnp.sum(value * chosen)
      counts[kind] = counts[kind] + jnp.sum(chosen)
  parts = {k: sums[k] / jnp.maximum(counts[k], 1.0) for k in sums}
  return 0.25 * parts["bg"] + 0.25 * parts["fg"] + 0.5 * parts["neg"], parts


# --- Random walk ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _pair_indices(h: int, w: int, radius: int) -> list:
  """[(dy, dx, flat source indices, flat destination indices)] of the grid's pairs."""
  index = np.arange(h * w).reshape(h, w)
  out = []
  for dy, dx in half_offsets(radius):
    (ys, xs), (yd, xd) = pair_slices(h, w, dy, dx)
    out.append((dy, dx, index[ys, xs].ravel(), index[yd, xd].ravel()))
  return out


def transition(features, radius: int, beta: float):
  """(B, N, N) row-stochastic T = D^-1 [a_ij^beta] over pairs within `radius` (a_ii = 1)."""
  b, h, w, _ = features.shape
  n = h * w
  a = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (b, n, n))
  for dy, dx, src, dst in _pair_indices(h, w, radius):
    value = pair_affinity(features, dy, dx).reshape(b, -1) ** beta
    a = a.at[:, src, dst].set(value).at[:, dst, src].set(value)
  return a / a.sum(-1, keepdims=True)


def random_walk(maps, features, radius: int, beta: float, log2_steps: int):
  """maps (B, C, h, w) on the feature grid propagated t = 2^log2_steps steps: T^t maps."""
  t = transition(features, radius, beta)
  for _ in range(log2_steps):
    t = t @ t
  b, c, h, w = maps.shape
  return jnp.einsum("bij,bcj->bci", t, maps.reshape(b, c, h * w)).reshape(b, c, h, w)


# --- Training -------------------------------------------------------------------------------------------
def param_labels(params):
  """'backbone' for the trunk (lr x1), 'head' for the projections (lr x head_lr_mult)."""
  return {k: jax.tree.map(lambda _: "backbone" if k == "backbone" else "head", v)
          for k, v in params.items()}


def make_init_fn(model, tx, config):
  size = config.data.image_size

  def init_state():
    params_rng, dropout_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    variables = model.init({"params": params_rng, "dropout": dropout_rng},
                           jnp.zeros((1, size, size, 3), jnp.float32))
    state = ClassifierState.create(variables["params"], tx, state_rng)
    return state.replace(batch_stats=variables.get("batch_stats", {}), mu=jnp.ones((), jnp.float32))
  return init_state


def make_train_step(model, tx, schedule, config, background: int):
  dtype, layer = compute_dtype(config), f"mask_{config.data.mask_layers[0]}"

  def train_step(state, batch):
    images = prepare_images(batch["image"], config.data, dtype)

    def loss_fn(params):
      features, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                      images, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": state.step_rng()})
      labels = grid_labels(batch[layer], features.shape[1:3])
      loss, parts = affinity_loss(features, labels, background, config.radius)
      return loss, (parts, updates)

    (loss, (parts, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    step_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    out = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
    out |= {f"loss/{k}": v for k, v in parts.items()}
    return state.replace(step=state.step + 1, opt_state=opt_state,
                         params=optax.apply_updates(state.params, step_updates),
                         batch_stats=updates["batch_stats"]), out

  return train_step


def build_training(config, mesh, background: int) -> Training:
  """AffinityNet, its optimiser and jitted step; `predict` gives (params, batch_stats, u8 images)
  -> the feature grid."""
  model = AffinityNet(config.model.width, config.model.dim, compute_dtype(config))
  spe = steps_per_epoch(config)
  steps = total_steps(config, spe)
  tx, schedule = backbone_head_optimizer(config, param_labels, steps)
  init_state = make_init_fn(model, tx, config)
  abstract_state, state_sharding = state_sharding_of(init_state, mesh, config)
  train_step = jit_train_step(make_train_step(model, tx, schedule, config, background),
                              state_sharding, mesh, config.nan_policy)
  data = config.data

  @jax.jit
  def features_fn(params, batch_stats, images_u8):
    return model.apply({"params": params, "batch_stats": batch_stats},
                       prepare_images(images_u8, data, compute_dtype(config)))
  return Training(model, init_state, abstract_state, state_sharding, train_step,
                  total_steps=steps, steps_per_epoch=spe, predict=features_fn)
