"""Optimisers and learning-rate schedules built from config sections."""
from __future__ import annotations

import flax.traverse_util as traverse_util
import jax
import optax

from wsss_jax.errors import UserError

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


def decay_mask(params):
  """True where weight decay applies: weights of rank >= 2 except embeddings and special tokens.

  Norm scales and biases (rank 1) and position embeddings / class and mask tokens are not decayed,
  as in the MAE reference (timm's param_groups_weight_decay).
  """
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({
      path: x.ndim >= 2 and not any(name in NO_DECAY_NAMES for name in path)
      for path, x in flat.items()})


def scaled_lr(base_lr: float, batch_size: int) -> float:
  """lr = base_lr * batch / 256 (the linear scaling rule of the MAE recipe)."""
  return base_lr * batch_size / 256


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0):
  """Linear warm-up from 0 to `peak_lr`, then cosine decay to `end_lr` at `total_steps`."""
  if not 0 <= warmup_steps < total_steps:
    raise UserError(f"optim.warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps})")
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, total_steps, end_lr)


def adamw(optim_cfg, batch_size: int, total_steps: int):
  """AdamW with the decay mask above and a warm-up + cosine schedule; returns (tx, schedule)."""
  schedule = warmup_cosine(scaled_lr(optim_cfg.base_lr, batch_size), optim_cfg.warmup_steps,
                           total_steps, optim_cfg.end_lr)
  tx = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                   weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  if optim_cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), tx)
  return tx, schedule


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


SCHEDULES = ("poly", "cosine")
OPTIMIZERS = ("sgd", "adamw", "lars")


def warmup_poly(peak_lr: float, warmup_steps: int, total_steps: int, power: float = 0.9):
  """lr = peak * (1 - t / T)^power per step (DeepLab's 'poly'), after an optional linear warm-up."""
  if not 0 <= warmup_steps < total_steps:
    raise UserError(f"optim.warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps})")
  poly = optax.polynomial_schedule(peak_lr, 0.0, power, total_steps - warmup_steps)
  if not warmup_steps:
    return poly
  return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup_steps), poly],
                              [warmup_steps])


def schedule_from(optim_cfg, batch_size: int, total_steps: int):
  peak = optim_cfg.base_lr * (batch_size / 256 if optim_cfg.lr_batch_scaling else 1.0)
  if optim_cfg.schedule not in SCHEDULES:
    raise UserError(f"optim.schedule={optim_cfg.schedule!r} is not one of {SCHEDULES}")
  if optim_cfg.schedule == "poly":
    return warmup_poly(peak, optim_cfg.warmup_steps, total_steps, optim_cfg.poly_power)
  return warmup_cosine(peak, optim_cfg.warmup_steps, total_steps, optim_cfg.end_lr)


def grouped_lr(schedule, multipliers: dict[str, float], labels):
  """Per-group learning rate `multiplier * schedule(step)`; a multiplier of 0 freezes the group.

  optax.multi_transform over the groups named in `labels` (a tree of group names, or a function
  of the parameters that returns one).
  """
  def group(m):
    return optax.set_to_zero() if m == 0 else optax.scale_by_learning_rate(
        lambda step: m * schedule(step))
  return optax.multi_transform({name: group(m) for name, m in multipliers.items()}, labels)


def classifier_optimizer(optim_cfg, labels, multipliers: dict, batch_size: int, total_steps: int):
  """SGD (the multi-layer pseudo-supervision recipe), AdamW (MAE fine-tuning) or LARS (MAE linear
  probing), with per-group learning rates; returns (tx, schedule).

  SGD is PyTorch's: the decay term is added to the gradient before momentum. AdamW's decay is
  decoupled and scaled by each group's learning rate, as in PyTorch's AdamW with param groups.
  """
  if optim_cfg.name not in OPTIMIZERS:
    raise UserError(f"optim.name={optim_cfg.name!r} is not one of {OPTIMIZERS}")
  schedule = schedule_from(optim_cfg, batch_size, total_steps)
  lr = grouped_lr(schedule, multipliers, labels)
  decay = optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask)
  if optim_cfg.name == "sgd":
    tx = optax.chain(decay, optax.trace(optim_cfg.momentum, optim_cfg.nesterov), lr)
  elif optim_cfg.name == "adamw":
    tx = optax.chain(optax.scale_by_adam(optim_cfg.b1, optim_cfg.b2), decay, lr)
  else:  # LARS: layer-wise trust ratio ||w|| / ||g + wd w||, then momentum
    tx = optax.chain(decay, optax.scale_by_trust_ratio(), lr,
                     optax.trace(optim_cfg.momentum, optim_cfg.nesterov))
  if optim_cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), tx)
  return tx, schedule
