"""grain input pipelines: source -> process shard -> shuffle -> repeat -> augment -> batch.

Each process reads only its own slice of the source (`ds[process_index::process_count]`) and
yields its share of the global batch; the global array is assembled on device by
`wsss_jax.device.parallel.global_batch`. The iterator state is a small dict saved in every checkpoint, so a
resumed run sees the same data order as an uninterrupted one. Images stay uint8 until they reach
the device (4x less host-to-device traffic); `normalize` runs inside the jitted step.
"""
from __future__ import annotations

import os

import grain
import jax.numpy as jnp
import numpy as np
from absl import flags

from wsss_jax.data import cells, folders, lesions, mask_files, randaugment, slides, synthetic, transforms
from wsss_jax.errors import UserError

EMBEDDED = {"synthetic": synthetic.SyntheticHistology, "synthetic_lesions": lesions.SyntheticLesions,
            "synthetic_cells": cells.SyntheticCells}
DATASETS = tuple(EMBEDDED) + ("slides",) + tuple(folders.SPECS)


def check_dataset_name(name: str) -> None:
  if name not in DATASETS:
    raise UserError(f"data.name={name!r} is not a known dataset; known: {DATASETS}")


def build_source(data_cfg, split: str):
  """The random-access source named by `data.name` for one split; for segmentation training
  (`data.mask_layers` set) with the per-layer masks attached (`MaskedSource`)."""
  check_dataset_name(data_cfg.name)
  if data_cfg.name in EMBEDDED:
    num = {"train": data_cfg.num_train, "val": data_cfg.num_val,
           "test": data_cfg.get("num_test", data_cfg.num_val)}[split]
    source = EMBEDDED[data_cfg.name](num, split, seed=data_cfg.seed, size=data_cfg.tile_size)
  elif data_cfg.name == "slides":  # tissue tiles cut from large TIFF/PNG images
    source = slides.slide_source(data_cfg, split)
  elif data_cfg.get("records_dir"):  # ArrayRecord shards written by configs/dataset.py
    from wsss_jax.data import records  # imports tensorflow_datasets: only when used
    source = records.RecordSource(data_cfg.records_dir, data_cfg.name, split,
                                  folders.class_names(data_cfg))
  else:
    source = folders.folder_source(data_cfg, split)
  if split == "train" and data_cfg.get("erase_dir"):  # adversarial erasing: regions mined before
    source = ErasedSource(source, data_cfg.erase_dir, data_cfg.mean)
  if split == "train" and data_cfg.get("mask_layers"):
    source = MaskedSource(source, tuple(data_cfg.mask_layers), data_cfg.get("masks_dir", ""),
                          data_cfg.num_classes)
  return source


def images_only(data_cfg):
  """A copy of a data section whose sources carry the images and their ground truth, not the
  pseudo masks of `mask_layers` (which a check before the pseudo-mask phase cannot need)."""
  data = data_cfg.copy_and_resolve_references()
  with data.unlocked():
    data.mask_layers = ()
  return data


def has_masks(data_cfg, split: str) -> bool:
  """Whether `split`'s images carry ground-truth masks."""
  source = build_source(images_only(data_cfg), split)
  return len(source) > 0 and "mask" in source[0]


def check_ground_truth(data_cfg, split: str, needed_by: str) -> None:
  """One line before any work when `split`'s images carry no ground-truth masks and
  `needed_by` (full supervision, an upper bound) learns from them."""
  if not has_masks(data_cfg, split):
    where = getattr(build_source(images_only(data_cfg), split), "image_dir",
                    f"data.name={data_cfg.name!r}")
    raise UserError(f"{needed_by} learns from ground-truth masks, and the {split} images of "
                    f"{where} have none (a weakly labelled set: run supervision=pseudo)")


def has_negatives(data_cfg) -> bool | None:
  """Whether the training split has an image without any label (a normal image); None where
  that is not known without reading every image (the embedded generators make both)."""
  labels = getattr(build_source(images_only(data_cfg), "train"), "labels", None)
  if not isinstance(labels, dict) or not labels:
    return None
  return any(not np.any(v) for v in labels.values())


def example_name(source, index: int) -> str:
  return source.name(index) if hasattr(source, "name") else str(source[index]["name"])


class MaskedSource:
  """A source whose examples carry `mask_<layer>` for each layer: the pseudo masks read from
  `<masks_dir>/<layer>/<tile>.png` (checked: present, readable, the image's size, indices <=
  num_classes, the background), or with no `masks_dir` the ground truth (full supervision)."""

  def __init__(self, base, layers: tuple, masks_dir: str, num_classes: int):
    self.base, self.layers, self.masks_dir, self.num_classes = base, layers, masks_dir, num_classes
    if masks_dir:
      self._check_files()

  def _path(self, layer: str, index: int) -> str:
    return os.path.join(self.masks_dir, layer, mask_files.file_stem(example_name(self.base, index))
                        + ".png")

  def _check_files(self) -> None:
    for layer in self.layers:
      directory = os.path.join(self.masks_dir, layer)
      present = set(os.listdir(directory)) if os.path.isdir(directory) else set()
      missing = [self._path(layer, i) for i in range(len(self.base))
                 if os.path.basename(self._path(layer, i)) not in present]
      if missing:
        action = ("finish a segment run with self_labels.write=True (it writes "
                  "self_labels/masks/)" if layer == mask_files.SELF_LAYER
                  else "run the pseudo_masks phase")
        raise UserError(f"{len(missing)} of {len(self.base)} pseudo masks of layer {layer!r} are "
                        f"missing, e.g. {missing[0]}; {action} on the same training set first")

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, index: int) -> dict:
    example = dict(self.base[index])
    size = example["image"].shape[:2]
    for layer in self.layers:
      if self.masks_dir:
        example[f"mask_{layer}"] = mask_files.read_mask(self._path(layer, index), size, self.num_classes)
      elif "mask" in example:
        example[f"mask_{layer}"] = example["mask"]
      else:
        raise UserError(f"{example.get('name')} has no ground-truth mask for full supervision")
    return example

  def __repr__(self) -> str:
    return f"MaskedSource({self.base!r}, layers={self.layers}, masks_dir={self.masks_dir!r})"


class ErasedSource:
  """A source whose tiles have the pixels of `<erase_dir>/<tile>.png` (nonzero = mined by an
  earlier adversarial-erasing round) set to the dataset's mean colour, before any augmentation."""

  def __init__(self, base, erase_dir: str, mean):
    self.base, self.erase_dir = base, erase_dir
    self.fill = np.round(np.asarray(mean) * 255).astype(np.uint8)
    present = set(os.listdir(erase_dir)) if os.path.isdir(erase_dir) else set()
    missing = [self._path(i) for i in range(len(base))
               if os.path.basename(self._path(i)) not in present]
    if missing:
      raise UserError(f"{len(missing)} of {len(base)} erasure masks are missing, e.g. "
                      f"{missing[0]} (data.erase_dir is written by the erasing phase for the "
                      f"same training set)")

  def _path(self, index: int) -> str:
    return os.path.join(self.erase_dir, mask_files.file_stem(example_name(self.base, index)) + ".png")

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, index: int) -> dict:
    example = dict(self.base[index])
    region = mask_files.read_binary(self._path(index), example["image"].shape[:2])
    example["image"] = np.where(region[..., None], self.fill, example["image"])
    return example

  def __repr__(self) -> str:
    return f"ErasedSource({self.base!r}, erase_dir={self.erase_dir!r})"


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
  """Random-resized crop (or a plain resize when data.crop_scale is (1, 1), or an MRN pair), flips,
  Gaussian blur, RandAugment."""
  steps = []
  if data_cfg.get("pair_size", 0):  # MRN: a (target, context) pair cut at a random centre
    steps.append(transforms.RandomPair(data_cfg.pair_size, data_cfg.context_scale))
  elif tuple(data_cfg.crop_scale) == (1.0, 1.0):
    steps.append(transforms.Resize(data_cfg.image_size))
  else:
    steps.append(transforms.RandomResizedCropFlip(data_cfg.image_size, data_cfg.crop_scale,
                                                  hflip=False))
  if data_cfg.hflip or data_cfg.get("vflip", False):
    steps.append(transforms.RandomFlip(data_cfg.hflip, data_cfg.get("vflip", False)))
  if data_cfg.get("blur_p", 0) > 0:
    steps.append(transforms.RandomGaussianBlur(data_cfg.blur_p, data_cfg.blur_radius))
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
    raise UserError(f"the training split has {len(source)} images: process {process_index} "
                    f"gets {len(ds)}, fewer than its batch of {local_batch}")
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


class ModelInput:
  """grain map transform: `<key>` = the tile resized to `size` (as the evaluation pipeline does),
  `image` and `mask` kept at tile size."""
  random = False

  def __init__(self, key: str, size: int):
    self.key, self.resize = key, transforms.Resize(size)

  def __call__(self, example: dict) -> dict:
    return example | {self.key: self.resize({"image": example["image"]})["image"]}


def tile_batches(data_cfg, split: str, batch: int, inputs: dict, keys, extra=(), num=None,
                 start: int = 0):
  """Padded batches of a split at tile size plus model inputs `inputs` = {key: size}, read and
  prepared by grain threads ahead of the device; the last batch repeats its final tile and
  `valid` marks the real rows. `extra`: more grain map transforms; `num`: only the first tiles;
  `start`: from this tile on (a resumed pass)."""
  source = build_source(data_cfg, split)
  ds = grain.MapDataset.source(source)
  if num is not None or start:
    ds = ds[start:num]
  ds = ds.map(CheckExample(data_cfg, split, "labels" in keys))
  for key, size in inputs.items():
    ds = ds.map(ModelInput(key, size))
  for transform in extra:
    ds = ds.map(transform)
  ds = ds.map(_select(keys)).batch(batch, drop_remainder=False)
  for b in ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads,
                                                prefetch_buffer_size=2)):
    n = len(b[keys[0]])
    b = {k: np.concatenate([v, np.repeat(v[-1:], batch - n, 0)]) for k, v in b.items()}
    b["valid"] = np.arange(batch) < n
    yield b
