"""Orbax checkpoints: the train state, the input iterator's position, and what wrote them.

One `Checkpointer` per run directory. Saves are asynchronous and atomic (orbax writes into a
temporary directory and renames it when complete, so a killed run never leaves a half-written step
behind); the last `max_to_keep` steps are kept. Restores go onto whatever mesh the caller gives,
so a run saved on 8 devices resumes on 1 or 2. A checkpoint written for another model or phase
is refused with one line naming the field that differs.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

from wsss_jax.errors import UserError



_array_handler_processes: int | None = None  # the process count it was registered for


def _register_array_handler() -> None:
  """Replica-parallel saving (each replica of a replicated array writes a slice of it) only
  across processes: within one, it buys no parallel writes and compiles a slice program per
  parameter shape and device at the first save (54 of them, 2.2 s, for a tiny ResNet38 on 2 CPU
  devices). Orbax already turns it off on GPUs. Registered once per process, quietly: orbax
  logs a warning each time its default handler is overridden."""
  global _array_handler_processes
  if _array_handler_processes == jax.process_count():
    return
  from orbax.checkpoint._src.metadata import array_metadata_store  # as orbax's default handler
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        use_replica_parallel=jax.process_count() > 1,
        array_metadata_store=array_metadata_store.Store()), override=True)
  finally:
    absl_logging.set_verbosity(verbosity)
  _array_handler_processes = jax.process_count()


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               best_metric: str | None = None):
    """best_metric: keep the `max_to_keep` steps with the highest value of this metric (passed
    to `save`) instead of the latest ones."""
    self.directory = os.path.abspath(directory)
    _register_array_handler()
    best = {} if best_metric is None else dict(best_fn=lambda m: m[best_metric], best_mode="max")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save, **best)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}  # registered up front: metadata reads
    self._manager = ocp.CheckpointManager(epath.Path(self.directory), options=options,
                                          item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, meta: dict,
           metrics: dict | None = None) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state, shardings, expected_meta: dict):
    """Restores (state, data_state) of `step` onto `shardings`; checks `expected_meta` first."""
    where = os.path.join(self.directory, str(step))
    check_meta(self.read_meta(step), expected_meta, where)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_state, shardings)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"checkpoint {where} does not fit this model: {_first_line(e)}") from None
    return restored["state"], restored["data"]

  def restore_params(self, step: int, sharding):
    """(params, meta) of `step`, whatever model wrote it: the tree is read from the checkpoint's
    own metadata, so a classifier can start from an MAE run without rebuilding its optimiser."""
    fields, meta = self.restore_fields(step, sharding, ("params",))
    return fields["params"], meta

  def restore_fields(self, step: int, sharding, fields=("params", "batch_stats")):
    """({field: tree}, meta) for the named fields of the saved state (those it has)."""
    tree = self._manager.item_metadata(step)["state"].tree
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          tree)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
    return {f: restored[f] for f in fields if f in restored}, self.read_meta(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


# How a step computes, not what it learns: left out of a checkpoint's model description, so a run
# may resume (or be started from) with other settings of these.
RUNTIME_MODEL_FIELDS = ("init_from", "attention", "remat", "gather")


def model_meta(model_cfg) -> dict:
  """The `model` entry of a checkpoint's meta: the model section without its runtime fields."""
  return {k: v for k, v in model_cfg.to_dict().items() if k not in RUNTIME_MODEL_FIELDS}


def restore_latest(workdir: str, sharding, fields=("params", "batch_stats"), *, flag: str,
                   hint: str = "") -> tuple[dict, dict, int]:
  """({field: tree}, meta, step) of the latest checkpoint of the run in `workdir` (another
  phase's run); one error naming `flag` when it has none. Nothing is created there."""
  directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
  ckpt = Checkpointer(directory, async_save=False) if os.path.isdir(directory) else None
  step = ckpt.latest_step() if ckpt else None
  if step is None:
    if ckpt:
      ckpt.close()
    raise UserError(f"{flag}={workdir}: no checkpoint in {directory}{hint}")
  try:
    restored, meta = ckpt.restore_fields(step, sharding, fields)
  finally:
    ckpt.close()
  return restored, meta, step


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def check_meta(saved: dict, expected: dict, where: str) -> None:
  """Refuses a checkpoint whose phase or model description differs from the current config."""
  expected = json.loads(json.dumps(expected))  # tuples -> lists, as the saved JSON has them
  for key in sorted(set(saved) | set(expected)):
    if saved.get(key) != expected.get(key):
      raise UserError(
          f"checkpoint {where} was written with {key}={json.dumps(saved.get(key))} but this run "
          f"has {key}={json.dumps(expected.get(key))}; use another --workdir or the same config")
