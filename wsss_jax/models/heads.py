"""Multi-label classification heads and Progressive Dropout Attention (PDA, Han et al. 2022)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models.layers import LayerNorm


def progressive_dropout_attention(features, cams, mu):
  """PDA: features * mean_k(M_k with M_k > mu * max_hw M_k zeroed), M_k = ReLU(cams_k).

  features (B, H, W, C); cams (B, H, W, K) = the head's 1x1 conv applied to `features`; mu a scalar.
  """
  cams = jax.nn.relu(cams)
  beta = mu * cams.max(axis=(1, 2), keepdims=True)        # beta_k = mu * max_hw(M_k)
  dropped = jnp.where(cams > beta, jnp.zeros_like(cams), cams)
  return features * dropped.mean(axis=-1, keepdims=True)  # A = mean over the K classes


class MultiLabelHead(nn.Module):
  """Dropout2d(0.5), global average pooling, bias-free 1x1 conv `fc8` to K classes.

  With `mu` given and `pda_active` true, PDA reweights the feature map first, its class maps taken
  from the same `fc8` kernel (as the authors' code does). `fc8` applied to the feature map is the
  CAM; applied to the pooled features it gives the logits (pooling and a 1x1 conv commute).
  """
  num_classes: int
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool = False, mu=None, pda_active=False):
    fc8 = nn.Conv(self.num_classes, (1, 1), use_bias=False, dtype=self.dtype,
                  kernel_init=nn.initializers.xavier_uniform(), name="fc8")
    if mu is not None:
      attended = progressive_dropout_attention(features, fc8(features), mu)
      features = jnp.where(pda_active, attended, features)
    if self.is_mutable_collection("intermediates"):  # class maps for map-level losses (SEAM)
      self.sow("intermediates", "cam", fc8(features).astype(jnp.float32))
    features = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(features)
    pooled = features.mean(axis=(1, 2), keepdims=True)
    return fc8(pooled).reshape(features.shape[0], self.num_classes).astype(jnp.float32)


class TokenHead(nn.Module):
  """ViT head as in the MAE fine-tuning and linear-probing recipes.

  pool='gap': mean of the patch tokens (class token excluded) then LayerNorm `fc_norm`;
  pool='cls': the class token (the encoder's final LayerNorm already applied).
  linear_probe: BatchNorm without affine parameters before the linear head.
  """
  num_classes: int
  pool: str = "gap"
  linear_probe: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    if self.pool == "gap":
      x = LayerNorm(epsilon=1e-6, dtype=self.dtype, name="fc_norm")(tokens[:, 1:].mean(1))
    else:
      x = tokens[:, 0]
    if self.linear_probe:
      x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                       momentum=0.9, epsilon=1e-6, dtype=self.dtype, name="head_norm")(x)
    head = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                    kernel_init=nn.initializers.truncated_normal(2e-5 if not self.linear_probe
                                                                 else 0.01))
    return head(x).astype(jnp.float32)
