"""The CAM family: class activation maps from a layer's activations A and gradients g.

Every gradient method is one function from (A, g) to a map, as in pytorch-grad-cam, where most
methods differ only in how the channel weights are computed. Shapes: A (B, h, w, C), g (K, B, h,
w, C) for K classes; maps come out (B, K, h, w).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.errors import UserError
from wsss_jax.relevance import core


def _weighted(weights, acts):
  """sum_c weights_kc A_c: (K, B, C), (B, h, w, C) -> (B, K, h, w)."""
  return jnp.einsum("kbc,bhwc->bkhw", weights, acts)


def gradcam_map(acts, grads):
  """Grad-CAM: alpha_kc = mean_hw dy_k/dA_c, map = sum_c alpha_kc A_c (Selvaraju et al. 2017)."""
  return _weighted(grads.mean(axis=(2, 3)), acts)


def gradcampp_map(acts, grads):
  """Grad-CAM++: a = g^2 / (2 g^2 + sum_hw(A) g^3), w_c = sum_hw ReLU(g) a (Chattopadhay 2018)."""
  g2 = grads * grads
  denom = 2.0 * g2 + acts.sum(axis=(1, 2))[None, :, None, None, :] * g2 * grads
  alpha = jnp.where((grads != 0) & (denom != 0), g2 / jnp.where(denom != 0, denom, 1.0), 0.0)
  return _weighted((jax.nn.relu(grads) * alpha).sum(axis=(2, 3)), acts)


def xgradcam_map(acts, grads):
  """XGrad-CAM: w_c = sum_hw(g A) / sum_hw(A) (Fu et al. 2020)."""
  norm = acts.sum(axis=(1, 2))[None] + 1e-7
  return _weighted((grads * acts[None]).sum(axis=(2, 3)) / norm, acts)


def layercam_map(acts, grads):
  """LayerCAM: sum_c ReLU(g) A, element-wise (Jiang et al. 2021)."""
  return jnp.einsum("kbhwc,bhwc->bkhw", jax.nn.relu(grads), acts)


def hirescam_map(acts, grads):
  """HiResCAM: sum_c g A, element-wise (Draelos and Carin 2020)."""
  return jnp.einsum("kbhwc,bhwc->bkhw", grads, acts)


GRADIENT_MAPS = {"gradcam": gradcam_map, "gradcampp": gradcampp_map, "xgradcam": xgradcam_map,
                 "layercam": layercam_map, "hirescam": hirescam_map}


def gradient_method(map_fn):
  """A method from a map function: one forward pass, one vjp vmapped over classes."""
  def method(ctx: core.Context):
    _, features, _, grads = core.class_gradients(
        ctx.apply_fn, ctx.variables, ctx.images, ctx.layers, ctx.names, ctx.classes, ctx.target)
    return {n: map_fn(core.spatial(features[n]).astype(jnp.float32),
                      core.spatial(grads[n], batch_dims=2)) for n in ctx.names}
  method.__doc__ = map_fn.__doc__
  return method


# --- Gradient-free maps -----------------------------------------------------------------------------
def head_kernel(params, head: str):
  """The (C, K) weights of the linear head at '/'-path `head` in params."""
  node = params
  for key in head.split("/"):
    if not isinstance(node, dict) or key not in node:
      raise UserError(f"CAM needs the linear head's weights at params path {head!r}, which this "
                      f"model lacks; set cam_head= to its path, or use gradcam")
    node = node[key]
  kernel = node["kernel"] if isinstance(node, dict) else node
  return kernel.reshape(-1, kernel.shape[-1])


def cam(ctx: core.Context, cam_head: str = "head/fc8"):
  """CAM (Zhou et al. 2016): M_k = sum_c w_kc A_c with the head's weights, for a head that is
  global average pooling then a linear map of the explained layer."""
  kernel = head_kernel(ctx.variables["params"], cam_head)
  _, features, _ = core.forward(ctx.apply_fn, ctx.variables, ctx.images, ctx.layers, {})
  out = {}
  for n in ctx.names:
    acts = core.spatial(features[n]).astype(jnp.float32)
    if acts.shape[-1] != kernel.shape[0]:
      raise UserError(f"CAM: layer {n!r} has {acts.shape[-1]} channels but the head {cam_head!r} "
                      f"reads {kernel.shape[0]}; CAM applies only to the layer the head pools")
    w = kernel[:, jnp.asarray(ctx.classes)].astype(jnp.float32)  # (C, K)
    out[n] = jnp.einsum("ck,bhwc->bkhw", w, acts)
  return out


def first_component(acts):
  """Eigen-CAM for one image: the projection of the centred (hw, C) activations on their first
  right singular vector, its sign chosen so the map correlates positively with the mean
  activation (the SVD's sign is arbitrary)."""
  h, w, c = acts.shape
  x = acts.reshape(h * w, c)
  x = x - x.mean(axis=0)
  _, _, vt = jnp.linalg.svd(x, full_matrices=False)
  proj = x @ vt[0]
  sign = jnp.where(jnp.dot(proj, acts.reshape(h * w, c).mean(-1)) < 0, -1.0, 1.0)
  return (sign * proj).reshape(h, w)


def eigencam(ctx: core.Context):
  """Eigen-CAM (Muhammad and Yeasin 2020): class-agnostic, the same map for every class."""
  _, features, _ = core.forward(ctx.apply_fn, ctx.variables, ctx.images, ctx.layers, {})
  k = len(ctx.classes)
  out = {}
  for n in ctx.names:
    maps = jax.vmap(first_component)(core.spatial(features[n]).astype(jnp.float32))
    out[n] = jnp.broadcast_to(maps[:, None], (maps.shape[0], k) + maps.shape[1:])
  return out


def channel_masks(acts, image_hw):
  """Score-CAM masks: every channel upsampled to the input and min-max scaled to [0, 1]."""
  up = jax.image.resize(acts, (acts.shape[0],) + tuple(image_hw) + (acts.shape[-1],), "bilinear")
  lo = up.min(axis=(1, 2), keepdims=True)
  span = up.max(axis=(1, 2), keepdims=True) - lo
  return jnp.where(span > 0, (up - lo) / jnp.where(span > 0, span, 1.0), 0.0)  # (B, H, W, C)


def scorecam(ctx: core.Context, score_batch: int = 64):
  """Score-CAM (Wang et al. 2020): w_kc = softmax_c(score_k(x * mask_c)); map = sum_c w_kc A_c.

  The C masked forward passes per image run on device, `score_batch` channels at a time for
  the whole batch (lax.map over channel chunks).
  """
  _, features, _ = core.forward(ctx.apply_fn, ctx.variables, ctx.images, ctx.layers, {})
  images = ctx.images
  b = images.shape[0]
  idx = jnp.asarray(ctx.classes)
  out = {}
  for n in ctx.names:
    acts = core.spatial(features[n]).astype(jnp.float32)
    masks = channel_masks(acts, images.shape[1:3])
    c = masks.shape[-1]
    chunk = max(1, min(score_batch, c))
    pad = -c % chunk
    masks = jnp.pad(masks, ((0, 0), (0, 0), (0, 0), (0, pad)))
    groups = jnp.moveaxis(masks.reshape(masks.shape[:3] + ((c + pad) // chunk, chunk)), 3, 0)

    def scores(group):  # (B, H, W, chunk) -> (B, chunk, K)
      masked = images[:, None] * jnp.moveaxis(group, -1, 1)[..., None].astype(images.dtype)
      logits = ctx.apply_fn(core.model_variables(ctx.variables),
                            masked.reshape((-1,) + images.shape[1:]))
      return core.target_scores(logits, ctx.target)[:, idx].reshape(b, chunk, -1)

    s = jax.lax.map(scores, groups)  # (groups, B, chunk, K)
    s = jnp.moveaxis(s, 0, 1).reshape(b, c + pad, -1)[:, :c]
    weights = jax.nn.softmax(s, axis=1)  # over channels
    out[n] = jnp.einsum("bck,bhwc->bkhw", weights, acts)
  return out
