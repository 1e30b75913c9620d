"""AffinityNet (Ahn & Kwak, CVPR 2018): per-pixel features at output stride 8 whose L1 distances
give the inter-pixel affinities a_ij = exp(-mean_c |f_ic - f_jc|).

The trunk is the classifier's ResNet38 (the submodule `backbone`, so a classify checkpoint
initialises it); the features of b4_5, b5_2 and bn7 (all at stride 8) are each projected by a
1x1 convolution (64, 128 and 256 channels, ELU), concatenated and projected again to `dim`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wsss_jax.models.layers import conv_init
from wsss_jax.models.resnet38 import ResNet38

BRANCHES = (("b4_5", 64), ("b5_2", 128), ("bn7", 256))


class AffinityNet(nn.Module):
  """(B, H, W, 3) in [0, 1] -> (B, H/8, W/8, dim) affinity features."""
  width: float = 1.0
  dim: int = 448
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    stages = ResNet38(self.width, dtype=self.dtype, features=tuple(n for n, _ in BRANCHES),
                      name="backbone")(x, train)
    parts = [nn.elu(nn.Conv(c, (1, 1), use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                            name=f"proj_{name}")(stages[name])) for name, c in BRANCHES]
    features = nn.Conv(self.dim, (1, 1), use_bias=False, kernel_init=conv_init,
                       dtype=self.dtype, name="proj")(jnp.concatenate(parts, -1))
    return features.astype(jnp.float32)
