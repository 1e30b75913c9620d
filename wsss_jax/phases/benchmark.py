"""Benchmark phase: steady-state train-step throughput and model FLOPs utilisation (MFU).

Compiles the step once, warms up, then times `steps` steps one by one with device
synchronisation. FLOPs per step come from XLA's cost analysis of the compiled step; the peak is a
large matmul timed in the same run on the same devices, so MFU = achieved FLOP/s / matmul FLOP/s.
Input is a fixed device-resident batch: this measures the step, not the input pipeline.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax import atomic, relevance
from wsss_jax.data import folders, pipeline
from wsss_jax.device import hlo_report, parallel, profiler
from wsss_jax.errors import UserError
from wsss_jax.relevance.options import method_options
from wsss_jax.tasks import classify, pretrain, segment
from wsss_jax.tasks.common import compute_dtype

CLASSIFIERS = ("resnet38", "resnet50", "vit")
SEGMENTERS = ("deeplabv3plus", "mrn")
# Dense bf16 tensor-core peaks from the datasheets (FLOP/s per device), by `device_kind` prefix.
DATASHEET_BF16_PEAK = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
                       "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12,
                       "TPU v6 lite": 918e12}
MODELS = ("mae",) + CLASSIFIERS + SEGMENTERS


def _timed(fn, *args, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return times


def matmul_peak(dtype, n: int, repeats: int = 10) -> float:
  """FLOP/s of an n x n x n matmul on one device (best of `repeats` after a warm-up)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, b))
  return 2 * n**3 / min(_timed(mm, a, b, repeats=repeats))


def datasheet_peak(device_kind: str) -> float | None:
  """The datasheet dense bf16 peak of a known accelerator, else None (CPUs, unknown chips)."""
  return next((v for k, v in DATASHEET_BF16_PEAK.items() if device_kind.startswith(k)), None)


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on device 0 since start (None where the backend does not report it)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _training(config, mesh):
  """(built training, a device-resident random batch, the compute dtype) for `model.name`."""
  size = config.data.image_size
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (config.batch_size, size, size, 3), np.uint8)}
  if config.model.name == "mae":
    return pretrain.build_training(config, mesh), batch, compute_dtype(config)
  if config.model.name in SEGMENTERS:
    k = config.data.num_classes
    for layer in config.data.mask_layers:  # class indices, k = background (ignored)
      batch[f"mask_{layer}"] = rng.integers(0, k + 1, (config.batch_size, size, size), np.uint8)
    if config.model.name == "mrn":
      batch["context"] = rng.integers(0, 256, (config.batch_size, size, size, 3), np.uint8)
    config.data = folders.settle(config.data)
    return segment.build_training(config, mesh), batch, compute_dtype(config)
  batch["labels"] = (rng.random((config.batch_size, config.data.num_classes)) < 0.5).astype(
      np.float32)
  return classify.build_training(config, mesh), batch, compute_dtype(config)


def _remat(config) -> bool:
  return config.model.get("remat", "none") != "none"


def model_flops(config, mesh, state, batch) -> float:
  """FLOPs per device of the step without rematerialisation: MFU counts the model's FLOPs, not
  the recomputed ones (those are in `hardware_gflops_per_image`)."""
  plain = config.copy_and_resolve_references()
  plain.model.remat = "none"
  t, _, _ = _training(plain, mesh)
  return hlo_report.jaxpr_flops(t.train_step.trace(state, batch).jaxpr) / mesh.devices.size


def fed_by_pipeline(config, compiled, state, mesh) -> dict:
  """The same compiled step fed by the real grain pipeline (decode, augment, batch, global
  arrays) for `total_steps` steps after a warm-up: images/s and the share of wall time spent
  waiting for input, as the training loop measures it."""
  keys = ("image",) if config.model.name == "mae" else ("image", "labels")
  local = parallel.check_batch_size(config.batch_size, mesh)
  it = iter(pipeline.train_dataset(config.data, seed=config.seed, local_batch=local, keys=keys,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count()))

  def step(state):
    t = time.perf_counter()
    batch = parallel.global_batch(next(it), mesh)
    waited = time.perf_counter() - t
    return compiled(state, batch), waited

  for _ in range(config.warmup_steps):
    (state, metrics), _ = step(state)
  jax.block_until_ready(state)
  wait, start = 0.0, time.perf_counter()
  for _ in range(config.total_steps):
    (state, metrics), waited = step(state)
    wait += waited
  jax.block_until_ready(metrics)
  wall = time.perf_counter() - start
  return {"input_images_per_sec": config.total_steps * config.batch_size / wall,
          "data_wait_fraction": wait / wall, "input_threads": config.data.num_threads,
          "input_workers": config.data.num_workers}


def benchmark_step(config, workdir: str | None = None) -> dict:
  mesh = parallel.mesh_from_config(config)
  parallel.check_batch_size(config.batch_size, mesh)
  n_dev = mesh.devices.size
  t, batch, dtype = _training(config, mesh)
  state = jax.jit(t.init_state, out_shardings=t.state_sharding)()
  batch = jax.device_put(batch, parallel.batch_sharded(mesh))
  t0 = time.perf_counter()
  traced = t.train_step.trace(state, batch)  # one trace serves the FLOP count and the compile
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - t0
  hardware_flops = hlo_report.jaxpr_flops(traced.jaxpr) / n_dev
  flops_per_device = model_flops(config, mesh, state, batch) if _remat(config) else hardware_flops
  state, metrics, times = timed_steps(compiled, state, batch, config)
  step_s = float(np.median(times))
  fed = fed_by_pipeline(config, compiled, state, mesh) if config.get("real_input") else {}
  fusion = (hlo_report.fusion_report(compiled.as_text()) if config.model.name in ("mae", "vit")
            else None)
  peak = matmul_peak(dtype, config.matmul_size)
  achieved = flops_per_device / step_s
  kind = jax.devices()[0].device_kind
  sheet = datasheet_peak(kind) if config.mixed_precision else None
  memory = peak_memory_bytes()
  if config.get("profile") and workdir:
    summary = profiler.profile_steps(compiled, state, batch, workdir)
    atomic.write_json(os.path.join(workdir, "profile_summary.json"), summary)
    profiler.print_summary(summary, step_s)
  per_image = n_dev / config.batch_size / 1e9  # per-device FLOPs -> GFLOPs per image
  return {
      "model": config.model.name, **model_description(config),
      "image_size": config.data.image_size, "batch_size": config.batch_size,
      "mixed_precision": bool(config.mixed_precision),
      "num_devices": int(n_dev), "mesh": dict(mesh.shape), "device_kind": kind,
      "compile_seconds": compile_s,
      "step_time_median": step_s, "step_time_p10": float(np.percentile(times, 10)),
      "step_time_p90": float(np.percentile(times, 90)),
      "images_per_sec": config.batch_size / step_s,
      "images_per_sec_per_device": config.batch_size / step_s / n_dev,
      "gflops_per_image": flops_per_device * per_image,
      "hardware_gflops_per_image": hardware_flops * per_image,
      "xla_cost_gflops_per_image": hlo_report.xla_cost_flops(compiled) * per_image,
      "matmul_peak_gflops_per_device": peak / 1e9,
      "achieved_gflops_per_device": achieved / 1e9,
      "mfu": achieved / peak, "mfu_datasheet": achieved / sheet if sheet else None,
      "peak_memory_gib": None if memory is None else memory / 2**30,
      "final_loss": float(metrics["loss"]), **fed, **({"fusion": fusion} if fusion else {}),
  }


def timed_steps(compiled, state, batch, config) -> tuple:
  """(state, last metrics, seconds of each of `total_steps` synchronised steps after warm-up)."""
  for _ in range(config.warmup_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(config.total_steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return state, metrics, times


def model_description(config) -> dict:
  """The benchmarked variant's fields in the result."""
  if config.model.name == "mae":
    return {"variant": config.model.variant, "gather": config.model.gather,
            "decoder": [config.model.decoder_depth, config.model.decoder_width],
            "remat": config.model.remat, "scan_blocks": bool(config.model.scan_blocks)}
  if config.model.name in SEGMENTERS:
    return {"variant": (f"{config.model.backbone} width {config.model.width}"
                        if config.model.name == "deeplabv3plus"
                        else f"depth {config.model.mrn_depth} width {config.model.width}")}
  return {"variant": config.model.variant if config.model.name == "vit"
          else f"width {config.model.width}", "pda": bool(config.pda.enabled)}


def benchmark_maps(config) -> dict:
  """Steady-state relevance maps/s of `config.relevance` (e.g. gradcam, lrp:EpsilonPlusFlat) for
  all classes of a freshly initialised classifier, batch sharded over the devices."""
  if config.model.name not in CLASSIFIERS:
    raise UserError("relevance= benchmarks a classifier: use model=resnet38, resnet50 or vit")
  mesh = parallel.mesh_from_config(config)
  parallel.check_batch_size(config.batch_size, mesh)
  t, batch, _ = _training(config, mesh)
  state = jax.jit(t.init_state, out_shardings=t.state_sharding)()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  images = jax.device_put(jnp.asarray(batch["image"], jnp.float32) / 255,
                          parallel.batch_sharded(mesh))
  name, options = method_options(config.relevance, config, config.data)
  fn = relevance.relevance_fn(name, t.model.apply, **options)
  t0 = time.perf_counter()
  traced = fn.jitted(variables, images).trace(variables, images, None)
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - t0
  for _ in range(config.warmup_steps):
    jax.block_until_ready(compiled(variables, images, None))
  times = _timed(compiled, variables, images, None, repeats=config.total_steps)
  step_s = float(np.median(times))
  k = config.data.num_classes
  return {"model": config.model.name, "relevance": config.relevance,
          "image_size": config.data.image_size, "batch_size": config.batch_size,
          "classes": k, "num_devices": int(mesh.devices.size),
          "device_kind": jax.devices()[0].device_kind, "compile_seconds": compile_s,
          "call_time_median": step_s, "call_time_p10": float(np.percentile(times, 10)),
          "call_time_p90": float(np.percentile(times, 90)),
          "maps_per_sec": config.batch_size * k / step_s,
          "gflops_per_call": hlo_report.jaxpr_flops(traced.jaxpr) / 1e9}


def run(config, workdir: str) -> dict:
  if config.model.name not in MODELS:
    raise UserError(f"model.name={config.model.name!r} is not one of {MODELS}")
  if config.get("real_input") and config.model.name in SEGMENTERS:
    raise UserError("real_input=True times the MAE and classifier steps (the segmenters read "
                    "pseudo-mask files: time them with the segment phase's own log)")
  for field in ("total_steps", "warmup_steps", "matmul_size"):
    if config[field] <= 0:
      raise UserError(f"{field}={config[field]} must be a positive integer")
  result = (benchmark_maps(config) if config.get("relevance")
            else benchmark_step(config, workdir))
  result["date"] = time.strftime("%Y-%m-%d")
  if jax.process_index() == 0:
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in result.items() if k != "fusion"), flush=True)
    for name, entry in result.get("fusion", {}).items():  # the memory-bound passes in the HLO
      written = ", ".join(f"{d} {n / 2**20:.1f} MiB" for d, n in entry["fusion_output_bytes"].items())
      print(f"fusion {name}: {entry['fused_ops']} ops in {entry['fusions']} fusions, "
            f"{entry['unfused_ops']} outside any ({written or 'nothing'} written)"
            + "".join(f"\n  unfused: {line}" for line in entry["unfused"]), flush=True)
    with open(os.path.join(workdir, "benchmark.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return result
