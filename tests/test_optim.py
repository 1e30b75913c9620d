import math

import jax.numpy as jnp
import ml_collections
import pytest

from wsss_jax.errors import UserError
from wsss_jax.train import optim


def test_warmup_cosine_closed_form():
  peak, warm, total = optim.scaled_lr(1.5e-4, 512), 10, 110
  assert peak == pytest.approx(3e-4)
  sched = optim.warmup_cosine(peak, warm, total)
  for step in [0, 5, 10, 35, 60, 110]:
    if step < warm:
      want = peak * step / warm
    else:
      want = peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
    assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_warmup_must_fit_in_training():
  with pytest.raises(UserError, match="warmup_steps=20"):
    optim.warmup_cosine(1e-3, 20, 10)


def test_decay_mask_excludes_norms_biases_and_tokens():
  params = {"encoder": {"cls_token": jnp.zeros((1, 1, 4)), "norm": {"scale": jnp.ones(4)},
                        "blocks_0": {"fc1": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}},
            "mask_token": jnp.zeros((1, 1, 4)), "decoder_pred": {"kernel": jnp.zeros((4, 2))}}
  mask = optim.decay_mask(params)
  assert mask["encoder"]["blocks_0"]["fc1"] == {"kernel": True, "bias": False}
  assert mask["encoder"]["cls_token"] is False and mask["mask_token"] is False
  assert mask["encoder"]["norm"]["scale"] is False and mask["decoder_pred"]["kernel"] is True


def test_adamw_applies_decay_only_where_masked():
  cfg = ml_collections.ConfigDict(dict(base_lr=256.0, b1=0.9, b2=0.95, weight_decay=0.5,
                                       warmup_steps=0, end_lr=0.0, grad_clip_norm=0.0))
  tx, _ = optim.adamw(cfg, batch_size=1, total_steps=1000)  # lr = 1.0
  params = {"w": {"kernel": jnp.ones((2, 2))}, "b": {"bias": jnp.ones(2)}}
  zero = {"w": {"kernel": jnp.zeros((2, 2))}, "b": {"bias": jnp.zeros(2)}}
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(updates["w"]["kernel"][0, 0]) == pytest.approx(-0.5)  # -lr * wd * w
  assert float(updates["b"]["bias"][0]) == 0.0
