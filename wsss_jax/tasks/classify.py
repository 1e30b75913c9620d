"""Classification task: the multi-label classifier (ResNet38 + PDA, ResNet-50, ViT), its losses
(multi-label soft margin, SEAM's equivariance), PDA's mu schedule, the jitted train and predict
steps (`build_training`, shared with the benchmark) and the multi-label evaluation of a split.
PDA's mu lives in the train state and changes at epoch ends inside the jitted step.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wsss_jax import metrics
from wsss_jax.data import mixing, pipeline
from wsss_jax.device import parallel
from wsss_jax.models.classifier import build_classifier, lr_multipliers, param_labels
from wsss_jax.tasks.common import (Training, compute_dtype, jit_train_step, prepare_images,
                                   state_sharding_of, steps_per_epoch, total_steps)
from wsss_jax.train import optim
from wsss_jax.train.checkpoint import model_meta
from wsss_jax.train.train_state import ClassifierState


def pda_active(epoch, pda_cfg):
  """Whether PDA reweights the features during `epoch` (0-based)."""
  if not pda_cfg.enabled:
    return jnp.asarray(False)
  return jnp.asarray(True) if pda_cfg.attend_in_warmup else epoch >= pda_cfg.warmup_epochs


def mu_after_epoch(mu, epoch, pda_cfg):
  """mu for the epoch after `epoch`: mu <- sigma mu once warm-up is over (or always, with
  `decay_in_warmup`), either clipped at the lower bound or only while mu > bound ('check')."""
  decays = jnp.logical_and(pda_cfg.enabled, jnp.logical_or(
      pda_cfg.decay_in_warmup, epoch + 1 >= pda_cfg.warmup_epochs))
  if pda_cfg.bound == "clip":
    new = jnp.maximum(pda_cfg.sigma * mu, pda_cfg.lower_bound)
  else:
    new = jnp.where(mu > pda_cfg.lower_bound, pda_cfg.sigma * mu, mu)
  return jnp.where(decays, new, mu).astype(jnp.float32)


def checkpoint_meta(config) -> dict:
  return {"phase": "classify", "model": model_meta(config.model),
          "image_size": config.data.image_size, "num_classes": config.data.num_classes}


def multilabel_soft_margin(logits, labels):
  """PyTorch's MultiLabelSoftMarginLoss: sigmoid BCE averaged over classes and batch."""
  return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def make_init_fn(model, tx, image_size: int, seed: int):
  def init_state():
    params_rng, dropout_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)
    state = ClassifierState.create(variables["params"], tx, state_rng)
    return state.replace(batch_stats=variables.get("batch_stats", {}),
                         mu=jnp.ones((), jnp.float32))
  return init_state


def equivariant_transform(x, scale: float):
  """SEAM's A(.): rescale by `scale` (bilinear) and flip horizontally; (B, H, W, C) arrays."""
  b, h, w, c = x.shape
  size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
  return jnp.flip(jax.image.resize(x, (b,) + size + (c,), "bilinear"), axis=2)


def max_normalised(cams):
  """ReLU class maps divided by their spatial maximum (SEAM's normalisation)."""
  cams = jax.nn.relu(cams)
  return cams / (cams.max(axis=(1, 2), keepdims=True) + 1e-5)


def equivariance_loss(cams, transformed_cams, scale: float):
  """SEAM's equivariant regularisation: mean |A(CAM(I)) - CAM(A(I))| on max-normalised maps;
  A(CAM(I)) is resized to the size of CAM(A(I)) (downsampling strides round differently)."""
  target = jax.image.resize(max_normalised(cams), transformed_cams.shape, "bilinear")
  return jnp.mean(jnp.abs(jnp.flip(target, axis=2) - max_normalised(transformed_cams)))


def make_train_step(model, tx, schedule, config, spe: int) -> Callable:
  """(state, batch) -> (state, metrics): one optimiser step on the multi-label soft-margin loss."""
  dtype, pda_cfg = compute_dtype(config), config.pda
  update_stats = not config.model.freeze_bn
  er = config.get("equivariance")
  er = er if er and er.weight > 0 else None

  def train_step(state: ClassifierState, batch):
    epoch = state.step // spe
    rng = state.step_rng()
    mix_rng, dropout_rng = jax.random.split(rng)
    images = prepare_images(batch["image"], config.data, dtype)
    labels = batch["labels"].astype(jnp.float32)
    hs = config.get("hide_and_seek")
    if hs and hs.prob > 0:  # hidden cells take the mean image value: 0 once normalised
      fill = jnp.zeros(3) if config.data.normalize else jnp.asarray(config.data.mean)
      images = mixing.hide_patches(jax.random.fold_in(mix_rng, 1), images, hs.grid, hs.prob, fill)
    images, labels = mixing.mix_batch(mix_rng, images, labels, config.mixup_alpha,
                                      config.cutmix_alpha)
    if config.label_smoothing:
      labels = labels * (1 - config.label_smoothing) + config.label_smoothing / 2

    def forward(params, x, rng):
      variables = {"params": params, "batch_stats": state.batch_stats}
      return model.apply(
          variables, x, train=True, mu=state.mu if pda_cfg.enabled else None,
          pda_active=pda_active(epoch, pda_cfg), rngs={"dropout": rng},
          mutable=(["batch_stats"] if update_stats else []) + (["intermediates"] if er else []))

    def loss_fn(params):
      logits, updates = forward(params, images, dropout_rng)
      loss = multilabel_soft_margin(logits, labels)
      if er:  # SEAM: classify the transformed copy too and tie the two sets of maps
        t_logits, t_updates = forward(params, equivariant_transform(images, er.scale),
                                      jax.random.fold_in(dropout_rng, 1))
        eq = equivariance_loss(updates["intermediates"]["head"]["cam"][0],
                               t_updates["intermediates"]["head"]["cam"][0], er.scale)
        loss = loss + multilabel_soft_margin(t_logits, labels) + er.weight * eq
      return loss, (logits, {k: v for k, v in updates.items() if k != "intermediates"})

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    step_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, step_updates)
    epoch_ends = (state.step + 1) % spe == 0
    mu = jnp.where(epoch_ends, mu_after_epoch(state.mu, epoch, pda_cfg), state.mu)
    out = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
           "mu": state.mu, "epoch": epoch,
           "train_exact_match": jnp.mean(jnp.all((logits > 0) == (labels > 0.5), axis=1))}
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, mu=mu,
                        batch_stats=updates.get("batch_stats", state.batch_stats))
    return new, out

  return train_step


def make_predict_fn(model, config):
  """(params, batch_stats, images uint8) -> sigmoid probabilities (B, K), inference mode."""
  dtype = compute_dtype(config)

  def predict(params, batch_stats, images_u8):
    logits = model.apply({"params": params, "batch_stats": batch_stats},
                         prepare_images(images_u8, config.data, dtype), train=False)
    return jax.nn.sigmoid(logits)

  return predict


def build_training(config, mesh) -> Training:
  model = build_classifier(config.model, config.data.image_size, config.data.num_classes,
                           compute_dtype(config))
  spe = steps_per_epoch(config)
  steps = total_steps(config, spe)
  labels = functools.partial(param_labels, model, config.model)  # params -> group names
  tx, schedule = optim.classifier_optimizer(
      config.optim, labels, lr_multipliers(model, config.model, config.optim), config.batch_size,
      steps)
  init_state = make_init_fn(model, tx, config.data.image_size, config.seed)
  abstract_state, state_sharding = state_sharding_of(init_state, mesh, config)
  train_step = jit_train_step(make_train_step(model, tx, schedule, config, spe), state_sharding,
                              mesh, config.nan_policy)
  predict = jax.jit(make_predict_fn(model, config),
                    in_shardings=(state_sharding.params, state_sharding.batch_stats,
                                  parallel.batch_sharded(mesh)),
                    out_shardings=parallel.replicated(mesh))
  return Training(model, init_state, abstract_state, state_sharding, train_step,
                  total_steps=steps, steps_per_epoch=spe, predict=predict)


# --- Validation -----------------------------------------------------------------------------------
def evaluate(t: Training, state, config, mesh) -> dict:
  """Multi-label metrics over the whole validation split."""
  return split_metrics(lambda images: t.predict(state.params, state.batch_stats, images),
                       config.data, parallel.eval_batch_size(config.batch_size, mesh), mesh)


def split_metrics(predict: Callable, data_cfg, batch: int, mesh, split: str = "val") -> dict:
  """Multi-label metrics of `predict` (uint8 images -> probabilities) over a whole split."""
  probs, labels = [], []
  for b in pipeline.eval_batches(data_cfg, batch, split):
    p = parallel.to_host(predict(parallel.shard_identical(b["image"], mesh)))
    probs.append(p[b["valid"]])
    labels.append(b["labels"][b["valid"]])
  return metrics.multilabel_metrics(np.concatenate(probs), np.concatenate(labels),
                                    data_cfg.class_names)
