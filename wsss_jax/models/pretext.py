"""Pretext tasks that pretrain the same ViT encoder as MAE, or a ResNet38 / ResNet-50 trunk of the
classify phase (`model.encoder`). The encoder's parameters stay under `encoder`, so the classify
phase and chained pretraining take them as they take MAE's:

  rotation (Gidaris et al. 2018): each image turned by k x 90 degrees, k uniform in 0..3; the
    encoder's pooled features -> 4-way softmax predicts k.
  jigsaw (Noroozi & Favaro 2016): the image cut into grid x grid tiles, put back in the order of
    one permutation of a fixed set, chosen by maximal Hamming distance, and the network predicts
    which permutation. A CNN is the paper's context-free network (each tile through the shared
    encoder alone); a ViT sees the whole reassembled puzzle at once.
  exemplar (instance discrimination, Dosovitskiy et al. 2014; Wu et al. 2018) in its in-batch form
    (SimCLR, Chen et al. 2020): every image is its own class; two strong augmentations of it
    (data/strong_augment.py) are the positives, the other 2B - 2 views of the global batch the
    negatives; encoder -> pooled features -> 2-layer projection -> unit sphere -> NT-Xent.
Inputs are made on device inside the jitted step, so the grain pipeline is MAE's.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.errors import UserError
from wsss_jax.models.vit import VisionTransformer

OBJECTIVES = ("mae", "rotation", "jigsaw", "exemplar")
ENCODERS = ("vit", "resnet38", "resnet50")


def pooled_features(encoder: nn.Module, images, train: bool):
  """(B, F): a ViT's mean patch token (after its final LayerNorm) or a CNN's global average pool
  of its last feature map (BatchNorm in batch-statistics mode and dropout on when `train`)."""
  if isinstance(encoder, VisionTransformer):
    return encoder(images)[:, 1:].mean(1)
  return encoder(images, train).mean((1, 2))


class PretextClassifier(nn.Module):
  """encoder -> pooled features -> `pretext_head` (rotation; jigsaw with a ViT, which sees the
  whole reassembled puzzle)."""
  encoder: nn.Module
  num_outputs: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    head = nn.Dense(self.num_outputs, dtype=self.dtype, name="pretext_head",
                    kernel_init=nn.initializers.truncated_normal(2e-5))  # starts at chance
    return head(pooled_features(self.encoder, images, train)).astype(jnp.float32)


class ContextFreeNetwork(nn.Module):
  """Jigsaw for a CNN as Noroozi & Favaro built it: every tile of the puzzle goes through the
  shared encoder alone (a siamese network of grid x grid branches); per tile pooled features ->
  Dense(`tile_dim`), ReLU ("fc6"); the tiles' vectors concatenated in puzzle order -> Dense(
  `hidden`), ReLU ("fc7") -> one logit per permutation ("fc8")."""
  encoder: nn.Module
  num_outputs: int
  grid: int
  tile_dim: int = 512
  hidden: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, puzzles, train: bool = False):
    b = puzzles.shape[0]
    tiles = to_tiles(puzzles, self.grid)  # (B, T, h, w, C), row-major
    f = pooled_features(self.encoder, tiles.reshape(-1, *tiles.shape[2:]), train)  # one branch each
    f = nn.relu(nn.Dense(self.tile_dim, dtype=self.dtype, name="fc6")(f))
    f = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc7")(f.reshape(b, -1)))
    head = nn.Dense(self.num_outputs, dtype=self.dtype, name="pretext_head",
                    kernel_init=nn.initializers.truncated_normal(2e-5))
    return head(f).astype(jnp.float32)


class InstanceEmbedder(nn.Module):
  """encoder -> pooled features -> Dense(hidden), ReLU, Dense(dim) -> L2-normalised embedding
  (SimCLR's projection head; the classifier later takes only `encoder`)."""
  encoder: nn.Module
  hidden: int
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    pooled = pooled_features(self.encoder, images, train)
    h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="projection_hidden")(pooled))
    z = nn.Dense(self.dim, dtype=self.dtype, name="projection_out")(h).astype(jnp.float32)
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-12)


def nt_xent(z1, z2, temperature: float):
  """(loss, instance accuracy) of SimCLR's normalised-temperature cross-entropy: view i of one
  image must pick its other view among the 2B - 1 other views, logits = cosine / temperature.
  z1, z2: unit embeddings (B, D) of the two views; row i of z1 and of z2 is one image."""
  b = z1.shape[0]
  z = jnp.concatenate([z1, z2])
  logits = (z @ z.T) / temperature
  logits = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, logits)  # a view is not its own pair
  target = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])
  log_p = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.take_along_axis(log_p, target[:, None], 1).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == target)


def check_exemplar(cfg, batch_size: int) -> None:
  if cfg.temperature <= 0:
    raise UserError(f"exemplar.temperature={cfg.temperature} must be positive")
  if not 0 < cfg.crop_min <= 1:
    raise UserError(f"exemplar.crop_min={cfg.crop_min} must lie in (0, 1]")
  for name in ("colour_p", "grayscale_p", "blur_p"):
    if not 0 <= cfg[name] <= 1:
      raise UserError(f"exemplar.{name}={cfg[name]} must lie in [0, 1]")
  if cfg.colour_strength < 0 or cfg.hidden <= 0 or cfg.dim <= 0:
    raise UserError("exemplar.colour_strength must be >= 0 and exemplar.hidden, exemplar.dim "
                    "positive")
  if batch_size < 2:
    raise UserError(f"batch_size={batch_size}: instance discrimination needs at least 2 images "
                    f"per batch (the others are the negatives)")


def maximal_hamming_permutations(n_tiles: int, count: int, seed: int = 0,
                                 max_candidates: int = 400_000) -> np.ndarray:
  """`count` permutations of n_tiles, chosen greedily: each next one has the largest minimal
  Hamming distance to those already chosen (ties at random), starting from a random one
  (Noroozi & Favaro 2016, Algorithm 1). Up to 3x3 tiles every permutation is a candidate (9! =
  362,880); beyond, `max_candidates` distinct random ones (16! cannot be listed)."""
  total = math.factorial(n_tiles)
  if not 1 <= count <= min(total, max_candidates):
    raise UserError(f"jigsaw.permutations={count} must lie in [1, {min(total, max_candidates)}] "
                    f"for {n_tiles} tiles")
  rng = np.random.default_rng(seed)
  if total <= max_candidates:
    candidates = np.array(list(itertools.permutations(range(n_tiles))), np.int8)
  else:
    draws = np.argsort(rng.random((max_candidates, n_tiles)), axis=1).astype(np.int8)
    candidates = np.unique(draws, axis=0)
  chosen = [int(rng.integers(len(candidates)))]
  min_dist = (candidates != candidates[chosen[0]]).sum(1)
  for _ in range(count - 1):
    best = np.flatnonzero(min_dist == min_dist.max())
    pick = int(rng.choice(best))
    chosen.append(pick)
    min_dist = np.minimum(min_dist, (candidates != candidates[pick]).sum(1))
  return candidates[chosen].astype(np.int32)


def rotate_batch(rng, images):
  """(images turned by k x 90 degrees, k) with k uniform per image; square images."""
  k = jax.random.randint(rng, (images.shape[0],), 0, 4)
  turns = jnp.stack([jnp.rot90(images, r, axes=(1, 2)) for r in range(4)])  # (4, B, H, W, C)
  return jnp.take_along_axis(turns, k[None, :, None, None, None], 0)[0], k


def to_tiles(images, grid: int):
  """(B, H, W, C) -> (B, grid * grid, H / grid, W / grid, C), tiles in row-major order."""
  b, h, w, c = images.shape
  tiles = images.reshape(b, grid, h // grid, grid, w // grid, c).transpose(0, 1, 3, 2, 4, 5)
  return tiles.reshape(b, grid * grid, h // grid, w // grid, c)


def from_tiles(tiles, grid: int):
  """The inverse of `to_tiles`."""
  b, _, th, tw, c = tiles.shape
  tiles = tiles.reshape(b, grid, grid, th, tw, c).transpose(0, 1, 3, 2, 4, 5)
  return tiles.reshape(b, grid * th, grid * tw, c)


def shuffle_tiles(images, permutation, grid: int):
  """Tile i of the output is tile permutation[i] of the input (row-major tiles)."""
  tiles = jnp.take_along_axis(to_tiles(images, grid), permutation[:, :, None, None, None], 1)
  return from_tiles(tiles, grid)


def jigsaw_batch(rng, images, permutations, grid: int):
  """(puzzles, index of the permutation each was made with)."""
  index = jax.random.randint(rng, (images.shape[0],), 0, permutations.shape[0])
  return shuffle_tiles(images, jnp.asarray(permutations)[index], grid), index


def check_jigsaw(image_size: int, grid: int) -> None:
  if grid < 2 or image_size % grid:
    raise UserError(f"jigsaw.grid={grid} must be >= 2 and divide data.image_size={image_size} "
                    f"(the crop is cut into grid x grid equal tiles)")
