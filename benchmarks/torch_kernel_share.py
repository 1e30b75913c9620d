"""The share of a PyTorch eager train step (benchmarks.side_by_side's) spent in its matmul and
convolution kernels, from torch.profiler's self times:

  python -m benchmarks.torch_kernel_share vit 8

If PyTorch spends a share s of its step in kernels, a framework with the same kernels and every
other op free is at most 1/s times as fast (BENCHMARKS.md, "The CPU ceiling")."""
from __future__ import annotations

import collections
import sys
import time

from torch.profiler import ProfilerActivity, profile

from benchmarks.side_by_side import torch_step

KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
           "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def kernel_share(name: str, batch: int, steps: int = 2) -> dict:
  step = torch_step(name, batch, 224, "B/16")
  step()
  step()
  start = time.perf_counter()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  wall = (time.perf_counter() - start) / steps
  self_seconds = collections.Counter()
  for event in prof.key_averages():
    self_seconds[event.key] += event.self_cpu_time_total / 1e6 / steps
  kernels = sum(v for k, v in self_seconds.items() if k in KERNELS)
  return {"model": name, "batch": batch, "step_s": wall, "kernel_s": kernels,
          "share": kernels / wall, "top": self_seconds.most_common(12)}


def main() -> None:
  name, batch = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
  r = kernel_share(name, batch)
  print(f"{name} batch {batch}: step {r['step_s']:.2f} s, in matmul/conv kernels "
        f"{r['kernel_s']:.2f} s ({r['share']:.0%}): at most {1 / r['share']:.2f}x with the "
        "same kernels")
  for op, seconds in r["top"]:
    print(f"  {seconds:7.3f} s  {op}")


if __name__ == "__main__":
  main()
