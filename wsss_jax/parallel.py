"""Mesh, shardings and multi-host helpers: the one place that knows about devices."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wsss_jax.errors import UserError

DATA_AXIS = "data"


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """`jax.distributed.initialize()` when launched as several processes.

  Explicit arguments (flags) win; otherwise the WSSS_JAX_COORDINATOR / WSSS_JAX_NUM_PROCESSES /
  WSSS_JAX_PROCESS_ID environment variables; otherwise, on a TPU VM slice or under SLURM, JAX's own
  auto-detection (`WSSS_JAX_DISTRIBUTED=auto`). A single process does nothing.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("WSSS_JAX_COORDINATOR")
  if num_processes is None and "WSSS_JAX_NUM_PROCESSES" in env:
    num_processes = int(env["WSSS_JAX_NUM_PROCESSES"])
  if process_id is None and "WSSS_JAX_PROCESS_ID" in env:
    process_id = int(env["WSSS_JAX_PROCESS_ID"])
  if coordinator_address and (num_processes or 1) > 1:
    if process_id is None:
      raise UserError("--process_id (or WSSS_JAX_PROCESS_ID) is required with --num_processes > 1")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif env.get("WSSS_JAX_DISTRIBUTED") == "auto":
    jax.distributed.initialize()


def make_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D data-parallel mesh over all devices (or the first `num_devices` of one process)."""
  devices = jax.devices()
  if num_devices > 0:
    if jax.process_count() > 1:
      raise UserError("num_devices must be -1 (all devices) in a multi-process run")
    if num_devices > len(devices):
      raise UserError(f"num_devices={num_devices} but only {len(devices)} devices are present")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def eval_batch_size(batch_size: int, mesh: Mesh) -> int:
  """An evaluation batch: at least one row per device and a multiple of the device count."""
  batch = max(batch_size, mesh.devices.size)
  return batch + -batch % mesh.devices.size


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
  """Validates the global batch against the mesh and returns the per-process batch."""
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % n:
    raise UserError(f"batch_size={batch_size} must be a positive multiple of the device count {n}")
  return batch_size // jax.process_count()


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Process-local numpy arrays -> global jax.Arrays sharded along the batch axis."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def shard_state(state, mesh: Mesh):
  """Places a state pytree replicated on the mesh (data parallelism)."""
  return jax.device_put(state, replicated(mesh))


def state_shardings(abstract_state, mesh: Mesh):
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def to_host(tree):
  """Replicated jax.Arrays -> numpy, also when they span other processes' devices."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                      else x, tree)


def replicate(tree, mesh: Mesh):
  """Identical host data on every process -> global arrays replicated on the mesh."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def is_main_process() -> bool:
  return jax.process_index() == 0


def shard_identical(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """The same full host array on every process -> a global array split along the batch axis."""
  return jax.make_array_from_callback(x.shape, batch_sharded(mesh), lambda index: x[index])
