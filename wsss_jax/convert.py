"""PyTorch state dicts -> this project's Flax variables, written as an orbax checkpoint workdir.

  python -m wsss_jax.convert --from=mae_pretrain_vit_base.pth --to=runs/mae_b16 --arch=mae
  python -m wsss_jax.convert --from=vit_base_patch16_224.pth --to=runs/vit_b16 --arch=vit
  python -m wsss_jax.convert --from=resnet101-63fe2227.pth --to=runs/r101 --arch=resnet101
  python -m wsss_jax.convert --from=res38_cls.pth --to=runs/res38 --arch=resnet38

Architectures:
  mae        facebookresearch/mae checkpoints (key `model`, timm ViT naming), the medical X-ray MAE
             releases of the same layout; encoder, and the decoder where the file has it (the
             released `mae_pretrain_*` files hold the encoder only: the decoder then starts fresh
             and the report says so). Written as a pretrain checkpoint.
  vit        timm `vit_*_patch16_224` classifiers (class token, learned position embedding, `norm`,
             `head`) and MAE fine-tuned ViTs (global pool, `fc_norm`, `head`). A classify checkpoint.
  resnet50, resnet101
             torchvision ResNets: the backbone (for classifiers and the DeepLabV3+ backbone); the
             1000-class ImageNet `fc` has no counterpart in the multi-label head and is reported.
  resnet38   the multi-layer pseudo-supervision authors' ResNet38 classifier (`conv1a`, `b2`..`b7`,
             `bn7`, `fc8`).
The result is a workdir for `--config.model.init_from=<to>` (classify, segment). Every key of the
file is either converted or listed with the reason it is not; a key the architecture does not
know, or a parameter the file lacks, is an error naming it. torch is needed only to read the file
(`pip install -e '.[torch]'`).
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from absl import app, flags
from flax import traverse_util

from wsss_jax import runner
from wsss_jax.errors import UserError
from wsss_jax.models.resnet import DEPTHS
from wsss_jax.models.resnet38 import ResNet38
from wsss_jax.models.vit import VARIANTS, sincos_2d_posemb
from wsss_jax.train import checkpoint

ARCHS = ("mae", "vit", "resnet50", "resnet101", "resnet38")
IGNORED = re.compile(r"(^|\.)num_batches_tracked$")  # BatchNorm step counters: no Flax state


# --- Reading ----------------------------------------------------------------------------------------
def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a .pth/.pt file as float32 numpy arrays, unwrapped from `model`/`state_dict`
  and with DataParallel's `module.` prefix removed."""
  try:  # optional (the torch extra): only this reader needs it
    import torch
  except ImportError:
    raise UserError("reading PyTorch files needs torch: pip install -e '.[torch]'") from None
  if not os.path.isfile(path):
    raise UserError(f"--from={path} is not a file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (torch raises many types for a bad file)
    raise UserError(f"--from={path} is not a readable PyTorch checkpoint "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  for key in ("model", "state_dict", "model_state"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict) or not obj:
    raise UserError(f"--from={path} holds no state dict (a dict of tensors)")
  tensors = {}
  for key, value in obj.items():
    if not hasattr(value, "detach"):
      raise UserError(f"--from={path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    tensors[key.removeprefix("module.")] = value.detach().float().numpy()
  return tensors


class Mapper:
  """Takes tensors out of a state dict by name, converting layouts, and records what it used."""

  def __init__(self, state_dict: dict[str, np.ndarray]):
    self.sd, self.used = state_dict, set()
    self.params, self.batch_stats = {}, {}

  def has(self, key: str) -> bool:
    return key in self.sd

  def take(self, key: str) -> np.ndarray:
    if key not in self.sd:
      raise UserError(f"the checkpoint lacks {key!r}, which this architecture needs")
    self.used.add(key)
    return self.sd[key]

  def conv(self, key: str, path: tuple, bias: bool = False) -> None:
    """(out, in, kh, kw) -> (kh, kw, in, out)."""
    self.params[path + ("kernel",)] = self.take(f"{key}.weight").transpose(2, 3, 1, 0)
    if bias:
      self.params[path + ("bias",)] = self.take(f"{key}.bias")

  def dense(self, key: str, path: tuple) -> None:
    """(out, in) -> (in, out)."""
    self.params[path + ("kernel",)] = self.take(f"{key}.weight").T
    self.params[path + ("bias",)] = self.take(f"{key}.bias")

  def layer_norm(self, key: str, path: tuple) -> None:
    self.params[path + ("scale",)] = self.take(f"{key}.weight")
    self.params[path + ("bias",)] = self.take(f"{key}.bias")

  def batch_norm(self, key: str, path: tuple) -> None:
    self.layer_norm(key, path)
    self.batch_stats[path + ("mean",)] = self.take(f"{key}.running_mean")
    self.batch_stats[path + ("var",)] = self.take(f"{key}.running_var")

  def unused(self) -> list[str]:
    return sorted(k for k in self.sd if k not in self.used and not IGNORED.search(k))


def _count(prefix: str, keys) -> int:
  """Number of consecutive numbered children `prefix.<i>.` (blocks, layers)."""
  found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
  return max(found) + 1 if found else 0


# --- ViT and MAE ------------------------------------------------------------------------------------
def _vit_variant(width: int, depth: int, mlp_dim: int, patch: int) -> str:
  for name, (w, d, m, _) in VARIANTS.items():
    if (w, d, m) == (width, depth, mlp_dim):
      return f"{name}/{patch}"
  raise UserError(f"a ViT of width {width}, depth {depth} and MLP {mlp_dim} is none of the "
                  f"variants {sorted(VARIANTS)}")


def _check_fixed_table(m: Mapper, key: str, width: int, grid: int) -> None:
  """MAE's position embeddings are the fixed 2-D sin-cos table; a file whose table differs was
  trained with learned ones (use --arch=vit)."""
  if not m.has(key):
    return
  table = m.take(key)[0]
  ours = sincos_2d_posemb(width, grid)
  if table.shape != ours.shape or np.abs(table - ours).max() > 1e-4:
    raise UserError(f"{key} of shape {table.shape} is not the fixed sin-cos table of a "
                    f"{grid}x{grid} grid; a learned table converts with --arch=vit")


def vit_blocks(m: Mapper, prefix: str, path: tuple, depth: int) -> None:
  for i in range(depth):
    src, dst = f"{prefix}.{i}", path + (f"{prefix}_{i}",)
    m.layer_norm(f"{src}.norm1", dst + ("norm1",))
    m.dense(f"{src}.attn.qkv", dst + ("attn", "qkv"))
    m.dense(f"{src}.attn.proj", dst + ("attn", "proj"))
    m.layer_norm(f"{src}.norm2", dst + ("norm2",))
    m.dense(f"{src}.mlp.fc1", dst + ("mlp", "fc1"))
    m.dense(f"{src}.mlp.fc2", dst + ("mlp", "fc2"))


def vit_encoder(m: Mapper, learned_pos_embed: bool) -> dict:
  """The encoder under `encoder/`; returns its description (variant, image size, ...)."""
  kernel = m.take("patch_embed.proj.weight")
  width, patch = kernel.shape[0], kernel.shape[-1]
  depth = _count("blocks", m.sd)
  mlp_dim = m.sd.get("blocks.0.mlp.fc1.weight", np.zeros((0,))).shape[0]
  variant = _vit_variant(width, depth, mlp_dim, patch)
  tokens = m.sd["pos_embed"].shape[1] if m.has("pos_embed") else None
  grid = int(round(np.sqrt(tokens - 1))) if tokens else 224 // patch
  enc = ("encoder",)
  m.conv("patch_embed.proj", enc + ("patch_embed",), bias=True)
  m.params[enc + ("cls_token",)] = m.take("cls_token")
  if learned_pos_embed:
    m.params[enc + ("pos_embed",)] = m.take("pos_embed")
  else:
    _check_fixed_table(m, "pos_embed", width, grid)
  vit_blocks(m, "blocks", enc, depth)
  if m.has("norm.weight"):
    m.layer_norm("norm", enc + ("norm",))
  return {"variant": variant, "image_size": grid * patch, "width": width}


def convert_mae(m: Mapper, decoder_heads: int) -> dict:
  info = vit_encoder(m, learned_pos_embed=False)
  if not m.has("norm.weight"):
    raise UserError("the checkpoint lacks 'norm.weight' (the encoder's final LayerNorm)")
  info["decoder"] = m.has("decoder_embed.weight")
  if info["decoder"]:
    width = m.sd["decoder_embed.weight"].shape[0]
    m.dense("decoder_embed", ("decoder_embed",))
    m.params[("mask_token",)] = m.take("mask_token")
    _check_fixed_table(m, "decoder_pos_embed", width, info["image_size"] // int(
        info["variant"].split("/")[1]))
    info["decoder_depth"] = _count("decoder_blocks", m.sd)
    vit_blocks(m, "decoder_blocks", (), info["decoder_depth"])
    m.layer_norm("decoder_norm", ("decoder_norm",))
    m.dense("decoder_pred", ("decoder_pred",))
    info.update(decoder_width=width, decoder_heads=decoder_heads)
  return info


def convert_vit(m: Mapper) -> dict:
  info = vit_encoder(m, learned_pos_embed=m.has("pos_embed"))
  info["pool"] = "gap" if m.has("fc_norm.weight") else "cls"
  if info["pool"] == "gap":
    m.layer_norm("fc_norm", ("head", "fc_norm"))
  m.dense("head", ("head", "head"))
  info["num_classes"] = int(m.sd["head.weight"].shape[0])
  info["pos_embed"] = "learned" if m.has("pos_embed") else "sincos"
  return info


# --- CNNs -------------------------------------------------------------------------------------------
def convert_resnet(m: Mapper, depth: int) -> dict:
  found = tuple(_count(f"layer{s}", m.sd) for s in range(1, 5))
  if found != DEPTHS[depth]:
    raise UserError(f"the checkpoint has {found} blocks per stage; ResNet-{depth} has "
                    f"{DEPTHS[depth]}")
  bb = ("backbone",)
  m.conv("conv1", bb + ("conv1",))
  m.batch_norm("bn1", bb + ("bn1",))
  for s, blocks in enumerate(DEPTHS[depth], start=1):
    for i in range(blocks):
      src, dst = f"layer{s}.{i}", bb + (f"layer{s}_{i}",)
      for j in (1, 2, 3):
        m.conv(f"{src}.conv{j}", dst + (f"conv{j}",))
        m.batch_norm(f"{src}.bn{j}", dst + (f"bn{j}",))
      if m.has(f"{src}.downsample.0.weight"):
        m.conv(f"{src}.downsample.0", dst + ("downsample_conv",))
        m.batch_norm(f"{src}.downsample.1", dst + ("downsample_bn",))
  return {"width": m.sd["conv1.weight"].shape[0] / 64, "depth": depth}


def convert_resnet38(m: Mapper) -> dict:
  bb = ("backbone",)
  m.conv("conv1a", bb + ("conv1a",))
  names = [p if i == 0 else f"{p}_{i}" for p, blocks, *_ in ResNet38.STAGES for i in range(blocks)]
  for name in names + ["b6", "b7"]:
    for bn in ("bn_branch2a", "bn_branch2b1", "bn_branch2b2"):
      if bn != "bn_branch2b2" or name in ("b6", "b7"):
        m.batch_norm(f"{name}.{bn}", bb + (name, bn))
    for cv in ("conv_branch2a", "conv_branch2b1", "conv_branch2b2", "conv_branch1"):
      if m.has(f"{name}.{cv}.weight"):
        m.conv(f"{name}.{cv}", bb + (name, cv))
  m.batch_norm("bn7", bb + ("bn7",))
  info = {"width": m.sd["conv1a.weight"].shape[0] / 64}
  if m.has("fc8.weight"):
    m.conv("fc8", ("head", "fc8"))
    info["num_classes"] = int(m.sd["fc8.weight"].shape[0])
  return info


# --- Writing ----------------------------------------------------------------------------------------
def convert(state_dict: dict[str, np.ndarray], arch: str, decoder_heads: int = 16):
  """(params, batch_stats, info, not_converted) as nested dicts of numpy arrays."""
  if arch not in ARCHS:
    raise UserError(f"--arch={arch!r} is not one of {ARCHS}")
  m = Mapper(state_dict)
  info = {"mae": lambda: convert_mae(m, decoder_heads), "vit": lambda: convert_vit(m),
          "resnet50": lambda: convert_resnet(m, 50), "resnet101": lambda: convert_resnet(m, 101),
          "resnet38": lambda: convert_resnet38(m)}[arch]()
  left = m.unused()
  known = {"fc.weight", "fc.bias"} if arch.startswith("resnet") and arch != "resnet38" else set()
  unknown = [k for k in left if k not in known]
  if unknown:
    raise UserError(f"{len(unknown)} key(s) of the checkpoint have no place in --arch={arch}: "
                    f"{', '.join(unknown[:12])}{' ...' if len(unknown) > 12 else ''}")
  unflat = traverse_util.unflatten_dict
  return unflat(m.params), unflat(m.batch_stats), info, sorted(known & set(left))


def write_workdir(workdir: str, params: dict, batch_stats: dict, meta: dict) -> str:
  """An orbax checkpoint (step 0) holding {params, batch_stats}, as the phases write them."""

  path = runner.prepare_workdir(workdir)
  directory = os.path.join(path, "checkpoints")
  if os.path.isdir(directory) and os.listdir(directory):
    raise UserError(f"--to={workdir} already holds checkpoints; choose an empty workdir")
  state = {"params": jax.tree.map(np.asarray, params)}
  if batch_stats:
    state["batch_stats"] = jax.tree.map(np.asarray, batch_stats)
  ckpt = checkpoint.Checkpointer(directory, async_save=False)
  ckpt.save(0, state, {}, meta)
  ckpt.wait()
  ckpt.close()
  return directory


def run(source: str, workdir: str, arch: str, decoder_heads: int = 16) -> dict:
  params, batch_stats, info, skipped = convert(read_state_dict(source), arch, decoder_heads)
  meta = {"phase": "pretrain" if arch == "mae" else "classify", "converted_from": source,
          "arch": arch, "info": info}
  directory = write_workdir(workdir, params, batch_stats, meta)
  count = sum(int(np.size(x)) for x in __import__("jax").tree.leaves(params))
  print(f"converted {arch} ({count:,} parameters) from {source} into {directory}")
  for key in skipped:
    print(f"  not converted: {key} (the ImageNet classification head)")
  if arch == "mae" and not info["decoder"]:
    print("  the file has no decoder (decoder_*, mask_token): MAE training from it starts a "
          "fresh decoder")
  print("  " + ", ".join(f"{k}={v}" for k, v in info.items()))
  return {"directory": directory, "info": info, "not_converted": skipped}


FLAGS = flags.FLAGS
flags.DEFINE_string("from", None, "a PyTorch state dict (.pth / .pt)")
flags.DEFINE_string("to", None, "the workdir to write (must hold no checkpoint yet)")
flags.DEFINE_enum("arch", None, ARCHS, "what the file holds")
flags.DEFINE_integer("decoder_heads", 16, "MAE decoder heads (not recorded in the weights)")


def main(argv) -> None:
  del argv
  try:
    if not FLAGS["from"].value or not FLAGS.to or not FLAGS.arch:
      raise UserError("--from, --to and --arch are required")
    run(FLAGS["from"].value, FLAGS.to, FLAGS.arch, FLAGS.decoder_heads)
  except UserError as e:
    print(f"error: {e}")
    raise SystemExit(2) from None


if __name__ == "__main__":
  app.run(main)
