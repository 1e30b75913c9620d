"""Small pieces shared by the convolutional networks."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

# PyTorch's BatchNorm2d: running stats updated with weight 0.1 (flax momentum 0.9), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # He, fan-out


def batch_norm(use_running_average: bool, dtype: Any = jnp.float32):
  return functools.partial(nn.BatchNorm, use_running_average=use_running_average,
                           momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype)


# On the CPU: 1x1 convolutions as matmuls, and LRP's pull to the pixels over space-to-depth
# blocks (read when a model is traced; benchmarks/cpu_convs.py compares both settings)
CPU_CONV_REWRITES = True
_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                     out_spec=(0, 3, 1, 2))


def _cpu_nhwc(rhs, lhs_dilation, dimension_numbers, feature_group_count) -> bool:
  """On the CPU with the rewrites on: a 2-D NHWC / HWIO convolution without input dilation or
  groups."""
  return (CPU_CONV_REWRITES and jax.default_backend() == "cpu" and rhs.ndim == 4
          and feature_group_count == 1 and dimension_numbers == _NHWC
          and all(d == 1 for d in (lhs_dilation or ())))


def _rewritable(rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count) -> bool:
  """As _cpu_nhwc, and without kernel dilation."""
  return (_cpu_nhwc(rhs, lhs_dilation, dimension_numbers, feature_group_count)
          and all(d == 1 for d in (rhs_dilation or ())))


def _unpadded_1x1(rhs, padding) -> bool:
  """A 1x1 kernel without padding: a strided matmul."""
  return rhs.shape[:2] == (1, 1) and (padding in ("VALID", "SAME")
                                      or all(tuple(p) == (0, 0) for p in padding))


def space_to_depth_conv(lhs, rhs, window_strides, padding, precision=None):
  """A stride-s convolution as a stride-1 one: blocks of s x s pixels become channels and the
  kernel, padded with zeros to a multiple of s, is cut the same way (y[o] = sum_a sum_i
  x[(o + a) s + i] w[a s + i]). Its input gradient is then an ordinary convolution, not one over
  a zero-dilated input."""
  (pt, pb), (pl, pr) = padding
  sh, sw = window_strides
  kh, kw = rhs.shape[:2]
  b, h, w, c = lhs.shape
  oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  ah, aw = -(-kh // sh), -(-kw // sw)  # kernel size in blocks
  hb, wb = oh + ah - 1, ow + aw - 1    # input size in blocks that the output reads
  x = jnp.pad(lhs, ((0, 0), (pt, max(hb * sh - h - pt, 0)), (pl, max(wb * sw - w - pl, 0)),
                    (0, 0)))[:, :hb * sh, :wb * sw]
  x = x.reshape(b, hb, sh, wb, sw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hb, wb, sh * sw * c)
  k = jnp.pad(rhs, ((0, ah * sh - kh), (0, aw * sw - kw), (0, 0), (0, 0)))
  k = k.reshape(ah, sh, aw, sw, c, -1).transpose(0, 2, 1, 3, 4, 5).reshape(ah, aw, sh * sw * c, -1)
  return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=_NHWC,
                                      precision=precision)


# On the CPU: the kernel gradient of wide stride-1 convolutions over large maps as one matmul
# (the transpose of _kernel_tangent). XLA:CPU's ran ResNet38's b7 3x3 (1024 -> 2048, dilation
# 4, 28x28) at 36-55 GFLOP/s, the matmul at 126-129; ResNet38's train step 1.12x
# (BENCHMARKS.md). Narrower layers or smaller maps were slower as a matmul (ResNet-50's 7x7
# layer4: step 0.97x; an ASPP branch 2048 -> 256 at dilation 12: 200 -> 243 ms).
CPU_KERNEL_GRAD_MATMUL = True
KERNEL_GRAD_MIN_CHANNELS = 512
KERNEL_GRAD_MIN_PIXELS = 28 * 28


def _wide_stride1(lhs, rhs, window_strides, padding, lhs_dilation, dimension_numbers,
                  feature_group_count) -> bool:
  """On the CPU: a stride-1 NHWC / HWIO k x k convolution (k > 1, any dilation) with explicit
  padding, at least KERNEL_GRAD_MIN_CHANNELS channels in and out, on KERNEL_GRAD_MIN_PIXELS."""
  return (CPU_KERNEL_GRAD_MATMUL
          and _cpu_nhwc(rhs, lhs_dilation, dimension_numbers, feature_group_count)
          and rhs.shape[:2] != (1, 1) and all(s == 1 for s in window_strides)
          and not isinstance(padding, str)
          and min(rhs.shape[2:]) >= KERNEL_GRAD_MIN_CHANNELS
          and lhs.ndim == 4 and lhs.shape[1] * lhs.shape[2] >= KERNEL_GRAD_MIN_PIXELS)


def shifted_columns(lhs, kernel_shape, padding, rhs_dilation):
  """The padded input's k x k shifted views of a stride-1 convolution, channel-major:
  (k k C, N H W) for an H x W output (im2col, transposed), and (N, H, W)."""
  kh, kw, c, _ = kernel_shape
  dh, dw = rhs_dilation
  x = jnp.transpose(jnp.pad(lhs, ((0, 0), *padding, (0, 0))), (3, 0, 1, 2))  # (C, N, Hp, Wp)
  n, h, w = x.shape[1], x.shape[2] - dh * (kh - 1), x.shape[3] - dw * (kw - 1)
  cols = jnp.stack([x[:, :, i * dh:i * dh + h, j * dw:j * dw + w]
                    for i in range(kh) for j in range(kw)])
  return cols.reshape(kh * kw * c, n * h * w), (n, h, w)


def _stride1_conv(lhs, rhs, padding, rhs_dilation, precision):
  return jax.lax.conv_general_dilated(lhs, rhs, (1, 1), padding, rhs_dilation=rhs_dilation,
                                      dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))  # columns rebuilt in the backward pass
def _kernel_tangent(lhs, drhs, padding, rhs_dilation):
  """conv(x, dW) as the shifted columns times dW. It is linear in dW, and its transpose is the
  kernel gradient as one matmul of the columns (k k C, N H W) with the output cotangent g
  (N H W, O): dW[i, j, c, o] = sum over pixels of x_pad[n, y + i d, x + j d, c] g[n, y, x, o]."""
  cols, (n, h, w) = shifted_columns(lhs, drhs.shape, padding, rhs_dilation)
  out = jnp.einsum("kp,ko->po", cols, drhs.reshape(-1, drhs.shape[-1]),
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(n, h, w, drhs.shape[-1])


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_kernel_grad(lhs, rhs, padding, rhs_dilation, precision):
  return _stride1_conv(lhs, rhs, padding, rhs_dilation, precision)


def _conv_matmul_kernel_grad_jvp(padding, rhs_dilation, precision, primals, tangents):
  """d conv = conv(dx, W) + conv(x, dW). The first term transposes to XLA's input gradient, the
  second (_kernel_tangent) to the kernel-gradient matmul. Forward mode (jvp, jacfwd) works too.
  A zero tangent (symbolic) adds no term, so a vjp in x alone (LRP) computes no kernel term."""
  lhs, rhs = primals
  dlhs, drhs = tangents
  out = _stride1_conv(lhs, rhs, padding, rhs_dilation, precision)
  terms = []
  if not isinstance(dlhs, SymbolicZero):
    terms.append(_stride1_conv(dlhs, rhs, padding, rhs_dilation, precision))
  if not isinstance(drhs, SymbolicZero):
    terms.append(_kernel_tangent(lhs, drhs, padding, rhs_dilation))
  return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


_conv_matmul_kernel_grad.defjvp(_conv_matmul_kernel_grad_jvp, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None):
  """lax.conv_general_dilated, except that on the CPU a 1x1 convolution runs as a strided slice
  and a matmul: XLA:CPU's convolution kernel ran ResNet-50's 1x1 layers at 28-67 GFLOP/s and
  their input gradients at 28-47 on the 2-core machine, the same products as a dot at 52-114
  (BENCHMARKS.md). Wide stride-1 k x k convolutions on large maps keep XLA's forward and input
  gradient and take their kernel gradient as one matmul (_conv_matmul_kernel_grad). Same
  parameters, same values; GPUs and TPUs keep the convolution."""
  if _wide_stride1(lhs, rhs, window_strides, padding, lhs_dilation, dimension_numbers,
                   feature_group_count):
    return _conv_matmul_kernel_grad(lhs, rhs, tuple(tuple(p) for p in padding),
                                    tuple(rhs_dilation or (1, 1)), precision)
  if _rewritable(rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                 feature_group_count) and _unpadded_1x1(rhs, padding):
    sh, sw = window_strides
    return jnp.einsum("nhwc,co->nhwo", lhs[:, ::sh, ::sw], rhs[0, 0], precision=precision)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision)


def conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, dtype=jnp.float32,
         name: str | None = None) -> nn.Conv:
  """Bias-free convolution with PyTorch's symmetric padding (dilation * (kernel - 1) / 2)."""
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                 use_bias=False, kernel_init=conv_init, dtype=dtype, name=name,
                 conv_general_dilated=conv_general_dilated)


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


def conv_blocked_input_grad(lhs, rhs, window_strides, padding, lhs_dilation=None,
                            rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                            precision=None):
  """conv_general_dilated whose input gradient, for a strided convolution on the CPU, is taken
  through `space_to_depth_conv` (an ordinary convolution) instead of XLA's convolution over a
  zero-dilated input, which ran ResNet-50's 7x7 stride-2 stem backwards at 0.2x the rate (LRP's
  pull to the pixels; BENCHMARKS.md). The forward pass and the kernel gradient are XLA's."""
  if not (_rewritable(rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
          and any(st > 1 for st in window_strides) and not isinstance(padding, str)):
    return conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, precision)
  strides, pad = tuple(window_strides), tuple(tuple(p) for p in padding)

  def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, strides, pad, dimension_numbers=_NHWC,
                                        precision=precision)

  @jax.custom_vjp
  def conv(x, w):
    return xla(x, w)

  def backward(saved, ct):
    x, w = saved
    dx = jax.vjp(lambda v: space_to_depth_conv(v, w, strides, pad, precision), x)[1](ct)[0]
    return dx, jax.vjp(lambda u: xla(x, u), w)[1](ct)[0]

  conv.defvjp(lambda x, w: (xla(x, w), (x, w)), backward)
  return conv(lhs, rhs)


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
