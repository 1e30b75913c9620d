"""The relevance maps a config asks for: a method spec ('gradcam', 'lrp:EpsilonGammaBox') turned
into the method and its options, and each classifier backbone's default map layers."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from wsss_jax import relevance
from wsss_jax.errors import UserError
from wsss_jax.relevance import lrp


DEFAULT_LAYERS = {"resnet38": ("b4_5", "b5_2", "bn7"), "resnet50": ("layer3", "layer4"),
                  "vit": ()}


# config.relu of the maps and pseudo-mask phases -> relevance_fn's relu (None: the method's own)
RELU_MODES = {"method": None, "off": False, "on": True}


def relu_flag(mode: str, extra_modes: tuple = ()):
  """relevance_fn's relu for the named mode; a name outside RELU_MODES + extra_modes is refused."""
  if mode not in RELU_MODES:
    raise UserError(f"relu={mode!r} is not one of {extra_modes + tuple(RELU_MODES)}")
  return RELU_MODES[mode]


def method_options(spec: str, config, data) -> tuple[str, dict]:
  """'lrp:EpsilonGammaBox' -> ('lrp', options); bounds for z-box from the input range."""
  name, _, variant = spec.partition(":")
  relevance.check_method(name)
  options = {}
  if name == "lrp":
    options = dict(config.lrp.to_dict())
    if variant in lrp.COMPOSITES:
      options["composite"] = variant
    elif variant in lrp.RULES:
      options["rule"] = variant
    elif variant:
      raise UserError(f"methods: {spec!r}: {variant!r} is neither an LRP composite "
                      f"{sorted(lrp.COMPOSITES)} nor a rule {list(lrp.RULES)}")
    mean, std = np.asarray(data.mean), np.asarray(data.std)
    low, high = ((0 - mean) / std, (1 - mean) / std) if data.normalize else (0.0, 1.0)
    options |= {"low": jnp.asarray(low, jnp.float32), "high": jnp.asarray(high, jnp.float32)}
  elif variant:
    raise UserError(f"methods: {spec!r}: only lrp takes a ':variant'")
  if name == "scorecam":
    options = dict(config.scorecam.to_dict())
  return name, options


def layers_for(method: str, config, backbone: str):
  if method in relevance.PIXEL_METHODS or method in relevance.ATTENTION_METHODS:
    return None
  if method == "cam":
    return None  # the pooled layer
  layers = tuple(config.layers) or DEFAULT_LAYERS.get(backbone, ())
  return list(layers) or None
