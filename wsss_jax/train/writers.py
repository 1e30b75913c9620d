"""Run outputs: metrics.jsonl, TensorBoard event files, summary.json and a progress line.

Only the main process writes; the others get a writer that does nothing.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from wsss_jax import atomic


def _plain(value):
  """numpy / jax scalars -> Python numbers for JSON."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the rows with step <= last_step (atomic rewrite)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    rows = [line for line in f if line.strip()]
  kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
  if len(kept) != len(rows):
    atomic.write_text(path, "".join(kept))


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter (TensorBoard event files without TensorFlow), imported with
  torch hidden: tensorboardX imports torch when it is installed (2.4 s here) only to accept torch
  tensors, and every value this project logs is numpy. A torch imported before stays visible."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
  try:  # imported here so that torch can be hidden from it first
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter(logdir)


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool = True, stream=sys.stdout,
               resume_step: int = 0):
    """`resume_step`: rows logged after it by an interrupted run are dropped, not duplicated."""
    self.enabled = enabled
    self.workdir = workdir
    self.stream = stream
    self._jsonl = None
    self._tb = None
    if enabled:
      path = os.path.join(workdir, "metrics.jsonl")
      _truncate_jsonl(path, resume_step)
      self._jsonl = open(path, "a", encoding="utf-8")
      self._tb = _summary_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))

  def image(self, tag: str, step: int, image: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(tag, image, int(step), dataformats="HWC")

  def progress(self, step: int, total: int, metrics: dict, eta_s: float) -> None:
    if not self.enabled:
      return
    parts = [f"step {step}/{total}"]
    for k, fmt in (("loss", ".4f"), ("lr", ".2e"), ("images_per_sec", ".1f"),
                   ("step_time", ".3f"), ("data_wait_fraction", ".2f")):
      if k in metrics:
        parts.append(f"{k} {format(float(metrics[k]), fmt)}")
    parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime(max(eta_s, 0)))}")
    print(" | ".join(parts), file=self.stream, flush=True)

  def summary(self, summary: dict) -> None:
    if self.enabled:
      path = os.path.join(self.workdir, "summary.json")
      atomic.write_json(path, {k: _plain(v) for k, v in summary.items()})

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
