"""Transformer maps: class-token attention, attention rollout, gradient-weighted attention.

They read the attention weights (B, heads, N, N) that every ViT block names (`attn/attention`);
Grad-CAM and the rest of the CAM family work on ViT tokens through `core.spatial`. AttnLRP's
rewrites of the ViT's modules live in `lrp.py` with the other rules.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.errors import UserError
from wsss_jax.relevance import core

TOKENS = ("cls", "mean")


def attention_layers(layers: core.Layers, method: str) -> list[str]:
  names = layers.attention_layers()
  if not names:
    raise UserError(f"method {method!r} needs a transformer: this model names no attention "
                    f"weights (a CNN?); use a CAM method or LRP")
  return names


def query_row(matrix, token: str):
  """The relevance of every patch for the class token's row (or the mean patch row): (..., N, N)
  -> (..., g, g)."""
  if token == "cls":
    row = matrix[..., 0, 1:]
  else:
    row = matrix[..., 1:, 1:].mean(axis=-2)
  return core.token_grid(row[..., None])[..., 0]


def _per_class(maps, k: int):
  return jnp.broadcast_to(maps[:, None], (maps.shape[0], k) + maps.shape[1:])


def attention(ctx: core.Context, head: int | None = None, token: str = "cls"):
  """The last block's attention from the class token to the patches, averaged over heads or of
  head `head`. Class-agnostic: the same map for every class."""
  core.check_choice("token", token, TOKENS)
  last = attention_layers(ctx.layers, "attention")[-1]
  _, features, _ = core.forward(ctx.apply_fn, ctx.variables, ctx.images, ctx.layers, {})
  weights = features[last].astype(jnp.float32)  # (B, heads, N, N)
  if head is None:
    weights = weights.mean(axis=1)
  else:
    if not 0 <= head < weights.shape[1]:
      raise UserError(f"head={head} is out of range: the model has {weights.shape[1]} heads")
    weights = weights[:, head]
  return {last: _per_class(query_row(weights, token), len(ctx.classes))}


def fuse_heads(weights, how: str):
  core.check_choice("head_fusion", how, ("mean", "max", "min"))
  return getattr(weights, how)(axis=1)


def rollout(ctx: core.Context, head_fusion: str = "mean", discard_ratio: float = 0.0,
            token: str = "cls"):
  """Attention rollout (Abnar and Zuidema 2020): A' = rows-normalised (fused A + I), the product
  A'_L ... A'_1, read at the class token's row. `discard_ratio` zeroes that fraction of the
  smallest fused weights of each row first (the class token's column is kept)."""
  core.check_choice("token", token, TOKENS)
  names = attention_layers(ctx.layers, "rollout")
  _, features, _ = core.forward(ctx.apply_fn, ctx.variables, ctx.images, ctx.layers, {})
  result = None
  for name in names:
    a = fuse_heads(features[name].astype(jnp.float32), head_fusion)  # (B, N, N)
    if discard_ratio > 0:
      n = a.shape[-1]
      cut = jnp.sort(a, axis=-1)[..., int(discard_ratio * n)][..., None]
      a = jnp.where((a < cut) & (jnp.arange(n) != 0), 0.0, a)
    a = a + jnp.eye(a.shape[-1])
    a = a / a.sum(axis=-1, keepdims=True)
    result = a if result is None else a @ result
  return {names[-1]: _per_class(query_row(result, token), len(ctx.classes))}


def chefer(ctx: core.Context, token: str = "cls"):
  """Gradient-weighted attention relevance (Chefer et al. 2021, generic attention
  explainability): R = I; per block R <- R + mean_heads((dy_k/dA * A)^+) R; read at the class
  token's row. Class-specific: all classes' gradients from one vmapped vjp."""
  core.check_choice("token", token, TOKENS)
  names = attention_layers(ctx.layers, "chefer")
  _, features, _, grads = core.class_gradients(
      ctx.apply_fn, ctx.variables, ctx.images, ctx.layers, names, ctx.classes, ctx.target)
  relevance = None
  for name in names:
    a = features[name].astype(jnp.float32)[None]  # (1, B, heads, N, N)
    abar = jax.nn.relu(grads[name] * a).mean(axis=2)  # (K, B, N, N)
    if relevance is None:
      relevance = jnp.broadcast_to(jnp.eye(abar.shape[-1]), abar.shape)
    relevance = relevance + abar @ relevance
  return {names[-1]: jnp.moveaxis(query_row(relevance, token), 0, 1)}
