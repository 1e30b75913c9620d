"""Convolution kernels for the CPU, apart from the models that use them.

XLA:CPU's convolution kernels are slow on some shapes the networks use; on the CPU these
rewrites compute the same values another way (1x1 convolutions as matmuls, the kernel gradient
of wide stride-1 convolutions as one matmul, LRP's pull to the pixels over space-to-depth
blocks). Which kernels run is the config field `kernels` ("rewrite", the default, or "xla":
XLA's own everywhere), set for a run by `selected_kernels`; it is read when a model is traced.
GPUs and TPUs always use XLA's convolutions. Their measured speed: BENCHMARKS.md, "CPU
convolution rewrites" (`python -m benchmarks.cpu_convs` compares both settings).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from wsss_jax.errors import UserError

KERNELS = ("rewrite", "xla")
_SELECTED = contextvars.ContextVar("wsss_jax_kernels", default="rewrite")


def selected() -> str:
  """The kernels in force where a model is being traced."""
  return _SELECTED.get()


@contextlib.contextmanager
def selected_kernels(kernels: str):
  """Runs the block with `kernels` ("rewrite" or "xla")."""
  if kernels not in KERNELS:
    raise UserError(f"kernels={kernels!r} is not one of {KERNELS}")
  token = _SELECTED.set(kernels)
  try:
    yield
  finally:
    _SELECTED.reset(token)




_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                     out_spec=(0, 3, 1, 2))


def _cpu_nhwc(rhs, lhs_dilation, dimension_numbers, feature_group_count) -> bool:
  """On the CPU with the rewrites on: a 2-D NHWC / HWIO convolution without input dilation or
  groups."""
  return (selected() == "rewrite" and jax.default_backend() == "cpu" and rhs.ndim == 4
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


# The kernel gradient of a wide stride-1 convolution over a large map as one matmul (the
# transpose of _kernel_tangent): only from these sizes on was it faster than XLA:CPU's own;
# narrower layers and smaller maps stay convolutions (BENCHMARKS.md, "CPU convolution rewrites").
KERNEL_GRAD_MIN_CHANNELS = 512


KERNEL_GRAD_MIN_PIXELS = 28 * 28


def _wide_stride1(lhs, rhs, window_strides, padding, lhs_dilation, dimension_numbers,
                  feature_group_count) -> bool:
  """On the CPU: a stride-1 NHWC / HWIO k x k convolution (k > 1, any dilation) with explicit
  padding, at least KERNEL_GRAD_MIN_CHANNELS channels in and out, on KERNEL_GRAD_MIN_PIXELS."""
  return (_cpu_nhwc(rhs, lhs_dilation, dimension_numbers, feature_group_count)
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
  """lax.conv_general_dilated, except that on the CPU (kernels "rewrite") a 1x1 convolution runs
  as a strided slice and a matmul, which XLA:CPU runs faster than its convolution kernel, and
  wide stride-1 k x k convolutions on large maps keep XLA's forward and input gradient but take
  their kernel gradient as one matmul (_conv_matmul_kernel_grad). Same parameters, same values;
  GPUs and TPUs keep the convolution."""
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


def conv_blocked_input_grad(lhs, rhs, window_strides, padding, lhs_dilation=None,
                            rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                            precision=None):
  """conv_general_dilated whose input gradient, for a strided convolution on the CPU, is taken
  through `space_to_depth_conv` (an ordinary convolution) instead of XLA's convolution over a
  zero-dilated input, which XLA:CPU runs far slower (LRP's pull to the pixels). The forward
  pass and the kernel gradient are XLA's."""
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
