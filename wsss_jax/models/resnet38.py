"""ResNet38 ("Wider or Deeper", Wu et al. 2019, model A) as used for multi-layer pseudo-supervision.

Pre-activation blocks (BN, ReLU, conv); conv1a 64; stages of 128, 256, 512 channels with stride 2;
b5 512 -> 1024 with dilation 2; bottleneck blocks b6 (2048, dropout 0.3) and b7 (4096, dropout 0.5)
with dilation 4; bn7 = ReLU(BN(x)). Output stride 8: 224 -> 28 x 28.

The features `b4_5`, `b5_2` and `bn7` are named (`layers.named_feature`). Parameter names follow
the PyTorch release (`b4_5/conv_branch2a`, `bn7`, ...) so converted weights map one to one.
`width` scales every channel count (1.0 is the paper's network; smaller values give test- and
laptop-sized models).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wsss_jax.models.layers import ResidualBlock, batch_norm, conv, named_feature

FEATURES = ("b4_5", "b5_2", "bn7")  # named for relevance maps
STAGE_OUTPUTS = ("b2_2", "b3_2", "b4_5", "b5_2", "bn7")  # what `features` may ask for


class ResBlock(ResidualBlock, kw_only=True):
  """Pre-activation basic block: two 3x3 convolutions; a 1x1 projection when the shape changes."""
  mid: int
  out: int
  stride: int = 1
  dilation: int = 1
  first_dilation: int | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = self.norm(train)
    first = self.dilation if self.first_dilation is None else self.first_dilation
    y = nn.relu(norm(name="bn_branch2a")(x))
    shortcut = x
    if x.shape[-1] != self.out or self.stride != 1:
      shortcut = conv(self.out, 1, self.stride, dtype=self.dtype, name="conv_branch1")(y)
    y = conv(self.mid, 3, self.stride, first, dtype=self.dtype, name="conv_branch2a")(y)
    y = nn.relu(norm(name="bn_branch2b1")(y))
    y = conv(self.out, 3, 1, self.dilation, dtype=self.dtype, name="conv_branch2b1")(y)
    return shortcut + y


class BottleneckBlock(ResidualBlock, kw_only=True):
  """Pre-activation bottleneck: 1x1 to out/4, 3x3 to out/2, 1x1 to out, channel dropout inside."""
  out: int
  dilation: int = 1
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    norm = self.norm(train)
    drop = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)  # Dropout2d
    y = nn.relu(norm(name="bn_branch2a")(x))
    shortcut = conv(self.out, 1, dtype=self.dtype, name="conv_branch1")(y)
    y = conv(self.out // 4, 1, dtype=self.dtype, name="conv_branch2a")(y)
    y = drop(nn.relu(norm(name="bn_branch2b1")(y)))
    y = conv(self.out // 2, 3, 1, self.dilation, dtype=self.dtype, name="conv_branch2b1")(y)
    y = drop(nn.relu(norm(name="bn_branch2b2")(y)))
    y = conv(self.out, 1, dtype=self.dtype, name="conv_branch2b2")(y)
    return shortcut + y


class ResNet38(nn.Module):
  """(B, H, W, 3) -> ReLU(bn7) features (B, H/8, W/8, 4096 * width)."""
  width: float = 1.0
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  features: tuple = ()  # names from STAGE_OUTPUTS: return {name: feature} instead of bn7
  last_dilation: int = 4  # b7's; other rates on the same weights give multi-dilation maps

  # stage name prefix -> (blocks, mid, out, stride, dilation, first_dilation)
  STAGES = (("b2", 3, 128, 128, 2, 1, None), ("b3", 3, 256, 256, 2, 1, None),
            ("b4", 6, 512, 512, 2, 1, None), ("b5", 3, 512, 1024, 1, 2, 1))

  @property
  def stem_names(self):
    """conv1a and the first stage: frozen in the authors' recipe."""
    return ("conv1a", "b2", "b2_1", "b2_2")

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = lambda n: max(1, int(round(n * self.width)))  # noqa: E731
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    x = conv(c(64), 3, dtype=self.dtype, name="conv1a")(x.astype(self.dtype))
    outputs = {}
    for prefix, blocks, mid, out, stride, dilation, first in self.STAGES:
      for i in range(blocks):
        name = prefix if i == 0 else f"{prefix}_{i}"
        x = ResBlock(mid=c(mid), out=c(out), stride=stride if i == 0 else 1, dilation=dilation,
                     first_dilation=first if i == 0 else None, name=name, **kw)(x, train)
        if name in FEATURES:
          x = named_feature(self, name, x)
        outputs[name] = x
    x = BottleneckBlock(out=c(2048), dilation=4, dropout=0.3, name="b6", **kw)(x, train)
    x = BottleneckBlock(out=c(4096), dilation=self.last_dilation, dropout=0.5, name="b7",
                        **kw)(x, train)
    x = nn.relu(batch_norm(not train or self.frozen_bn, self.dtype)(name="bn7")(x))
    outputs["bn7"] = x = named_feature(self, "bn7", x)
    return {name: outputs[name] for name in self.features} if self.features else x
