"""Train-step throughput of the same networks in JAX (this project) and PyTorch (eager and
torch.compile), in one run on the same machine (each timed in a process of its own); prints
images/s of both and their ratio, and writes JSON.

  pip install -e '.[test]'      # torch, torchvision, timm
  python -m benchmarks.side_by_side --models=mae,vit,resnet50,resnet38 --batch=8 --steps=5
  python -m benchmarks.side_by_side --models=vit --torch-modes=eager,default,max-autotune --bf16

`--torch-modes` times PyTorch eager and/or `torch.compile` (mode default or max-autotune) on the
forward and loss; a compiled run that has not finished within `--compile-budget` seconds (its
compilation included) is dropped and reported as such. The ratio is JAX's images/s over the
fastest PyTorch run's.

PyTorch side: the MAE reference layout (timm blocks, paper decoder) with AdamW, timm's
VisionTransformer (B/16) with AdamW, torchvision's ResNet-50 and the authors' ResNet38 with PDA
(mu 0.9) with SGD momentum 0.9 and weight decay, multi-label BCE on random labels. JAX side: the
benchmark phase (`configs/benchmark.py`) with the same model, batch and size. Both use every core,
or the GPU when there is one (PyTorch: cudnn.benchmark on, channels-last for the ResNets);
`--bf16` runs JAX in mixed precision and PyTorch under bf16 autocast.

  pip install -e '.[test,bench]'   # + pytorch-grad-cam and zennit
  python -m benchmarks.side_by_side --maps=gradcam,lrp:EpsilonPlusFlat --models= --steps=5

times relevance maps instead (maps/s for all 4 classes of a batch, ResNet-50 with random
weights): pytorch-grad-cam's GradCAM at `layer4` and zennit's EpsilonPlusFlat composite with its
ResNet canonizer, each called once per class as their documentation does, against the benchmark
phase's `relevance=` (one compiled call for all classes). Both upsample Grad-CAM to the input.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import torch

from benchmarks import benchmark_config, isolated, median_seconds, torch_models

MODELS = ("mae", "vit", "resnet50", "resnet38")
MAPS = ("gradcam", "lrp:EpsilonPlusFlat")


def torch_device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_step(name: str, batch: int, size: int, variant: str, bf16: bool = False,
               classes: int = 4, mode: str = "eager"):
  """A closure running one PyTorch train step (forward, loss, backward, optimiser step);
  `mode` "default" or "max-autotune" compiles the forward and loss with `torch.compile` (the
  backward follows through AOTAutograd)."""
  device = torch_device()
  x = torch.from_numpy(torch_models.numpy_images(batch, size)).to(device)
  labels = torch.from_numpy((np.random.default_rng(1).random((batch, classes)) < 0.5)
                            .astype(np.float32)).to(device)
  bce = torch.nn.BCEWithLogitsLoss()
  if name == "mae":
    model = torch_models.mae_for_variant(variant, size)
    loss_fn = lambda: model.loss(x)  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), 1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
  elif name == "vit":
    import timm
    arch = {"S": "small", "B": "base", "L": "large"}[variant.split("/")[0]]
    model = timm.create_model(f"vit_{arch}_patch16_224", pretrained=False, num_classes=classes,
                              img_size=size, drop_path_rate=0.1)
    loss_fn = lambda: bce(model(x), labels)  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), 1e-3, betas=(0.9, 0.999), weight_decay=0.05)
  elif name == "resnet50":
    import torchvision
    model = torchvision.models.resnet50(num_classes=classes)
    loss_fn = lambda: bce(model(x), labels)  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=5e-4)
  elif name == "resnet38":
    model = torch_models.TorchResNet38(1.0, classes)
    loss_fn = lambda: bce(model(x, mu=0.9)[1], labels)  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=5e-4)
  else:
    raise SystemExit(f"--models: {name!r} is not one of {MODELS}")
  model.to(device).train()
  if name.startswith("resnet") and device.type == "cuda":  # the fast layout for cudnn convs
    model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt.load_state_dict(opt.state_dict())  # optimiser state follows the moved parameters
  if mode != "eager":
    loss_fn = torch.compile(loss_fn, mode=mode)

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      loss = loss_fn()
    loss.backward()
    opt.step()
    return float(loss.detach())
  return step


def time_torch(name, batch, size, variant, steps, warmup, bf16=False, mode="eager") -> dict:
  torch.set_num_threads(os.cpu_count())
  torch.backends.cudnn.benchmark = True
  step = torch_step(name, batch, size, variant, bf16, mode=mode)
  t = time.perf_counter()
  step()  # compiles (torch.compile) and autotunes (cudnn)
  first = time.perf_counter() - t
  median = median_seconds(step, steps, warmup)
  return {"mode": mode, "step_time_median": median, "images_per_sec": batch / median,
          "first_step_seconds": first}


def torch_maps_call(method: str, batch: int, size: int, classes: int = 4):
  """A closure computing `method`'s maps for every class of one batch with the PyTorch tools."""
  import torchvision
  model = torchvision.models.resnet50(num_classes=classes).to(torch_device()).eval()
  x = torch.from_numpy(torch_models.numpy_images(batch, size)).to(torch_device())
  if method == "gradcam":
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    cam = GradCAM(model=model, target_layers=[model.layer4[-1]])
    return lambda: [cam(input_tensor=x, targets=[ClassifierOutputTarget(k)] * batch)
                    for k in range(classes)]
  if method == "lrp:EpsilonPlusFlat":
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer
    attributor = Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[ResNetCanonizer()]))
    eye = torch.eye(classes, device=x.device)

    def call():
      with attributor:
        maps = [attributor(x, eye[[k] * batch])[1].sum(1) for k in range(classes)]
      if x.is_cuda:
        torch.cuda.synchronize()
      return maps
    return call
  raise SystemExit(f"--maps: {method!r} is not one of {MAPS}")


def time_torch_maps(method, batch, size, steps, warmup, classes: int = 4) -> dict:
  torch.set_num_threads(os.cpu_count())
  median = median_seconds(torch_maps_call(method, batch, size, classes), steps, warmup)
  return {"call_time_median": median, "maps_per_sec": batch * classes / median}


def time_jax_maps(method, batch, size, steps, warmup) -> dict:
  from wsss_jax.phases import benchmark
  result = benchmark.benchmark_maps(benchmark_config(
      f"model=resnet50,relevance={method},batch={batch},image_size={size},steps={steps},"
      f"warmup={warmup}"))
  return {k: result[k] for k in ("call_time_median", "maps_per_sec", "gflops_per_call")}


def time_jax(name, batch, size, variant, steps, warmup, bf16=False) -> dict:
  from wsss_jax.phases import benchmark
  config = benchmark_config(f"model={name},variant={variant},batch={batch},image_size={size},"
                             f"steps={steps},warmup={warmup},bf16={bf16},"
                             f"matmul={8192 if torch.cuda.is_available() else 2048}")
  result = benchmark.benchmark_step(config)
  return {k: result[k] for k in ("step_time_median", "images_per_sec", "gflops_per_image", "mfu")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--maps", default="", help=f"relevance methods to time: {','.join(MAPS)}")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--bf16", action="store_true", help="mixed precision on both sides")
  parser.add_argument("--torch-modes", default="eager",
                      help="PyTorch runs: eager and/or torch.compile modes (default, "
                           "max-autotune), comma-separated")
  parser.add_argument("--compile-budget", type=float, default=300.0,
                      help="seconds a torch.compile run may take in all before it is dropped")
  parser.add_argument("--out", default="side_by_side.json")
  args = parser.parse_args()
  rows = []

  def write():  # after every row: partial runs keep rows
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"cpu_count": os.cpu_count(), "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                 "rows": rows}, f, indent=2)

  for method in filter(None, args.maps.split(",")):
    torch_r = isolated(time_torch_maps, method, args.batch, args.size, args.steps, args.warmup)
    jax_r = isolated(time_jax_maps, method, args.batch, args.size, args.steps, args.warmup)
    rows.append({"maps": method, "model": "resnet50", "batch": args.batch, "classes": 4,
                 "image_size": args.size, "device": str(torch_device()), "jax": jax_r,
                 "torch": torch_r, "ratio": jax_r["maps_per_sec"] / torch_r["maps_per_sec"]})
    print(f"{method:20s} jax {jax_r['maps_per_sec']:7.2f} maps/s   torch "
          f"{torch_r['maps_per_sec']:7.2f} maps/s   ratio {rows[-1]['ratio']:.2f}x", flush=True)
    write()
  for name in filter(None, args.models.split(",")):
    common = (name, args.batch, args.size, args.variant, args.steps, args.warmup, args.bf16)
    jax_r = isolated(time_jax, *common)
    runs = {}
    for mode in args.torch_modes.split(","):
      # a compiled run past its budget (max-autotune can take many minutes) is dropped: None
      runs[mode] = isolated(time_torch, *common, mode,
                            timeout=None if mode == "eager" else args.compile_budget)
    timed = {m: r for m, r in runs.items() if r}
    best = max(timed, key=lambda m: timed[m]["images_per_sec"]) if timed else None
    row = {"model": name, "batch": args.batch, "image_size": args.size,
           "variant": args.variant if name in ("mae", "vit") else "", "bf16": args.bf16,
           "device": str(torch_device()), "jax": jax_r, "torch": runs,
           "torch_best_mode": best,
           "ratio": jax_r["images_per_sec"] / timed[best]["images_per_sec"] if best else None,
           "ratio_by_mode": {m: jax_r["images_per_sec"] / r["images_per_sec"]
                             for m, r in timed.items()}}
    rows.append(row)
    shown = "   ".join(f"torch {m} {r['images_per_sec']:8.2f} img/s" if r else
                       f"torch {m}: over {args.compile_budget:.0f} s, dropped"
                       for m, r in runs.items())
    print(f"{name:9s} jax {jax_r['images_per_sec']:8.2f} img/s ({jax_r['gflops_per_image']:.1f} "
          f"GFLOP/img, MFU {jax_r['mfu']:.1%})   {shown}   ratio to the fastest PyTorch "
          + (f"{row['ratio']:.2f}x" if best else "n/a"), flush=True)
    write()


if __name__ == "__main__":
  main()
