"""A run's record in its workdir: which phase owns it, and its config.json.

config.json is written only once the run is accepted (the config valid, the workdir's checkpoints
of this phase and model), so a refused run leaves another run's record as it found it. It is
written to a temporary name and renamed: a crash never leaves half a config.
"""
from __future__ import annotations

import json
import os

import jax

from wsss_jax import atomic
from wsss_jax.errors import UserError

CONFIG_FILE = "config.json"


def recorded_config(workdir: str) -> dict | None:
  """The config.json a run in `workdir` recorded, or None (none there, or unreadable)."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE), encoding="utf-8") as f:
      recorded = json.load(f)
  except (OSError, ValueError):
    return None
  return recorded if isinstance(recorded, dict) else None


def recorded_phase(workdir: str) -> str | None:
  """The phase named in the workdir's config.json, or None when there is none (or unreadable)."""
  return (recorded_config(workdir) or {}).get("phase")


def check_phase(config, workdir: str) -> None:
  """Refuses a workdir that holds another phase's run (its config.json says so)."""
  found, phase = recorded_phase(workdir), config.get("phase")
  if found is not None and found != phase:
    raise UserError(f"--workdir={workdir} holds a {found} run (its {CONFIG_FILE} says "
                    f"phase={found}); this is a {phase} run: use another --workdir")


def write_config(config, workdir: str) -> None:
  """config.json of the run (main process only), atomically."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    atomic.write_text(path, config.to_json_best_effort(indent=2))
  except OSError as e:
    raise UserError(f"{path} cannot be written: {e.strerror}") from None
