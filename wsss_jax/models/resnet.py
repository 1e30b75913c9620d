"""ResNet-50 / ResNet-101 v1.5 (He et al. 2016; stride on the 3x3 conv, as torchvision) with BN.

`output_stride` 32 (classification), 16 or 8 replaces the stride of the last stage(s) by
dilation, as torchvision's `replace_stride_with_dilation` and DeepLab do: the first block of a
dilated stage keeps the previous dilation in its 3x3 conv. `multi_grid` scales the dilation of
the last stage's blocks (DeepLabV3's (1, 2, 4)), its first block included. The stem output and `layer1`..`layer4` are named
features. Parameter names follow torchvision (`layer3_2/conv1`, `downsample_conv`, ...).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wsss_jax.errors import UserError
from wsss_jax.models.layers import ResidualBlock, batch_norm, conv, max_pool, named_feature

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
FEATURES = ("stem", "layer1", "layer2", "layer3", "layer4")


class Bottleneck(ResidualBlock, kw_only=True):
  planes: int
  stride: int = 1
  dilation: int = 1
  first_dilation: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = self.norm(train)
    out = 4 * self.planes
    y = nn.relu(norm(name="bn1")(conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)))
    y = conv(self.planes, 3, self.stride, self.first_dilation, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = norm(name="bn3")(conv(out, 1, dtype=self.dtype, name="conv3")(y))
    if x.shape[-1] != out or self.stride != 1:
      x = conv(out, 1, self.stride, dtype=self.dtype, name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(x + y)


def stage_plan(output_stride: int):
  """(stride, dilation) of layer1..layer4 for an output stride of 32, 16 or 8."""
  plans = {32: ((1, 1), (2, 1), (2, 1), (2, 1)), 16: ((1, 1), (2, 1), (2, 1), (1, 2)),
           8: ((1, 1), (2, 1), (1, 2), (1, 4))}
  if output_stride not in plans:
    raise UserError(f"model.output_stride={output_stride} must be 8, 16 or 32")
  return plans[output_stride]


class ResNet(nn.Module):
  """(B, H, W, 3) -> layer4 features (B, H/os, W/os, 2048 * width)."""
  depth: int = 50
  output_stride: int = 32
  multi_grid: tuple = (1, 1, 1)
  width: float = 1.0
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  features: tuple = ()  # names from FEATURES: return {name: feature} instead of layer4

  @property
  def stem_names(self):
    """The stem and the first stage: what the 'freeze_stem' option freezes."""
    return ("conv1", "bn1", *(f"layer1_{i}" for i in range(DEPTHS[self.depth][0])))

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in DEPTHS:
      raise UserError(f"model.depth={self.depth} must be one of {sorted(DEPTHS)}")
    c = lambda n: max(1, int(round(n * self.width)))  # noqa: E731
    norm = batch_norm(not train or self.frozen_bn, self.dtype)
    x = conv(c(64), 7, 2, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
    x = nn.relu(norm(name="bn1")(x))
    x = named_feature(self, "stem", x)
    out = {"stem": x}
    x = max_pool(x, 3, 2, 1)  # its derivative: the window winners, found once
    previous_dilation = 1
    for s, (blocks, (stride, dilation)) in enumerate(zip(DEPTHS[self.depth],
                                                         stage_plan(self.output_stride))):
      grid = self.multi_grid if s == 3 else (1,) * blocks
      for i in range(blocks):
        rate = dilation * grid[i % len(grid)]
        # torchvision: a dilated stage's first block keeps the previous dilation; DeepLab's
        # multi-grid sets every block of the last stage, the first included.
        multi_grid = s == 3 and tuple(self.multi_grid) != (1, 1, 1)
        first = previous_dilation if i == 0 and not multi_grid else rate
        x = Bottleneck(planes=c(64 * 2**s), stride=stride if i == 0 else 1, dilation=rate,
                       first_dilation=first, frozen_bn=self.frozen_bn, dtype=self.dtype,
                       name=f"layer{s + 1}_{i}")(x, train)
      previous_dilation = dilation
      x = named_feature(self, f"layer{s + 1}", x)
      out[f"layer{s + 1}"] = x
    return {name: out[name] for name in self.features} if self.features else x
