"""The training loop every phase shares: input, step, timing, logging, checkpoints, hooks.

`train_loop` runs steps `start_step + 1 .. total_steps`. The first step compiles, so it is kept
out of the timings; each logging window reports the median-free mean step time, images/s and the
fraction of wall time spent waiting for the input pipeline.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from wsss_jax import parallel
from wsss_jax.errors import UserError


class Throughput:
  """Step-time windows between log lines, excluding the first (compiling) step."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
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


def train_loop(state, *, train_step: Callable, data_iter, mesh, start_step: int,
               total_steps: int, log_every: int, checkpoint_every: int, batch_size: int,
               writer, save: Callable, extra_metrics: Callable | None = None,
               step_callback: Callable | None = None):
  """Runs the steps; returns (state, last logged metrics, Throughput).

  save(step, state): writes a checkpoint (and whatever else the phase keeps with it).
  extra_metrics(step, state) -> dict: added to the log row of `step` (e.g. validation metrics).
  step_callback(step, state): called after every step (tests use it to interrupt a run).
  """
  timer, metrics = Throughput(batch_size), {}
  for step in range(start_step + 1, total_steps + 1):
    t_data = time.perf_counter()
    local = next(data_iter)
    timer.waited(time.perf_counter() - t_data)
    state, metrics = train_step(state, parallel.global_batch(local, mesh))
    timer.stepped(step == start_step + 1, metrics)
    if step % log_every == 0 or step == total_steps:
      metrics = parallel.to_host(metrics) | timer.window()
      if not np.isfinite(metrics["loss"]):
        raise UserError(f"loss became {metrics['loss']} at step {step}; lower optim.base_lr")
      if extra_metrics is not None:
        metrics |= extra_metrics(step, state)
      writer.write(step, metrics)
      writer.progress(step, total_steps, metrics,
                      (total_steps - step) * metrics.get("step_time", 0.0))
    if step % checkpoint_every == 0 or step == total_steps:
      save(step, state)
    if step_callback is not None:
      step_callback(step, state)
  return state, metrics, timer
