"""Pretrain phase: masked-autoencoder pretraining of a ViT encoder.

Sections: mesh, model, optimiser and jitted step (`build_training`, shared with the benchmark)
-> state (fresh or resumed) -> input -> loop (metrics, checkpoints, reconstruction figures)
-> summary. The step is one `jax.jit` with explicit
shardings: state replicated, batch split over the `data` axis, state donated.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wsss_jax import figures, loop, optim, parallel
from wsss_jax.checkpoint import Checkpointer
from wsss_jax.data import pipeline
from wsss_jax.errors import UserError
from wsss_jax.models.mae import MaskedAutoencoder, build_mae, random_masking
from wsss_jax.train_state import TrainState
from wsss_jax.writers import MetricWriter


def compute_dtype(config):
  return jnp.bfloat16 if config.mixed_precision else jnp.float32


def checkpoint_meta(config) -> dict:
  """What must match for a checkpoint to be resumed by this config."""
  return {"phase": "pretrain", "model": config.model.to_dict(),
          "image_size": config.data.image_size}


def make_init_fn(model: MaskedAutoencoder, tx, image_size: int, seed: int):
  def init_state():
    params_rng, mask_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = model.init({"params": params_rng, "mask": mask_rng}, dummy)["params"]
    return TrainState.create(params, tx, state_rng)
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
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_reconstruct_fn(model: MaskedAutoencoder, mean, std, dtype, seed: int):
  """images (uint8) -> (original, masked, reconstruction) float images in [0, 1] for figures."""
  p = model.encoder.patch_size

  def reconstruct(params, images_u8):
    images = pipeline.normalize(images_u8, mean, std, dtype)
    masking = random_masking(jax.random.PRNGKey(seed), images.shape[0],
                             model.encoder.grid_size**2, model.mask_ratio)
    out = model.apply({"params": params}, images, masking)
    return figures.mae_panels(images.astype(jnp.float32), out.pred.astype(jnp.float32),
                              out.mask, p, model.norm_pix_loss, mean, std)

  return reconstruct


class Training(NamedTuple):
  """What the pretrain and benchmark phases build alike from a config and a mesh."""
  model: MaskedAutoencoder
  init_state: Callable      # () -> TrainState, to be jitted with `state_sharding`
  abstract_state: Any       # its shapes and dtypes
  state_sharding: Any
  train_step: Callable      # jitted (state, batch) -> (state, metrics); state donated


def build_training(config, mesh) -> Training:
  """Model, AdamW, the state's shape and sharding, and the sharded, jitted train step."""
  dtype = compute_dtype(config)
  model = build_mae(config.model, config.data.image_size, dtype)
  tx, schedule = optim.adamw(config.optim, config.batch_size, config.total_steps)
  init_state = make_init_fn(model, tx, config.data.image_size, config.seed)
  abstract_state = jax.eval_shape(init_state)
  state_sharding = parallel.state_shardings(abstract_state, mesh)
  train_step = jax.jit(
      make_train_step(model, tx, schedule, tuple(config.data.mean), tuple(config.data.std),
                      dtype),
      in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
      out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)
  return Training(model, init_state, abstract_state, state_sharding, train_step)


def validate(config) -> None:
  for field in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    if config[field] <= 0:
      raise UserError(f"{field}={config[field]} must be a positive integer")
  pipeline.check_dataset_name(config.data.name)
  lo, hi = config.data.crop_scale
  if not 0 < lo <= hi <= 1:
    raise UserError(f"data.crop_scale={tuple(config.data.crop_scale)} must satisfy "
                    f"0 < low <= high <= 1")


def run(config, workdir: str, *, step_callback: Callable | None = None) -> dict:
  """Trains until `config.total_steps`, resuming from the latest checkpoint in `workdir`."""
  validate(config)
  # --- Mesh, model, optimiser, jitted step ------------------------------------------------------
  mesh = parallel.make_mesh(config.num_devices)
  local_batch = parallel.check_batch_size(config.batch_size, mesh)
  t = build_training(config, mesh)
  state_sharding = t.state_sharding

  # --- State: fresh or resumed ------------------------------------------------------------------
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
                      async_save=config.async_checkpointing)
  meta = checkpoint_meta(config)
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, t.abstract_state, state_sharding, meta)
  else:
    state, data_state = jax.jit(t.init_state, out_shardings=state_sharding)(), None
  start_step = int(parallel.to_host(state.step))
  writer = MetricWriter(workdir, enabled=parallel.is_main_process(), resume_step=start_step)
  if latest is not None and writer.enabled:
    print(f"resumed from {ckpt.directory}/{latest}", flush=True)

  # --- Input ------------------------------------------------------------------------------------
  dataset = pipeline.train_dataset(
      config.data, seed=config.seed, local_batch=local_batch,
      process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = iter(dataset)
  if data_state is not None:
    data_iter.set_state(data_state)
  eval_images = parallel.replicate(
      pipeline.eval_examples(config.data, config.num_figure_images)["image"], mesh)

  # --- Figures ----------------------------------------------------------------------------------
  reconstruct = jax.jit(make_reconstruct_fn(t.model, tuple(config.data.mean),
                                            tuple(config.data.std), compute_dtype(config),
                                            config.seed),
                        out_shardings=parallel.replicated(mesh))

  def save(step, state):
    ckpt.save(step, state, data_iter.get_state(), meta)
    panels = parallel.to_host(reconstruct(state.params, eval_images))  # on every process
    if writer.enabled:
      grid = figures.save_grid(panels, os.path.join(workdir, "figures", f"recon_{step:07d}.png"))
      writer.image("reconstruction", step, grid)

  # --- Loop -------------------------------------------------------------------------------------
  t_start = time.perf_counter()
  try:
    state, metrics, timer = loop.train_loop(
        state, train_step=t.train_step, data_iter=data_iter, mesh=mesh, start_step=start_step,
        total_steps=config.total_steps, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, batch_size=config.batch_size, writer=writer,
        save=save, step_callback=step_callback)
  finally:
    ckpt.wait()
    ckpt.close()

  summary = {
      "phase": "pretrain", "steps": config.total_steps, "resumed_from": start_step,
      "final_loss": float(metrics["loss"]) if metrics else None,
      "wall_seconds": time.perf_counter() - t_start,
      "images_per_sec": timer.images_per_sec(),
      "num_devices": int(mesh.devices.size), "num_processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "num_params": optim.count_params(state.params),
  }
  writer.summary(summary)
  writer.close()
  return summary
