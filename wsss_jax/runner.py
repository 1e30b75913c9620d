"""Phase dispatch: the command line (`wsss_jax.main`) runs a config through `run_phase`, and the
phases that compose others (pipeline, erasing, pretrain's evaluation) get `DISPATCH` to do the same."""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

from wsss_jax.device import kernels
from wsss_jax.errors import UserError
from wsss_jax.phases import (affinity, benchmark, classify, dataset, erasing, maps, pipeline,
                             predict, pretrain, pseudo_masks, segment)
from wsss_jax.train import run_record

PHASES = {"pretrain": pretrain, "classify": classify, "benchmark": benchmark, "maps": maps,
          "pseudo_masks": pseudo_masks, "segment": segment, "pipeline": pipeline,
          "dataset": dataset, "erasing": erasing, "predict": predict, "affinity": affinity}
# phases that run other phases are given the dispatch below in their run and validate (a phase
# never imports the runner)
COMPOSING = ("pretrain", "erasing", "pipeline")
# phases that resume from checkpoints: they record their config once those are accepted
# (loop.start_run); the others record it before they start
RESUMING = ("pretrain", "classify", "segment", "predict", "affinity")  # write their own config.json once accepted


def prepare_workdir(workdir: str | None) -> str:
  """Creates the workdir if needed and checks it is a writable directory."""
  if not workdir:
    raise UserError("--workdir is required")
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--workdir={workdir} exists and is not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UserError(f"--workdir={workdir} cannot be created: {e.strerror}") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise UserError(f"--workdir={workdir} is not writable")
  return path


def validate_phase(config) -> None:
  """The checks of the phase named by `config.phase` (a phase composing others checks their
  sections through the dispatch before it starts)."""
  phase = config.get("phase")
  if phase not in PHASES:
    raise UserError(f"config field phase={phase!r} is not one of {sorted(PHASES)}")
  check = getattr(PHASES[phase], "validate", None)
  if check is None:  # benchmark, dataset: their config has nothing to check ahead
    return
  if phase in COMPOSING:
    check(config, DISPATCH)
  else:
    check(config)


def run_phase(config, workdir: str) -> dict:
  """Dispatches to the runner named by `config.phase`."""
  phase = config.get("phase")
  if phase not in PHASES:
    raise UserError(f"config field phase={phase!r} is not one of {sorted(PHASES)}")
  chosen = config.get("kernels", "rewrite")
  if chosen not in kernels.KERNELS:
    raise UserError(f"kernels={chosen!r} is not one of {kernels.KERNELS}")
  workdir = prepare_workdir(workdir)
  if "data" in config and "report_dir" in config.data and not config.data.report_dir:
    config.data.report_dir = workdir  # lists of skipped bad files land in the run's workdir
  run_record.check_phase(config, workdir)
  if phase not in RESUMING:  # a refused config leaves no config.json behind
    validate_phase(config)
    run_record.write_config(config, workdir)
  with kernels.selected_kernels(chosen):
    if phase in COMPOSING:
      return PHASES[phase].run(config, workdir, dispatch=DISPATCH)
    return PHASES[phase].run(config, workdir)


class Dispatch(NamedTuple):
  """What a phase composing others is given to run and check them."""
  run: Callable
  validate: Callable


DISPATCH = Dispatch(run_phase, validate_phase)
