"""PatternNet and PatternAttribution (Kindermans et al. 2018).

Per linear layer y = w^T x (+ b), the signal direction is the pattern
a = cov(x, y) / (w^T cov(x, y)), one vector per output unit, estimated over training data:
'linear' uses every sample, 'relu' (the two-component estimator) only samples with y > 0.
PatternNet back-projects with a in place of w; PatternAttribution with w * a. The statistics of
a convolution are kernel-shaped: sum_positions x y_j is the kernel gradient of the layer with
output cotangent y, so one forward pass with a kernel vjp per layer accumulates them all.
Canonised BatchNorms are folded into their convolution first (as for LRP); a standalone
BatchNorm's pattern is 1/w exactly.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from wsss_jax.errors import UserError
from wsss_jax.relevance import core, lrp

ESTIMATORS = ("relu", "linear")


class _Statistics(core.Interceptor):
  """Accumulates, per linear layer, n, sum(y), sum(x y) and sum(x) over the (masked) samples."""

  def __init__(self, plan: lrp.Plan, variables, estimator: str):
    super().__init__()
    self.plan, self.variables, self.estimator = plan, variables, estimator

  def intercept(self, next_fun, args, kwargs, context):
    mod, path = context.module, "/".join(context.module.path)
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(mod, nn.BatchNorm) and path in self.plan.folded_bns:
      return args[0]
    if not isinstance(mod, (nn.Conv, nn.Dense)) or path not in self.plan.linear:
      return next_fun(*args, **kwargs)
    x = args[0].astype(jnp.float32)
    w, b = lrp.linear_params(self.variables, self.plan, path)
    lin = lrp.linear_fn(mod, self)
    y = lin(x, w, b)
    mask = (y > 0).astype(jnp.float32) if self.estimator == "relu" else jnp.ones_like(y)
    _, pull = jax.vjp(lambda k: lin(x, k), w)  # kernel gradient = sum over positions of x (.)
    axes = tuple(range(y.ndim - 1))
    self.records[path] = {"n": mask.sum(axes), "y": (y * mask).sum(axes),
                          "xy": pull(y * mask)[0], "x": pull(mask)[0]}
    return y


def statistics_fn(apply_fn, plan: lrp.Plan, estimator: str):
  """A jitted (variables, images) -> per-layer sums for one batch."""
  def stats(variables, images):
    interceptor = _Statistics(plan, variables, estimator)
    with nn.intercept_methods(interceptor):
      apply_fn(core.model_variables(variables), images)
    return interceptor.records
  return jax.jit(stats)


def fit_patterns(apply_fn, variables, batches: Iterable, estimator: str = "relu",
                 canonize: bool = True) -> dict:
  """Patterns {layer path: kernel-shaped array} from one pass over `batches` (model inputs)."""
  core.check_choice("estimator", estimator, ESTIMATORS)
  totals, stats, plan = None, None, None
  for images in batches:
    if plan is None:
      plan = lrp.make_plan(apply_fn, variables, images, canonize)
      stats = statistics_fn(apply_fn, plan, estimator)
    batch = stats(variables, images)
    totals = batch if totals is None else jax.tree.map(jnp.add, totals, batch)
  if totals is None:
    raise UserError("fit_patterns got no batches")
  patterns = {}
  for path, t in totals.items():
    w, _ = lrp.linear_params(variables, plan, path)
    n = jnp.maximum(t["n"], 1.0)
    cov = t["xy"] / n - (t["x"] / n) * (t["y"] / n)  # E[x y] - E[x] E[y], per output unit
    denom = (w * cov).reshape(-1, w.shape[-1]).sum(0)  # w^T cov(x, y)
    patterns[path] = jnp.where(denom != 0, cov / jnp.where(denom != 0, denom, 1.0), 0.0)
  return patterns


def save_patterns(directory: str, patterns: dict, meta: dict) -> None:
  """An orbax checkpoint of the patterns plus a JSON of how they were fitted."""
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "patterns"), {k.replace("/", "."): v for k, v in
                                                          patterns.items()}, force=True)
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)


def load_patterns(directory: str, meta: dict) -> dict | None:
  """The saved patterns if they were fitted as `meta` says, else None."""
  directory = os.path.abspath(directory)
  try:
    with open(os.path.join(directory, "meta.json")) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None
  if saved != meta:
    return None
  restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "patterns"))
  return {k.replace(".", "/"): jnp.asarray(np.asarray(v)) for k, v in restored.items()}


def _method(attribution: bool):
  def method(ctx: core.Context, patterns: dict | None = None, canonize: bool = True,
             reduce: str = "sum"):
    name = "patternattribution" if attribution else "patternnet"
    if patterns is None:
      raise UserError(f"method {name!r} needs patterns: fit them with "
                      f"wsss_jax.relevance.fit_patterns and pass patterns=")
    plan = lrp.make_plan(ctx.apply_fn, ctx.variables, ctx.images, canonize)
    missing = [p for p in plan.linear if p not in patterns]
    if missing:
      raise UserError(f"the patterns do not fit this model: no pattern for layers {missing}")
    interceptor = lrp.RuleInterceptor(plan, ctx.variables, {}, patterns=patterns,
                                      attribution=attribution)
    return lrp.propagate(ctx, interceptor, False, None, reduce)
  method.__doc__ = ("PatternAttribution: back-projection with w * a." if attribution else
                    "PatternNet: the signal back-projected with the patterns a.")
  return method


patternnet = _method(False)
patternattribution = _method(True)
