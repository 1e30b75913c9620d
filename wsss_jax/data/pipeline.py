"""grain input pipelines: source -> process shard -> shuffle -> repeat -> augment -> batch.

Each process reads only its own slice of the source (`ds[process_index::process_count]`) and
yields its share of the global batch; the global array is assembled on device by
`wsss_jax.parallel.global_batch`. The iterator state is a small dict saved in every checkpoint, so a
resumed run sees the same data order as an uninterrupted one. Images stay uint8 until they reach
the device (4x less host-to-device traffic); `normalize` runs inside the jitted step.
"""
from __future__ import annotations

import grain
from absl import flags
import jax.numpy as jnp
import numpy as np

from wsss_jax.data import randaugment, synthetic, transforms
from wsss_jax.errors import UserError

DATASETS = ("synthetic",)


def check_dataset_name(name: str) -> None:
  if name not in DATASETS:
    raise UserError(f"data.name={name!r} is not a known dataset; known: {DATASETS}")


def build_source(data_cfg, split: str):
  """The random-access source named by `data.name` for one split."""
  check_dataset_name(data_cfg.name)
  if data_cfg.name == "synthetic":
    num = {"train": data_cfg.num_train, "val": data_cfg.num_val,
           "test": data_cfg.get("num_test", data_cfg.num_val)}[split]
    return synthetic.SyntheticHistology(num, split, seed=data_cfg.seed, size=data_cfg.tile_size)
  raise AssertionError(f"no reader for {data_cfg.name}")  # DATASETS and readers disagree


def _select(keys):
  return lambda example: {k: example[k] for k in keys}


class CheckExample:
  """Refuses, with the example's name, a label vector of the wrong length or a too small image.

  An all-zero label vector is accepted: it is a background-only tile (every class negative).
  """

  def __init__(self, data_cfg, split: str, check_labels: bool):
    self.size, self.split, self.check_labels = data_cfg.image_size, split, check_labels
    self.num_classes = data_cfg.get("num_classes")

  def __call__(self, example: dict) -> dict:
    name = example.get("name", "an example")
    where = f"{name} (split {self.split})"
    h, w = example["image"].shape[:2]
    if min(h, w) < self.size:
      raise UserError(f"{where} is {h}x{w} pixels, smaller than data.image_size={self.size}; "
                      f"lower data.image_size or drop the image")
    if self.check_labels and np.shape(example["labels"]) != (self.num_classes,):
      raise UserError(f"{where} has {np.size(example['labels'])} labels but "
                      f"data.num_classes={self.num_classes}")
    return example


def train_transforms(data_cfg) -> list:
  """Random-resized crop (or a plain resize when data.crop_scale is (1, 1)), flips, RandAugment."""
  steps = []
  if tuple(data_cfg.crop_scale) == (1.0, 1.0):
    steps.append(transforms.Resize(data_cfg.image_size))
  else:
    steps.append(transforms.RandomResizedCropFlip(data_cfg.image_size, data_cfg.crop_scale,
                                                  hflip=False))
  if data_cfg.hflip or data_cfg.get("vflip", False):
    steps.append(transforms.RandomFlip(data_cfg.hflip, data_cfg.get("vflip", False)))
  if data_cfg.get("randaugment_ops", 0) > 0:
    steps.append(randaugment.RandAugment(data_cfg.randaugment_ops,
                                         data_cfg.randaugment_magnitude))
  return steps


def train_dataset(data_cfg, *, seed: int, local_batch: int, process_index: int = 0,
                  process_count: int = 1, keys=("image",)) -> grain.IterDataset:
  """Infinite, shuffled (a new permutation every epoch), augmented, batched training stream."""
  source = build_source(data_cfg, "train")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) < local_batch:
    raise UserError(f"data.num_train={len(source)} gives process {process_index} only {len(ds)} "
                    f"images, fewer than its batch of {local_batch}")
  ds = ds.shuffle(seed=seed).repeat(None).map(CheckExample(data_cfg, "train", "labels" in keys))
  for i, transform in enumerate(train_transforms(data_cfg)):
    ds = ds.random_map(transform, seed=seed + i) if transform.random else ds.map(transform)
  ds = ds.map(_select(keys)).batch(local_batch, drop_remainder=True)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads,
                                               prefetch_buffer_size=data_cfg.prefetch))
  if data_cfg.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app too
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return it_ds


def eval_batches(data_cfg, batch_size: int, split: str = "val", keys=("image", "labels")):
  """The whole split, resized, in batches of `batch_size`; the last one padded by repeating the
  final example, with `valid` (bool) marking the real rows."""
  source = build_source(data_cfg, split)
  check, resize = CheckExample(data_cfg, split, "labels" in keys), transforms.Resize(
      data_cfg.image_size)
  for start in range(0, len(source), batch_size):
    idx = list(range(start, min(start + batch_size, len(source))))
    examples = [_select(keys)(resize(check(source[i]))) for i in idx]
    pad = batch_size - len(examples)
    examples += examples[-1:] * pad
    batch = {k: np.stack([e[k] for e in examples]) for k in keys}
    batch["valid"] = np.arange(batch_size) < len(idx)
    yield batch


def eval_examples(data_cfg, num: int, keys=("image",)) -> dict:
  """The first `num` validation tiles, resized to the model's input size, as one numpy batch."""
  num = min(num, len(build_source(data_cfg, "val")))
  batch = next(eval_batches(data_cfg, num, "val", keys))
  return {k: batch[k] for k in keys}


def normalize(images, mean, std, dtype=jnp.float32):
  """uint8 (B, H, W, 3) -> (x / 255 - mean) / std in `dtype`, on device."""
  x = images.astype(jnp.float32) / 255.0
  return ((x - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)
