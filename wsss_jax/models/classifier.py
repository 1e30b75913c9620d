"""Multi-label patch classifiers: a backbone (ResNet38, ResNet-50, ViT) and its head.

`build_classifier(model_cfg, image_size, num_classes)` picks the network by `model.backbone`;
`param_labels` names the optimiser group of every parameter ("backbone", "head", "frozen", or
"layer_<i>" for the ViT's layer-wise learning-rate decay).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

from wsss_jax.errors import UserError
from wsss_jax.models.heads import MultiLabelHead, TokenHead
from wsss_jax.models.resnet import ResNet
from wsss_jax.models.resnet38 import ResNet38
from wsss_jax.models.vit import VisionTransformer

BACKBONES = ("resnet38", "resnet50", "vit")
POOLS = ("gap", "cls")


class CNNClassifier(nn.Module):
  """Backbone features -> (PDA during training) -> MultiLabelHead; returns logits (B, K).
  `linear_probe`: the backbone frozen (inference-mode BatchNorm, no backward pass through it)."""
  backbone: nn.Module
  num_classes: int
  head_dropout: float = 0.5
  linear_probe: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, mu=None, pda_active=False):
    features = self.backbone(images, train and not self.linear_probe)
    if self.linear_probe:
      features = jax.lax.stop_gradient(features)
    return MultiLabelHead(self.num_classes, self.head_dropout, self.dtype, name="head")(
        features, train, mu if train else None, pda_active)  # PDA is off at inference


class ViTClassifier(nn.Module):
  """ViT encoder (MAE's, same parameter names) -> TokenHead; returns logits (B, K)."""
  encoder: VisionTransformer
  num_classes: int
  pool: str = "gap"
  linear_probe: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, mu=None, pda_active=False):
    del mu, pda_active  # PDA acts on convolutional feature maps only
    tokens = self.encoder(images, deterministic=not train or self.linear_probe,
                          final_norm=self.pool == "cls")
    if self.linear_probe:
      tokens = jax.lax.stop_gradient(tokens)  # frozen encoder: no backward pass through it
    return TokenHead(self.num_classes, self.pool, self.linear_probe, self.dtype, name="head")(
        tokens, train)


def build_classifier(model_cfg, image_size: int, num_classes: int, dtype=jnp.float32):
  name = model_cfg.backbone
  if name not in BACKBONES:
    raise UserError(f"model.backbone={name!r} is not one of {BACKBONES}")
  if num_classes <= 0:
    raise UserError(f"data.num_classes={num_classes} must be positive")
  if name == "vit":
    if model_cfg.pool not in POOLS:
      raise UserError(f"model.pool={model_cfg.pool!r} is not one of {POOLS}")
    encoder = VisionTransformer.from_variant(
        model_cfg.variant, image_size, drop_path=0.0 if model_cfg.linear_probe
        else model_cfg.drop_path, pos_embed_kind=model_cfg.get("pos_embed", "sincos"), dtype=dtype,
        attention=model_cfg.get("attention", "xla"), remat=model_cfg.get("remat", "none"),
        gelu=model_cfg.get("gelu", "exact"))
    return ViTClassifier(encoder, num_classes, model_cfg.pool, model_cfg.linear_probe, dtype)
  backbone = build_cnn_backbone(name, model_cfg.width, dtype, frozen_bn=model_cfg.freeze_bn,
                                output_stride=model_cfg.output_stride,
                                last_dilation=model_cfg.get("last_dilation", 4))
  return CNNClassifier(backbone, num_classes, model_cfg.head_dropout,
                       model_cfg.get("linear_probe", False), dtype)


def build_cnn_backbone(name: str, width: float, dtype=jnp.float32, *, frozen_bn: bool = False,
                       output_stride: int = 32, last_dilation: int = 4) -> nn.Module:
  """ResNet38 (output stride 8) or ResNet-50 at `width` times the published channels (strides and
  dilations change no parameter shape, so a trunk pretrained with one fine-tunes with another)."""
  if width <= 0:
    raise UserError(f"model.width={width} must be positive")
  if name == "resnet38":
    return ResNet38(width, frozen_bn, dtype, last_dilation=last_dilation)
  return ResNet(50, output_stride, width=width, frozen_bn=frozen_bn, dtype=dtype)


def vit_layer_id(path: tuple, depth: int) -> int:
  """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest depth + 1."""
  if path[0] == "encoder":
    if path[1] in ("patch_embed", "cls_token"):
      return 0
    if path[1].startswith("blocks_"):
      return int(path[1].split("_")[1]) + 1
  return depth + 1


def _is_batch_norm_param(path: tuple) -> bool:
  return any(p.startswith("bn") or p.endswith("_bn") for p in path[:-1])


def param_labels(model: nn.Module, model_cfg, params):
  """The optimiser group of every parameter (a tree of strings like `params`)."""
  flat = traverse_util.flatten_dict(params)
  if isinstance(model, ViTClassifier):
    depth = model.encoder.depth
    def label(path):
      if model.linear_probe and path[0] == "encoder":
        return "frozen"
      return f"layer_{vit_layer_id(path, depth)}"
  else:
    stem = set(model.backbone.stem_names)
    def label(path):
      if path[0] == "head":
        return "head"
      if model.linear_probe:
        return "frozen"
      if model_cfg.freeze_stem and path[1] in stem:
        return "frozen"
      if model_cfg.freeze_bn and _is_batch_norm_param(path):
        return "frozen"
      return "backbone"
  return traverse_util.unflatten_dict({p: label(p) for p in flat})


def lr_multipliers(model: nn.Module, model_cfg, optim_cfg) -> dict[str, float]:
  """Learning-rate factor of every group: head x`head_lr_mult`, ViT layers decay^(L + 1 - i)."""
  if isinstance(model, ViTClassifier):
    depth = model.encoder.depth
    mults = {f"layer_{i}": optim_cfg.layer_decay ** (depth + 1 - i) for i in range(depth + 2)}
  else:
    mults = {"backbone": 1.0, "head": optim_cfg.head_lr_mult}
  return mults | {"frozen": 0.0}
