"""XLA:CPU's own convolutions against this project's CPU rewrites (the config field `kernels`,
`wsss_jax/device/kernels.py`: 1x1 convolutions as matmuls, LRP's pull to the pixels over space-to-depth blocks), compared in
one process with the two compiled programs timed in alternation, so that a noisy machine moves
both alike:

  python -m benchmarks.cpu_convs --batch=8 --rounds=6
  python -m benchmarks.cpu_convs --model=resnet38 --only=train --batch=2 --rounds=4

Times a classifier at 224 (ResNet-50 by default; 4 classes, random weights): Grad-CAM maps, LRP
EpsilonPlusFlat maps and the train step, and prints the median call time of each setting and
their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import benchmark_config
from wsss_jax import relevance
from wsss_jax.device import kernels, parallel
from wsss_jax.phases import benchmark
from wsss_jax.relevance.options import method_options


def programs(kind: str, batch: int, model: str = "resnet50"):
  """{setting: a call running one compiled step} for one workload, each traced under its
  setting."""
  arg = f"model={model},batch={batch}" + ("" if kind == "train" else f",relevance={kind}")
  config = benchmark_config(arg)
  mesh = parallel.mesh_from_config(config)
  out = {}
  for rewrite in (True, False):
    with kernels.selected_kernels("rewrite" if rewrite else "xla"):
      out["rewritten" if rewrite else "xla"] = _program(kind, config, mesh)
  return out


def _program(kind, config, mesh):
  """A call running one compiled step of `kind`, traced under the kernels in force."""
  t, data, _ = benchmark._training(config, mesh)
  state = jax.jit(t.init_state, out_shardings=t.state_sharding)()
  if kind == "train":
    data = jax.device_put(data, parallel.batch_sharded(mesh))
    compiled = t.train_step.lower(state, data).compile()
    held = [state]  # the step donates its state: each call feeds the last one's

    def call(compiled=compiled, held=held, data=data):
      held[0], metrics = compiled(held[0], data)
      return metrics
  else:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = jnp.asarray(data["image"], jnp.float32) / 255
    name, options = method_options(kind, config, config.data)
    fn = relevance.relevance_fn(name, t.model.apply, **options)
    compiled = fn.jitted(variables, images).lower(variables, images, None).compile()
    call = lambda c=compiled, v=variables, x=images: c(v, x, None)  # noqa: E731
  return call


def alternate(progs: dict, rounds: int) -> dict:
  times = {k: [] for k in progs}
  for call in progs.values():  # warm-up
    jax.block_until_ready(call())
  for _ in range(rounds):
    for k, call in progs.items():
      t = time.perf_counter()
      jax.block_until_ready(call())
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--only", default="gradcam,lrp:EpsilonPlusFlat,train")
  parser.add_argument("--model", default="resnet50", choices=("resnet50", "resnet38"))
  args = parser.parse_args()
  for kind in args.only.split(","):
    med = alternate(programs(kind, args.batch, args.model), args.rounds)
    print(f"{args.model} {kind:20s} xla {med['xla']:.3f} s   rewritten {med['rewritten']:.3f} s   "
          f"speed-up {med['xla'] / med['rewritten']:.2f}x", flush=True)


if __name__ == "__main__":
  main()
