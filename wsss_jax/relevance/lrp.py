"""Layer-wise relevance propagation (LRP) as a modified gradient, with rules, composites and
canonisation as three separate ideas (as zennit has them).

Relevance propagates as c = R / a, the relevance per unit of activation, which the ordinary
gradient carries unchanged through ReLUs, max-pooling (winner takes all), average pooling and
residual sums (both in proportion to each input's share). Only linear layers (Conv, Dense) need
a rule. A rule rewrites a layer's output so that its forward value stays y while its gradient
becomes c_in = sum_s s J_s^T (c_out * y / stab(z_s)), the rule's modified outputs z_s = W_s x_s +
b_s; then R_in = x * c_in. The first layer is explicit instead: its output relevance
R_1 = y_1 * c_1 is taken at a tap there and pushed to the pixels by its rule, so input-only rules
(flat, w-square, z-box), whose relevance is not x times something, work there.

Canonisation: a BatchNorm that reads a convolution's output directly is folded into it
(w' = w gamma / sqrt(var + eps), b' = (b - mu) gamma / sqrt(var + eps) + beta) and replaced by
the identity. A BatchNorm after a residual sum (pre-activation ResNet38) stays a per-channel
linear layer, whose gradient is the z-rule with bias.

Biases, per rule: epsilon, gamma (b + gamma b^+) and the z-rule of a standalone BatchNorm keep
the bias in the denominator, so the relevance it explains is absorbed there (not conserved);
zplus and alpha-beta drop it (all relevance reaches the inputs), zplus_bias and alpha-beta
`_bias` keep its positive (and for beta its negative) part. The first-layer rules flat, w-square
and z-box ignore it. Per composite: EpsilonPlus / EpsilonPlusFlat use zplus (bias dropped) on
the convolutions, EpsilonPlusBias / EpsilonPlusFlatBias zplus_bias (as zennit's EpsilonPlus /
EpsilonPlusFlat); all use epsilon (bias kept) on dense layers. With BatchNorm folded into the
convolutions the biases can be large, and the two forms then give visibly different maps.

Rules are attached by intercepting linen module calls (`nn.intercept_methods`), so models carry
no LRP code. AttnLRP (for ViTs) also freezes the attention weights (stop-gradient on q and k),
the LayerNorm's standard deviation, and treats the MLP's non-linearity with the identity rule
(y = x * stop_gradient(y / x)); with the attention weights frozen, no product of two
input-dependent factors remains, so the uniform split of products is not needed.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.device import kernels
from wsss_jax.errors import UserError
from wsss_jax.relevance import core

sg = jax.lax.stop_gradient
FIRST = "__first__"  # the tap at the first linear layer's output


def stabilize(z, epsilon: float):
  """z + eps * sign(z), with sign(0) = +1."""
  return z + epsilon * jnp.where(z >= 0, 1.0, -1.0)


def _pos(a):
  return None if a is None else jnp.maximum(a, 0)


def _neg(a):
  return None if a is None else jnp.minimum(a, 0)


# --- Rules ------------------------------------------------------------------------------------------
# groups(x, W, b) -> [(s, [(x_i, W_i, b_i), ...])]: each group is one modified output
# z_s = sum_i lin(x_i; W_i, b_i), weighted by s.
@dataclasses.dataclass(frozen=True)
class Epsilon:
  """R_i = x_i sum_j w_ij R_j / stab(z_j) (Bach et al. 2015)."""
  epsilon: float = 1e-6

  def groups(self, x, w, b):
    return [(1.0, [(x, w, b)])]


@dataclasses.dataclass(frozen=True)
class Gamma:
  """Epsilon rule on w + gamma w^+ (and b + gamma b^+): favours positive contributions."""
  gamma: float = 0.25
  epsilon: float = 1e-6

  def groups(self, x, w, b):
    b = None if b is None else b + self.gamma * _pos(b)
    return [(1.0, [(x, w + self.gamma * _pos(w), b)])]


@dataclasses.dataclass(frozen=True)
class ZPlus:
  """Positive weights on positive inputs only: z = W^+ x^+ (`zplus`: the bias dropped, so all
  relevance reaches the inputs), or z = W^+ x^+ + b^+ (`zplus_bias`, zennit's ZPlus: the
  positive bias joins the denominator and keeps its share of the relevance, which is lost)."""
  epsilon: float = 1e-6
  bias: bool = False

  def groups(self, x, w, b):
    return [(1.0, [(jnp.maximum(x, 0), _pos(w), _pos(b) if self.bias else None)])]


@dataclasses.dataclass(frozen=True)
class AlphaBeta:
  """alpha (positive contributions x^+ w^+ + x^- w^-) - beta (negative ones), alpha - beta = 1;
  with `bias` the positive (negative) part of the bias joins the positive (negative) part."""
  alpha: float = 1.0
  beta: float = 0.0
  bias: bool = False
  epsilon: float = 1e-6

  def groups(self, x, w, b):
    xp, xn = jnp.maximum(x, 0), jnp.minimum(x, 0)
    bp, bn = (_pos(b), _neg(b)) if self.bias and b is not None else (None, None)
    out = [(self.alpha, [(xp, _pos(w), bp), (xn, _neg(w), None)])]
    if self.beta:
      out.append((-self.beta, [(xp, _neg(w), bn), (xn, _pos(w), None)]))
    return out


@dataclasses.dataclass(frozen=True)
class Flat:
  """Input layer only: R_i = sum_j R_j / n_j, n_j the inputs of output j (w = 1, x = 1)."""
  epsilon: float = 1e-6
  input_only = True


@dataclasses.dataclass(frozen=True)
class WSquare:
  """Input layer only: R_i = sum_j w_ij^2 / sum_i' w_i'j^2 R_j."""
  epsilon: float = 1e-6
  input_only = True


@dataclasses.dataclass(frozen=True)
class ZBox:
  """Input layer only, for inputs bounded in [low, high] (Montavon et al. 2017):
  R_i = sum_j (x_i w_ij - l_i w_ij^+ - h_i w_ij^-) / z_j R_j."""
  low: Any = 0.0
  high: Any = 1.0
  epsilon: float = 1e-6
  input_only = True


def parse_rule(name: str, *, epsilon: float = 1e-6, gamma: float = 0.25, low=0.0, high=1.0):
  """A rule from its name: epsilon, gamma, zplus, alpha1beta0, alpha2beta1 (+ '_bias'), flat,
  wsquare, zbox."""
  rules = {
      "epsilon": lambda: Epsilon(epsilon), "gamma": lambda: Gamma(gamma, epsilon),
      "zplus": lambda: ZPlus(), "zplus_bias": lambda: ZPlus(bias=True), "alpha1beta0": lambda: AlphaBeta(1.0, 0.0),
      "alpha2beta1": lambda: AlphaBeta(2.0, 1.0), "alpha1beta0_bias": lambda: AlphaBeta(
          1.0, 0.0, True), "alpha2beta1_bias": lambda: AlphaBeta(2.0, 1.0, True),
      "flat": lambda: Flat(), "wsquare": lambda: WSquare(), "zbox": lambda: ZBox(low, high)}
  if name not in rules:
    raise UserError(f"unknown LRP rule {name!r}; rules are {sorted(rules)}")
  return rules[name]()


RULES = ("epsilon", "gamma", "zplus", "zplus_bias", "alpha1beta0", "alpha2beta1",
         "alpha1beta0_bias", "alpha2beta1_bias", "flat", "wsquare", "zbox")
# composite -> (first layer, other convolutions, dense layers); None: as the layer's type says.
COMPOSITES = {
    "EpsilonPlus": (None, "zplus", "epsilon"),
    "EpsilonPlusFlat": ("flat", "zplus", "epsilon"),
    "EpsilonPlusBias": (None, "zplus_bias", "epsilon"),  # zennit's EpsilonPlus
    "EpsilonPlusFlatBias": ("flat", "zplus_bias", "epsilon"),  # zennit's EpsilonPlusFlat
    "EpsilonGammaBox": ("zbox", "gamma", "epsilon"),
    "EpsilonAlpha2Beta1": (None, "alpha2beta1", "epsilon"),
    "AttnLRP": ("epsilon", "epsilon", "epsilon"),
}


# --- The model's linear layers and canonisation ------------------------------------------------------
@dataclasses.dataclass
class Plan:
  """Linear layers in call order with their kind ('conv' or 'dense'), the BatchNorms folded into
  them (conv path -> (bn path, eps)), the standalone BatchNorms (path -> eps), and the first
  layer's output shape."""
  linear: dict
  folded: dict
  standalone_bn: dict
  first_out: Any

  @property
  def first(self) -> str:
    return next(iter(self.linear))

  @property
  def folded_bns(self) -> set:
    return {bn for bn, _ in self.folded.values()}


class _Recorder(core.Interceptor):
  def __init__(self, canonize: bool):
    super().__init__()
    self.canonize = canonize
    self.linear, self.folded, self.standalone, self.outputs = {}, {}, {}, {}
    self.last = None

  def intercept(self, next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod, path = context.module, "/".join(context.module.path)
    if context.method_name != "__call__":
      return out
    if isinstance(mod, (nn.Conv, nn.Dense)):
      x = args[0]
      pointwise = isinstance(mod, nn.Dense) or all(d == 1 for d in x.shape[1:-1])
      self.linear[path] = "dense" if pointwise else "conv"  # a conv over a 1x1 map is dense
      self.outputs[path] = out
      self.last = (path, out)
    elif isinstance(mod, nn.BatchNorm):
      if self.canonize and self.last is not None and args[0] is self.last[1]:
        self.folded[self.last[0]] = (path, mod.epsilon)
      else:
        self.standalone[path] = mod.epsilon
    return out


def make_plan(apply_fn, variables, images, canonize: bool = True) -> Plan:
  recorder = _Recorder(canonize)

  def run(v, x):
    with nn.intercept_methods(recorder):
      return apply_fn(v, x)
  jax.eval_shape(run, core.model_variables(variables), images)
  if not recorder.linear:
    raise UserError("LRP found no Conv or Dense layer in the model")
  first = next(iter(recorder.linear))
  out = recorder.outputs[first]
  return Plan(recorder.linear, recorder.folded, recorder.standalone,
              jax.ShapeDtypeStruct(out.shape, jnp.float32))


def _at(tree, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def linear_params(variables, plan: Plan, path: str):
  """(kernel, bias or None) of a linear layer, with its BatchNorm folded in when canonised."""
  p = _at(variables["params"], path)
  w, b = p["kernel"].astype(jnp.float32), p.get("bias")
  b = None if b is None else b.astype(jnp.float32)
  if path in plan.folded:
    bn, eps = plan.folded[path]
    scale, shift = bn_affine(variables, bn, eps)
    w = w * scale
    b = (0.0 if b is None else b) * scale + shift
  return w, b


def bn_affine(variables, path: str, eps: float):
  """BatchNorm at inference as y = scale x + shift (running statistics)."""
  p, s = _at(variables["params"], path), _at(variables["batch_stats"], path)
  inv = jax.lax.rsqrt(s["var"].astype(jnp.float32) + eps)
  gamma = p["scale"].astype(jnp.float32) if "scale" in p else 1.0
  beta = p["bias"].astype(jnp.float32) if "bias" in p else 0.0
  return gamma * inv, beta - s["mean"].astype(jnp.float32) * gamma * inv


# --- Applying rules ----------------------------------------------------------------------------------
def linear_fn(module, interceptor: core.Interceptor, features: int | None = None,
              first: bool = False):
  """lin(x, W, b): the layer's own operation (padding, strides, dilation) with other weights
  (of `features` outputs when given). At the `first` layer, whose rules pull relevance back to
  the pixels, a strided convolution's input gradient is taken over space-to-depth blocks."""
  changes = {} if features is None else {"features": features}
  if first and isinstance(module, nn.Conv):
    changes["conv_general_dilated"] = kernels.conv_blocked_input_grad

  def lin(x, w, b=None):
    clone = module.clone(parent=None, use_bias=b is not None, **changes)
    params = {"kernel": w} | ({} if b is None else {"bias": b})
    with interceptor.own_calls():
      return clone.apply({"params": params}, x.astype(jnp.float32))
  return lin


def _is_feature(value) -> bool:
  """A (B, H, W, C) map or (B, N, C) tokens, not logits or a tuple."""
  return isinstance(value, jax.Array) and value.ndim >= 3


def _group_output(lin, parts):
  return sum(lin(xi, wi, bi) for xi, wi, bi in parts)


def modified_output(rule, lin, x, y, w, b):
  """Forward value y; gradient sum_s s J_s^T (c * y / stab(z_s))."""
  out = sg(y)
  for s, parts in rule.groups(x, w, b):
    z = _group_output(lin, parts)
    out = out + s * (z - sg(z)) * sg(y / stabilize(z, rule.epsilon))
  return out


def input_relevance(rule, lin, lin_one, x, w, b, relevance):
  """R at the first layer's input from R at its output, by the layer's rule (`lin_one`: the
  layer's operation with one output)."""
  def pull(fn, at, r):
    return jax.vjp(fn, at)[1](r)[0]
  if isinstance(rule, (Flat, WSquare)):
    # flat: a kernel of ones gives every output channel the same z_j = n_j, so the channels'
    # relevance is summed and pulled back through one channel (exact; C_out times fewer products)
    flat = isinstance(rule, Flat)
    op, wm = (lin_one, jnp.ones(w.shape[:-1] + (1,), jnp.float32)) if flat else (lin, w * w)
    # the channel sum as a matvec: XLA:CPU ran it as a fused multiply-reduce in 229 ms of
    # ResNet-50's LRP call (batch 8, 4 classes), this in about 50
    r = jnp.matmul(relevance, jnp.ones((relevance.shape[-1], 1), jnp.float32),
                   precision="highest") if flat else relevance
    ones = jnp.ones_like(x)
    return pull(lambda v: op(v, wm), ones, r / stabilize(op(ones, wm), rule.epsilon))
  if isinstance(rule, ZBox):
    low = jnp.broadcast_to(jnp.asarray(rule.low, jnp.float32), x.shape)
    high = jnp.broadcast_to(jnp.asarray(rule.high, jnp.float32), x.shape)
    z = lin(x, w) - lin(low, _pos(w)) - lin(high, _neg(w))
    r = relevance / stabilize(z, rule.epsilon)
    return (x * pull(lambda v: lin(v, w), x, r) - low * pull(lambda v: lin(v, _pos(w)), low, r)
            - high * pull(lambda v: lin(v, _neg(w)), high, r))
  total = 0.0
  for i, (s, _) in enumerate(rule.groups(x, w, b)):
    z_fn = lambda v, i=i: _group_output(lin, rule.groups(v, w, b)[i][1])  # noqa: E731
    total = total + s * pull(z_fn, x, relevance / stabilize(z_fn(x), rule.epsilon))
  return x * total


class RuleInterceptor(core.Interceptor):
  """Rewrites linear layers by their rules (or, for pattern methods, by their patterns), folds
  canonised BatchNorms, taps the first layer, and applies AttnLRP's ViT rewrites."""

  def __init__(self, plan: Plan, variables, rules: dict, vit: bool = False,
               patterns: dict | None = None, attribution: bool = False):
    super().__init__()
    self.plan, self.variables, self.rules, self.vit = plan, variables, rules, vit
    self.patterns, self.attribution = patterns, attribution
    self.first_lin = self.first_lin_one = None

  def intercept(self, next_fun, args, kwargs, context):
    mod, path = context.module, "/".join(context.module.path)
    if context.method_name == "activation" and self.vit:
      x = args[0]
      y = next_fun(*args, **kwargs)  # identity rule: y = x * sg(y / x)
      return sg(y) + (x - sg(x)) * sg(y / stabilize(x, 1e-6))
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if not isinstance(mod, (nn.Conv, nn.Dense, nn.BatchNorm, nn.LayerNorm)):
      out = next_fun(*args, **kwargs)  # a block, whose output every class's backward reads
      return core.computed_once(out) if _is_feature(out) else out
    if isinstance(mod, nn.BatchNorm):
      if path in self.plan.folded_bns:
        return args[0]  # folded into the preceding convolution
      if self.patterns is not None and path in self.plan.standalone_bn:
        x, y = args[0], next_fun(*args, **kwargs)
        scale, _ = bn_affine(self.variables, path, self.plan.standalone_bn[path])
        # a per-channel layer's pattern is cov(x, wx) / (w cov(x, wx)) = 1 / w exactly
        factor = 1.0 if self.attribution else 1.0 / scale
        return sg(y) + (x - sg(x)) * factor
      return next_fun(*args, **kwargs)
    if isinstance(mod, nn.LayerNorm) and self.vit:
      return self._layer_norm(mod, args[0], next_fun(*args, **kwargs))
    if not isinstance(mod, (nn.Conv, nn.Dense)) or path not in self.plan.linear:
      return next_fun(*args, **kwargs)
    x = args[0].astype(jnp.float32)
    w, b = linear_params(self.variables, self.plan, path)
    lin = linear_fn(mod, self, first=path == self.plan.first)
    y = lin(x, w, b)
    if self.patterns is not None:
      kernel = self.patterns[path] * (w if self.attribution else 1.0)
      z = lin(x, kernel)
      out = sg(y) + (z - sg(z))
    elif getattr(self.rules[path], "input_only", False):
      out = y  # its rule applies explicitly at the first layer's tap, not as a gradient
    else:
      out = modified_output(self.rules[path], lin, x, y, w, b)
    if self.vit and path.endswith("attn/qkv"):  # freeze q and k: the attention weights
      d = out.shape[-1] // 3
      out = jnp.where(jnp.arange(out.shape[-1]) >= 2 * d, out, sg(out))
    if path == self.plan.first:  # tap: the relevance at its output, for the explicit input step
      self.first_lin, self.first_lin_one = lin, linear_fn(mod, self, features=1, first=True)
      self.records["first"] = {"x": x, "w": w, "b": b, "y": y}
      out = out + self.deltas[FIRST]
    return out

  def _layer_norm(self, mod, x, y):
    """Identity rule on the normalisation: the standard deviation is a constant."""
    x = x.astype(jnp.float32)
    xc = x - x.mean(axis=-1, keepdims=True)
    std = jnp.sqrt(x.var(axis=-1, keepdims=True) + mod.epsilon)
    scale = mod.variables["params"]["scale"] if mod.use_scale else 1.0
    lin = xc * sg(scale / std)
    return sg(y) + (lin - sg(lin))


# --- The method -------------------------------------------------------------------------------------
def assign_rules(plan: Plan, composite: str | None, rule: str | None, rules: dict | None,
                 **params) -> dict:
  """path -> Rule: from one `rule` for every layer, or a composite by layer type, then the
  `rules` overrides ({regex on the layer path: rule name})."""
  if rule is not None:
    base = {path: parse_rule(rule, **params) for path in plan.linear}
  else:
    if composite not in COMPOSITES:
      raise UserError(f"unknown LRP composite {composite!r}; composites are {sorted(COMPOSITES)}")
    first, conv_rule, dense_rule = COMPOSITES[composite]
    base = {}
    for path, kind in plan.linear.items():
      name = first if path == plan.first and first else (conv_rule if kind == "conv"
                                                          else dense_rule)
      base[path] = parse_rule(name, **params)
  for pattern, name in (rules or {}).items():
    hits = [p for p in plan.linear if re.search(pattern, p)]
    if not hits:
      raise UserError(f"rules: {pattern!r} matches no linear layer; they are {list(plan.linear)}")
    for p in hits:
      base[p] = parse_rule(name, **params)
  for path, r in base.items():
    if getattr(r, "input_only", False) and path != plan.first:
      raise UserError(f"rule {type(r).__name__} applies only to the first layer "
                      f"({plan.first!r}), not to {path!r}")
  return base


def reduce_channels(r, how: str):
  core.check_choice("reduce", how, ("sum", "abs", "norm"))
  if how == "sum":
    return r.sum(-1)
  if how == "abs":
    return jnp.abs(r).sum(-1)
  return jnp.sqrt((r * r).sum(-1))


def propagate(ctx: core.Context, interceptor: RuleInterceptor, times_input: bool, first_rule,
              reduce: str):
  """Runs the modified backward pass once for all classes and reads the requested layers:
  named layers as reduce(A * c) (LRP) or reduce(c) (patterns), `input` through the first layer."""
  names = [n for n in ctx.names if n != core.INPUT]
  extra = {FIRST: jnp.zeros(interceptor.plan.first_out.shape, jnp.float32)}
  _, features, records, grads = core.class_gradients(
      ctx.apply_fn, ctx.variables, ctx.images, ctx.layers, names, ctx.classes, ctx.target,
      interceptor, extra)
  out = {}
  for n in names:
    c = core.spatial(grads[n], batch_dims=2)
    r = core.spatial(features[n]).astype(jnp.float32)[None] * c if times_input else c
    out[n] = jnp.moveaxis(reduce_channels(r, reduce), 0, 1)
  if core.INPUT in ctx.names:
    first, lin = records["first"], interceptor.first_lin
    c1 = grads[FIRST]  # (K, B, ...) at the first layer's output
    if first_rule is None:  # patterns: back-project the signal with the first layer's pattern
      kernel = interceptor.patterns[interceptor.plan.first] * (
          first["w"] if interceptor.attribution else 1.0)
      r_in = jax.vmap(lambda c: jax.vjp(lambda v: lin(v, kernel), first["x"])[1](c)[0])(c1)
    else:
      r1 = first["y"][None] * c1
      r_in = jax.vmap(lambda r: input_relevance(first_rule, lin, interceptor.first_lin_one,
                                                first["x"], first["w"], first["b"], r))(r1)
    if r_in.shape[1:] != ctx.images.shape and r_in[0].size == ctx.images.size:
      r_in = r_in.reshape((r_in.shape[0],) + ctx.images.shape)  # a model that flattens first
    out[core.INPUT] = jnp.moveaxis(reduce_channels(r_in, reduce), 0, 1)
  return out


def lrp(ctx: core.Context, composite: str = "EpsilonPlusFlat", rule: str | None = None,
        rules: dict | None = None, epsilon: float = 1e-6, gamma: float = 0.25, low=0.0,
        high=1.0, canonize: bool = True, reduce: str = "sum"):
  """LRP maps at `input` (pixels) and/or named layers, for all classes in one modified backward
  pass. `low`/`high` bound the input for z-box (the model's input range)."""
  plan = make_plan(ctx.apply_fn, ctx.variables, ctx.images, canonize)
  vit = composite == "AttnLRP" and rule is None
  if vit and not ctx.layers.attention_layers():
    raise UserError("the AttnLRP composite applies to transformers, and this model has no "
                    "attention layers; use EpsilonPlus, EpsilonPlusFlat, EpsilonGammaBox or "
                    "EpsilonAlpha2Beta1")
  assigned = assign_rules(plan, composite, rule, rules, epsilon=epsilon, gamma=gamma, low=low,
                          high=high)
  interceptor = RuleInterceptor(plan, ctx.variables, assigned, vit=vit)
  return propagate(ctx, interceptor, True, assigned[plan.first], reduce)
