"""Phase dispatch shared by the command line (`wsss_jax.main`) and the pipeline phase."""
from __future__ import annotations

import importlib
import os

from wsss_jax.device import kernels
from wsss_jax.errors import UserError
from wsss_jax.train import run_record

PHASES = {
    "pretrain": "wsss_jax.phases.pretrain",
    "classify": "wsss_jax.phases.classify",
    "benchmark": "wsss_jax.phases.benchmark",
    "maps": "wsss_jax.phases.maps",
    "pseudo_masks": "wsss_jax.phases.pseudo_masks",
    "segment": "wsss_jax.phases.segment",
    "pipeline": "wsss_jax.phases.pipeline",
    "dataset": "wsss_jax.phases.dataset",
    "erasing": "wsss_jax.phases.erasing",
    "predict": "wsss_jax.phases.predict",
}
# phases that resume from checkpoints: they record their config once those are accepted
# (loop.start_run); the others record it before they start
RESUMING = ("pretrain", "classify", "segment", "predict")  # write their own config.json once accepted


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
  """The checks of the phase named by `config.phase` (a phase composing another checks its
  section before it starts)."""
  phase = config.get("phase")
  if phase not in PHASES:
    raise UserError(f"config field phase={phase!r} is not one of {sorted(PHASES)}")
  importlib.import_module(PHASES[phase]).validate(config)


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
  if phase not in RESUMING:
    run_record.write_config(config, workdir)
  with kernels.selected_kernels(chosen):
    return importlib.import_module(PHASES[phase]).run(config, workdir)
