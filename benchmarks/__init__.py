"""Benchmarks beside the benchmark phase (side by side with PyTorch: the torch extra)."""
import os


def benchmark_config(arg: str):
  """configs/benchmark.py with `arg` (the text after its colon)."""
  from wsss_jax import config_lib
  return config_lib.sibling_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                "benchmark.py"), "benchmark", arg)
