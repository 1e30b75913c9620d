"""Small pieces shared by the convolutional networks."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.device import kernels

# PyTorch's BatchNorm2d: running stats updated with weight 0.1 (flax momentum 0.9), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # He, fan-out


def batch_norm(use_running_average: bool, dtype: Any = jnp.float32):
  return functools.partial(nn.BatchNorm, use_running_average=use_running_average,
                           momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype)


class ResidualBlock(nn.Module):
  """What every residual block of the CNNs shares: BatchNorm that can be frozen (running
  statistics and affine kept) and the compute dtype. Subclasses declare `kw_only=True` so their
  own fields may come without defaults."""
  frozen_bn: bool = False
  dtype: Any = jnp.float32

  def norm(self, train: bool):
    """The block's BatchNorm: batch statistics only while training an unfrozen block."""
    return batch_norm(not train or self.frozen_bn, self.dtype)




# --- LayerNorm that keeps 16-bit activations 16-bit -------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon: float):
  """y = (x - mean) / sqrt(var + epsilon) * scale + bias over the last axis, statistics in f32,
  y in x's dtype. Its gradient keeps only x (alive anyway as the block's input) and the per-token
  mean and 1 / std: autodiff of the same formula saves f32 copies of the normalised activations,
  tensors twice the size of a bf16 activation written and read again."""
  return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_forward(x, scale, bias, epsilon):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + epsilon)
  y = (x32 - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype), (x, mean, rstd, scale)


def _layer_norm_backward(epsilon, residuals, g):
  x, mean, rstd, scale = residuals
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  g = g.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  d_scale, d_bias = (g * x_hat).sum(axes), g.sum(axes)
  gx = g * scale.astype(jnp.float32)
  # d/dx of the normalisation: rstd (gx - mean(gx) - x_hat mean(gx x_hat))
  dx = rstd * (gx - gx.mean(-1, keepdims=True) - x_hat * (gx * x_hat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nn.LayerNorm):
  """flax's LayerNorm (same parameters, `scale` and `bias`), computed by `layer_norm` when the
  activations are 16-bit; in float32 flax's own (the PyTorch-parity path)."""

  @nn.compact
  def __call__(self, x, *args, **kwargs):
    if jnp.dtype(self.dtype or x.dtype).itemsize != 2:
      return super().__call__(x, *args, **kwargs)
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
    return layer_norm(x.astype(self.dtype), scale, bias, self.epsilon)


def conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, dtype=jnp.float32,
         name: str | None = None) -> nn.Conv:
  """Bias-free convolution with PyTorch's symmetric padding (dilation * (kernel - 1) / 2)."""
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                 use_bias=False, kernel_init=conv_init, dtype=dtype, name=name,
                 conv_general_dilated=kernels.conv_general_dilated)


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


def _pool_windows(x, window, stride, pad, fill):
  """The window's offsets as strided views of the input padded with `fill`."""
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=fill)
  oh = (x.shape[1] + 2 * pad - window) // stride + 1
  ow = (x.shape[2] + 2 * pad - window) // stride + 1
  return [xp[:, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
          for dy in range(window) for dx in range(window)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: int, stride: int, pad: int):
  """nn.max_pool (NHWC, -inf padding) whose derivative is built from the window's winners (the
  first maximum, as XLA's select-and-scatter picks) found once from the input. The same
  derivative as XLA's, but a backward pass vmapped over many cotangents (relevance maps: one per
  class) then costs a few strided slices each. XLA's own batched rule recomputes the argmax per
  cotangent with five index arrays of the input's size."""
  return nn.max_pool(x, (window, window), (stride, stride), padding=((pad, pad), (pad, pad)))


@max_pool.defjvp
def _max_pool_jvp(window, stride, pad, primals, tangents):
  (x,), (t,) = primals, tangents
  y = max_pool(x, window, stride, pad)
  taken = jnp.zeros(y.shape, bool)
  out = jnp.zeros(y.shape, t.dtype)
  for view, t_view in zip(_pool_windows(x, window, stride, pad, -jnp.inf),
                          _pool_windows(t, window, stride, pad, 0)):
    winner = (view == y) & ~taken  # the first offset that holds the maximum
    taken = taken | winner
    out = out + jnp.where(winner, t_view, 0)
  return y, out
