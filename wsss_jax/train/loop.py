"""The trainer every trained phase shares: input, step, timing, logging, checkpoints, hooks.

`fit` is the one entry point: given a task's built training (model, init_state, shardings,
jitted train step) and its checkpoint description, it resumes the run from its workdir (or
starts it fresh, optionally from pretrained weights), trains to `total_steps` with checkpoints,
validation and figure hooks, and returns the run with the summary fields every phase reports.
Underneath, `start_run` restores or initialises, `train` runs the steps and closes the
checkpointer, `summary` collects the common fields. The first step compiles, so it is kept
out of the timings; each logging window reports the median-free mean step time, images/s and the
fraction of wall time spent waiting for the input pipeline.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.data import pipeline
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.train import optim, run_record
from wsss_jax.train.checkpoint import Checkpointer
from wsss_jax.train.writers import MetricWriter


class Throughput:
  """Step-time windows between log lines, excluding the first (compiling) step."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    self.started = time.perf_counter()
    self.window_start, self.window_steps, self.data_wait = None, 0, 0.0
    self.timed_steps, self.timed_seconds = 0, 0.0

  def waited(self, seconds: float) -> None:
    self.data_wait += seconds

  def stepped(self, first: bool, outputs) -> None:
    if first:
      jax.block_until_ready(outputs)  # the first step compiles: keep it out of the timings
      self.window_start, self.data_wait = time.perf_counter(), 0.0
    else:
      self.window_steps += 1

  def window(self) -> dict:
    """Figures of the window since the last call; starts a new window."""
    now, out = time.perf_counter(), {}
    if self.window_steps:
      elapsed = now - self.window_start
      step_time = elapsed / self.window_steps
      out = {"step_time": step_time, "images_per_sec": self.batch_size / step_time,
             "data_wait_fraction": self.data_wait / elapsed}
      self.timed_steps += self.window_steps
      self.timed_seconds += elapsed
    self.window_start, self.window_steps, self.data_wait = now, 0, 0.0
    return out

  def images_per_sec(self) -> float | None:
    return self.batch_size * self.timed_steps / self.timed_seconds if self.timed_seconds else None


@jax.jit
def _first_non_finite(first, loss: jax.Array, grad_norm: jax.Array, step: jax.Array):
  """The first step whose loss or global gradient norm was not finite (0: none yet)."""
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return jnp.where((first == 0) & ~ok, step, first)


def _refuse_non_finite(step: int, last_saved: int | None, checkpoint_dir: str | None):
  kept = (f"the last good checkpoint is {checkpoint_dir}/{last_saved}" if last_saved
          else "no checkpoint was written")
  raise UserError(f"the loss or the gradient norm became non-finite at step {step}: nothing "
                  f"after it was saved ({kept}); lower optim.base_lr or check the input")


def train_loop(state, *, train_step: Callable, data_iter, mesh, start_step: int,
               total_steps: int, log_every: int, checkpoint_every: int, batch_size: int,
               writer, save: Callable, extra_metrics: Callable | None = None,
               step_callback: Callable | None = None, seen_path: str | None = None,
               checkpoint_dir: str | None = None, check_saves: Callable | None = None):
  """Runs the steps; returns (state, last logged metrics, Throughput).

  Every step's loss and gradient norm are checked on device (one small jitted reduction, no
  host sync); the flag is read where the loop syncs anyway (log lines) and before every save,
  so a non-finite state is never written over the last good checkpoint.

  save(step, state): writes a checkpoint (and whatever else the phase keeps with it).
  extra_metrics(step, state) -> dict: added to the log row of `step` (e.g. validation metrics).
  step_callback(step, state): called after every step (tests use it to interrupt a run).
  seen_path: a file to which each step appends the names of the examples this process fed
  (`data.log_seen`: an audit of what each host read).
  check_saves(): raises if a background checkpoint save has failed (called every step).
  """
  timer, metrics = Throughput(batch_size), {}
  # a Python 0 to start: the flag then lives wherever the step's metrics do (any process count)
  first_bad, last_saved = 0, (start_step or None)
  for step in range(start_step + 1, total_steps + 1):
    t_data = time.perf_counter()
    local = next(data_iter)
    timer.waited(time.perf_counter() - t_data)
    if "name" in local:
      names = local.pop("name")
      if seen_path:
        with open(seen_path, "a", encoding="utf-8") as f:
          f.write(json.dumps({"step": step, "names": [str(n) for n in names]}) + "\n")
    state, metrics = train_step(state, parallel.global_batch(local, mesh))
    first_bad = _first_non_finite(first_bad, metrics["loss"],
                                  metrics.get("grad_norm", metrics["loss"]), step)
    timer.stepped(step == start_step + 1, metrics)
    if check_saves is not None:
      check_saves()
    logging = step % log_every == 0 or step == total_steps
    saving = step % checkpoint_every == 0 or step == total_steps
    if logging or saving:  # the host syncs here anyway: read the flag before any save
      bad = int(parallel.to_host(first_bad))
      if bad:
        _refuse_non_finite(bad, last_saved, checkpoint_dir)
    if logging:
      metrics = parallel.to_host(metrics) | timer.window()
      if extra_metrics is not None:
        metrics |= extra_metrics(step, state)
      writer.write(step, metrics)
      writer.progress(step, total_steps, metrics,
                      (total_steps - step) * metrics.get("step_time", 0.0))
    if saving:
      save(step, state)
      last_saved = step
    if step_callback is not None:
      step_callback(step, state)
  return state, metrics, timer


def params_checksum(params) -> str:
  """SHA-256 of this process's copy of the parameters (gathered where sharded): processes that
  hold one model report the same value."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(parallel.to_host(params)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


class Run(NamedTuple):
  """A run's checkpointer, its state (resumed or fresh), input iterator and metric writer."""
  ckpt: Checkpointer
  state: Any
  data_iter: Any
  writer: MetricWriter
  start_step: int


def start_run(config, workdir: str, training, meta: dict, local_batch: int, *,
              keys=("image",), initialize: Callable | None = None, eval_splits=()) -> Run:
  """Restores the latest checkpoint in `workdir` (refused if `meta` differs) or builds a fresh
  state (`training.init_state`, then `initialize(state)` if given: pretrained weights).
  The training split and `eval_splits` are scanned first, so that a bad file in any of them
  stops (or, with data.bad_files=skip, is listed) before the first step, not at the first
  evaluation."""
  for split in ("train",) + tuple(eval_splits):
    pipeline.build_source(config.data, split)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
                      async_save=config.async_checkpointing)
  state, data_state, latest = ckpt.restore_usable(training.abstract_state,
                                                  training.state_sharding, meta)
  if latest is None:
    state = jax.jit(training.init_state, out_shardings=training.state_sharding)()
    if initialize is not None:
      state = initialize(state)
  start_step = int(parallel.to_host(state.step))
  run_record.write_config(config, workdir)  # accepted: this run's record replaces any older one
  writer = MetricWriter(workdir, enabled=parallel.is_main_process(), resume_step=start_step)
  if latest is not None and writer.enabled:
    print(f"resumed from {ckpt.directory}/{latest}", flush=True)
  if config.data.get("log_seen"):
    keys = tuple(keys) + ("name",)
  data_iter = iter(pipeline.train_dataset(
      config.data, seed=config.seed, local_batch=local_batch, keys=keys,
      process_index=jax.process_index(), process_count=jax.process_count()))
  if data_state is not None:
    data_iter.set_state(data_state)
  return Run(ckpt, state, data_iter, writer, start_step)


def train(run: Run, config, *, train_step: Callable, mesh, total_steps: int, save: Callable,
          extra_metrics: Callable | None = None, step_callback: Callable | None = None):
  """`train_loop` over `run`; the checkpointer is flushed and closed whatever happens."""
  seen_path = None
  if config.data.get("log_seen"):
    seen_path = os.path.join(run.writer.workdir, f"seen_process_{jax.process_index()}.jsonl")
  try:
    result = train_loop(
        run.state, train_step=train_step, data_iter=run.data_iter, mesh=mesh,
        start_step=run.start_step, total_steps=total_steps, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, batch_size=config.batch_size,
        writer=run.writer, save=save, extra_metrics=extra_metrics, step_callback=step_callback,
        seen_path=seen_path, checkpoint_dir=run.ckpt.directory, check_saves=run.ckpt.check)
  except BaseException:
    try:  # the error in flight is the one to report; a failing save in flight is secondary
      run.ckpt.wait()
      run.ckpt.close()
    except Exception:  # noqa: BLE001
      pass
    raise
  run.ckpt.wait()  # a failed final save: one line
  run.ckpt.close()
  return result


class Fitted(NamedTuple):
  """What `fit` hands back: the run (its writer still open), the final state, the last logged
  metrics and the common summary fields."""
  run: Run
  state: Any
  last: dict
  summary: dict


def fit(phase: str, config, workdir: str, training, meta: dict, mesh, *, total_steps: int,
        keys=("image",), initialize: Callable | None = None, eval_splits=(),
        validation: Callable | None = None, after_save: Callable | None = None,
        step_callback: Callable | None = None) -> Fitted:
  """Trains `training` (a task's built model, state shardings and jitted step) to
  `total_steps` in `workdir`.

  validation(step, state) -> dict: merged into the log row of `step` (called at log steps).
  after_save(run, step, state): after each checkpoint is started (figures, ...).
  The caller closes `fitted.run.writer` after writing its summary.
  """
  local_batch = parallel.check_batch_size(config.batch_size, mesh)
  run = start_run(config, workdir, training, meta, local_batch, keys=keys,
                  initialize=initialize, eval_splits=eval_splits)

  def save(step, state):
    run.ckpt.save(step, state, run.data_iter.get_state(), meta)
    if after_save is not None:
      after_save(run, step, state)

  state, last, timer = train(run, config, train_step=training.train_step, mesh=mesh,
                             total_steps=total_steps, save=save, extra_metrics=validation,
                             step_callback=step_callback)
  return Fitted(run, state, last, summary(phase, run, state, last, timer, mesh, total_steps))


def summary(phase: str, run: Run, state, last: dict, timer: Throughput, mesh,
            total_steps: int) -> dict:
  """The summary fields every phase reports."""
  return {
      "phase": phase, "steps": total_steps, "resumed_from": run.start_step,
      "final_loss": float(last["loss"]) if last else None,
      "wall_seconds": time.perf_counter() - timer.started,
      "images_per_sec": timer.images_per_sec(),
      "num_devices": int(mesh.devices.size), "mesh": dict(mesh.shape),
      "num_processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "num_params": optim.count_params(state.params),
      "params_checksum": params_checksum(state.params),
  }
