"""Device time of a few traced train steps, per XLA op, kernel and coarse category, read from
the xplane that `jax.profiler.trace` writes."""
from __future__ import annotations

import glob
import os

import jax
# the xplane reader jax ships; no public API reads a trace back yet
from jax._src.lib import _profile_data


def op_category(name: str) -> str:
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


def profile_summary(trace_dir: str, steps: int, top: int = 25) -> dict:
  """Device time per step by XLA op, from the xplane a `jax.profiler.trace` wrote.

  Events that carry an `hlo_op` stat are the device's work (kernels on a GPU, thunks on a
  CPU); they are summed per op and per category and divided by the traced steps."""
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
        category = op_category(event.name + " " + op)
        by_category[category] = by_category.get(category, 0.0) + ms
  total = sum(by_op.values())
  ranked = lambda d: [{"name": k, "ms_per_step": v, "share": v / total if total else 0.0}
                      for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
  return {"device_busy_ms_per_step": total, "trace": paths[-1],
          "categories": ranked(by_category), "ops": ranked(by_op), "kernels": ranked(by_kernel)}


def profile_steps(compiled, state, batch, workdir: str, steps: int = 3) -> dict:
  trace_dir = os.path.join(workdir, "profile")
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  return profile_summary(trace_dir, steps)


def print_summary(summary: dict, step_s: float) -> None:
  if not summary or jax.process_index() != 0:
    return
  busy = summary["device_busy_ms_per_step"]
  print(f"profile: device busy {busy:.2f} ms of a {step_s * 1e3:.2f} ms step")
  for section in ("categories", "ops", "kernels"):
    print(f"  top {section}:")
    for row in summary[section][:15 if section != "categories" else None]:
      print(f"    {row['ms_per_step']:8.3f} ms {100 * row['share']:5.1f}%  {row['name'][:110]}")
