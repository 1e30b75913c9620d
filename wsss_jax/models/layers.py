"""Small pieces shared by the convolutional networks."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# PyTorch's BatchNorm2d: running stats updated with weight 0.1 (flax momentum 0.9), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # He, fan-out


def batch_norm(use_running_average: bool, dtype: Any = jnp.float32):
  return functools.partial(nn.BatchNorm, use_running_average=use_running_average,
                           momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype)


def conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, dtype=jnp.float32,
         name: str | None = None) -> nn.Conv:
  """Bias-free convolution with PyTorch's symmetric padding (dilation * (kernel - 1) / 2)."""
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                 use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


def feature_key(name: str) -> str:
  """Collection key of the named feature `name` (distinct from the module of the same name)."""
  return f"{name}_features"


def named_feature(module: nn.Module, name: str, x):
  """Makes `x` addressable by name for relevance maps: sown into `intermediates` and open to
  `perturbations` (whose gradient is the gradient with respect to `x`), both under
  `feature_key(name)`. `init` creates no perturbation: callers ask for them with
  `apply(..., mutable=["perturbations"])`, so the variables of a fresh model stay params and
  batch statistics only."""
  if not module.is_initializing():
    x = module.perturb(feature_key(name), x)
  module.sow("intermediates", feature_key(name), x)
  return x
