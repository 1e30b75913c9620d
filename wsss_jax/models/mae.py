"""Masked autoencoder (He et al. 2022): ViT encoder on visible patches, light decoder on all.

Masking is per sample: argsort of a score per patch, keep the int(L * (1 - mask_ratio)) lowest
(the same exact count in every sample), and the argsort of that shuffle (`ids_restore`) puts the
decoder's tokens back in image order. The loss is the pixel MSE on masked patches only.

`mask_sampling` picks the score: "random" (uniform noise, the paper), "block" (BEiT's block-wise
masking: random rectangles of >= 16 patches, aspect 0.3-3.3, masked in the order drawn), "grid"
(a regular sub-grid of stride ~1/sqrt(1 - ratio) stays visible, MAE Fig. 6) or "centre" (masking
probability proportional to exp(-d^2 / 2 width^2), d the patch's distance from the image centre
in half-sides, drawn without replacement by Gumbel-top-k: for images whose subject is central).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from wsss_jax.errors import UserError
from wsss_jax.models.layers import LayerNorm
from wsss_jax.models.vit import (VisionTransformer, _dense_init, make_blocks, run_blocks,
                                 sincos_2d_posemb)

GATHERS = ("take", "onehot")


def gather_tokens(x, ids, how: str = "take"):
  """x[b, ids[b, k]] for every b, k: (B, L, D), (B, K) -> (B, K, D).

  "take" is a take_along_axis gather; "onehot" contracts a one-hot (B, K, L) matrix with x, which
  turns the gather into a matmul (benchmarked in BENCHMARKS.md).
  """
  if how == "take":
    return jnp.take_along_axis(x, ids[..., None], axis=1)
  if how == "onehot":
    return jnp.einsum("bkl,bld->bkd", jax.nn.one_hot(ids, x.shape[1], dtype=x.dtype), x)
  raise UserError(f"model.gather={how!r} is not one of {GATHERS}")


def restore_order(visible, fill_token, ids_restore, how: str = "take"):
  """Decoder input in image order: visible tokens (B, K, D) and mask tokens at hidden positions.

  Concatenating [visible, fill] reproduces the shuffled order; `ids_restore` undoes the shuffle.
  """
  b, length = ids_restore.shape
  fill = jnp.broadcast_to(fill_token.astype(visible.dtype),
                          (b, length - visible.shape[1], visible.shape[2]))
  return gather_tokens(jnp.concatenate([visible, fill], axis=1), ids_restore, how)


class Masking(NamedTuple):
  ids_keep: jax.Array     # (B, K) indices of the visible tokens, in shuffled order
  ids_restore: jax.Array  # (B, L) inverse permutation of the shuffle
  mask: jax.Array         # (B, L) 1 = masked (hidden from the encoder), 0 = visible


MASK_SAMPLINGS = ("random", "block", "grid", "centre")


def masking_from_scores(scores, mask_ratio: float) -> Masking:
  """Keeps the int(L (1 - mask_ratio)) patches of lowest score in every row of (B, L) scores."""
  batch, length = scores.shape
  len_keep = int(length * (1 - mask_ratio))
  ids_shuffle = jnp.argsort(scores, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  shuffled_mask = jnp.arange(length)[None, :] >= len_keep  # visible first, then masked
  mask = jnp.take_along_axis(jnp.broadcast_to(shuffled_mask, (batch, length)), ids_restore, 1)
  return Masking(ids_shuffle[:, :len_keep], ids_restore, mask.astype(jnp.float32))


def random_masking(rng, batch: int, length: int, mask_ratio: float) -> Masking:
  """Per-sample random masking by argsort of uniform noise (MAE, Sec. 3)."""
  return masking_from_scores(jax.random.uniform(rng, (batch, length)), mask_ratio)


def _patch_coordinates(grid: int):
  rows, cols = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing="ij")
  return rows.reshape(-1), cols.reshape(-1)


def grid_scores(rng, batch: int, grid: int, mask_ratio: float):
  """Visible first: the patches of a stride-s sub-grid at a random offset, s = round(1/sqrt(1 -
  ratio)) (2 for 0.75: one patch in four), then the rest in random order."""
  stride = max(2, int(round((1 - mask_ratio) ** -0.5)))
  k_offset, k_noise = jax.random.split(rng)
  offset = jax.random.randint(k_offset, (batch, 2), 0, stride)
  rows, cols = _patch_coordinates(grid)
  on_grid = ((rows[None] % stride == offset[:, :1]) & (cols[None] % stride == offset[:, 1:]))
  return jax.random.uniform(k_noise, (batch, grid * grid)) + jnp.where(on_grid, 0.0, 1.0)


def block_scores(rng, batch: int, grid: int, mask_ratio: float, min_patches: int = 16,
                 min_aspect: float = 0.3):
  """Masked first: patches of random rectangles (area >= min_patches, aspect in [min_aspect,
  1/min_aspect]) in the order the rectangles were drawn, then the rest in random order."""
  length = grid * grid
  quota = max(1, length - int(length * (1 - mask_ratio)))
  n_blocks = 2 * -(-quota // min_patches)
  k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(rng, 5)
  area = jax.random.uniform(k_area, (batch, n_blocks), minval=min(min_patches, quota),
                            maxval=max(min(min_patches, quota), 0.4 * quota) + 1e-3)
  log_aspect = jax.random.uniform(k_aspect, (batch, n_blocks), minval=jnp.log(min_aspect),
                                  maxval=-jnp.log(min_aspect))
  h = jnp.clip(jnp.round(jnp.sqrt(area * jnp.exp(log_aspect))), 1, grid).astype(jnp.int32)
  w = jnp.clip(jnp.round(jnp.sqrt(area / jnp.exp(log_aspect))), 1, grid).astype(jnp.int32)
  top = (jax.random.uniform(k_top, (batch, n_blocks)) * (grid - h + 1)).astype(jnp.int32)
  left = (jax.random.uniform(k_left, (batch, n_blocks)) * (grid - w + 1)).astype(jnp.int32)
  rows, cols = _patch_coordinates(grid)
  inside = ((rows[None, None] >= top[..., None]) & (rows[None, None] < (top + h)[..., None])
            & (cols[None, None] >= left[..., None]) & (cols[None, None] < (left + w)[..., None]))
  first = jnp.min(jnp.where(inside, jnp.arange(n_blocks)[None, :, None], n_blocks), axis=1)
  noise = jax.random.uniform(k_noise, (batch, length))
  return jnp.where(first < n_blocks, 2.0 + (n_blocks - first), 0.0) + noise


def centre_scores(rng, batch: int, grid: int, width: float):
  """Masked first by Gumbel-top-k on log w = -d^2 / (2 width^2): each next masked patch is drawn
  with probability proportional to w among those left."""
  rows, cols = _patch_coordinates(grid)
  half = grid / 2
  d2 = ((rows + 0.5 - half) ** 2 + (cols + 0.5 - half) ** 2) / half**2
  return -d2[None] / (2 * width**2) + jax.random.gumbel(rng, (batch, grid * grid))


def sample_masking(rng, batch: int, grid: int, mask_ratio: float, sampling: str = "random",
                   centre_width: float = 0.5) -> Masking:
  """A Masking of (batch, grid * grid) patches drawn by `sampling` (MASK_SAMPLINGS)."""
  length = grid * grid
  if sampling == "random":
    return random_masking(rng, batch, length, mask_ratio)
  if sampling == "grid":
    return masking_from_scores(grid_scores(rng, batch, grid, mask_ratio), mask_ratio)
  # "block" and "centre" score the patches to mask highest; the lowest stay visible
  scores = (block_scores(rng, batch, grid, mask_ratio) if sampling == "block"
            else centre_scores(rng, batch, grid, centre_width))
  return masking_from_scores(scores, mask_ratio)


def patchify(images, p: int):
  """(B, H, W, C) -> (B, L, p*p*C), patches in row-major order, pixels (py, px, c) inside."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c)
  return jnp.einsum("bhpwqc->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches, p: int, channels: int = 3):
  """Inverse of `patchify` for square images."""
  b, length, _ = patches.shape
  g = int(round(length**0.5))
  x = patches.reshape(b, g, g, p, p, channels)
  return jnp.einsum("bhwpqc->bhpwqc", x).reshape(b, g * p, g * p, channels)


def pixel_targets(images, p: int, norm_pix_loss: bool):
  """Patchified targets; with norm_pix_loss each patch is normalised by its mean and its
  unbiased variance (n - 1, as the reference MAE's torch `var` computes it)."""
  target = patchify(images.astype(jnp.float32), p)
  if norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def masked_mse(pred, target, mask):
  """Mean over pixels of each patch, then mean over the masked patches only."""
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAEOutput(NamedTuple):
  loss: jax.Array
  pred: jax.Array  # (B, L, p*p*C) predicted (normalised if norm_pix_loss) pixels per patch
  mask: jax.Array  # (B, L) 1 = masked


class MaskedAutoencoder(nn.Module):
  encoder: VisionTransformer
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  gather: str = "take"
  dtype: Any = jnp.float32
  mask_sampling: str = "random"  # MASK_SAMPLINGS
  centre_width: float = 0.5      # "centre": width of the masking probability, in half-sides

  def sample_masking(self, rng, batch: int) -> Masking:
    return sample_masking(rng, batch, self.encoder.grid_size, self.mask_ratio, self.mask_sampling,
                          self.centre_width)

  def setup(self):
    enc = self.encoder
    self.decoder_embed = nn.Dense(self.decoder_width, dtype=self.dtype, kernel_init=_dense_init)
    self.mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                                 (1, 1, self.decoder_width))
    self.decoder_pos_embed = jnp.asarray(
        sincos_2d_posemb(self.decoder_width, enc.grid_size))[None]
    self.decoder_blocks = make_blocks(self.decoder_depth, self.decoder_heads,
                                      4 * self.decoder_width, dtype=self.dtype,
                                      attention=enc.attention, remat=enc.remat, gelu=enc.gelu,
                                      scan=enc.scan_blocks)
    self.decoder_norm = LayerNorm(epsilon=1e-6, dtype=self.dtype)
    self.decoder_pred = nn.Dense(enc.patch_size**2 * 3, dtype=self.dtype,
                                 kernel_init=_dense_init)

  def encode_visible(self, images, masking: Masking):
    """Encoder on the visible tokens only (no mask tokens): (B, 1 + K, width)."""
    tokens = self.encoder.patch_tokens(images)
    return self.encoder.encode(gather_tokens(tokens, masking.ids_keep, self.gather))

  def decode(self, latent, masking: Masking):
    """Mask tokens fill the hidden positions; returns per-patch pixels (B, L, p*p*3)."""
    x = self.decoder_embed(latent)
    tokens = restore_order(x[:, 1:], self.mask_token, masking.ids_restore, self.gather)
    x = jnp.concatenate([x[:, :1], tokens], axis=1) + self.decoder_pos_embed.astype(x.dtype)
    x = run_blocks(self.decoder_blocks, x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # class token dropped

  def __call__(self, images, masking: Masking | None = None) -> MAEOutput:
    """images: (B, H, W, 3), already normalised. Draws the mask from the 'mask' rng if not given."""
    enc = self.encoder
    if masking is None:
      masking = self.sample_masking(self.make_rng("mask"), images.shape[0])
    pred = self.decode(self.encode_visible(images, masking), masking)
    target = pixel_targets(images, enc.patch_size, self.norm_pix_loss)
    return MAEOutput(masked_mse(pred, target, masking.mask), pred, masking.mask)


def build_mae(model_cfg, image_size: int, dtype=jnp.float32) -> MaskedAutoencoder:
  """MaskedAutoencoder from the `model` section of a pretrain config."""
  if not 0.0 < model_cfg.mask_ratio < 1.0:
    raise UserError(f"model.mask_ratio={model_cfg.mask_ratio} must lie in (0, 1)")
  sampling = model_cfg.get("mask_sampling", "random")
  if sampling not in MASK_SAMPLINGS:
    raise UserError(f"model.mask_sampling={sampling!r} is not one of {MASK_SAMPLINGS}")
  if model_cfg.get("centre_width", 0.5) <= 0:
    raise UserError(f"model.centre_width={model_cfg.centre_width} must be positive")
  if model_cfg.gather not in GATHERS:
    raise UserError(f"model.gather={model_cfg.gather!r} is not one of {GATHERS}")
  if model_cfg.decoder_width % model_cfg.decoder_heads:
    raise UserError(f"model.decoder_width={model_cfg.decoder_width} is not divisible by "
                    f"model.decoder_heads={model_cfg.decoder_heads}")
  encoder = VisionTransformer.from_variant(model_cfg.variant, image_size, dtype=dtype,
                                           attention=model_cfg.get("attention", "xla"),
                                           gelu=model_cfg.get("gelu", "exact"),
                                           remat=model_cfg.get("remat", "none"),
                                           scan_blocks=model_cfg.get("scan_blocks", False))
  return MaskedAutoencoder(
      encoder=encoder, decoder_width=model_cfg.decoder_width,
      decoder_depth=model_cfg.decoder_depth, decoder_heads=model_cfg.decoder_heads,
      mask_ratio=model_cfg.mask_ratio, norm_pix_loss=model_cfg.norm_pix_loss,
      gather=model_cfg.gather, dtype=dtype, mask_sampling=sampling,
      centre_width=float(model_cfg.get("centre_width", 0.5)))
