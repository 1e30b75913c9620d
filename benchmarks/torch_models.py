"""PyTorch versions of networks that torchvision and timm do not ship, with the parameter names of
the released code: the multi-layer pseudo-supervision authors' ResNet38 (+ PDA head) and the MAE
reference model (timm blocks). Used by the conversion tests (random weights, compare outputs)
and by `benchmarks/side_by_side.py` (timing). Written here from the papers' descriptions; the
JAX side is `wsss_jax.models`."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from wsss_jax.models import resnet38, vit


class TorchResBlock(nn.Module):
  """Pre-activation basic block (bn_branch2a, conv_branch2a, bn_branch2b1, conv_branch2b1,
  conv_branch1 when the shape changes)."""

  def __init__(self, cin, mid, out, stride=1, first_dilation=None, dilation=1):
    super().__init__()
    first = dilation if first_dilation is None else first_dilation
    self.same_shape = cin == out and stride == 1
    self.bn_branch2a = nn.BatchNorm2d(cin)
    self.conv_branch2a = nn.Conv2d(cin, mid, 3, stride, first, first, bias=False)
    self.bn_branch2b1 = nn.BatchNorm2d(mid)
    self.conv_branch2b1 = nn.Conv2d(mid, out, 3, 1, dilation, dilation, bias=False)
    if not self.same_shape:
      self.conv_branch1 = nn.Conv2d(cin, out, 1, stride, bias=False)

  def forward(self, x):
    y = torch.relu(self.bn_branch2a(x))
    shortcut = x if self.same_shape else self.conv_branch1(y)
    y = self.conv_branch2b1(torch.relu(self.bn_branch2b1(self.conv_branch2a(y))))
    return shortcut + y


class TorchBotBlock(nn.Module):
  """Pre-activation bottleneck with channel dropout (b6, b7)."""

  def __init__(self, cin, out, dilation, dropout=0.0):
    super().__init__()
    self.bn_branch2a = nn.BatchNorm2d(cin)
    self.conv_branch2a = nn.Conv2d(cin, out // 4, 1, bias=False)
    self.bn_branch2b1 = nn.BatchNorm2d(out // 4)
    self.conv_branch2b1 = nn.Conv2d(out // 4, out // 2, 3, 1, dilation, dilation, bias=False)
    self.bn_branch2b2 = nn.BatchNorm2d(out // 2)
    self.conv_branch2b2 = nn.Conv2d(out // 2, out, 1, bias=False)
    self.conv_branch1 = nn.Conv2d(cin, out, 1, bias=False)
    self.dropout = nn.Dropout2d(dropout)

  def forward(self, x):
    y = torch.relu(self.bn_branch2a(x))
    shortcut = self.conv_branch1(y)
    y = self.dropout(torch.relu(self.bn_branch2b1(self.conv_branch2a(y))))
    y = self.dropout(torch.relu(self.bn_branch2b2(self.conv_branch2b1(y))))
    return shortcut + self.conv_branch2b2(y)


class TorchResNet38(nn.Module):
  """ResNet38 at a channel multiplier `w` (1.0: the published network) with the fc8 head;
  returns (bn7 features, logits). `mu` given: PDA on the features before pooling (training)."""

  def __init__(self, w=0.0625, classes=4):
    super().__init__()
    c = lambda n: max(1, int(round(n * w)))  # noqa: E731
    self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)
    cin, self.names = c(64), []
    for prefix, blocks, mid, out, stride, dilation, first in resnet38.ResNet38.STAGES:
      for i in range(blocks):
        name = prefix if i == 0 else f"{prefix}_{i}"
        setattr(self, name, TorchResBlock(cin, c(mid), c(out), stride if i == 0 else 1,
                                          first if i == 0 else None, dilation))
        self.names.append(name)
        cin = c(out)
    self.b6 = TorchBotBlock(cin, c(2048), 4, 0.3)
    self.b7 = TorchBotBlock(c(2048), c(4096), 4, 0.5)
    self.bn7 = nn.BatchNorm2d(c(4096))
    self.dropout7 = nn.Dropout2d(0.5)
    self.fc8 = nn.Conv2d(c(4096), classes, 1, bias=False)

  def forward(self, x, mu=None):
    x = self.conv1a(x)
    for name in self.names:
      x = getattr(self, name)(x)
    features = torch.relu(self.bn7(self.b7(self.b6(x))))
    x = features
    if mu is not None:  # PDA: zero M_k above mu * max(M_k), attention = class mean
      cams = torch.relu(self.fc8(x))
      beta = mu * cams.amax(dim=(2, 3), keepdim=True)
      x = x * torch.where(cams > beta, torch.zeros_like(cams), cams).mean(1, keepdim=True)
    x = self.dropout7(x)
    return features, self.fc8(x.mean((2, 3), keepdim=True)).flatten(1)


class TorchMAE(nn.Module):
  """The MAE reference model's layout (timm blocks; fixed sin-cos tables as buffers)."""

  def __init__(self, size=32, patch=8, width=64, depth=2, heads=2, dec_width=32, dec_depth=2,
               dec_heads=4, ln_init=True):
    super().__init__()
    from timm.models.vision_transformer import Block, PatchEmbed
    grid = size // patch
    self.patch = patch
    self.patch_embed = PatchEmbed(size, patch, 3, width)
    self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
    self.register_buffer("pos_embed", torch.from_numpy(vit.sincos_2d_posemb(width, grid))[None])
    self.blocks = nn.ModuleList([Block(width, heads, 4, qkv_bias=True) for _ in range(depth)])
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.decoder_embed = nn.Linear(width, dec_width)
    self.mask_token = nn.Parameter(torch.randn(1, 1, dec_width) * 0.02)
    self.register_buffer("decoder_pos_embed",
                         torch.from_numpy(vit.sincos_2d_posemb(dec_width, grid))[None])
    self.decoder_blocks = nn.ModuleList([Block(dec_width, dec_heads, 4, qkv_bias=True)
                                         for _ in range(dec_depth)])
    self.decoder_norm = nn.LayerNorm(dec_width, eps=1e-6)
    self.decoder_pred = nn.Linear(dec_width, patch * patch * 3)
    if ln_init:  # LayerNorms away from (1, 0), so their conversion is exercised
      for b in list(self.blocks) + list(self.decoder_blocks):
        for ln in (b.norm1, b.norm2):
          nn.init.uniform_(ln.weight, 0.5, 1.5)
          nn.init.uniform_(ln.bias, -0.2, 0.2)

  def forward(self, x, ids_shuffle, keep):
    """Per-patch predictions (B, L, p*p*3) with the tokens ids_shuffle[:, :keep] visible."""
    x = self.patch_embed(x) + self.pos_embed[:, 1:]
    ids_restore = torch.argsort(ids_shuffle, 1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, x.shape[-1]))
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], 1)
    for b in self.blocks:
      x = b(x)
    x = self.decoder_embed(self.norm(x))
    fill = self.mask_token.expand(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], -1)
    y = torch.cat([x[:, 1:], fill], 1)
    y = torch.gather(y, 1, ids_restore[..., None].expand(-1, -1, y.shape[-1]))
    x = torch.cat([x[:, :1], y], 1) + self.decoder_pos_embed
    for b in self.decoder_blocks:
      x = b(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  def loss(self, images, mask_ratio=0.75, norm_pix_loss=True):
    """MAE loss: per-sample random masking (argsort of noise), MSE on the masked patches."""
    b, _, h, _ = images.shape
    p, length = self.patch, (h // self.patch) ** 2
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(torch.rand(b, length, device=images.device), 1)
    pred = self(images, ids_shuffle, keep)
    target = images.reshape(b, 3, h // p, p, h // p, p).permute(0, 2, 4, 3, 5, 1).reshape(
        b, length, p * p * 3)
    if norm_pix_loss:
      target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True)
                                                            + 1e-6).sqrt()
    mask = torch.ones(b, length, device=images.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, torch.argsort(ids_shuffle, 1))
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def mae_for_variant(variant: str, size: int) -> TorchMAE:
  """The paper's MAE (decoder 8 blocks, 512 wide, 16 heads) for a ViT variant like 'B/16'."""
  name, patch = variant.split("/")
  width, depth, _, heads = vit.VARIANTS[name]
  return TorchMAE(size, int(patch), width, depth, heads, 512, 8, 16, ln_init=False)


def numpy_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).random((batch, 3, size, size), np.float32)
