"""Preemption: a SIGTERM (the notice TPU VMs, spot GPUs and SLURM give) or a SIGINT (Ctrl-C) stops
a run at the next step or tile boundary instead of killing it mid-write.

One process: a Python handler sets a flag that the loop reads after each step. Several processes:
JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM in any process
and agrees with the others on one step at which all of them stop
(`multihost_utils.reached_preemption_sync_point`, called at every step by every process); a SIGINT
is passed on to it as a SIGTERM. The caller writes its checkpoint there and raises `Preempted`,
which `wsss_jax.main` reports in one line with exit status `Preempted.EXIT_STATUS` (75).
"""
from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from wsss_jax.errors import Preempted

__all__ = ["Preempted", "StopSignal"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """`with StopSignal() as stop:` ... `if stop.reached(step): ...` at every step or tile.

  Handlers are installed only in the main thread (Python's rule) and restored on exit, so a
  phase run inside another (the pipeline's) or a test keeps its own."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}
    self._shared = jax.process_count() > 1  # JAX's service decides where every process stops

  def __enter__(self) -> "StopSignal":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        if self._shared and sig == signal.SIGTERM:
          continue  # JAX's own notifier handles it
        if signal.getsignal(sig) == signal.SIG_IGN:
          continue  # ignored by whoever started us (a background job's SIGINT): left so
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    self.received = signal.Signals(signum).name
    if self._shared:  # SIGINT on one host: notify the preemption service as a SIGTERM would
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """True when the run should stop after `step` (the same step on every process)."""
    if self._shared:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None
