"""Weak scaling of a benchmark-phase train step: the same per-device batch on 1, 2, 4, ... devices,
efficiency = images/s on n devices / (n x images/s on one). Prints a table and writes JSON.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.weak_scaling \\
      --spec=model=mae,variant=S/16,image_size=112,paper=False --per_device_batch=4 --out=ws.json
  python -m benchmarks.weak_scaling --spec=model=mae,variant=B/16,bf16=True --per_device_batch=256

On forced host devices (one CPU split into n) this checks that scaling is correct (same FLOPs per
image, a step that runs on every device count), not speed: the n devices share the same cores.
`--fsdp` splits the state over the devices of each run as well.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax


def load_config(arg: str):
  """configs/benchmark.py:<arg>, loaded by path as main loads it."""
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "benchmark.py")
  spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--spec", default="model=mae,variant=S/16,image_size=112,paper=False",
                      help="configs/benchmark.py argument string (batch and devices are set here)")
  parser.add_argument("--per_device_batch", type=int, default=4)
  parser.add_argument("--devices", default="", help="comma-separated counts (default 1, 2, 4 .. all)")
  parser.add_argument("--fsdp", action="store_true", help="split the state over each run's devices")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  from wsss_jax.phases import benchmark
  counts = ([int(c) for c in args.devices.split(",")] if args.devices else
            [2**i for i in range(jax.device_count().bit_length()) if 2**i <= jax.device_count()])
  rows = []
  for n in counts:
    config = load_config(f"{args.spec},batch={args.per_device_batch * n},devices={n}"
                         + (f",fsdp={n}" if args.fsdp else ""))
    with tempfile.TemporaryDirectory() as workdir:
      result = benchmark.run(config, workdir)
    rows.append(result)
  base = rows[0]["images_per_sec"] / rows[0]["num_devices"]
  print(f"\n{'devices':>7} {'batch':>6} {'images/s':>10} {'per device':>10} {'efficiency':>10} "
        f"{'GFLOP/img':>10}")
  for r in rows:
    r["weak_scaling_efficiency"] = r["images_per_sec"] / (r["num_devices"] * base)
    print(f"{r['num_devices']:>7} {r['batch_size']:>6} {r['images_per_sec']:>10.2f} "
          f"{r['images_per_sec_per_device']:>10.2f} {r['weak_scaling_efficiency']:>10.2f} "
          f"{r['gflops_per_image']:>10.2f}")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
