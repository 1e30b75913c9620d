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
