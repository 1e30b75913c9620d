"""Pretraining task: the masked autoencoder and the pretext tasks (rotation, jigsaw, exemplar)
on a ViT or a CNN trunk; their models, losses, jitted train steps (`build_training`, shared with
the benchmark), the reconstruction figure, and chained pretraining from another pretrain run.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from wsss_jax.data import pipeline, strong_augment
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.models import classifier, pretext
from wsss_jax.models.mae import MaskedAutoencoder, build_mae
from wsss_jax.models.vit import stack_blocks, unstack_blocks
from wsss_jax.outputs import mae_grid
from wsss_jax.tasks.common import Training, compute_dtype, jit_train_step, prepare_images
from wsss_jax.train import optim
from wsss_jax.train.checkpoint import model_meta, restore_latest
from wsss_jax.train.train_state import BatchNormState, TrainState


def checkpoint_meta(config) -> dict:
  """What must match for a checkpoint to be resumed by this config."""
  meta = {"phase": "pretrain", "model": model_meta(config.model),
          "image_size": config.data.image_size}
  if config.get("objective", "mae") != "mae":  # a pretext run: its task and head size
    meta["objective"] = config.objective
    meta["jigsaw"] = config.jigsaw.to_dict() if config.objective == "jigsaw" else None
    if config.objective == "exemplar":  # the projection head's shape
      meta["exemplar"] = {"hidden": config.exemplar.hidden, "dim": config.exemplar.dim}
  return meta


def make_init_fn(model, tx, image_size: int, seed: int):
  """() -> TrainState, or a BatchNormState for a model with BatchNorm (a CNN encoder)."""
  def init_state():
    params_rng, mask_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init({"params": params_rng, "mask": mask_rng}, dummy)
    if "batch_stats" in variables:
      return BatchNormState.create(variables["params"], tx, state_rng).replace(
          batch_stats=variables["batch_stats"])
    return TrainState.create(variables["params"], tx, state_rng)
  return init_state


def make_loss_fn(model: MaskedAutoencoder, mean, std, dtype) -> Callable:
  """(params, batch, rng) -> masked-patch pixel loss averaged over the global batch."""

  def loss_fn(params, batch, rng):
    images = pipeline.normalize(batch["image"], mean, std, dtype)
    return model.apply({"params": params}, images, rngs={"mask": rng}).loss

  return loss_fn


def make_train_step(model: MaskedAutoencoder, tx, schedule, mean, std, dtype) -> Callable:
  """(state, batch) -> (state, metrics): one AdamW step on the masked-patch pixel loss."""
  loss_fn = make_loss_fn(model, mean, std, dtype)

  def train_step(state: TrainState, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, state.step_rng())
    return apply_gradients(state, tx, schedule, grads, loss=loss)

  return train_step


def apply_gradients(state: TrainState, tx, schedule, grads, batch_stats=None, **metrics):
  """One optimiser update of `state` (and its new BatchNorm statistics, if given); `metrics`
  plus the step's lr and gradient norm."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics |= {"lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
  state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  if batch_stats is not None:
    state = state.replace(batch_stats=batch_stats)
  return state, metrics


def apply_in_training(model, state: TrainState, params, inputs, rng):
  """(outputs, new BatchNorm statistics or None): a pretext model in training mode (a CNN
  encoder's BatchNorm uses and updates batch statistics, its dropout draws from `rng`)."""
  if getattr(state, "batch_stats", None) is None:
    return model.apply({"params": params}, inputs), None
  out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, inputs,
                             train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
  return out, updates["batch_stats"]


def pretext_inputs(images_u8, config, dtype):
  """uint8 images as the classify phase will feed this encoder: (x - mean) / std for a ViT,
  [0, 1] for a CNN (`data.normalize`, the ResNet38 recipe), so the pretrained trunk sees what
  it will be fine-tuned on."""
  return prepare_images(images_u8, config.data, dtype)


def make_reconstruct_fn(model: MaskedAutoencoder, mean, std, dtype, seed: int):
  """images (uint8) -> (original, masked, reconstruction) float images in [0, 1] for figures."""
  p = model.encoder.patch_size

  def reconstruct(params, images_u8):
    images = pipeline.normalize(images_u8, mean, std, dtype)
    masking = model.sample_masking(jax.random.PRNGKey(seed), images.shape[0])
    out = model.apply({"params": params}, images, masking)
    return mae_grid.mae_panels(images.astype(jnp.float32), out.pred.astype(jnp.float32),
                              out.mask, p, model.norm_pix_loss, mean, std)

  return reconstruct


def make_exemplar_step(model: pretext.InstanceEmbedder, tx, schedule, config, dtype) -> Callable:
  """(state, batch) -> (state, metrics): one AdamW step of instance discrimination (NT-Xent over
  two strong views of every image of the global batch, augmented on device)."""
  cfg = config.exemplar
  mean, std = jnp.asarray(config.data.mean), jnp.asarray(config.data.std)
  scale = (lambda x: (x - mean) / std) if config.data.normalize else (lambda x: x)  # noqa: E731

  def train_step(state: TrainState, batch):
    images = batch["image"].astype(jnp.float32) / 255.0
    k1, k2, dropout_rng = jax.random.split(state.step_rng(), 3)
    views = [scale(strong_augment.strong_view(k, images, cfg)).astype(dtype) for k in (k1, k2)]

    def loss_fn(params):  # both views in one pass (and one set of BatchNorm statistics)
      z, stats = apply_in_training(model, state, params, jnp.concatenate(views), dropout_rng)
      loss, accuracy = pretext.nt_xent(z[:images.shape[0]], z[images.shape[0]:],
                                       cfg.temperature)
      return loss, (accuracy, stats)

    (loss, (accuracy, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return apply_gradients(state, tx, schedule, grads, stats, loss=loss,
                           instance_accuracy=accuracy)

  return train_step


def make_pretext_step(model: pretext.PretextClassifier, tx, schedule, config, dtype) -> Callable:
  """(state, batch) -> (state, metrics): one AdamW step of the rotation or jigsaw task."""
  objective = config.objective
  permutations = None
  if objective == "jigsaw":
    permutations = pretext.maximal_hamming_permutations(
        config.jigsaw.grid**2, config.jigsaw.permutations, config.seed)

  def train_step(state: TrainState, batch):
    images = pretext_inputs(batch["image"], config, dtype)
    task_rng, dropout_rng = jax.random.split(state.step_rng())
    if objective == "rotation":
      inputs, target = pretext.rotate_batch(task_rng, images)
    else:
      inputs, target = pretext.jigsaw_batch(task_rng, images, permutations, config.jigsaw.grid)

    def loss_fn(params):
      logits, stats = apply_in_training(model, state, params, inputs, dropout_rng)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
      return loss, (jnp.mean(jnp.argmax(logits, -1) == target), stats)

    (loss, (accuracy, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return apply_gradients(state, tx, schedule, grads, stats, loss=loss,
                           pretext_accuracy=accuracy)

  return train_step


def encoder_name(config) -> str:
  return config.model.get("encoder", "vit")


def build_model(config, dtype):
  """MAE, or the encoder with a pretext head (rotation: 4 outputs; jigsaw: one per permutation,
  a context-free network for a CNN; exemplar: a projection to the unit sphere)."""
  objective = config.get("objective", "mae")
  if objective == "mae":
    return build_mae(config.model, config.data.image_size, dtype)
  if encoder_name(config) == "vit":
    encoder = build_mae(config.model, config.data.image_size, dtype).encoder
  else:
    encoder = classifier.build_cnn_backbone(encoder_name(config), config.model.width, dtype)
  if objective == "exemplar":
    return pretext.InstanceEmbedder(encoder, config.exemplar.hidden, config.exemplar.dim, dtype)
  if objective == "jigsaw" and encoder_name(config) != "vit":
    return pretext.ContextFreeNetwork(encoder, config.jigsaw.permutations, config.jigsaw.grid,
                                      dtype=dtype)
  outputs = 4 if objective == "rotation" else config.jigsaw.permutations
  return pretext.PretextClassifier(encoder, outputs, dtype)


def build_training(config, mesh) -> Training:
  """Model, AdamW, the state's shape and sharding, and the sharded, jitted train step."""
  dtype = compute_dtype(config)
  model = build_model(config, dtype)
  tx, schedule = optim.adamw(config.optim, config.batch_size, config.total_steps)
  init_state = make_init_fn(model, tx, config.data.image_size, config.seed)
  abstract_state = jax.eval_shape(init_state)
  state_sharding = parallel.state_shardings(abstract_state, mesh, config.get("parallel"))
  if isinstance(model, MaskedAutoencoder):
    step = make_train_step(model, tx, schedule, tuple(config.data.mean), tuple(config.data.std),
                           dtype)
  elif isinstance(model, pretext.InstanceEmbedder):
    step = make_exemplar_step(model, tx, schedule, config, dtype)
  else:
    step = make_pretext_step(model, tx, schedule, config, dtype)
  train_step = jit_train_step(step, state_sharding, mesh, config.nan_policy)
  return Training(model, init_state, abstract_state, state_sharding, train_step,
                  total_steps=config.total_steps)


def load_chained(state: TrainState, workdir: str, scanned: bool, mesh) -> TrainState:
  """Chained pretraining: this run's parameters (and a CNN encoder's BatchNorm statistics) from
  the latest checkpoint of another pretrain run (MAE on a larger unlabelled set, say). The
  encoder must match and is always copied; the decoder and the other top-level parts (pretext
  heads) are copied where the source has them with the same shapes, else they start fresh.
  Scanned and unscanned runs chain both ways."""
  saved, meta, step = restore_latest(workdir, parallel.replicated(mesh),
                                     ("params", "batch_stats"), flag="model.init_from")
  where = f"model.init_from={workdir} (step {step}, phase {meta.get('phase')})"
  if meta.get("phase") != "pretrain":
    raise UserError(f"{where}: chained pretraining starts from a pretrain run")
  theirs_encoder = meta.get("model", {}).get("encoder", "vit")
  ours_encoder = "vit" if getattr(state, "batch_stats", None) is None else "a CNN"
  if (theirs_encoder == "vit") != (ours_encoder == "vit"):
    raise UserError(f"{where} pretrained model.encoder={theirs_encoder!r}; this run's encoder is "
                    f"{ours_encoder}")
  params = _copy_parts(unstack_blocks(state.params), unstack_blocks(saved["params"]), where)
  state = state.replace(params=_place_like(stack_blocks(params) if scanned else params,
                                           state.params))
  if getattr(state, "batch_stats", None) is not None and saved.get("batch_stats"):
    state = state.replace(batch_stats=_place_like(
        _copy_parts(state.batch_stats, saved["batch_stats"], where), state.batch_stats))
  return state


def _copy_parts(ours_tree, theirs_tree, where: str):
  """`ours_tree` with each top-level part replaced by `theirs_tree`'s where every leaf of the
  part is there with the same shape; the encoder must be."""
  ours = traverse_util.flatten_dict(ours_tree)
  theirs = traverse_util.flatten_dict(theirs_tree)
  merged = dict(ours)
  for part in sorted({k[0] for k in ours}):
    keys = [k for k in ours if k[0] == part]
    fits = [k for k in keys if k in theirs and theirs[k].shape == ours[k].shape]
    if len(fits) < len(keys):
      if part == "encoder":
        bad = next(k for k in keys if k not in fits)
        raise UserError(f"{where}: {'/'.join(bad)} is missing or has another shape "
                        f"({len(keys) - len(fits)} encoder parameters differ): it was written "
                        f"for another model.variant, width or image size")
      continue  # e.g. a decoder of another width: this run's own, freshly initialised
    for k in keys:
      merged[k] = theirs[k].astype(ours[k].dtype)
  return traverse_util.unflatten_dict(merged)


def _place_like(tree, like):
  return jax.device_put(tree, jax.tree.map(lambda x: x.sharding, like))
