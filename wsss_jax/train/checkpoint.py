"""Orbax checkpoints: the train state, the input iterator's position, and what wrote them.

One `Checkpointer` per run directory. Saves are asynchronous and atomic (orbax writes into a
temporary directory and renames it when complete, so a killed run never leaves a half-written step
behind); the last `max_to_keep` steps are kept. Restores go onto whatever mesh the caller gives,
so a run saved on 8 devices resumes on 1 or 2. A checkpoint written for another model or phase
is refused with one line naming the field that differs.

Integrity: each step also stores a fingerprint of every array of the state (two sums of its bit
patterns, computed on device: no host copy), checked after every restore. A step that cannot be
read or does not match its fingerprint raises `CorruptCheckpoint`; `restore_usable` then moves it
aside (never deletes it) and takes the step before. Write failures (permission, full disk, a
vanished directory), also of a background save, are one `UserError` naming the path.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils

from wsss_jax.device import parallel
from wsss_jax.errors import UserError

CORRUPT_DIR = "checkpoints.corrupt"  # beside the checkpoints: steps moved aside


class CorruptCheckpoint(UserError):
  """A checkpoint step that cannot be read or does not match its integrity record."""


# --- Integrity record ----------------------------------------------------------------------------
def _words(x):
  """An array's bit patterns as uint32 (keys as their data, narrower types widened)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  if x.dtype.itemsize == 8:  # bitcast splits each 64-bit word into two 32-bit ones
    return jax.lax.bitcast_convert_type(x, bits).reshape(-1)
  return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).reshape(-1)


@jax.jit
def _fingerprint_arrays(tree):
  """Per array: (sum of its words, sum of word x (position + 1)), both mod 2^32 (exact and
  order-free, so any sharding gives the same values). A flipped bit changes the first; words
  swapped between positions change the second."""
  def one(x):
    w = _words(x)
    position = jnp.arange(1, w.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * position, dtype=jnp.uint32)])
  return jax.tree.map(one, tree)


def fingerprint(tree) -> dict:
  """{leaf path: [sum, weighted sum]} of a tree of arrays (what `save` records)."""
  sums = jax.device_get(_fingerprint_arrays(tree))
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  return {parallel.leaf_path(path): [int(v) for v in np.asarray(value)]
          for path, value in flat}


def verify(tree, record: dict | None, where: str, prefix: str = "") -> None:
  """Raises CorruptCheckpoint naming the first array of `tree` that does not match `record`
  (paths under `prefix`, e.g. "params/" for a restored field). No record: nothing to check."""
  if not record:
    return
  for path, value in fingerprint(tree).items():
    want = record.get(prefix + path)
    if want is not None and want != value:
      raise CorruptCheckpoint(f"checkpoint {where}: {prefix + path} does not match the "
                              f"integrity record written with it (damaged file)")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


# the operating system's words for the usual causes, as orbax and tensorstore pass them on
OS_CAUSES = ("No space left on device", "Read-only file system", "Permission denied",
             "No such file or directory", "Disk quota exceeded", "Input/output error")


_stranded = False  # a background save failed: orbax's threads wait minutes before they give up


def stranded_saves() -> bool:
  """True once a checkpoint write of this process has failed: orbax's signalling threads of
  that save then wait for a directory that never comes (5 minutes) and hold the interpreter at
  exit, so `wsss_jax.main` ends the process at once after its error line."""
  return _stranded


def _io_error(e: BaseException, path: str, doing: str) -> UserError:
  """One line for a failed write: the OS's cause where the error chain names one."""
  global _stranded
  _stranded = _stranded or doing == "written"
  cause, text = e, ""
  while cause is not None:
    if isinstance(cause, OSError) and cause.strerror:
      return UserError(f"checkpoint {path} could not be {doing}: {cause.strerror}")
    text += " " + str(cause)
    cause = cause.__cause__ or cause.__context__
  why = next((c for c in OS_CAUSES if c in text), _first_line(e)[:200])
  return UserError(f"checkpoint {path} could not be {doing}: {why}")


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
  # orbax's private module, as its own default handler builds it; imported only when registering
  from orbax.checkpoint._src.metadata import array_metadata_store
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
                "meta": ocp.JsonCheckpointHandler(),
                "integrity": ocp.JsonCheckpointHandler()}  # registered up front: metadata reads
    try:
      self._manager = ocp.CheckpointManager(epath.Path(self.directory), options=options,
                                            item_handlers=handlers)
    except OSError as e:
      raise _io_error(e, self.directory, "opened") from None
    self._saving = None  # the step of the save in flight (for error messages)

  def ensure_writable(self) -> None:
    """One line now, before the first step, if the directory refuses writes (read-only
    filesystem or mount, permissions), instead of at the first save."""
    probe = os.path.join(self.directory, f".write_probe.{os.getpid()}")
    try:
      with open(probe, "wb") as f:
        f.write(b"0")
      os.remove(probe)
    except OSError as e:
      raise UserError(f"checkpoint directory {self.directory} refuses writes: "
                      f"{e.strerror}") from None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, meta: dict,
           metrics: dict | None = None) -> None:
    """Starts writing `step` (with the state's integrity record); a failure of this or of the
    previous background save is one UserError naming the path and the cause."""
    if self._manager.is_saving_in_progress():
      self.wait()  # orbax would wait inside save(); this way its failure names its own step
    self.check()
    record = {"arrays": fingerprint(state), "step": int(step)}
    self._saving = step
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta),
          integrity=ocp.args.JsonSave(record)), metrics=metrics, force=True)
    except Exception as e:  # noqa: BLE001 - orbax wraps OS errors in its own types
      raise _io_error(e, os.path.join(self.directory, str(step)), "written") from None

  def check(self) -> None:
    """Raises (one line) if a background save has failed since the last call."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise _io_error(e, os.path.join(self.directory, str(self._saving)), "written") from None

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def _read_json(self, step: int, item: str):
    where = os.path.join(self.directory, str(step))
    if not os.path.isdir(os.path.join(where, item)):
      if item == "integrity":
        return None  # written before integrity records existed
      raise CorruptCheckpoint(f"checkpoint {where} is incomplete: its {item} is missing")
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.JsonRestore()}))[item]
    except Exception as e:  # noqa: BLE001
      raise CorruptCheckpoint(f"checkpoint {where} cannot be read ({item}): "
                              f"{_first_line(e)}") from None

  def read_meta(self, step: int) -> dict:
    return self._read_json(step, "meta")

  def read_integrity(self, step: int) -> dict | None:
    record = self._read_json(step, "integrity")
    return record["arrays"] if record else None

  def restore(self, step: int, abstract_state, shardings, expected_meta: dict):
    """Restores (state, data_state) of `step` onto `shardings`: checks `expected_meta` first
    (UserError), then reads and verifies the arrays (CorruptCheckpoint)."""
    where = os.path.join(self.directory, str(step))
    check_meta(self.read_meta(step), expected_meta, where)
    record = self.read_integrity(step)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_state, shardings)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - the model matched its meta: the files are at fault
      raise CorruptCheckpoint(f"checkpoint {where} cannot be read: {_first_line(e)}") from None
    verify(restored["state"], record, where)
    return restored["state"], restored["data"]

  def quarantine(self, step: int) -> str:
    """Moves step `step` out of the run's checkpoints (into checkpoints.corrupt/ beside them,
    never deleting it); returns where it went."""
    source = os.path.join(self.directory, str(step))
    target_dir = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)
    target = os.path.join(target_dir, str(step))
    if jax.process_index() == 0:
      os.makedirs(target_dir, exist_ok=True)
      n = 1
      while os.path.exists(target):
        target, n = os.path.join(target_dir, f"{step}.{n}"), n + 1
      try:
        shutil.move(source, target)
      except OSError as e:
        raise UserError(f"checkpoint {source} is damaged and cannot be moved aside: "
                        f"{e.strerror}") from None
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine {source}")
    self._manager.reload()
    return target

  def restore_usable(self, abstract_state, shardings, expected_meta: dict):
    """(state, data_state, step) of the latest step that reads and verifies, moving each
    damaged later step aside with one line; (None, None, None) when there are no steps; one
    UserError when there are steps and none is usable. A step of another model or phase is
    refused (UserError), not moved."""
    steps = sorted(self.all_steps(), reverse=True)
    for step in steps:
      try:
        state, data = self.restore(step, abstract_state, shardings, expected_meta)
        return state, data, step
      except CorruptCheckpoint as e:
        moved = self.quarantine(step)
        print(f"warning: {e}; moved to {moved}", flush=True)
    if steps:
      raise UserError(f"no usable checkpoint in {self.directory}: every step ({steps}) is "
                      f"damaged and was moved to {os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)}")
    return None, None, None

  def restore_params(self, step: int, sharding):
    """(params, meta) of `step`, whatever model wrote it: the tree is read from the checkpoint's
    own metadata, so a classifier can start from an MAE run without rebuilding its optimiser."""
    fields, meta = self.restore_fields(step, sharding, ("params",))
    return fields["params"], meta

  def restore_fields(self, step: int, sharding, fields=("params", "batch_stats")):
    """({field: tree}, meta) for the named fields of the saved state (those it has), verified
    against the step's integrity record (CorruptCheckpoint if they do not match)."""
    where = os.path.join(self.directory, str(step))
    meta, record = self.read_meta(step), self.read_integrity(step)
    try:
      tree = self._manager.item_metadata(step)["state"].tree
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            tree)
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # noqa: BLE001
      raise CorruptCheckpoint(f"checkpoint {where} cannot be read: {_first_line(e)}") from None
    out = {f: restored[f] for f in fields if f in restored}
    for f, tree in out.items():
      verify(tree, record, where, prefix=f"{f}/")
    return out, meta

  def wait(self) -> None:
    """Waits for the save in flight; its failure is one UserError."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise _io_error(e, os.path.join(self.directory, str(self._saving)), "written") from None
    self.check()

  def close(self) -> None:
    self._manager.close()


# How a step computes, not what it learns: left out of a checkpoint's model description, so a run
# may resume (or be started from) with other settings of these.
RUNTIME_MODEL_FIELDS = ("init_from", "attention", "remat", "gather")


# Fields added after checkpoints were first written: recorded only away from their default, so
# that a checkpoint written before them (which used the default) still matches.
LATER_MODEL_FIELDS = {"gelu": "exact"}


def model_meta(model_cfg) -> dict:
  """The `model` entry of a checkpoint's meta: the model section without its runtime fields."""
  return {k: v for k, v in model_cfg.to_dict().items()
          if k not in RUNTIME_MODEL_FIELDS and LATER_MODEL_FIELDS.get(k, object()) != v}


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
    for step in sorted(ckpt.all_steps(), reverse=True):  # damaged steps are skipped, not moved
      try:
        restored, meta = ckpt.restore_fields(step, sharding, fields)
        return restored, meta, step
      except CorruptCheckpoint as e:
        print(f"warning: {e}; trying the step before", flush=True)
    raise UserError(f"{flag}={workdir}: no usable checkpoint in {directory} (every step is "
                    f"damaged)")
  finally:
    ckpt.close()


def _differences(saved, expected, prefix: str) -> list[str]:
  """'field: saved -> expected' for each leaf field that differs (nested dicts walked)."""
  if isinstance(saved, dict) and isinstance(expected, dict):
    out = []
    for key in sorted(set(saved) | set(expected)):
      out += _differences(saved.get(key), expected.get(key), f"{prefix}.{key}")
    return out
  return [] if saved == expected else [f"{prefix} {json.dumps(saved)} -> {json.dumps(expected)}"]


def check_meta(saved: dict, expected: dict, where: str) -> None:
  """Refuses a checkpoint whose phase or model description differs from the current config, in
  one line naming the phase and (at most three of) the fields that differ."""
  expected = json.loads(json.dumps(expected))  # tuples -> lists, as the saved JSON has them
  if saved.get("phase") != expected.get("phase"):
    raise UserError(f"checkpoint {where} was written by the {saved.get('phase')} phase; this is "
                    f"a {expected.get('phase')} run: use another --workdir")
  differ = _differences(saved, expected, "")
  if differ:
    shown = ", ".join(d.lstrip(".") for d in differ[:3]) + (
        f" and {len(differ) - 3} more" if len(differ) > 3 else "")
    raise UserError(f"checkpoint {where} ({saved.get('phase')} phase) was written with another "
                    f"config: {shown} (saved -> this run); use another --workdir or the same "
                    f"config")
