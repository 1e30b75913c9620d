"""Benchmark phase: steady-state train-step throughput and model FLOPs utilisation (MFU).

Compiles the step once, warms up, then times `steps` steps one by one with device
synchronisation. FLOPs per step come from XLA's cost analysis of the compiled step; the peak is a
large matmul timed in the same run on the same devices, so MFU = achieved FLOP/s / matmul FLOP/s.
Input is a fixed device-resident batch: this measures the step, not the input pipeline.
"""
from __future__ import annotations

import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from wsss_jax.device import parallel
from wsss_jax.errors import UserError
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


def xla_cost_flops(compiled) -> float:
  """FLOPs of the compiled per-device program by XLA's cost analysis (NaN when unavailable).

  GPU backends leave most cuBLAS/cuDNN custom calls out of it (an H100 ViT-B/16 train step read
  10 GFLOPs per image instead of 105), so MFU uses `jaxpr_flops` instead; this is reported beside.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per module
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _dot_general_flops(eqn) -> int:
  (contract_lhs, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract_lhs)


def _conv_flops(eqn) -> int:
  """2 x output size x (kernel input features x kernel window) / input dilation; also right for
  the gradient convolutions (the weight gradient's "kernel" is the output cotangent; the input
  gradient of a strided conv dilates its input, whose inserted zeros cost nothing)."""
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
  rhs = eqn.invars[1].aval.shape
  window = math.prod(rhs[d] for d in rhs_spec[1:])
  dilation = math.prod(eqn.params["lhs_dilation"] or (1,))
  return 2 * math.prod(eqn.outvars[0].aval.shape) * window // dilation


def jaxpr_flops(jaxpr) -> int:
  """Matmul and convolution FLOPs of a (closed) jaxpr over global shapes: the model-FLOPs count
  of MFU, independent of the backend. Sub-jaxprs are walked (scan bodies times their length,
  the largest branch of a cond, while bodies once)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    subs = [v for p in eqn.params.values() for v in (p if isinstance(p, (tuple, list)) else (p,))
            if isinstance(v, (jax_core.Jaxpr, jax_core.ClosedJaxpr))]
    if not subs:
      continue
    counts = [jaxpr_flops(sub) for sub in subs]
    if name == "cond":
      total += max(counts)
    elif name == "scan":
      total += sum(counts) * eqn.params["length"]
    else:
      total += sum(counts)
  return total


def _op_category(name: str) -> str:
  """A coarse class of a device op or kernel name, to read a profile at a glance."""
  n = name.lower()
  if any(k in n for k in ("fmha", "flash", "attention", "softmax")):
    return "attention"
  if any(k in n for k in ("gemm", "cublas", "cutlass", "xmma", "nvjet", "dot", "matmul",
                          "ynn_fusion")):
    return "matmul"
  if "conv" in n:
    return "convolution"
  if any(k in n for k in ("reduce", "all-reduce", "all-gather", "nccl", "collective")):
    return "reduction/collective"
  if any(k in n for k in ("copy", "memcpy", "memset", "transpose")):
    return "copy/transpose"
  if "fusion" in n or "loop" in n or "input" in n:
    return "elementwise fusion"
  return "other"


# The memory-bound passes of the transformer steps, found in the compiled HLO by the source
# path XLA keeps in each instruction's metadata (flax module names).
PASSES = {"layernorm": r"/(?:norm\d*|fc_norm|decoder_norm)/",
          "gelu": r"mlp\.activation",
          # the visible tokens' gather and the decoder's unshuffle (model.gather=take)
          "mae_gather": r"MaskedAutoencoder\.(?:encode_visible|decode)/jit\(take_along_axis\)"}
_HLO_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s([a-z][a-z0-9\-]*)\(")
_NOT_WORK = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "fusion",
             "copy", "transpose", "custom-call", "dot", "convolution", "while", "call",
             "conditional", "after-all", "partition-id", "replica-id"}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8}


def _hlo_computations(text: str) -> dict:
  """{computation name: [(opcode, result type, line)]} of an optimised HLO module's text."""
  computations, current = {}, None
  for line in text.splitlines():
    header = _HLO_HEADER.match(line)
    if header:
      current = header.group(1)
      computations[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      m = _HLO_INSTRUCTION.match(line)
      if m:
        computations[current].append((m.group(2), m.group(1), line))
  return computations


def _result_bytes(result_type: str) -> dict:
  """{element type: bytes} of an HLO result type (arrays and tuples of them)."""
  out = {}
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", result_type):
    if dtype in _BYTES:
      n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      out[dtype] = out.get(dtype, 0) + n * _BYTES[dtype]
  return out


def fusion_report(hlo_text: str) -> dict:
  """Per memory-bound pass (PASSES): its instructions inside fusions and outside them (work
  XLA left as a kernel of its own, re-reading memory), the fusions it is in, and the bytes
  those fusions write by element type (bf16 activations show as bf16)."""
  computations = _hlo_computations(hlo_text)
  fused, reducers = {}, set()
  for instructions in computations.values():
    for opcode, result, line in instructions:
      if opcode == "fusion":
        for callee in re.findall(r"calls=%?([\w.\-]+)", line):
          fused[callee] = result
      reducers.update(re.findall(r"to_apply=%?([\w.\-]+)", line))
  report = {}
  for name, pattern in PASSES.items():
    source = re.compile(r'op_name="[^"]*' + pattern)
    entry = {"fused_ops": 0, "unfused_ops": 0, "fusions": 0, "fusion_output_bytes": {},
             "unfused_by_op": {}, "unfused": []}
    for computation, instructions in computations.items():
      if computation in reducers:
        continue
      hits = [(op, line) for op, result, line in instructions if source.search(line)
              and not re.fullmatch(r"[a-z]+\d*\[\]", result)]  # scalars: loop counters
      if computation in fused:
        entry["fused_ops"] += len(hits)
        if hits:
          entry["fusions"] += 1
          for dtype, n in _result_bytes(fused[computation]).items():
            entry["fusion_output_bytes"][dtype] = entry["fusion_output_bytes"].get(dtype, 0) + n
      else:
        work = [(op, line) for op, line in hits if op not in _NOT_WORK]
        entry["unfused_ops"] += len(work)
        for op, _ in work:
          entry["unfused_by_op"][op] = entry["unfused_by_op"].get(op, 0) + 1
        entry["unfused"] += [line.strip()[:200] for _, line in work[:3]]
    entry["unfused"] = entry["unfused"][:5]
    report[name] = entry
  return report


def profile_summary(trace_dir: str, steps: int, top: int = 25) -> dict:
  """Device time per step by XLA op, from the xplane a `jax.profiler.trace` wrote.

  Events that carry an `hlo_op` stat are the device's work (kernels on a GPU, thunks on a
  CPU); they are summed per op and per category and divided by the traced steps."""
  import glob

  from jax._src.lib import _profile_data
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    return {}
  data = _profile_data.ProfileData.from_file(paths[-1])
  planes = [p for p in data.planes if p.name.startswith("/device:")] or list(data.planes)
  by_op, by_kernel, by_category = {}, {}, {}
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get("hlo_op")
        if not op or line.name.startswith("XLA"):  # XLA Modules/Ops lines repeat the kernels
          continue
        ms = event.duration_ns / 1e6 / steps
        by_op[op] = by_op.get(op, 0.0) + ms
        by_kernel[event.name] = by_kernel.get(event.name, 0.0) + ms
        category = _op_category(event.name + " " + op)
        by_category[category] = by_category.get(category, 0.0) + ms
  total = sum(by_op.values())
  ranked = lambda d: [{"name": k, "ms_per_step": v, "share": v / total if total else 0.0}
                      for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
  return {"device_busy_ms_per_step": total, "trace": paths[-1],
          "categories": ranked(by_category), "ops": ranked(by_op), "kernels": ranked(by_kernel)}


def _profile(compiled, state, batch, workdir: str, steps: int = 3) -> dict:
  trace_dir = os.path.join(workdir, "profile")
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  return profile_summary(trace_dir, steps)


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
    return segment.Segmentation(config, mesh), batch, compute_dtype(config)
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
  return jaxpr_flops(t.train_step.trace(state, batch).jaxpr) / mesh.devices.size


def fed_by_pipeline(config, compiled, state, mesh) -> dict:
  """The same compiled step fed by the real grain pipeline (decode, augment, batch, global
  arrays) for `total_steps` steps after a warm-up: images/s and the share of wall time spent
  waiting for input, as the training loop measures it."""
  from wsss_jax.data import pipeline
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
  size = config.data.image_size
  batch = jax.device_put(batch, parallel.batch_sharded(mesh))
  t0 = time.perf_counter()
  traced = t.train_step.trace(state, batch)  # one trace serves the FLOP count and the compile
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - t0
  hardware_flops = jaxpr_flops(traced.jaxpr) / n_dev
  flops_per_device = model_flops(config, mesh, state, batch) if _remat(config) else hardware_flops

  for _ in range(config.warmup_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(config.total_steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  fed = fed_by_pipeline(config, compiled, state, mesh) if config.get("real_input") else {}
  fusion = fusion_report(compiled.as_text()) if config.model.name in ("mae", "vit") else None
  peak = matmul_peak(dtype, config.matmul_size)
  achieved = flops_per_device / step_s
  if config.model.name == "mae":
    model = {"variant": config.model.variant, "gather": config.model.gather,
             "decoder": [config.model.decoder_depth, config.model.decoder_width],
             "remat": config.model.remat, "scan_blocks": bool(config.model.scan_blocks)}
  elif config.model.name in SEGMENTERS:
    model = {"variant": (f"{config.model.backbone} width {config.model.width}"
                         if config.model.name == "deeplabv3plus"
                         else f"depth {config.model.mrn_depth} width {config.model.width}")}
  else:
    model = {"variant": config.model.variant if config.model.name == "vit"
             else f"width {config.model.width}", "pda": bool(config.pda.enabled)}
  kind = jax.devices()[0].device_kind
  sheet = datasheet_peak(kind) if config.mixed_precision else None
  memory = peak_memory_bytes()
  if config.get("profile") and workdir:
    summary = _profile(compiled, state, batch, workdir)
    with open(os.path.join(workdir, "profile_summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    _print_profile(summary, step_s)
  return {
      "model": config.model.name, **model, "image_size": size,
      "batch_size": config.batch_size, "mixed_precision": bool(config.mixed_precision),
      "num_devices": int(n_dev), "mesh": dict(mesh.shape), "device_kind": kind,
      "compile_seconds": compile_s,
      "step_time_median": step_s, "step_time_p10": float(np.percentile(times, 10)),
      "step_time_p90": float(np.percentile(times, 90)),
      "images_per_sec": config.batch_size / step_s,
      "images_per_sec_per_device": config.batch_size / step_s / n_dev,
      "gflops_per_image": flops_per_device * n_dev / config.batch_size / 1e9,
      "hardware_gflops_per_image": hardware_flops * n_dev / config.batch_size / 1e9,
      "xla_cost_gflops_per_image": xla_cost_flops(compiled) * n_dev / config.batch_size / 1e9,
      "matmul_peak_gflops_per_device": peak / 1e9,
      "achieved_gflops_per_device": achieved / 1e9,
      "mfu": achieved / peak,
      "mfu_datasheet": achieved / sheet if sheet else None,
      "peak_memory_gib": None if memory is None else memory / 2**30,
      "final_loss": float(metrics["loss"]),
      **fed,
      **({"fusion": fusion} if fusion else {}),
  }


def _print_profile(summary: dict, step_s: float) -> None:
  if not summary or jax.process_index() != 0:
    return
  busy = summary["device_busy_ms_per_step"]
  print(f"profile: device busy {busy:.2f} ms of a {step_s * 1e3:.2f} ms step")
  for section in ("categories", "ops", "kernels"):
    print(f"  top {section}:")
    for row in summary[section][:15 if section != "categories" else None]:
      print(f"    {row['ms_per_step']:8.3f} ms {100 * row['share']:5.1f}%  {row['name'][:110]}")


def benchmark_maps(config) -> dict:
  """Steady-state relevance maps/s of `config.relevance` (e.g. gradcam, lrp:EpsilonPlusFlat) for
  all classes of a freshly initialised classifier, batch sharded over the devices."""
  from wsss_jax import relevance
  from wsss_jax.relevance.options import method_options
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
          "gflops_per_call": jaxpr_flops(traced.jaxpr) / 1e9}


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
