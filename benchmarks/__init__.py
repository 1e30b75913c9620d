"""Benchmarks beside the benchmark phase (side by side with PyTorch: the torch extra)."""
import json
import multiprocessing
import os
import statistics
import time


def benchmark_config(arg: str):
  """configs/benchmark.py with `arg` (the text after its colon)."""
  from wsss_jax import config_lib
  return config_lib.sibling_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                "benchmark.py"), "benchmark", arg)


def median_seconds(call, steps: int = 5, warmup: int = 2) -> float:
  """Median wall time of `steps` calls after `warmup` untimed ones (each call ends with its
  results on the host or, on a GPU, after a synchronisation)."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    call()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def isolated(fn, *args, timeout: float | None = None):
  """fn(*args) in a fresh process: PyTorch's idle OpenMP threads keep spinning on the cores
  after its work (measured: JAX's Grad-CAM at 38 maps/s after PyTorch in the same process, 50
  alone), and each framework's GPU memory is handed back when its process ends. Past `timeout`
  seconds the process is ended and None returned."""
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    pending = pool.apply_async(fn, args)
    try:
      return pending.get(timeout=timeout)
    except multiprocessing.TimeoutError:
      pool.terminate()
      return None


def report(workdir: str, name: str, results: dict, text: str) -> None:
  """Prints a benchmark's table and writes it (<name>.md) and its results (<name>.json)."""
  print(text)
  with open(os.path.join(workdir, f"{name}.json"), "w") as f:
    json.dump(results, f, indent=2, default=float)
  with open(os.path.join(workdir, f"{name}.md"), "w") as f:
    f.write(text)
