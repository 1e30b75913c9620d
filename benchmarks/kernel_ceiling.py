"""The kernels under a train step, PyTorch's (oneDNN) against XLA:CPU's, on this machine: a large
fp32 matmul and the convolution shapes of ResNet-50 and ResNet38, forward and forward+backward,
each framework in a process of its own. With `--peak` it also builds and runs fma_peak.c, the
CPU's fp32 FMA peak (gcc with OpenMP).

  pip install -e '.[test]'     # torch
  python -m benchmarks.kernel_ceiling --peak

A train step cannot run faster than the kernels it calls: if XLA's kernels for a network's
shapes are slower than PyTorch's, no fusion of the rest makes the step 1.5x PyTorch's
(BENCHMARKS.md, "The CPU ceiling").
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import numpy as np

from benchmarks import isolated, median_seconds

# (batch, pixels per side, channels in, channels out, kernel, dilation)
CONV_SHAPES = (
    (8, 56, 64, 64, 3, 1),        # ResNet-50 layer1
    (8, 28, 128, 128, 3, 1),      # layer2
    (8, 14, 256, 256, 3, 1),      # layer3
    (8, 56, 256, 64, 1, 1),       # a 1x1 reduction (XLA's convolution; the project uses a dot)
    (2, 28, 512, 512, 3, 2),      # ResNet38 b5 (dilated)
    (2, 28, 1024, 1024, 3, 4),    # ResNet38 b6/b7 width (dilated)
)


def torch_rates(matmul: int) -> dict:
  import torch
  a, b = torch.randn(matmul, matmul), torch.randn(matmul, matmul)
  rates = {"matmul": 2 * matmul ** 3 / median_seconds(lambda: a @ b) / 1e9}
  for batch, hw, cin, cout, k, d in CONV_SHAPES:
    flops = 2 * batch * hw * hw * cin * cout * k * k
    x = torch.randn(batch, cin, hw, hw).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    conv = torch.nn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d, bias=False)
    conv = conv.to(memory_format=torch.channels_last)

    def forward():
      with torch.no_grad():
        conv(x)

    def forward_backward():
      y = conv(x)
      y.backward(torch.ones_like(y))
    rates[str((batch, hw, cin, cout, k, d))] = (flops / median_seconds(forward) / 1e9,
                                              3 * flops / median_seconds(forward_backward) / 1e9)
  return rates


def jax_rates(matmul: int) -> dict:
  import jax
  from jax import lax
  rng = np.random.default_rng(0)
  a = jax.numpy.asarray(rng.standard_normal((matmul, matmul), np.float32))
  dot = jax.jit(lambda a: a @ a)
  rates = {"matmul": 2 * matmul ** 3 / median_seconds(lambda: dot(a).block_until_ready()) / 1e9}
  for batch, hw, cin, cout, k, d in CONV_SHAPES:
    flops = 2 * batch * hw * hw * cin * cout * k * k
    x = jax.numpy.asarray(rng.standard_normal((batch, hw, hw, cin), np.float32))
    w = jax.numpy.asarray(rng.standard_normal((k, k, cin, cout), np.float32) * 0.01)

    def conv(x, w):
      return lax.conv_general_dilated(x, w, (1, 1), [(d * (k // 2),) * 2] * 2,
                                      rhs_dilation=(d, d),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    forward = jax.jit(conv)
    backward = jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1)))
    rates[str((batch, hw, cin, cout, k, d))] = (
        flops / median_seconds(lambda: forward(x, w).block_until_ready()) / 1e9,
        3 * flops / median_seconds(lambda: jax.block_until_ready(backward(x, w))) / 1e9)
  return rates


def fma_peak() -> float:
  """GFLOP/s of fma_peak.c on all cores (the best of its repeats)."""
  source = os.path.join(os.path.dirname(__file__), "fma_peak.c")
  with tempfile.TemporaryDirectory() as tmp:
    binary = os.path.join(tmp, "fma_peak")
    subprocess.run(["gcc", "-O2", "-mavx512f", "-mfma", "-fopenmp", source, "-o", binary],
                   check=True)
    out = subprocess.run([binary], check=True, capture_output=True, text=True).stdout
  return float(out.split()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--matmul", type=int, default=2048)
  parser.add_argument("--peak", action="store_true", help="also the FMA peak (needs gcc)")
  args = parser.parse_args()
  if args.peak:
    print(f"fp32 FMA peak, all cores: {fma_peak():.1f} GFLOP/s")
  ours, theirs = isolated(jax_rates, args.matmul), isolated(torch_rates, args.matmul)
  print(f"{args.matmul}^3 matmul: XLA {ours['matmul']:.1f}, oneDNN {theirs['matmul']:.1f} GFLOP/s")
  print("convolution (batch, side, in, out, kernel, dilation): forward | forward+backward GFLOP/s")
  for shape in map(str, CONV_SHAPES):
    (jf, jb), (tf, tb) = ours[shape], theirs[shape]
    print(f"  {shape:28s} XLA {jf:6.1f} | {jb:6.1f}   PyTorch {tf:6.1f} | {tb:6.1f}")


if __name__ == "__main__":
  main()
