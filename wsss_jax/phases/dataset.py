"""Dataset phase: statistics and checks, ArrayRecord packing, and the input-speed benchmark.

  action=stats   one pass over every split of data.root: stats.json and stats.md in the workdir
  action=build   the tfds builder packs data.root into ArrayRecord shards (data.records_dir, or
                 <workdir>/records when empty)
  action=input   decoded + augmented images/s per CPU core from the PNG folders and from the
                 ArrayRecord shards, and of the full grain pipeline on all its threads
With an empty data.root, `build` and `input` first write a release-shaped folder of embedded tiles
(<workdir>/release) so that the benchmark runs anywhere.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from PIL import Image

from wsss_jax.data import folders, mask_files, pipeline, records, stats, synthetic
from wsss_jax.errors import UserError

ACTIONS = ("stats", "build", "input")


def write_embedded_release(root: str, num_train: int, num_val: int, size: int, seed: int) -> str:
  """The embedded tiles as a LUAD-HistoSeg-shaped folder (labels in the training names, val/ with
  img/ and palette mask/); kept if already complete."""
  done = os.path.join(root, ".complete")
  if os.path.exists(done):
    return root
  for split, n in (("train", num_train), ("val", num_val)):
    img_dir = os.path.join(root, "training" if split == "train" else "val/img")
    os.makedirs(img_dir, exist_ok=True)
    if split == "val":
      os.makedirs(os.path.join(root, "val/mask"), exist_ok=True)
    for i in range(n):
      image, mask, labels = synthetic.generate_tile(seed, split, i, size)
      stem = f"{split}{i:05d}"
      if split == "train":
        stem += "-[" + " ".join(str(int(v)) for v in labels) + "]"
      Image.fromarray(image).save(os.path.join(img_dir, stem + ".png"))
      if split == "val":
        indexed = Image.fromarray(mask, mode="P")
        indexed.putpalette(mask_files.palette_bytes("luad", 5))
        indexed.save(os.path.join(root, "val/mask", stem + ".png"))
  open(done, "w").close()
  return root


def _release(config, workdir: str):
  data = config.data
  if data.name == "synthetic":
    if config.action == "stats":
      return data
    data = data.copy_and_resolve_references()
    data.name, data.class_names, data.num_classes = "luad_histoseg", (), 4
  if not data.root:
    data = data.copy_and_resolve_references()
    data.root = write_embedded_release(os.path.join(workdir, "release"), config.embedded_train,
                                       config.embedded_val, data.tile_size, data.seed)
  return data


def run_stats(config, workdir: str, data) -> dict:
  fixed = {"synthetic": synthetic.CLASS_NAMES, "slides": ()}
  names = fixed[data.name] if data.name in fixed else folders.class_names(data)
  result, hashes = {"name": data.name, "root": data.root, "splits": {}}, {}
  data = data.copy_and_resolve_references()
  data.bad_files, data.report_dir = "skip", ""  # every problem goes into the report
  data.image_size = 0  # every tile is counted, whatever a model's input size would need
  for split in ("train", "val", "test"):
    if data.name == "slides" and split != "train" and not os.path.isdir(
        os.path.join(data.root, split)):
      continue  # one set of slides: the same tiles would serve every split
    try:
      source = pipeline.build_source(data, split)
    except UserError as e:
      if split == "train":
        raise
      print(f"{split}: skipped ({e})")
      continue
    found = stats.split_statistics(source, names, threads=data.num_threads,
                                   moments=split == "train", hashes=hashes, split=split)
    if split == "train" and hasattr(source, "image_dir"):  # a folder: its files' own values
      found["raw_window"] = stats.raw_window(
          [os.path.join(source.image_dir, f) for f in source.files])
    skipped = [why for _, why in getattr(source, "skipped", [])]
    found["tiles"] += len(skipped)
    found["problems"] = skipped + found["problems"]
    result["splits"][split] = found
  with open(os.path.join(workdir, "stats.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  report = stats.markdown(result, f"{data.name} ({data.root or 'embedded'})")
  with open(os.path.join(workdir, "stats.md"), "w", encoding="utf-8") as f:
    f.write(report)
  print(report)
  return {"splits": {k: v["tiles"] for k, v in result["splits"].items()},
          "problems": sum(len(v["problems"]) for v in result["splits"].values()),
          "report": os.path.join(workdir, "stats.md")}


def run_build(config, workdir: str, data) -> dict:
  out = data.records_dir or os.path.join(workdir, "records")
  folder = records.build(data, out)
  print(f"ArrayRecord shards of {data.root} in {folder}; train with "
        f"--config.data.records_dir={out}")
  return {"records_dir": out, "dataset_dir": folder}


def _per_core(source, transforms, n: int) -> float:
  """Images/s of one thread: read, decode, augment `n` examples."""
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for i in range(n):
    example = source[i % len(source)]
    for t in transforms:
      example = t(example, rng) if t.random else t(example)
  return n / (time.perf_counter() - start)


def _pipeline_rate(data, batch: int, batches: int) -> float:
  it = iter(pipeline.train_dataset(data, seed=0, local_batch=batch, keys=("image", "labels")))
  next(it)  # threads started, buffers filling
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batch * batches / (time.perf_counter() - start)


def run_input(config, workdir: str, data) -> dict:
  rec = data.copy_and_resolve_references()
  rec.records_dir = data.records_dir or os.path.join(workdir, "records")
  records.build(data, rec.records_dir)
  transforms = pipeline.train_transforms(data)
  result = {"image_size": data.image_size, "tile_size": data.tile_size,
            "threads": data.num_threads, "cpu_count": os.cpu_count()}
  for label, cfg in (("png_folder", data), ("array_record", rec)):
    source = pipeline.build_source(cfg, "train")
    _per_core(source, transforms, 8)  # warm caches and imports
    result[label] = {
        "images_per_sec_per_core": _per_core(source, transforms, config.per_core_images),
        "pipeline_images_per_sec": _pipeline_rate(cfg, config.batch_size, config.batches)}
  for label in ("png_folder", "array_record"):
    r = result[label]
    print(f"{label:12s} {r['images_per_sec_per_core']:8.1f} images/s per core, grain pipeline "
          f"({data.num_threads} threads) {r['pipeline_images_per_sec']:8.1f} images/s")
  with open(os.path.join(workdir, "input_speed.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  return result


def run(config, workdir: str) -> dict:
  if config.action not in ACTIONS:
    raise UserError(f"action={config.action!r} is not one of {ACTIONS}")
  data = _release(config, workdir)
  return {"stats": run_stats, "build": run_build, "input": run_input}[config.action](
      config, workdir, data)
