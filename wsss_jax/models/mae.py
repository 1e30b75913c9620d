"""Masked autoencoder (He et al. 2022): ViT encoder on visible patches, light decoder on all.

Masking is per sample: argsort of uniform noise, keep the first int(L * (1 - mask_ratio)) tokens
(the same exact count in every sample), and the argsort of that shuffle (`ids_restore`) puts the
decoder's tokens back in image order. The loss is the pixel MSE on masked patches only.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from wsss_jax.errors import UserError
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


def random_masking(rng, batch: int, length: int, mask_ratio: float) -> Masking:
  """Per-sample random masking by argsort of uniform noise (MAE, Sec. 3)."""
  len_keep = int(length * (1 - mask_ratio))
  noise = jax.random.uniform(rng, (batch, length))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  shuffled_mask = jnp.arange(length)[None, :] >= len_keep  # visible first, then masked
  mask = jnp.take_along_axis(jnp.broadcast_to(shuffled_mask, (batch, length)), ids_restore, 1)
  return Masking(ids_shuffle[:, :len_keep], ids_restore, mask.astype(jnp.float32))


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
  """Patchified targets; with norm_pix_loss each patch is normalised by its mean and variance."""
  target = patchify(images.astype(jnp.float32), p)
  if norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True)
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

  def setup(self):
    enc = self.encoder
    self.decoder_embed = nn.Dense(self.decoder_width, dtype=self.dtype, kernel_init=_dense_init)
    self.mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                                 (1, 1, self.decoder_width))
    self.decoder_pos_embed = jnp.asarray(
        sincos_2d_posemb(self.decoder_width, enc.grid_size))[None]
    self.decoder_blocks = make_blocks(self.decoder_depth, self.decoder_heads,
                                      4 * self.decoder_width, dtype=self.dtype,
                                      attention=enc.attention, remat=enc.remat,
                                      scan=enc.scan_blocks)
    self.decoder_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)
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
    length = enc.grid_size**2
    if masking is None:
      masking = random_masking(self.make_rng("mask"), images.shape[0], length, self.mask_ratio)
    pred = self.decode(self.encode_visible(images, masking), masking)
    target = pixel_targets(images, enc.patch_size, self.norm_pix_loss)
    return MAEOutput(masked_mse(pred, target, masking.mask), pred, masking.mask)


def build_mae(model_cfg, image_size: int, dtype=jnp.float32) -> MaskedAutoencoder:
  """MaskedAutoencoder from the `model` section of a pretrain config."""
  if not 0.0 < model_cfg.mask_ratio < 1.0:
    raise UserError(f"model.mask_ratio={model_cfg.mask_ratio} must lie in (0, 1)")
  if model_cfg.gather not in GATHERS:
    raise UserError(f"model.gather={model_cfg.gather!r} is not one of {GATHERS}")
  if model_cfg.decoder_width % model_cfg.decoder_heads:
    raise UserError(f"model.decoder_width={model_cfg.decoder_width} is not divisible by "
                    f"model.decoder_heads={model_cfg.decoder_heads}")
  encoder = VisionTransformer.from_variant(model_cfg.variant, image_size, dtype=dtype,
                                           attention=model_cfg.get("attention", "xla"),
                                           remat=model_cfg.get("remat", "none"),
                                           scan_blocks=model_cfg.get("scan_blocks", False))
  return MaskedAutoencoder(
      encoder=encoder, decoder_width=model_cfg.decoder_width,
      decoder_depth=model_cfg.decoder_depth, decoder_heads=model_cfg.decoder_heads,
      mask_ratio=model_cfg.mask_ratio, norm_pix_loss=model_cfg.norm_pix_loss,
      gather=model_cfg.gather, dtype=dtype)
