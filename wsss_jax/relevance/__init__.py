"""Class relevance maps for any classifier of this project, batched and compiled.

    maps = relevance("gradcam", model.apply, variables, images, layers=["b4_5", "b5_2", "bn7"])

returns {layer: (B, K, H, W)} for a list of layers, or one (B, K, H, W) array for a single layer
name (or the default layer). All requested classes come from one compiled call: one forward
pass and one vjp whose pullback is vmapped over the classes' one-hot cotangents.
`relevance_fn(...)` returns the compiled callable `(variables, images, labels=None) -> maps`
for repeated use.

Methods: CAM family (cam, gradcam, gradcampp, xgradcam, layercam, hirescam, scorecam,
eigencam); transformers (attention, rollout, chefer; gradcam and the rest on token layers);
LRP (lrp with rules and composites, AttnLRP for ViTs); patternnet and patternattribution (with
patterns from `fit_patterns`). Pixel-level methods read the pseudo-layer `input`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple

import jax

from wsss_jax.errors import UserError
from wsss_jax.relevance import cam, core, lrp, pattern, transformer
from wsss_jax.relevance.core import INPUT, Layers, find_layers, normalize_maps
from wsss_jax.relevance.pattern import fit_patterns, load_patterns, save_patterns

__all__ = ["relevance", "relevance_fn", "METHODS", "MethodSpec", "INPUT", "Layers", "find_layers",
           "normalize_maps", "fit_patterns", "load_patterns", "save_patterns"]

class MethodSpec(NamedTuple):
  """A relevance method in the registry."""
  fn: Callable              # (core.Context, **options) -> raw maps
  uses_gradients: bool      # backpropagates the class scores
  default_relu: bool        # ReLU on the maps unless the caller says otherwise
  pixel_level: bool         # explains the pixels (`input`) by default, not a feature layer
  attention: bool = False   # tied to the attention layers, not to `layers`


METHODS = {
    "cam": MethodSpec(cam.cam, uses_gradients=False, default_relu=True, pixel_level=False),
    "gradcam": MethodSpec(cam.gradient_method(cam.gradcam_map), True, True, False),
    "gradcampp": MethodSpec(cam.gradient_method(cam.gradcampp_map), True, True, False),
    "xgradcam": MethodSpec(cam.gradient_method(cam.xgradcam_map), True, True, False),
    "layercam": MethodSpec(cam.gradient_method(cam.layercam_map), True, True, False),
    "hirescam": MethodSpec(cam.gradient_method(cam.hirescam_map), True, True, False),
    "scorecam": MethodSpec(cam.scorecam, False, True, False),
    "eigencam": MethodSpec(cam.eigencam, False, True, False),
    "attention": MethodSpec(transformer.attention, False, False, False, attention=True),
    "rollout": MethodSpec(transformer.rollout, False, False, False, attention=True),
    "chefer": MethodSpec(transformer.chefer, True, False, False, attention=True),
    "lrp": MethodSpec(lrp.lrp, True, False, True),
    "patternnet": MethodSpec(pattern.patternnet, True, False, True),
    "patternattribution": MethodSpec(pattern.patternattribution, True, False, True),
}
PIXEL_METHODS = tuple(m for m, spec in METHODS.items() if spec.pixel_level)
ATTENTION_METHODS = tuple(m for m, spec in METHODS.items() if spec.attention)


def check_method(method: str) -> None:
  if method not in METHODS:
    raise UserError(f"unknown relevance method {method!r}; methods are {sorted(METHODS)}")


class RelevanceFn:
  """A compiled relevance computation; layers resolve and compile at the first call per shape."""

  def __init__(self, method: str, apply_fn: Callable, *, classes=None, layers=None,
               target: str = "logit", upsample: bool = True, normalize: str = "class",
               relu: bool | None = None, only_present: bool = False, **options):
    check_method(method)
    core.check_choice("target", target, core.TARGETS)
    core.check_choice("normalize", normalize, core.NORMALIZATIONS)
    self.method, self.apply_fn, self.options = method, apply_fn, options
    self.classes, self.target = classes, target
    self.layer_list, self.single = core.as_layer_list(layers)
    fn, default_relu = METHODS[method].fn, METHODS[method].default_relu
    self.finish = core.Finish(default_relu if relu is None else relu, upsample, normalize,
                              only_present)
    self._compiled = {}
    try:
      inspect.signature(fn).bind(None, **options)
    except TypeError as e:
      raise UserError(f"method {method!r} does not take the options {sorted(options)}: {e}") \
          from None

  def resolve(self, variables, images) -> tuple[Layers, list, tuple]:
    layers = find_layers(self.apply_fn, variables, images)
    classes = core.check_classes(self.classes, layers.num_classes)
    if self.method in ATTENTION_METHODS:
      names = transformer.attention_layers(layers, self.method)[-1:]
      if self.layer_list is not None:
        raise UserError(f"method {self.method!r} reads the attention layers itself; "
                        f"do not pass layers=")
      return layers, names, classes
    wanted = self.layer_list
    if wanted is None:
      wanted = [INPUT] if self.method in PIXEL_METHODS else [layers.default()]
    names = []
    for name in wanted:
      if name == INPUT:
        if self.method not in PIXEL_METHODS:
          raise UserError(f"layer 'input' is for the pixel-level methods {PIXEL_METHODS}; "
                          f"{self.method!r} needs a named layer: {layers.names()}")
        names.append(INPUT)
      else:
        names.append(layers.resolve(name))
    return layers, names, classes

  def _build(self, variables, images):
    layers, names, classes = self.resolve(variables, images)
    fn = METHODS[self.method].fn

    def compute(variables, images, labels):
      ctx = core.Context(self.apply_fn, variables, images, layers, names, classes, self.target)
      raw = fn(ctx, **self.options)
      return {n: self.finish(m, images.shape[1:3], classes, labels) for n, m in raw.items()}
    return jax.jit(compute)

  def jitted(self, variables, images, labels=None):
    """The jitted `(variables, images, labels) -> {layer: maps}` for these shapes."""
    key = (jax.tree.structure(variables), images.shape, str(images.dtype), labels is None)
    if key not in self._compiled:
      self._compiled[key] = self._build(variables, images)
    return self._compiled[key]

  def maps(self, variables, images, labels=None) -> dict:
    """{layer: (B, K, H, W)} whatever `layers` was."""
    return self.jitted(variables, images, labels)(variables, images, labels)

  def __call__(self, variables, images, labels=None):
    maps = self.maps(variables, images, labels)
    return next(iter(maps.values())) if self.single else maps


def relevance_fn(method: str, apply_fn: Callable, **kwargs) -> RelevanceFn:
  """The compiled `(variables, images, labels=None) -> maps` for `method`; see `relevance`."""
  return RelevanceFn(method, apply_fn, **kwargs)


def relevance(method: str, apply_fn: Callable, variables, images, *, classes=None, layers=None,
              labels=None, target: str = "logit", upsample: bool = True,
              normalize: str = "class", relu: bool | None = None, only_present: bool = False,
              **options):
  """Class relevance maps (B, K, H, W) of `images` under `apply_fn(variables, images) -> logits`.

  classes: indices to explain (default all). layers: a layer name, a list of names (then a dict
  of maps comes back), or None (the model's last feature; `input` for LRP and patterns).
  target: 'logit', 'sigmoid' or 'softmax' score. upsample: bilinear to the input size.
  normalize: 'class' (min-max per class), 'joint' (over classes), 'maxabs' or 'none'.
  relu: clamp negative evidence (default: on for CAMs, off for LRP and patterns).
  only_present: zero (and leave out of the normalisation) classes absent from `labels`.
  options: the method's own (e.g. composite='EpsilonPlusFlat', rule='epsilon', head=0).
  """
  fn = _cached(method, apply_fn, classes=None if classes is None else tuple(classes),
               layers=layers if layers is None or isinstance(layers, str) else tuple(layers),
               target=target, upsample=upsample, normalize=normalize, relu=relu,
               only_present=only_present, **options)
  return fn(variables, images, labels)


def _cached(method, apply_fn, **kwargs) -> RelevanceFn:
  try:
    return _cache(method, apply_fn, **kwargs)
  except TypeError:  # unhashable options (a patterns dict): no caching
    return RelevanceFn(method, apply_fn, **kwargs)


@functools.lru_cache(maxsize=32)
def _cache(method, apply_fn, **kwargs) -> RelevanceFn:
  return RelevanceFn(method, apply_fn, **kwargs)
