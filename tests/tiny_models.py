"""Small flax models with hand-checkable structure for the relevance tests."""
from __future__ import annotations

import flax.linen as nn

from wsss_jax.models.layers import named_feature


class GapLinear(nn.Module):
  """conv 3x3 -> ReLU (named 'feat') -> global average pooling -> Dense: dlogit_k/dA = w_k / hw."""
  channels: int = 5
  classes: int = 3
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    a = nn.relu(nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=self.use_bias,
                        name="conv")(x))
    a = named_feature(self, "feat", a)
    return nn.Dense(self.classes, use_bias=self.use_bias, name="fc")(a.mean(axis=(1, 2)))


class SmallCNN(nn.Module):
  """conv -> ReLU -> max-pool -> conv -> ReLU (named 'feat') -> 1x1 conv head on GAP: no biases
  when `use_bias` is false, so epsilon-LRP conserves the logit."""
  classes: int = 3
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)), use_bias=self.use_bias,
                        name="conv1")(x))
    x = named_feature(self, "pool", nn.max_pool(x, (2, 2), (2, 2)))
    x = nn.relu(nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=self.use_bias,
                        name="conv2")(x))
    x = named_feature(self, "feat", x)
    pooled = x.mean(axis=(1, 2), keepdims=True)
    out = nn.Conv(self.classes, (1, 1), use_bias=self.use_bias, name="head")(pooled)
    return out.reshape(x.shape[0], self.classes)


class ConvBN(nn.Module):
  """conv -> BatchNorm -> ReLU -> GAP -> Dense, for canonisation."""
  classes: int = 3

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv")(x)
    y = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(y))
    y = named_feature(self, "feat", y)
    return nn.Dense(self.classes, name="fc")(y.mean(axis=(1, 2)))


class MLP(nn.Module):
  """Dense -> ReLU -> Dense -> ReLU -> Dense on flattened input (named 'hidden')."""
  hidden: tuple = (7, 5)
  classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(h, name=f"fc{i}")(x))
    x = named_feature(self, "hidden", x[:, None, None, :])[:, 0, 0]
    return nn.Dense(self.classes, name="out")(x)
