"""The machinery every relevance method shares: named layers, one forward pass with taps, the
per-class backward pass, and the map post-processing.

A model exposes a layer by `layers.named_feature` (sown into `intermediates`, open to
`perturbations`); a layer's name is its module path plus feature name, e.g. `backbone/b4_5` or
`encoder/blocks_11/norm1`, and any unique '/'-separated suffix of it (`b4_5`, `blocks_11/norm1`)
names it too. Gradients with respect to a layer are gradients with respect to its perturbation,
so the backward pass stops at the deepest requested layer. All classes come from one `jax.vjp`
whose pullback is vmapped over one-hot output cotangents.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

from wsss_jax.errors import UserError
from wsss_jax.models.layers import feature_key

TARGETS = ("logit", "sigmoid", "softmax")
NORMALIZATIONS = ("class", "joint", "maxabs", "none")
SUFFIX = feature_key("")  # "_features"
INPUT = "input"  # the pseudo-layer of pixel-level methods (LRP, patterns)


# --- Layers -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layers:
  """The named features of a model, in call order: name -> (path in `intermediates`, shape)."""
  paths: dict
  shapes: dict
  perturbations: Any  # the zero perturbation tree (ShapeDtypeStructs) every forward pass needs
  num_classes: int

  def resolve(self, name: str) -> str:
    """A full layer name from a name or unique suffix; one error listing the layers otherwise."""
    if name in self.paths:
      return name
    matches = [full for full in self.paths if full.endswith("/" + name)]
    if len(matches) == 1:
      return matches[0]
    if matches:
      raise UserError(f"layer {name!r} is ambiguous: it matches {matches}")
    raise UserError(f"the model has no layer {name!r}; its named layers are {self.names()}")

  def names(self) -> list[str]:
    return list(self.paths)

  def attention_layers(self) -> list[str]:
    """The attention weights of every transformer block, first block first."""
    return [n for n in self.paths if n.endswith("attn/attention")]

  def default(self) -> str:
    """The last block's first LayerNorm for a ViT (its class token reads the patch tokens
    there); the last named feature otherwise (bn7, layer4)."""
    norms = [n for n in self.paths if n.endswith("/norm1")]
    if norms:
      return norms[-1]
    return [n for n in self.paths if not n.endswith("attn/attention")][-1]


def model_variables(variables) -> dict:
  """The model's own collections (params, batch_stats): no stale taps or sown values."""
  return {k: v for k, v in variables.items() if k not in ("perturbations", "intermediates")}


def find_layers(apply_fn, variables, images) -> Layers:
  """Traces one forward pass abstractly (no FLOPs) to list the model's named features."""
  order = []

  def probe(v, x):
    logits, state = apply_fn(v, x, mutable=["intermediates", "perturbations"])
    # call order, read before jax's pytree flattening sorts the dict keys
    order.extend(traverse_util.flatten_dict(dict(state.get("intermediates", {}))))
    return logits, state
  logits, state = jax.eval_shape(probe, model_variables(variables), images)
  flat = traverse_util.flatten_dict(dict(state.get("intermediates", {})))
  paths, shapes = {}, {}
  for path in order:
    value = flat[path]
    if path[-1].endswith(SUFFIX):
      name = "/".join(path[:-1] + (path[-1][:-len(SUFFIX)],))
      paths[name], shapes[name] = path, value[0].shape
  if not paths:
    raise UserError("the model names no layers (layers.named_feature); relevance maps need them")
  return Layers(paths, shapes, state.get("perturbations", {}), logits.shape[-1])


def check_classes(classes, num_classes: int) -> tuple[int, ...]:
  if classes is None:
    return tuple(range(num_classes))
  classes = tuple(int(c) for c in classes)
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad or not classes:
    raise UserError(f"classes {list(classes)} must be a non-empty list of indices in "
                    f"[0, {num_classes}) for this {num_classes}-class model")
  return classes


def check_choice(kind: str, value, allowed) -> None:
  if value not in allowed:
    raise UserError(f"{kind}={value!r} is not one of {tuple(allowed)}")


# --- Forward and backward ---------------------------------------------------------------------------
def target_scores(logits, target: str):
  """The quantity explained: the logit, the sigmoid probability (multi-label) or the softmax."""
  if target == "sigmoid":
    return jax.nn.sigmoid(logits)
  if target == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  return logits


class Interceptor:
  """Base for method-specific rewrites of module calls (linen `intercept_methods`).

  `deltas` holds this pass's tap perturbations; `busy` guards the interceptor's own module
  calls (a clone applied inside an interceptor is intercepted too).
  """

  def __init__(self):
    self.deltas, self.busy, self.records = {}, False, {}

  def __call__(self, next_fun, args, kwargs, context):
    if self.busy:
      return next_fun(*args, **kwargs)
    return self.intercept(next_fun, args, kwargs, context)

  def intercept(self, next_fun, args, kwargs, context):
    return next_fun(*args, **kwargs)

  @contextlib.contextmanager
  def own_calls(self):
    self.busy = True
    try:
      yield
    finally:
      self.busy = False


def forward(apply_fn, variables, images, layers: Layers, deltas: dict,
            interceptor: Interceptor | None = None):
  """One forward pass: logits, {layer: feature}, and the interceptor's records. `deltas` maps
  layer names to perturbations (zeros, differentiated for gradients)."""
  perturbations = traverse_util.flatten_dict(dict(layers.perturbations))
  perturbations = {p: jnp.zeros(s.shape, s.dtype) for p, s in perturbations.items()}
  for name, delta in deltas.items():
    if name in layers.paths:
      perturbations[layers.paths[name]] = delta
  variables = model_variables(variables) | {"perturbations": traverse_util.unflatten_dict(perturbations)}
  context = contextlib.nullcontext()
  if interceptor is not None:
    interceptor.deltas, interceptor.records = deltas, {}
    context = nn.intercept_methods(interceptor)
  with context:
    logits, state = apply_fn(variables, images, mutable=["intermediates"])
  flat = traverse_util.flatten_dict(dict(state["intermediates"]))
  features = {name: flat[path][0] for name, path in layers.paths.items()}
  records = interceptor.records if interceptor is not None else {}
  return logits, features, records


def computed_once(x):
  """The identity, computed once for all classes' backward passes on the CPU.

  XLA:CPU fuses cheap elementwise producers into their consumers, duplicating them. Under the
  vmap over classes, each class's backward fusions then recomputed the forward activations
  they read, back through the residual stream: for ResNet-50's LRP, fusions of up to 63 arrays,
  run once per class, 38% of the call (BENCHMARKS.md). A divide by a runtime 1 at each block's
  output (XLA counts a divide as expensive) stops the recomputation there: the call's bytes
  accessed fall from 24.6 to 17.3 GB. Its derivative, a divide by the same 1, is part of the
  effect: an identity derivative (custom_jvp) left 27.6 GB. The 1 cannot be constant-folded and
  is 1 for any x, NaN and inf included."""
  if jax.default_backend() != "cpu":
    return x
  one = 1.0 + 0.0 * jnp.isnan(x[(0,) * x.ndim]).astype(x.dtype)
  return x / one


def class_gradients(apply_fn, variables, images, layers: Layers, names: Sequence[str],
                    classes: Sequence[int], target: str, interceptor: Interceptor | None = None,
                    extra_deltas: dict | None = None):
  """Gradients of the target score of every class in `classes` with respect to the named
  layers (and the interceptor's taps in `extra_deltas`), from one vjp vmapped over classes.

  Returns logits (B, K_all), features {name: (B, ...)}, records, and grads {name: (K, B, ...)}.
  """
  deltas = {n: jnp.zeros(layers.shapes[n], jnp.float32) for n in names} | (extra_deltas or {})
  idx = jnp.asarray(classes)

  def scores(d):
    logits, features, records = forward(apply_fn, variables, images, layers, d, interceptor)
    return target_scores(logits, target)[:, idx], (logits, features, records)

  _, pullback, (logits, features, records) = jax.vjp(scores, deltas, has_aux=True)
  k, b = len(classes), images.shape[0]
  cotangents = jnp.broadcast_to(jnp.eye(k, dtype=jnp.float32)[:, None, :], (k, b, k))
  (grads,) = jax.vmap(pullback)(cotangents)  # one backward pass per class, batched
  return logits, features, records, grads


# --- Feature geometry -------------------------------------------------------------------------------
def token_grid(tokens):
  """(..., N, C) ViT tokens -> (..., g, g, C) patch grid, the class token (if any) dropped."""
  n = tokens.shape[-2]
  for extra in (1, 0):
    g = math.isqrt(n - extra)
    if g * g == n - extra and g > 0:
      grid = tokens[..., extra:, :]
      return grid.reshape(grid.shape[:-2] + (g, g, grid.shape[-1]))
  raise UserError(f"a token sequence of length {n} is not a square grid (with or without a "
                  f"class token)")


def spatial(feature, batch_dims: int = 1):
  """A feature as (..., h, w, C): conv maps as they are, ViT tokens on their patch grid."""
  if feature.ndim == batch_dims + 3:
    return feature
  if feature.ndim == batch_dims + 2:
    return token_grid(feature)
  raise UserError(f"a feature of shape {feature.shape} is neither a (B, H, W, C) map nor "
                  f"(B, N, C) tokens")


# --- Post-processing --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Finish:
  """How raw (B, K, h, w) maps become the returned maps."""
  relu: bool = True
  upsample: bool = True
  normalize: str = "class"
  only_present: bool = False

  def __call__(self, maps, image_hw, classes, labels=None):
    maps = maps.astype(jnp.float32)
    if self.relu:
      maps = jax.nn.relu(maps)
    if self.upsample and maps.shape[-2:] != tuple(image_hw):
      maps = jax.image.resize(maps, maps.shape[:2] + tuple(image_hw), "bilinear")
    present = None
    if self.only_present and labels is not None:
      present = (labels[:, jnp.asarray(classes)] > 0)[:, :, None, None]
    maps = normalize_maps(maps, self.normalize, present)
    return maps if present is None else jnp.where(present, maps, 0.0)


def normalize_maps(maps, how: str, present=None):
  """Min-max per class ('class'), over all (present) classes of an image jointly ('joint', as
  the multi-layer pseudo-supervision code does), by the largest magnitude ('maxabs', keeps
  the sign of signed relevance) or not at all. Constant maps become 0."""
  if how == "none":
    return maps
  if how == "maxabs":
    scale = jnp.abs(maps).max(axis=(-2, -1), keepdims=True)
    return maps / jnp.where(scale > 0, scale, 1.0)
  axes = (-2, -1) if how == "class" else (-3, -2, -1)
  valid = jnp.ones(maps.shape, bool) if present is None else jnp.broadcast_to(present, maps.shape)
  lo = jnp.where(valid, maps, jnp.inf).min(axis=axes, keepdims=True)
  hi = jnp.where(valid, maps, -jnp.inf).max(axis=axes, keepdims=True)
  span = hi - lo
  ok = jnp.isfinite(span) & (span > 0)
  return jnp.where(ok, (maps - jnp.where(ok, lo, 0.0)) / jnp.where(ok, span, 1.0), 0.0)


def as_layer_list(layers) -> tuple[list | None, bool]:
  """(list of names or None, whether the caller asked for one layer)."""
  if layers is None:
    return None, True
  if isinstance(layers, str):
    return [layers], True
  layers = list(layers)
  if not layers:
    raise UserError("layers must name at least one layer")
  return layers, False


Method = Callable[..., dict]  # (ctx, **options) -> {layer: (B, K, h, w) raw maps}


@dataclasses.dataclass
class Context:
  """What a method gets: the model, the batch, resolved layers and classes."""
  apply_fn: Callable
  variables: Any
  images: Any
  layers: Layers
  names: list  # resolved layer names (or INPUT)
  classes: tuple
  target: str
