"""Vision Transformer encoder (Dosovitskiy et al. 2021) as used by MAE (He et al. 2022).

Pre-norm blocks, a class token with a zero position embedding, and a fixed 2-D sin-cos position
embedding. Parameter names follow timm's ViT (patch_embed, blocks_i/attn/qkv, ...) so PyTorch
checkpoints map over one to one.

For relevance maps, every block names (`layers.named_feature`) its attention weights
(`blocks_i/attn/attention`), the output of its first LayerNorm (`blocks_i/norm1`) and its output
tokens (`blocks_i/tokens`): sown into `intermediates` and open to `perturbations`. Nothing is
stored unless the caller makes `intermediates` mutable. The MLP's non-linearity is the method
`Mlp.activation`, a seam that `nn.intercept_methods` can replace (AttnLRP's identity rule).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.models.layers import LayerNorm, named_feature

# name -> (width, depth, mlp_dim, heads); Ti/S/B/L/H from the ViT and DeiT papers, "mu" is a
# test-sized model for CPU tests and the embedded quick run.
VARIANTS = {
    "mu": (64, 2, 256, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int


def parse_variant(variant: str) -> ViTSpec:
  """'B/16' -> ViTSpec(768, 12, 3072, 12, 16)."""
  name, sep, patch = str(variant).partition("/")
  if name not in VARIANTS or not sep or not patch.isdigit() or int(patch) <= 0:
    raise UserError(
        f"model.variant={variant!r} is not a ViT variant: use NAME/PATCH with NAME in "
        f"{sorted(VARIANTS)} and PATCH a positive integer, e.g. 'B/16'")
  return ViTSpec(*VARIANTS[name], patch_size=int(patch))


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[sin(p w_i), cos(p w_i)] with w_i = 1 / 10000^(i / (dim/2)), i < dim/2."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.outer(positions.reshape(-1), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_posemb(dim: int, grid_size: int, class_token: bool = True) -> np.ndarray:
  """Fixed 2-D sin-cos embedding of shape (grid**2 [+1], dim); half the channels per axis.

  The first half encodes the column (x) index and the second half the row (y) index, as in the
  MAE reference; the class token, if any, gets a zero row.
  """
  if dim % 4:
    raise UserError(f"model width {dim} must be divisible by 4 for the 2-D sin-cos embedding")
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  if class_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb.astype(np.float32)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:  # a Python float, also under nn.scan (rate 0 there)
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


_dense_init = nn.initializers.xavier_uniform()


ATTENTION_IMPLEMENTATIONS = ("xla", "jax", "cudnn", "pallas")
# Token counts the fused kernels are given: cuDNN's flash attention refused ViT-B/16's 197 and
# the MAE encoder's 50 tokens ("Unsupported sequence length"), and Pallas' TPU flash attention
# works in blocks of 128 tokens. Padded keys are masked out and padded queries dropped.
PAD_MULTIPLE = {"cudnn": 64, "pallas": 128}
CUDNN_KERNEL = "cudnn"  # what model.attention=cudnn asks jax for (tests on the CPU swap in "xla")


def padded_attention(q, k, v, multiple: int, implementation: str | None):
  """softmax(q k^T / sqrt(d)) v for (batch, tokens, heads, head_dim) inputs through
  `jax.nn.dot_product_attention(implementation=...)`, with the tokens padded to a multiple of
  `multiple` and the padded keys masked (`key_value_seq_lengths`); the padded queries' rows are
  cut off, so they get no gradient."""
  b, n = q.shape[:2]
  padded = -(-n // multiple) * multiple
  if padded == n:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  widths = ((0, 0), (0, padded - n), (0, 0), (0, 0))
  q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
  out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.full((b,), n, jnp.int32),
                                     implementation=implementation)
  return out[:, :n]


def pallas_attention(q, k, v, multiple: int = PAD_MULTIPLE["pallas"]):
  """The same through the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops`): the
  padded tokens form a segment of their own (segment ids 0 against 1), so real queries never see
  padded keys. Runs on TPUs, and anywhere under `pltpu.force_tpu_interpret_mode()`."""
  # TPU-only kernel module: imported when this attention is chosen, not by every ViT
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, n, _, d = q.shape
  padded = -(-n // multiple) * multiple
  widths = ((0, 0), (0, padded - n), (0, 0), (0, 0))
  q, k, v = (jnp.transpose(jnp.pad(t, widths), (0, 2, 1, 3)) for t in (q, k, v))  # b h n d
  ids = jnp.broadcast_to((jnp.arange(padded) < n).astype(jnp.int32), (b, padded))
  out = fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(ids, ids), sm_scale=d**-0.5)
  return jnp.transpose(out, (0, 2, 1, 3))[:, :n]


def fused_attention(q, k, v, implementation: str):
  """Attention through the kernel `implementation` names ("jax": jax's own choice, "cudnn":
  cuDNN flash attention on padded tokens, "pallas": the Pallas TPU kernel)."""
  if implementation == "pallas":
    return pallas_attention(q, k, v)
  if implementation == "cudnn":
    if CUDNN_KERNEL == "cudnn" and jax.default_backend() != "gpu":
      raise UserError(f"model.attention=cudnn needs an NVIDIA GPU (cuDNN's flash attention); "
                      f"this run's devices are {jax.default_backend()}: use attention=xla")
    return padded_attention(q, k, v, PAD_MULTIPLE["cudnn"], CUDNN_KERNEL)
  return jax.nn.dot_product_attention(q, k, v)


class Attention(nn.Module):
  """Multi-head self-attention.

  When the `intermediates` collection is mutable, the softmax weights (batch, heads, tokens,
  tokens) are computed explicitly and sown for relevance maps. Otherwise the normalisation is
  applied after the value product, softmax(l) v = (exp(l - max) v) / sum exp(l - max), which
  divides a (.., tokens, head_dim) tensor instead of a (.., tokens, tokens) one (BENCHMARKS.md).
  `implementation` "jax", "cudnn" or "pallas" hands the product to a fused kernel
  (`fused_attention`); relevance maps always take the written-out path.
  """
  num_heads: int
  dtype: Any = jnp.float32
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=_dense_init, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    if self.implementation != "xla" and not self.is_mutable_collection("intermediates"):
      out = fused_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.implementation)
      return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init, name="proj")(
          out.reshape(b, n, d))
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * head_dim**-0.5, k).astype(jnp.float32)
    if self.is_mutable_collection("intermediates"):
      weights = jax.nn.softmax(logits, axis=-1)
      weights = named_feature(self, "attention", weights)
      out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(self.dtype), v)
    else:
      e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
      out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(self.dtype), v)
      out = (out / e.sum(-1, keepdims=True)).astype(self.dtype)
    out = jnp.transpose(out, (0, 2, 1, 3)).reshape(b, n, d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init, name="proj")(out)


GELUS = ("exact", "tanh")
_SQRT_2_OVER_PI = float(np.sqrt(2 / np.pi))


def _gelu_cdf(x, approximate: bool):
  """Phi(x) (exact: 0.5 erfc(-x / sqrt 2)) or its tanh approximation, and dPhi/dx."""
  if approximate:
    t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t), 0.5 * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
  return 0.5 * jax.lax.erfc(-x * float(np.sqrt(0.5))), jnp.exp(-0.5 * x * x) / float(
      np.sqrt(2 * np.pi))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu_16bit(x, approximate: bool):
  """GELU x Phi(x) of 16-bit activations, computed in float32, whose gradient keeps only x:
  autodiff of the erf form keeps four tensors of the MLP's hidden width (the product, erfc, exp
  and a copy), the memory-bound pass it feeds reads them all again."""
  cdf, _ = _gelu_cdf(x.astype(jnp.float32), approximate)
  return (x.astype(jnp.float32) * cdf).astype(x.dtype)


def _gelu_16bit_backward(approximate, x, g):
  x32 = x.astype(jnp.float32)
  cdf, pdf = _gelu_cdf(x32, approximate)
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)  # d(x Phi)/dx


gelu_16bit.defvjp(lambda x, approximate: (gelu_16bit(x, approximate), x), _gelu_16bit_backward)


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32
  gelu: str = "exact"   # "tanh": the tanh approximation (one transcendental instead of erf)

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_dense_init, name="fc1")(x)
    x = self.activation(x)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init, name="fc2")(x)

  def activation(self, x):
    # exact erf GELU, as torch.nn.GELU and the MAE/timm checkpoints; "tanh":
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), within 5e-4 of it (docs/benchmark.md)
    if jnp.dtype(x.dtype).itemsize == 2:
      return gelu_16bit(x, self.gelu == "tanh")
    return nn.gelu(x, approximate=self.gelu == "tanh")


class Block(nn.Module):
  """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention: str = "xla"  # Attention.implementation
  gelu: str = "exact"     # Mlp.gelu

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = parallel.constrain_batch(x)  # tokens stay batch-split while FSDP gathers the weights
    y = named_feature(self, "norm1", LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x))
    y = Attention(self.num_heads, dtype=self.dtype, implementation=self.attention, name="attn")(y)
    x = x + DropPath(self.drop_path)(y, deterministic)
    y = LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
    y = Mlp(self.mlp_dim, dtype=self.dtype, gelu=self.gelu, name="mlp")(y)
    x = x + DropPath(self.drop_path)(y, deterministic)
    return named_feature(self, "tokens", x)


# Rematerialisation of each block in the backward pass: "block" recomputes all of it (activation
# memory of one block per layer), "dots" keeps the matmul outputs and recomputes the rest.
REMAT_POLICIES = ("none", "block", "dots")


def block_class(remat: str = "none"):
  """Block, or Block under `nn.remat` (argument 2, `deterministic`, static)."""
  if remat not in REMAT_POLICIES:
    raise UserError(f"model.remat={remat!r} is not one of {REMAT_POLICIES}")
  if remat == "none":
    return Block
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
  return nn.remat(Block, static_argnums=(2,), policy=policy)


class _ScanStep(nn.Module):
  """One Block as an `nn.scan` body: (tokens, deterministic) -> (tokens, None)."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  gelu: str = "exact"

  @nn.compact
  def __call__(self, x, deterministic: bool):
    block = block_class(self.remat)(self.num_heads, self.mlp_dim, dtype=self.dtype,
                                    attention=self.attention, gelu=self.gelu, name="block")
    return block(x, deterministic), None


def make_blocks(depth: int, num_heads: int, mlp_dim: int, rates=None, *, dtype=jnp.float32,
                attention: str = "xla", remat: str = "none", scan: bool = False,
                gelu: str = "exact"):
  """`depth` blocks: a list (parameters blocks_i/...) or, with `scan`, one `nn.scan` over a
  single block whose parameters are stacked along a leading layer axis (blocks/block/...), which
  compiles once instead of `depth` times. Scanned blocks share one stochastic-depth rate, so
  they need drop_path 0 (the MAE recipe)."""
  rates = [0.0] * depth if rates is None else [float(r) for r in rates]
  if not scan:
    cls = block_class(remat)
    return [cls(num_heads, mlp_dim, r, dtype=dtype, attention=attention, gelu=gelu)
            for r in rates]
  if any(rates):
    raise UserError("model.scan_blocks=True needs model.drop_path=0 (scanned blocks share one "
                    "stochastic-depth rate)")
  scanned = nn.scan(_ScanStep, variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                    length=depth)
  return scanned(num_heads, mlp_dim, dtype=dtype, attention=attention, remat=remat, gelu=gelu)


def run_blocks(blocks, x, deterministic: bool = True):
  if isinstance(blocks, (list, tuple)):
    for block in blocks:
      x = block(x, deterministic)
    return x
  return blocks(x, deterministic)[0]


def unstack_blocks(params: dict) -> dict:
  """Scanned parameters (blocks/block/... with a leading layer axis) -> the per-block layout
  blocks_i/... that the unscanned models, the converters and the relevance maps use. Applies to
  every scanned stack in the tree (encoder `blocks`, MAE `decoder_blocks`); other entries are
  returned as they are."""
  out = {}
  for key, value in params.items():
    if isinstance(value, dict) and set(value) == {"block"}:
      depth = jax.tree.leaves(value)[0].shape[0]
      for i in range(depth):
        out[f"{key}_{i}"] = jax.tree.map(lambda x, i=i: x[i], value["block"])
    elif isinstance(value, dict):
      out[key] = unstack_blocks(value)
    else:
      out[key] = value
  return out


def stack_blocks(params: dict, stacks=("blocks", "decoder_blocks")) -> dict:
  """The inverse of `unstack_blocks` for the named stacks: blocks_0..blocks_{n-1} -> blocks/block
  with a leading layer axis (a tree without them is returned as it is)."""
  def member(key):
    return any(key.startswith(f"{s}_") and key[len(s) + 1:].isdigit() for s in stacks)

  out = {}
  for key, value in params.items():
    if member(key):
      continue
    out[key] = stack_blocks(value, stacks) if isinstance(value, dict) else value
  for name in stacks:
    layers = sorted((int(k[len(name) + 1:]), v) for k, v in params.items()
                    if k.startswith(f"{name}_") and k[len(name) + 1:].isdigit())
    if layers:
      out[name] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *[v for _, v in layers])}
  return out


def _patch_embed_init(key, shape, dtype=jnp.float32):
  """Xavier-uniform on the flattened (p*p*c, width) view, as the MAE reference does."""
  kh, kw, cin, cout = shape
  return _dense_init(key, (kh * kw * cin, cout), dtype).reshape(shape)


class VisionTransformer(nn.Module):
  """ViT encoder. `__call__` returns the normed tokens (batch, 1 + L, width), class token first.

  `patch_tokens` and `encode` split the forward pass so MAE can drop tokens in between.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int
  drop_path: float = 0.0
  pos_embed_kind: str = "sincos"  # "learned": a trained parameter (timm's supervised ViTs)
  dtype: Any = jnp.float32
  attention: str = "xla"  # "cudnn": fused attention on GPUs (Attention)
  remat: str = "none"     # REMAT_POLICIES: recompute blocks in the backward pass
  scan_blocks: bool = False  # one nn.scan over the blocks (stacked parameters, fast compiles)
  gelu: str = "exact"     # GELUS: the MLP's non-linearity (Mlp.activation)

  @classmethod
  def from_variant(cls, variant: str, image_size: int, **kwargs) -> "VisionTransformer":
    spec = parse_variant(variant)
    if kwargs.get("attention", "xla") not in ATTENTION_IMPLEMENTATIONS:
      raise UserError(f"model.attention={kwargs['attention']!r} is not one of "
                      f"{ATTENTION_IMPLEMENTATIONS}")
    if kwargs.get("gelu", "exact") not in GELUS:
      raise UserError(f"model.gelu={kwargs['gelu']!r} is not one of {GELUS}")
    if image_size % spec.patch_size:
      raise UserError(
          f"data.image_size={image_size} is not divisible by the patch size {spec.patch_size} "
          f"of model.variant={variant!r}")
    return cls(width=spec.width, depth=spec.depth, mlp_dim=spec.mlp_dim,
               num_heads=spec.num_heads, patch_size=spec.patch_size, image_size=image_size,
               **kwargs)

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def setup(self):
    p = self.patch_size
    self.patch_embed = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                               dtype=self.dtype, kernel_init=_patch_embed_init)
    self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.width))
    table = jnp.asarray(sincos_2d_posemb(self.width, self.grid_size))[None]
    if self.pos_embed_kind == "learned":  # initialised at the fixed table, then trained
      self.pos_embed = self.param("pos_embed", lambda _: table)
    elif self.pos_embed_kind == "sincos":
      self.pos_embed = table
    else:
      raise UserError(f"model.pos_embed={self.pos_embed_kind!r} is not 'sincos' or 'learned'")
    rates = np.linspace(0.0, self.drop_path, self.depth)  # linearly increasing stochastic depth
    self.blocks = make_blocks(self.depth, self.num_heads, self.mlp_dim, rates, dtype=self.dtype,
                              attention=self.attention, remat=self.remat, scan=self.scan_blocks,
                              gelu=self.gelu)
    self.norm = LayerNorm(epsilon=1e-6, dtype=self.dtype)

  def patch_tokens(self, images):
    """(batch, H, W, C) -> patch tokens plus position embedding, (batch, L, width)."""
    x = self.patch_embed(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    return x + self.pos_embed[:, 1:].astype(x.dtype)

  def encode(self, tokens, deterministic: bool = True, final_norm: bool = True):
    """Prepends the class token and runs the blocks and (unless `final_norm=False`, as for
    MAE's global-pool fine-tuning) the final LayerNorm."""
    cls = (self.cls_token + self.pos_embed[:, :1]).astype(tokens.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (tokens.shape[0], 1, self.width)), tokens], 1)
    x = run_blocks(self.blocks, x, deterministic)
    return self.norm(x) if final_norm else x

  def __call__(self, images, deterministic: bool = True, final_norm: bool = True):
    return self.encode(self.patch_tokens(images), deterministic, final_norm)
