"""A folder of 16-bit grey TIFF 'nuclei' in the folder layout, to try the finding recipe as a user
would on data none of the embedded generators made: train/img (labels.csv) + train/mask,
val/img + val/mask, test/img + test/mask, half the images with nuclei, half normal.

  python -m benchmarks.nuclei_folder --root=runs/nuclei_data
  python -m wsss_jax.main --config=configs/dataset.py:action=stats,dataset=folder,root=runs/nuclei_data,classes=nucleus,setting=finding --workdir=runs/nuclei_stats
  python -m wsss_jax.main --config=configs/pipeline.py:dataset=folder,root=runs/nuclei_data,classes=nucleus,setting=finding,intensity=window:10/2220,upper_bound=True --workdir=runs/nuclei

Unlike `synthetic_cells`: soft-edged blobs (a flat top falling off as 1 - r^4), 5-14 px radius on
a 160 px side, a 12-bit range, a textured background of slow waves and broad haze as bright as a
dim nucleus, Poisson counts. Masks: 0 = nucleus, 1 = background (index K = background).
"""
from __future__ import annotations

import argparse
import csv
import os

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

SIDE = 160
SEEDS = {"train": 1, "val": 2, "test": 3}


def background(rng: np.random.Generator) -> np.ndarray:
  y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
  waves = 200 * np.sin(x * rng.uniform(1, 3) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(1, 3))
  haze = ndimage.gaussian_filter(rng.normal(0, 1, (SIDE, SIDE)), 12) * 2500
  return (300 + waves + haze).astype(np.float32)


def nuclei(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
  """(signal, mask): `count` rotated ellipses, each of its own brightness and radius."""
  y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
  signal, mask = np.zeros((SIDE, SIDE), np.float32), np.zeros((SIDE, SIDE), bool)
  for _ in range(count):
    cy, cx = rng.uniform(10, SIDE - 10, 2)
    radius, squash, angle = rng.uniform(5, 14), rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)
    u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / radius
    v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / (radius * squash)
    r2 = u ** 2 + v ** 2
    brightness = rng.uniform(600, 2500)
    texture = 0.8 + 0.2 * rng.random((SIDE, SIDE))
    signal += brightness * np.clip(1.2 - r2 ** 2, 0, 1) * texture
    mask |= r2 <= 1
  return signal, mask


def image(rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, np.ndarray]:
  """(uint16 image, bool mask) of one field of view, blurred by the optics, Poisson counts."""
  field = background(rng)
  signal, mask = nuclei(rng, int(rng.integers(3, 16)) if positive else 0)
  blurred = ndimage.gaussian_filter(field + signal, 1.0)
  counts = rng.poisson(np.clip(blurred, 1, None))
  return np.clip(counts, 0, 4095).astype(np.uint16), mask


def write_split(root: str, split: str, count: int) -> None:
  rng = np.random.default_rng(SEEDS[split])
  img_dir, mask_dir = os.path.join(root, split, "img"), os.path.join(root, split, "mask")
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(mask_dir, exist_ok=True)
  rows = []
  for i in range(count):
    positive = i % 2 == 0
    pixels, mask = image(rng, positive)
    stem = f"{split}_{i:04d}"
    tifffile.imwrite(os.path.join(img_dir, stem + ".tif"), pixels)
    Image.fromarray(np.where(mask, 0, 1).astype(np.uint8)).save(
        os.path.join(mask_dir, stem + ".png"))
    rows.append((stem + ".tif", "nucleus" if positive else ""))
  if split == "train":  # the image-level labels the weak recipe learns from
    with open(os.path.join(img_dir, "labels.csv"), "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(["file", "labels"])
      writer.writerows(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--train", type=int, default=384)
  parser.add_argument("--val", type=int, default=64)
  parser.add_argument("--test", type=int, default=64)
  args = parser.parse_args()
  for split in SEEDS:
    write_split(args.root, split, getattr(args, split))
  print(f"wrote {args.train} / {args.val} / {args.test} images to {args.root}")


if __name__ == "__main__":
  main()
