"""Mesh, shardings and multi-host helpers: the one place that knows about devices.

The mesh has two axes, `data` (replicas) and `fsdp` (fully sharded data parallelism, ZeRO-3
style): the batch is split over both; parameters and optimiser state are replicated over `data`
and, above `parallel.fsdp_min_size` elements, split along their largest divisible dimension over
`fsdp`, so each device holds 1/fsdp of them and XLA gathers each weight where it is used.
`parallel.rules` override that per state path (regular expressions, first match wins).
"""
from __future__ import annotations

import contextvars
import functools
import os
import re

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wsss_jax.errors import UserError

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device
SHARDING_KINDS = ("fsdp", "replicate")


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


def make_mesh(num_devices: int = -1, data: int = -1, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh over all devices (or the first `num_devices` of one process).

  One of the two sizes may be -1: it takes the devices the other leaves."""
  devices = jax.devices()
  if num_devices > 0:
    if jax.process_count() > 1:
      raise UserError("num_devices must be -1 (all devices) in a multi-process run")
    if num_devices > len(devices):
      raise UserError(f"num_devices={num_devices} but only {len(devices)} devices are present")
    devices = devices[:num_devices]
  data, fsdp = _axis_sizes(len(devices), data, fsdp)
  if len(devices) == len(jax.devices()) and len(devices) > 1:
    # ICI/NVLink-aware order on TPUs and GPUs; host devices come back in their own order
    grid = _device_grid((data, fsdp), devices)
  else:
    grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, BATCH_AXES)


def _axis_sizes(n: int, data: int, fsdp: int) -> tuple[int, int]:
  if data == -1 and fsdp == -1:
    raise UserError("parallel.data and parallel.fsdp cannot both be -1")
  for name, size in (("parallel.data", data), ("parallel.fsdp", fsdp)):
    if size == 0 or size < -1:
      raise UserError(f"{name}={size} must be a positive integer or -1 (the remaining devices)")
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if n % known:
      raise UserError(f"mesh: {'parallel.fsdp' if data == -1 else 'parallel.data'}={known} does "
                      f"not divide the {n} devices")
    return (n // known, known) if data == -1 else (known, n // known)
  if data * fsdp != n:
    raise UserError(f"mesh: parallel.data={data} x parallel.fsdp={fsdp} = {data * fsdp} devices, "
                    f"but this run has {n}; set one of them to -1")
  return data, fsdp


def _device_grid(shape, devices) -> np.ndarray:
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(shape)


def mesh_from_config(config) -> Mesh:
  """The mesh of `config.num_devices` and the `parallel` section (data and fsdp sizes)."""
  p = config.get("parallel")
  return make_mesh(config.num_devices, p.data if p else -1, p.fsdp if p else 1)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device (the data and fsdp axes)."""
  return NamedSharding(mesh, P(BATCH_AXES))


_TRACING_MESH: contextvars.ContextVar = contextvars.ContextVar("wsss_jax_mesh", default=None)


def constrain_batch(x):
  """Pins an activation's leading axis to the batch split (over data and fsdp) when traced under
  `with_mesh`, so FSDP's gathered weights meet batch-sharded activations; a no-op otherwise."""
  mesh = _TRACING_MESH.get()
  if mesh is None or mesh.devices.size == 1:
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, P(BATCH_AXES, *(None,) * (x.ndim - 1))))


def with_mesh(mesh: Mesh, fn):
  """`fn` whose tracing sees `mesh` (what `constrain_batch` reads)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    token = _TRACING_MESH.set(mesh)
    try:
      return fn(*args, **kwargs)
    finally:
      _TRACING_MESH.reset(token)
  return wrapped


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


def leaf_path(path) -> str:
  """'params/encoder/blocks_0/attn/qkv/kernel' for a pytree key path (opt_state paths too)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def fsdp_spec(shape: tuple, fsdp: int, min_size: int) -> P:
  """Shards the largest dimension divisible by `fsdp` (ties: the last), or replicates when the
  leaf is smaller than `min_size` elements or no dimension divides."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], d))
  return P(*(FSDP_AXIS if d == dim else None for d in range(len(shape))))


def parse_rules(rules) -> list[tuple[re.Pattern, str]]:
  parsed = []
  for rule in rules or ():
    if len(rule) != 2 or rule[1] not in SHARDING_KINDS:
      raise UserError(f"parallel.rules entry {tuple(rule)!r} must be (regex, one of "
                      f"{SHARDING_KINDS})")
    try:
      parsed.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise UserError(f"parallel.rules regex {rule[0]!r} does not compile: {e}") from None
  return parsed


def state_shardings(abstract_state, mesh: Mesh, parallel_cfg=None):
  """A NamedSharding per leaf: FSDP over the `fsdp` axis (above the size threshold, or as
  `parallel.rules` say), replicated over `data`. A rule that matches no leaf is an error."""
  fsdp = mesh.shape.get(FSDP_AXIS, 1)
  min_size = parallel_cfg.fsdp_min_size if parallel_cfg else 0
  rules = parse_rules(parallel_cfg.rules if parallel_cfg else ())
  used = [False] * len(rules)

  def sharding(path, leaf):
    name, kind = leaf_path(path), "fsdp"
    for i, (pattern, rule_kind) in enumerate(rules):
      if pattern.search(name):
        used[i], kind = True, rule_kind
        break
    spec = fsdp_spec(leaf.shape, fsdp, min_size) if kind == "fsdp" else P()
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(sharding, abstract_state)
  unused = [rules[i][0].pattern for i, u in enumerate(used) if not u]
  if unused:
    raise UserError(f"parallel.rules: {unused[0]!r} matches no parameter or optimiser-state "
                    f"path (e.g. {leaf_path(jax.tree_util.tree_flatten_with_path(abstract_state)[0][-1][0])!r})")
  return shardings


def sharded_fraction(shardings, abstract_state) -> float:
  """Share of the state's elements that are split over more than one device."""
  total = sharded = 0
  for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract_state)):
    size = int(np.prod(x.shape, dtype=np.int64))
    total += size
    sharded += size if any(a is not None for a in s.spec) else 0
  return sharded / max(total, 1)


def to_host(tree):
  """jax.Arrays -> numpy on every process: replicated ones from a local copy, sharded ones
  (FSDP parameters) gathered, across processes when they span other processes' devices."""
  def one(x):
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    if x.is_fully_addressable:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def replicate(tree, mesh: Mesh):
  """Identical host data on every process -> global arrays replicated on the mesh."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def is_main_process() -> bool:
  return jax.process_index() == 0


def shard_identical(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """The same full host array on every process -> a global array split along the batch axis."""
  return jax.make_array_from_callback(x.shape, batch_sharded(mesh), lambda index: x[index])
