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
from wsss_jax.train import optim, preemption, run_record
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


NAN_POLICIES = ("stop", "skip_step")


def check_trainer_fields(config) -> None:
  """The fields every trained phase's loop reads (one line for the first that is wrong)."""
  for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
    if config[field] <= 0:
      raise UserError(f"{field}={config[field]} must be a positive integer")
  if config.nan_policy not in NAN_POLICIES:
    raise UserError(f"nan_policy={config.nan_policy!r} is not one of {NAN_POLICIES}")
  if config.nan_max_in_a_row <= 0:
    raise UserError(f"nan_max_in_a_row={config.nan_max_in_a_row} must be a positive integer")


@jax.jit
def _count_non_finite(counts: jax.Array, ok: jax.Array, step, limit: int) -> jax.Array:
  """counts = (non-finite steps in a row, in all, first step at which the run reached `limit`
  in a row; 0: not yet); one small update on device, no host sync."""
  in_a_row = jnp.where(ok, 0, counts[0] + 1)
  reached = jnp.where((counts[2] == 0) & (in_a_row >= limit), step, counts[2])
  return jnp.stack([in_a_row, counts[1] + (~ok).astype(jnp.int32), reached])


class NonFiniteGuard:
  """Watches every step's loss and global gradient norm; read where the loop syncs anyway (log
  lines) and before every save, so that a non-finite state is never written over the last good
  checkpoint. nan_policy=stop: the first non-finite step ends the run. skip_step: the step leaves
  the state as it was (the jitted step's `skip_non_finite`), and `max_in_a_row` of them in a row
  end it."""

  def __init__(self, policy: str, max_in_a_row: int, checkpoint_dir: str | None,
               last_saved: int | None):
    self.limit = 1 if policy == "stop" else max_in_a_row
    self.policy, self.checkpoint_dir, self.last_saved = policy, checkpoint_dir, last_saved
    self.counts = jnp.zeros(3, jnp.int32)

  def stepped(self, step: int, metrics) -> None:
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics.get("grad_norm", metrics["loss"]))
    self.counts = _count_non_finite(self.counts, ok, step, self.limit)

  def check(self) -> dict:
    """Raises when the policy's limit was reached; else the log row's fields."""
    in_a_row, total, reached = (int(v) for v in parallel.to_host(self.counts))
    if reached:
      kept = (f"the last good checkpoint is {self.checkpoint_dir}/{self.last_saved}"
              if self.last_saved else "no checkpoint was written")
      what = (f"at step {reached}" if self.policy == "stop" else
              f"at {self.limit} steps in a row up to step {reached} (nan_policy=skip_step, "
              f"{total} skipped in all)")
      raise UserError(f"the loss or the gradient norm became non-finite {what}: nothing after "
                      f"it was saved ({kept}); lower optim.base_lr or check the input")
    return {"skipped_steps": total} if self.policy == "skip_step" else {}


def train_loop(state, *, train_step: Callable, data_iter, mesh, start_step: int,
               total_steps: int, log_every: int, checkpoint_every: int, batch_size: int,
               writer, save: Callable, extra_metrics: Callable | None = None,
               step_callback: Callable | None = None, seen_path: str | None = None,
               checkpoint_dir: str | None = None, check_saves: Callable | None = None,
               nan_policy: str = "stop", nan_max_in_a_row: int = 1):
  """Runs the steps; returns (state, last logged metrics, Throughput, the step after which a
  preemption notice stopped the run or None).

  save(step, state): writes a checkpoint (and whatever else the phase keeps with it); also at the
    step where a SIGTERM / SIGINT stops the run (`preemption.StopSignal`).
  extra_metrics(step, state) -> dict: added to the log row of `step` (e.g. validation metrics).
  step_callback(step, state): called after every step (tests use it to interrupt a run).
  seen_path: a file to which each step appends the names of the examples this process fed
  (`data.log_seen`: an audit of what each host read).
  check_saves(): raises if a background checkpoint save has failed (called every step).
  """
  timer, metrics = Throughput(batch_size), {}
  guard = NonFiniteGuard(nan_policy, nan_max_in_a_row, checkpoint_dir, start_step or None)
  with preemption.StopSignal() as stop:
    for step in range(start_step + 1, total_steps + 1):
      t_data = time.perf_counter()
      local = next(data_iter)
      timer.waited(time.perf_counter() - t_data)
      _log_seen(seen_path, step, local)
      state, metrics = train_step(state, parallel.global_batch(local, mesh))
      guard.stepped(step, metrics)
      timer.stepped(step == start_step + 1, metrics)
      if check_saves is not None:
        check_saves()
      stopping = stop.reached(step)
      logging = step % log_every == 0 or step == total_steps
      saving = step % checkpoint_every == 0 or step == total_steps or stopping
      if logging or saving:  # the host syncs here anyway: read the guard before any save
        fields = guard.check()
      if logging:
        metrics = parallel.to_host(metrics) | timer.window() | fields
        if extra_metrics is not None:
          metrics |= extra_metrics(step, state)
        writer.write(step, metrics)
        writer.progress(step, total_steps, metrics,
                        (total_steps - step) * metrics.get("step_time", 0.0))
      if saving:
        save(step, state)
        guard.last_saved = step
      if step_callback is not None:
        step_callback(step, state)
      if stopping and step < total_steps:
        return state, metrics, timer, step
  return state, metrics, timer, None


def _log_seen(seen_path: str | None, step: int, local: dict) -> None:
  """Takes the example names out of the batch; appends them to `seen_path` if given."""
  if "name" in local:
    names = local.pop("name")
    if seen_path:
      with open(seen_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "names": [str(n) for n in names]}) + "\n")


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
  ckpt.ensure_writable()
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
        seen_path=seen_path, checkpoint_dir=run.ckpt.directory, check_saves=run.ckpt.check,
        nan_policy=config.nan_policy, nan_max_in_a_row=config.nan_max_in_a_row)
  except BaseException:
    try:  # the error in flight is the one to report; a failing save in flight is secondary
      run.ckpt.wait()
      run.ckpt.close()
    except Exception:  # noqa: BLE001
      pass
    raise
  run.ckpt.wait()  # a failed final save (or the preemption's): one line
  run.ckpt.close()
  *result, stopped = result
  if stopped is not None:
    raise preemption.Preempted(
        f"preempted (SIGTERM or SIGINT): stopped after step {stopped} of {total_steps}, "
        f"checkpoint {run.ckpt.directory}/{stopped} written; run the same command again to "
        f"resume")
  return tuple(result)


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
