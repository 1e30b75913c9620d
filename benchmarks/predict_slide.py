"""Predict throughput on synthetic large slides of two or more sizes: windows/s, megapixels/s,
peak host memory (each size predicted in a process of its own) and the shares of the run spent
reading, computing and writing, so that a flat memory and a busy device can be checked.

  python -m benchmarks.predict_slide --model=runs/les3/segment --sizes=4096,8192 --workdir=runs/bench_predict

The slides are mosaics of the embedded ultrasound-like images at 224 px (`synthetic_lesions`),
written as tiled pyramidal TIFFs (as scanners write slides); a finding model computes every
window (no tissue mask).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np


def _mosaic_rows(side: int, tile: int):
  """Row bands (height `tile`) of the side x side mosaic, generated tile by tile (the generator
  is a pure function of the index, so the mosaic is never held whole)."""
  from wsss_jax.data import lesions
  per_row = -(-side // tile)
  for r in range(per_row):
    band = np.concatenate([lesions.generate_image(21, "test", r * per_row + c, tile)[0]
                           for c in range(per_row)], 1)[:, :side]
    yield band[:max(0, min(tile, side - r * tile))]


def _level_rows(rows, factors, spill: dict):
  """Passes level 0's bands on, and box-downsamples each into memory-mapped files, one per
  smaller level (`spill`: factor -> array), so one generation pass makes every level."""
  done = 0
  for band in rows:
    for f, out in spill.items():
      h = band.shape[0] // f * f
      small = band[:h, :out.shape[1] * f].reshape(h // f, f, out.shape[1], f, 3).mean((1, 3))
      out[done // f:done // f + small.shape[0]] = small.round().astype(np.uint8)
    done += band.shape[0]
    yield band


def _tiles(rows, height: int, width: int, side: int = 256):
  """Row bands -> the TIFF's side x side tiles in row-major order (zero-padded at the edges)."""
  buffer, emitted = np.zeros((0, width, 3), np.uint8), 0
  for band in rows:
    buffer = np.concatenate([buffer, band])
    while buffer.shape[0] >= side or (emitted + buffer.shape[0] >= height and buffer.shape[0]):
      block, buffer = buffer[:side], buffer[side:]
      emitted += block.shape[0]
      for x in range(0, width, side):
        out = np.zeros((side, side, 3), np.uint8)
        part = block[:, x:x + side]
        out[:part.shape[0], :part.shape[1]] = part
        yield out


def make_slide(path: str, side: int, tile: int = 224) -> None:
  """A side x side pyramidal RGB TIFF (levels 1, 1/2, 1/4 ... as SubIFDs, down to about 1,000 px),
  written band by band: the slide is never whole in memory (the smaller levels wait in
  memory-mapped files while level 0 is written)."""
  import tifffile
  if os.path.exists(path):
    return
  factors = []
  while side // (2 ** (len(factors) + 1)) >= 1000 and tile % 2 ** (len(factors) + 1) == 0:
    factors.append(2 ** (len(factors) + 1))
  spill = {f: np.lib.format.open_memmap(f"{path}.level{f}.npy", "w+", np.uint8,
                                        (side // f, side // f, 3)) for f in factors}
  try:
    with tifffile.TiffWriter(path + ".tmp.tif", bigtiff=True) as tif:
      options = dict(dtype=np.uint8, tile=(256, 256), photometric="rgb")
      tif.write(_tiles(_level_rows(_mosaic_rows(side, tile), factors, spill), side, side),
                shape=(side, side, 3), subifds=len(factors), **options)
      for f in factors:
        level = spill[f]
        rows = (level[y:y + 256] for y in range(0, level.shape[0], 256))
        tif.write(_tiles(rows, *level.shape[:2]), shape=level.shape, subfiletype=1, **options)
  finally:
    for f in factors:
      del spill[f]
      os.remove(f"{path}.level{f}.npy")
  os.replace(path + ".tmp.tif", path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="a segment run's workdir")
  parser.add_argument("--sizes", default="4096,8192")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  results = []
  for side in map(int, args.sizes.split(",")):
    slide = os.path.join(args.workdir, f"slide_{side}.tif")
    make_slide(slide, side)
    out = os.path.join(args.workdir, f"predict_{side}")
    subprocess.run(["rm", "-rf", out], check=True)
    proc = subprocess.Popen([sys.executable, "-m", "wsss_jax.main",
                             f"--config=configs/predict.py:model={args.model},input={slide},"
                             f"batch={args.batch}", f"--workdir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
      print(output[-3000:])
      raise SystemExit(f"predict failed on {slide}")
    summary = json.load(open(os.path.join(out, "summary.json")))["slides"][0]
    row = {"side": side, "megapixels": side * side / 1e6, "windows": summary["windows_computed"],
           "windows_per_sec": summary["windows_per_sec"],
           "megapixels_per_sec": summary["megapixels_per_sec"], "seconds": summary["seconds"],
           "peak_rss_mb": usage.ru_maxrss / 1024, "time_share": summary["time_share"]}
    results.append(row)
    shares = ", ".join(f"{k} {v:.0%}" for k, v in row["time_share"].items())
    print(f"{side} x {side}: {row['windows']} windows, {row['windows_per_sec']:.1f} windows/s "
          f"(compute), {row['megapixels_per_sec']:.2f} MP/s end to end, {row['seconds']:.0f} s, "
          f"peak host memory {row['peak_rss_mb']:.0f} MB; {shares}", flush=True)
  with open(os.path.join(args.workdir, "predict_bench.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
