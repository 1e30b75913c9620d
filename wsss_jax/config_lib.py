"""Shared config pieces. Config files are loaded by path, so what they share lives here.

Config files follow big_vision: `get_config(arg)` where `arg` is the text after ':' in
`--config=configs/mae.py:variant=B/16,batch=256`.
"""
from __future__ import annotations

import ml_collections

from wsss_jax.errors import UserError

# LUAD-HistoSeg statistics (TPRO's figures, given in BGR order there), here in RGB order.
HISTOLOGY_MEAN = (0.7343, 0.5050, 0.6916)
HISTOLOGY_STD = (0.1885, 0.2277, 0.1552)


def _convert(text: str, default):
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(text)
  return type(default)(text) if default is not None else text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'a=1,b=x' -> ConfigDict with the defaults' keys and types; unknown keys are refused."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"config argument {item!r} is not KEY=VALUE")
    if key not in defaults:
      raise UserError(f"config argument {key!r} is unknown; known: {sorted(defaults)}")
    try:
      out[key] = _convert(value, defaults[key])
    except ValueError:
      raise UserError(f"config argument {key}={value!r} is not a valid "
                      f"{type(defaults[key]).__name__}") from None
  return ml_collections.ConfigDict(out)


def common(phase: str, seed: int = 0) -> ml_collections.ConfigDict:
  """Fields every phase honours."""
  c = ml_collections.ConfigDict()
  c.phase = phase
  c.seed = seed
  c.batch_size = 64           # global, over all devices and processes
  c.total_steps = 1000
  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.num_devices = -1          # -1: every device; n > 0: the first n of a single process
  c.mixed_precision = False   # bf16 compute, fp32 parameters and optimiser state
  return c


def data(name: str = "synthetic", image_size: int = 224) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.name = name
  d.root = ""                 # folder of a dataset on disk (unused by the embedded one)
  d.seed = 0                  # the embedded dataset's generator seed
  d.num_train = 4096
  d.num_val = 64
  d.tile_size = 224           # size of the embedded dataset's tiles
  d.image_size = image_size   # network input size after cropping
  d.crop_scale = (0.2, 1.0)   # random-resized-crop area range (0.5-1.0 for X-ray-like data)
  d.hflip = True
  d.mean = HISTOLOGY_MEAN
  d.std = HISTOLOGY_STD
  d.num_threads = 2           # grain reader threads per process
  d.num_workers = 0           # grain worker processes (0: in-process threads only)
  d.prefetch = 4              # batches buffered ahead of the step
  return d
