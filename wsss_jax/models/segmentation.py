"""Segmentation networks: DeepLabV3+ (Chen et al. 2018) and the multi-resolution U-Net (MRN,
Gu et al. 2018). Both return per-pixel logits (B, H, W, K) at the input size.

DeepLabV3+: a ResNet-50/101 (output stride 16, multi-grid (1, 2, 4)) or ResNet38 (output stride
8) backbone; ASPP = 1x1 conv, three 3x3 atrous convs (rates 6/12/18 at stride 16, doubled at 8)
and image pooling, 256 channels each, concatenated, projected to 256, dropout 0.5; decoder: the
stride-4 features projected to 48 channels, concatenated with the bilinearly upsampled ASPP output,
two 3x3 convs of 256 (dropout 0.5, 0.1), a 1x1 classifier, bilinear upsampling to the input.
The backbone is the submodule `backbone`, named as in the classifier, so a classification
checkpoint initialises it.

MRN: one U-Net encoder reads the target patch and a context patch of the same pixel size centred on
it at `scale` times coarser resolution. At each decoder level the context features are centre-
cropped to the target's field of view (1 / scale of their extent) and brought back to the target's
size by bilinear interpolation (`upsample="bilinear"`) or a learned transposed convolution
(`"transposed"`), then concatenated with the target's skip features.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.errors import UserError
from wsss_jax.models.layers import batch_norm, conv_init
from wsss_jax.models.resnet import ResNet
from wsss_jax.models.resnet38 import ResNet38

SEGMENTERS = ("deeplabv3plus", "mrn")
BACKBONES = ("resnet50", "resnet101", "resnet38")
MRN_UPSAMPLING = ("bilinear", "transposed")


def resize(x, size, method: str = "bilinear"):
  """(B, h, w, C) -> (B, H, W, C): half-pixel-centred bilinear interpolation."""
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method)


class AtrousConv(nn.Module):
  """Bias-free k x k convolution with dilation and 'same' zero padding (parameters as nn.Conv's).

  When the dilation reaches the map's size every off-centre tap reads padding only, so the
  convolution is exactly the 1x1 convolution with the centre tap: ASPP's rates 12/24/36 on the
  8x8 maps of a 64 px input, or rate 36 at 28x28, cost a ninth and avoid a slow dilated kernel.
  """
  features: int
  kernel: int = 3
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", conv_init, (self.kernel, self.kernel, x.shape[-1], self.features))
    k = k.astype(self.dtype)
    if self.kernel > 1 and self.dilation >= max(x.shape[1:3]):
      return jnp.einsum("bhwc,cd->bhwd", x, k[self.kernel // 2, self.kernel // 2])
    pad = self.dilation * (self.kernel - 1) // 2
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((pad, pad), (pad, pad)),
                                        rhs_dilation=(self.dilation, self.dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ConvBNReLU(nn.Module):
  features: int
  kernel: int = 3
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = AtrousConv(self.features, self.kernel, self.dilation, self.dtype, name="conv")(
        x.astype(self.dtype))
    return nn.relu(batch_norm(not train, self.dtype)(name="bn")(x))


class ASPP(nn.Module):
  features: int = 256
  rates: tuple = (6, 12, 18)
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    branches = [ConvBNReLU(self.features, 1, dtype=self.dtype, name="branch0")(x, train)]
    for i, rate in enumerate(self.rates):
      branches.append(ConvBNReLU(self.features, 3, rate, self.dtype, name=f"branch{i + 1}")(
          x, train))
    pooled = ConvBNReLU(self.features, 1, dtype=self.dtype, name="pool")(
        jnp.mean(x, axis=(1, 2), keepdims=True), train)
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))  # bilinear of 1x1 = constant
    y = ConvBNReLU(self.features, 1, dtype=self.dtype, name="project")(
        jnp.concatenate(branches, -1), train)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class DeepLabV3Plus(nn.Module):
  num_classes: int
  backbone: nn.Module            # returns {low: stride-4 features, high: last features}
  low_level: str = "layer1"
  high_level: str = "layer4"
  aspp_rates: tuple = (6, 12, 18)
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, context=None):
    del context  # single-resolution network
    c = lambda n: max(1, int(round(n * self.width)))  # noqa: E731
    feats = self.backbone(images, train)
    x = ASPP(c(256), self.aspp_rates, 0.5, self.dtype, name="aspp")(feats[self.high_level], train)
    low = ConvBNReLU(c(48), 1, dtype=self.dtype, name="low_level")(feats[self.low_level], train)
    x = jnp.concatenate([resize(x, low.shape[1:3]), low], -1)
    x = ConvBNReLU(c(256), 3, dtype=self.dtype, name="decoder1")(x, train)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    x = ConvBNReLU(c(256), 3, dtype=self.dtype, name="decoder2")(x, train)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)
    return resize(logits.astype(jnp.float32), images.shape[1:3])


# --- MRN ------------------------------------------------------------------------------------------
def centre_crop(x, scale: int):
  """The central 1/scale of a (B, H, W, C) map: the target's field of view in the context."""
  h, w = x.shape[1:3]
  if h % scale or w % scale:
    raise UserError(f"MRN: a {h}x{w} context feature map does not divide by scale {scale}; "
                    f"use a patch size divisible by scale * 2^depth")
  ch, cw = h // scale, w // scale
  top, left = (h - ch) // 2, (w - cw) // 2
  return x[:, top:top + ch, left:left + cw]


class UNetEncoder(nn.Module):
  features: tuple
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    skips = []
    for i, f in enumerate(self.features):
      if i:
        x = nn.max_pool(x, (2, 2), (2, 2))
      x = ConvBNReLU(f, dtype=self.dtype, name=f"down{i}_a")(x, train)
      x = ConvBNReLU(f, dtype=self.dtype, name=f"down{i}_b")(x, train)
      skips.append(x)
    return skips  # full resolution first; the last is the bottleneck


class MRN(nn.Module):
  """Multi-resolution U-Net: logits of the target patch from (target, context)."""
  num_classes: int
  base: int = 64
  depth: int = 4                 # down-sampling steps; the encoder has depth + 1 levels
  scale: int = 2                 # context resolution factor
  upsample: str = "transposed"   # how cropped context features return to size
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, context=None):
    if self.upsample not in MRN_UPSAMPLING:
      raise UserError(f"model.mrn_upsample={self.upsample!r} is not one of {MRN_UPSAMPLING}")
    if context is None or context.shape != images.shape:
      raise UserError("MRN needs a context patch of the target's shape")
    b = images.shape[0]
    features = tuple(self.base * 2**i for i in range(self.depth + 1))
    encoder = UNetEncoder(features, self.dtype, name="encoder")  # shared by both resolutions
    both = encoder(jnp.concatenate([images, context]).astype(self.dtype), train)
    target, ctx = [s[:b] for s in both], [s[b:] for s in both]
    x = target[-1]
    for i in reversed(range(self.depth)):
      f = features[i]
      x = nn.ConvTranspose(f, (2, 2), (2, 2), dtype=self.dtype, name=f"up{i}")(x)
      c = centre_crop(ctx[i], self.scale)
      if self.upsample == "bilinear":
        c = resize(c, target[i].shape[1:3])
      else:
        c = nn.ConvTranspose(f, (self.scale, self.scale), (self.scale, self.scale),
                             dtype=self.dtype, name=f"context_up{i}")(c)
      x = jnp.concatenate([x, target[i], c], -1)
      x = ConvBNReLU(f, dtype=self.dtype, name=f"dec{i}_a")(x, train)
      x = ConvBNReLU(f, dtype=self.dtype, name=f"dec{i}_b")(x, train)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x).astype(
        jnp.float32)


def build_segmenter(model_cfg, num_classes: int, dtype=jnp.float32) -> nn.Module:
  if model_cfg.name not in SEGMENTERS:
    raise UserError(f"model.name={model_cfg.name!r} is not one of {SEGMENTERS}")
  if model_cfg.width <= 0:
    raise UserError(f"model.width={model_cfg.width} must be positive")
  if model_cfg.name == "mrn":
    return MRN(num_classes, max(1, int(round(64 * model_cfg.width))), model_cfg.mrn_depth,
               model_cfg.context_scale, model_cfg.mrn_upsample, dtype)
  if model_cfg.backbone not in BACKBONES:
    raise UserError(f"model.backbone={model_cfg.backbone!r} is not one of {BACKBONES}")
  if model_cfg.backbone == "resnet38":  # output stride 8: the ASPP rates double
    backbone = ResNet38(model_cfg.width, dtype=dtype, features=("b3_2", "bn7"), name="backbone")
    rates, low, high = tuple(2 * r for r in model_cfg.aspp_rates), "b3_2", "bn7"
  else:
    os_ = model_cfg.output_stride
    backbone = ResNet(int(model_cfg.backbone[6:]), os_, tuple(model_cfg.multi_grid),
                      model_cfg.width, dtype=dtype, features=("layer1", "layer4"), name="backbone")
    rates = tuple(model_cfg.aspp_rates) if os_ == 16 else tuple(2 * r for r in model_cfg.aspp_rates)
    low, high = "layer1", "layer4"
  return DeepLabV3Plus(num_classes, backbone, low, high, rates, model_cfg.width, dtype)
