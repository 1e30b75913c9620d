"""Segmentation task: DeepLabV3+ (or MRN) trained on pseudo masks with multi-layer
pseudo-supervision, its losses and classification gate, the jitted steps (`build_training`, shared
with the benchmark), evaluation of a split at tile size (MRN by windows with their context), and
the test figure.

The multi-layer pseudo-supervision loss (Han et al. 2022) is sum_l w_l CE(logits, mask_l) over
the layers' pseudo masks (b4_5 0.2, b5_2 0.2, bn7 0.6); each CE averages over the pixels whose
mask is a class (background and out-of-image pixels are ignored). The authors instead append a
constant logit of 100 at background pixels, which gives those pixels a near-zero loss but keeps
them in the average: their loss is ours scaled by the tissue fraction of each batch.

Findings against a background (`data.setting=finding`): background is the segmenter's own
output channel K, trained like the findings (every pixel counts in the loss; CE + soft Dice by
default), the gate never excludes it (a negative image whose findings all fail is all
background), and scoring is the `finding` convention (background a scored class).

Classification gate at test time: classes whose classifier probability is <= epsilon (0.1) are
excluded from the argmax (`gate.mode="exclude"`: logit -> -inf; a tile whose classes all fail
keeps its ungated logits). The authors multiply the logits by the 0/1 gate (`"multiply"`), which
does not exclude a class: a zeroed logit still wins wherever the others are negative.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wsss_jax import metrics
from wsss_jax.data import folders, mask_files, pipeline, transforms
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.models.segmentation import MRN, build_segmenter
from wsss_jax.outputs import overlays
from wsss_jax.pseudo import par
from wsss_jax.tasks.common import (Training, backbone_head_optimizer, compute_dtype, jit_train_step,
                                   prepare_images, state_sharding_of, steps_per_epoch, total_steps)
from wsss_jax.train import earlier_runs
from wsss_jax.train.checkpoint import model_meta
from wsss_jax.train.train_state import ClassifierState

GATE_MODES = ("off", "exclude", "multiply")


# --- Loss and gate ------------------------------------------------------------------------------------
def masked_cross_entropy(logits, labels, num_classes: int):
  """Mean softmax CE over the pixels whose label is a class (< num_classes); 0 when none is."""
  valid = labels < num_classes
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.where(valid, labels, 0).astype(jnp.int32))
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def soft_dice_loss(logits, labels, num_classes: int, dice_classes: int):
  """1 - mean_c 2 sum_i p_ic y_ic / (sum_i p_ic + sum_i y_ic) over the first `dice_classes`
  output channels (Milletari et al. 2016, summed over the whole batch as nnU-Net's batch Dice),
  pixels whose label is a class only. Each class weighs the same whatever its pixel share,
  so a finding on 3% of the pixels is not drowned by the background; a batch without the
  class gives that class a loss that only pushes its probabilities down (the +1 smoothing)."""
  valid = (labels < num_classes)[..., None]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :dice_classes] * valid
  onehot = jax.nn.one_hot(labels, dice_classes, dtype=jnp.float32) * valid
  axes = tuple(range(logits.ndim - 1))
  overlap = jnp.sum(probs * onehot, axis=axes)
  dice = (2 * overlap + 1.0) / (jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes) + 1.0)
  return 1.0 - jnp.mean(dice)


LOSSES = ("ce", "ce+dice")


def mask_loss(logits, labels, num_classes: int, kind: str, dice_classes: int):
  """The per-mask loss: CE, or CE + soft Dice (the nnU-Net default for imbalanced findings)."""
  ce = masked_cross_entropy(logits, labels, num_classes)
  if kind == "ce":
    return ce
  return ce + soft_dice_loss(logits, labels, num_classes, dice_classes)


def multilayer_loss(logits, batch, weights: dict, num_classes: int, kind: str = "ce",
                    dice_classes: int = 0):
  """(sum_l w_l L(logits, mask_l), {layer: L}) over the pseudo masks of the layers."""
  parts = {layer: mask_loss(logits, batch[f"mask_{layer}"], num_classes, kind,
                            dice_classes or num_classes)
           for layer in weights}
  return sum(w * parts[layer] for layer, w in weights.items()), parts


POOLINGS = ("lse", "topk")


def image_scores(logits, num_findings: int, pooling: str, r: float, top_k: float):
  """(B, K) image-level finding scores pooled from the per-pixel probabilities p_ic:
  lse: (1/r) log(mean_i exp(r p_ic)); topk: the mean of the largest `top_k` share of p_ic."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :num_findings]
  flat = probs.reshape(probs.shape[0], -1, num_findings)
  if pooling == "lse":  # log-sum-exp pooling (REFERENCE.md section 10)
    return (jax.nn.logsumexp(r * flat, axis=1) - jnp.log(flat.shape[1])) / r
  k = max(1, int(round(top_k * flat.shape[1])))
  return jax.lax.top_k(jnp.swapaxes(flat, 1, 2), k)[0].mean(-1)


def image_label_loss(logits, labels, num_findings: int, pooling: str = "lse", r: float = 5.0,
                     top_k: float = 0.05):
  """BCE of the pooled finding scores against the image labels (multiple-instance learning): a
  normal image pays for any finding it shows, a positive one for showing none."""
  s = image_scores(logits, num_findings, pooling, r, top_k)
  y = labels.astype(jnp.float32)  # each log's argument kept off 0, one side each
  return -jnp.mean(y * jnp.log(jnp.maximum(s, 1e-6))
                   + (1 - y) * jnp.log1p(-jnp.minimum(s, 1 - 1e-6)))


def size_prior_loss(logits, labels, num_findings: int, lower: float, upper: float):
  """Kervadec et al.'s size constraint on V_c = the finding's mean probability: (V - a)^2
  below the lower bound a, (V - b)^2 above the upper bound b, 0 between; a class absent from
  the image has b = 0 (and a = 0)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :num_findings]
  share = probs.reshape(probs.shape[0], -1, num_findings).mean(axis=1)  # (B, K)
  present = labels > 0
  a = jnp.where(present, lower, 0.0)
  b = jnp.where(present, upper, 0.0)
  return jnp.mean(jnp.where(share < a, (share - a) ** 2, 0.0)
                  + jnp.where(share > b, (share - b) ** 2, 0.0))


def image_losses(logits, labels, config):
  """The finding setting's image-level terms from the segmenter's own output: {name: (weight,
  value)} of those switched on (image_loss, size_prior)."""
  k = config.data.num_classes
  out = {}
  il, sp = config.image_loss, config.size_prior
  if il.weight > 0:
    out["image_label"] = (il.weight, image_label_loss(logits, labels, k, il.pooling, il.r,
                                                      il.top_k))
  if sp.weight > 0:
    out["size_prior"] = (sp.weight, size_prior_loss(logits, labels, k, sp.lower, sp.upper))
  return out


def uses_labels(config) -> bool:
  """Whether training reads the image labels (the image-level losses of the finding setting)."""
  return setting(config) == "finding" and (config.image_loss.weight > 0
                                           or config.size_prior.weight > 0)


def loss_kind(config) -> str:
  """config.loss, or by setting ("setting"): CE for tissue maps, CE + Dice for findings."""
  if config.loss != "setting":
    return config.loss
  return "ce+dice" if setting(config) == "finding" else "ce"


def output_classes(config) -> int:
  """Segmenter outputs: the K classes, plus the background channel in the finding setting."""
  return config.data.num_classes + (setting(config) == "finding")


def setting(config) -> str:
  """tissue or finding: the data section is settled when the phase starts (folders.settle)."""
  if config.data.setting not in folders.SETTINGS:
    raise ValueError(f"data.setting={config.data.setting!r}: settle the data section first")
  return config.data.setting


def scoring(config) -> str:
  """The metrics convention: finding (background a class) or the authors' stage 2."""
  return "finding" if setting(config) == "finding" else "stage2"


def gate(logits, probs, mode: str, epsilon: float):
  """Classification gate on (B, H, W, K') logits with (B, K) classifier probabilities; output
  channels past K (the background of the finding setting) always pass."""
  if mode == "off":
    return logits
  extra = logits.shape[-1] - probs.shape[-1]
  if extra:
    probs = jnp.concatenate([probs, jnp.ones(probs.shape[:1] + (extra,), probs.dtype)], axis=1)
  keep = probs > epsilon
  if mode == "multiply":  # the authors' form
    return logits * keep[:, None, None, :]
  keep = jnp.where(keep.any(axis=1, keepdims=True), keep, True)  # never exclude every class
  return jnp.where(keep[:, None, None, :], logits, -jnp.inf)


# --- Model, optimiser, steps -------------------------------------------------------------------------
def checkpoint_meta(config) -> dict:
  return {"phase": "segment", "model": model_meta(config.model),
          "image_size": config.data.image_size, "num_classes": output_classes(config),
          "setting": setting(config)}


def param_labels(params):
  """'backbone' for the backbone / MRN encoder (lr x1), 'head' for the rest (lr x head_lr_mult)."""
  return {k: jax.tree.map(lambda _: "backbone" if k in ("backbone", "encoder") else "head", v)
          for k, v in params.items()}


def input_size(config) -> int:
  return config.data.pair_size if config.model.name == "mrn" else config.data.image_size


def make_init_fn(model, tx, config):
  size = input_size(config)

  def init_state():
    params_rng, dropout_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, dummy, context=dummy)
    state = ClassifierState.create(variables["params"], tx, state_rng)
    return state.replace(batch_stats=variables.get("batch_stats", {}), mu=jnp.ones((), jnp.float32))
  return init_state


def make_train_step(model, tx, schedule, config):
  dtype, weights, k = compute_dtype(config), layer_weights(config), output_classes(config)
  kind = loss_kind(config)
  # the Dice term weighs the findings; background (channel K of the finding setting) is left to CE
  dice_classes = config.data.num_classes

  def train_step(state, batch):
    images = prepare_images(batch["image"], config.data, dtype)
    context = prepare_images(batch["context"], config.data, dtype) if "context" in batch else None

    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                    train=True, context=context, mutable=["batch_stats"],
                                    rngs={"dropout": state.step_rng()})
      loss, parts = multilayer_loss(logits, batch, weights, k, kind, dice_classes)
      if "labels" in batch:  # the finding setting's image-level terms
        for name, (weight, value) in image_losses(logits, batch["labels"], config).items():
          loss, parts = loss + weight * value, parts | {name: value}
      return loss, (logits, parts, updates)

    (loss, (logits, parts, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    step_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    last = batch[f"mask_{list(weights)[-1]}"]
    labelled = last < k
    out = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
           "train_pixel_accuracy": jnp.sum((jnp.argmax(logits, -1) == last) & labelled)
           / jnp.maximum(jnp.sum(labelled), 1)}
    out |= {f"loss/{layer}": v for layer, v in parts.items()}
    new = state.replace(step=state.step + 1, opt_state=opt_state,
                        params=optax.apply_updates(state.params, step_updates),
                        batch_stats=updates["batch_stats"])
    return new, out

  return train_step


def layer_weights(config) -> dict:
  return dict(zip(config.data.mask_layers, config.loss_weights))


def build_training(config, mesh) -> Training:
  """Model, optimiser, jitted steps and the numbers of steps; `predict` gives the logits of
  (params, batch_stats, images, context or None) at the model's output size."""
  model = build_segmenter(config.model, output_classes(config), compute_dtype(config))
  spe = steps_per_epoch(config)
  steps = total_steps(config, spe)
  tx, schedule = backbone_head_optimizer(config, param_labels, steps)
  init_state = make_init_fn(model, tx, config)
  abstract_state, state_sharding = state_sharding_of(init_state, mesh, config)
  train_step = jit_train_step(make_train_step(model, tx, schedule, config), state_sharding, mesh,
                              config.nan_policy)
  dtype, data = compute_dtype(config), config.data

  @jax.jit
  def logits_fn(params, batch_stats, images_u8, context_u8):
    context = None if context_u8 is None else prepare_images(context_u8, data, dtype)
    return model.apply({"params": params, "batch_stats": batch_stats},
                       prepare_images(images_u8, data, dtype), context=context)
  return Training(model, init_state, abstract_state, state_sharding, train_step,
                  total_steps=steps, steps_per_epoch=spe, predict=logits_fn)


# --- Evaluation ----------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _scores(logits, probs, truth_valid, num_classes, modes, epsilon, convention):
  """Tile-size logits -> per gate mode: prediction (B, H, W) and confusion matrix (stage2, or
  finding with background a class)."""
  truth, valid = truth_valid
  out = {}
  for mode in modes:
    pred = jnp.argmax(gate(logits, probs, mode, epsilon), -1)
    out[mode] = (pred, metrics.device_confusion(pred, truth, num_classes, num_classes, convention,
                                                valid))
  return out


def tile_logits(seg: Training, state, b, config, mesh):
  """(B, H, W, K) logits at tile size: DeepLab on the resized tile, upsampled; MRN by windows of
  `pair_size` with their context, stitched (a later window overwrites the overlap)."""
  if not isinstance(seg.model, MRN):
    logits = seg.predict(state.params, state.batch_stats,
                        parallel.shard_identical(b["input"], mesh), None)
    h, w = b["mask"].shape[1:3] if "mask" in b else b["image"].shape[1:3]
    return jax.image.resize(logits, (logits.shape[0], h, w, logits.shape[-1]), "bilinear")
  windows = [transforms.context_windows(image, config.data.pair_size, config.data.context_scale)
             for image in b["image"]]
  targets = np.concatenate([w.targets for w in windows])
  contexts = np.concatenate([w.contexts for w in windows])
  pad = parallel.eval_batch_size(len(targets), mesh) - len(targets)
  targets = np.concatenate([targets, np.repeat(targets[-1:], pad, 0)])
  contexts = np.concatenate([contexts, np.repeat(contexts[-1:], pad, 0)])
  out = np.asarray(seg.predict(state.params, state.batch_stats,
                              parallel.shard_identical(targets, mesh),
                              parallel.shard_identical(contexts, mesh)))
  per_image = len(windows[0].starts)
  return jnp.asarray(np.stack([
      transforms.stitch_windows(out[i * per_image:(i + 1) * per_image], w.starts,
                                b["image"].shape[1:3]) for i, w in enumerate(windows)]))


def evaluate(seg, state, config, mesh, split: str, classifier=None, overlays: int = 0):
  """Stage-2 scores of `split` for each gate mode ('off' only without a classifier); the first
  `overlays` tiles' (image, truth, prediction) kept for figures."""
  k, names = config.data.num_classes, tuple(config.data.class_names)
  convention = scoring(config)
  if convention == "finding":
    names += ("background",)
  batch = parallel.eval_batch_size(config.eval_batch_size, mesh)
  inputs = {} if isinstance(seg.model, MRN) else {"input": config.data.image_size}
  keys = ["image", "mask", "labels", "name"] + list(inputs)
  modes = ("off",)
  if classifier is not None:
    inputs["cls_input"] = classifier["image_size"]
    keys.append("cls_input")
    modes = tuple(config.gate.modes)
  confusion, shown = {m: 0 for m in modes}, []
  for b in pipeline.tile_batches(config.data, split, batch, inputs, tuple(keys)):
    logits = tile_logits(seg, state, b, config, mesh)
    probs = (classifier["predict"](parallel.shard_identical(b["cls_input"], mesh))
             if classifier is not None else jnp.ones((batch, k)))
    truth = parallel.shard_identical(b["mask"], mesh)
    out = _scores(logits, probs, (truth, jnp.asarray(b["valid"])), k, modes, config.gate.epsilon,
                  convention)
    for m in modes:
      confusion[m] = confusion[m] + np.asarray(out[m][1], np.int64)
    for i in range(min(int(b["valid"].sum()), overlays - len(shown))):
      shown.append((b["image"][i], b["mask"][i], np.asarray(out[modes[0]][0][i]), b["labels"][i],
                    b["name"][i]))
  findings = tuple(config.data.class_names) if convention == "finding" else ()
  return {m: metrics.iou_scores(c, names, findings) for m, c in confusion.items()}, shown


# --- Self-training: the segmenter relabels its training tiles --------------------------------------
SELF_LAYER = mask_files.SELF_LAYER


@functools.partial(jax.jit, static_argnames=("par_settings", "finding"))
def self_labels(logits, images, labels, previous, confidence, par_settings: tuple, finding: bool):
  """(B, H, W) uint8 labels for the next round from the segmenter's tile-size logits: classes
  absent from the image label excluded, the probabilities refined by the image (PAR) where
  `par_settings`, the argmax where its probability reaches `confidence`, IGNORE elsewhere.
  Findings: a normal image is all background. Tissue maps: the pixels the previous masks gave
  the background (white glass, index K) and tiles without a label keep index K."""
  k = labels.shape[1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  allowed = labels > 0
  if finding:  # the background channel K is always allowed
    allowed = jnp.concatenate([allowed, jnp.ones_like(allowed[:, :1])], axis=1)
  probs = jnp.where(allowed[:, None, None, :], probs, 0.0)
  if par_settings:
    probs = jnp.moveaxis(par.refine(jnp.moveaxis(probs, -1, 1), images, **dict(par_settings)),
                         1, -1)
  probs = probs / jnp.maximum(probs.sum(-1, keepdims=True), 1e-12)
  mask = jnp.where(probs.max(-1) >= confidence, jnp.argmax(probs, -1), mask_files.IGNORE)
  if not finding:
    fixed = (previous == k) | ~allowed.any(axis=1)[:, None, None]
    mask = jnp.where(fixed, k, mask)
  return mask.astype(jnp.uint8)


def relabel_batches(seg, state, config, mesh, confidence: float, par_settings: tuple):
  """(names, labels) of the valid rows of each batch of the training split (self_labels)."""
  batch = parallel.eval_batch_size(config.eval_batch_size, mesh)
  inputs = {} if isinstance(seg.model, MRN) else {"input": config.data.image_size}
  previous = f"mask_{config.data.mask_layers[-1]}"
  keys = ("image", "labels", "name", previous) + tuple(inputs)
  finding = scoring(config) == "finding"
  for b in pipeline.tile_batches(config.data, "train", batch, inputs, keys):
    logits = tile_logits(seg, state, b, config, mesh)
    masks = self_labels(logits, parallel.shard_identical(b["image"], mesh),
                        jnp.asarray(b["labels"]), parallel.shard_identical(b[previous], mesh),
                        jnp.float32(confidence), par_settings, finding)
    valid = b["valid"]
    yield list(b["name"][valid]), np.asarray(masks)[valid]


def load_gate_classifier(config, mesh):
  """{'predict': u8 inputs -> probabilities, 'image_size'} of the classifier in `gate.classifier`,
  or None when the gate is not used."""
  if not config.gate.classifier_workdir:
    return None
  model, variables, meta, _, data = earlier_runs.load_classifier(config.gate.classifier_workdir, mesh,
                                                         field="gate.classifier_workdir")
  if meta["num_classes"] != config.data.num_classes:
    raise UserError(f"gate.classifier_workdir={config.gate.classifier_workdir}: its checkpoint "
                    f"has {meta['num_classes']} classes but data.num_classes="
                    f"{config.data.num_classes}")
  cls_data = earlier_runs.data_config(config, data)
  cls_data.image_size = meta["image_size"]
  predict = jax.jit(lambda u8: jax.nn.sigmoid(model.apply(
      variables, prepare_images(u8, cls_data, jnp.float32))))
  return {"predict": predict, "image_size": meta["image_size"]}


def overlay_figure(shown, palette: list, class_names, title: str) -> np.ndarray:
  """Rows of image | ground truth | prediction, blended and labelled (wsss_jax/outputs/overlays.py)."""
  items = [(image, truth, {"prediction": pred}) for image, truth, pred, _, _ in shown]
  return overlays.mask_figure(items, palette, class_names, title)
