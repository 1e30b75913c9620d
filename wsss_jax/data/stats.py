"""Dataset statistics and a check report, one pass over every split.

Per split: tile count, image sizes, per-class label frequencies (tiles showing each class), label
vectors that are empty, per-class pixel shares of the ground-truth masks; over the training split the
RGB channel mean and standard deviation (in [0, 1], the values `data.mean`/`data.std` take). The
check report lists every file that fails to decode or disagrees with its mask, and tiles whose
pixels appear in two splits (leakage), instead of stopping at the first problem.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib

import numpy as np

from wsss_jax.data import intensity
from wsss_jax.errors import UserError
from wsss_jax.train.progress import Progress


class _Moments:
  """Exact per-channel sums in float64 (a pass over a release is at most ~1e10 pixels)."""

  def __init__(self):
    self.n, self.s, self.s2 = 0, np.zeros(3), np.zeros(3)

  def add(self, image: np.ndarray) -> None:
    x = image.reshape(-1, 3).astype(np.float64) / 255.0
    self.n += len(x)
    self.s += x.sum(0)
    self.s2 += (x * x).sum(0)

  def mean_std(self) -> tuple[list, list]:
    mean = self.s / max(self.n, 1)
    return mean.tolist(), np.sqrt(np.maximum(self.s2 / max(self.n, 1) - mean ** 2, 0)).tolist()


def _read(source, index: int):
  try:
    return index, source[index], None
  except UserError as e:
    return index, None, str(e)


def split_statistics(source, class_names, threads: int = 4, moments: bool = False,
                     hashes: dict | None = None, split: str = "") -> dict:
  """Statistics and problems of one split; `hashes` (pixel digest -> first name) is shared across
  splits to find tiles that occur twice."""
  k = len(class_names)
  sizes, label_counts, pixel_counts = collections.Counter(), np.zeros(k, np.int64), None
  empty, problems, stats = 0, [], _Moments()
  progress = Progress(f"statistics {split}".strip(), len(source))
  progress.update(0)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for index, example, error in pool.map(lambda i: _read(source, i), range(len(source))):
      progress.update(index + 1)
      if error:
        problems.append(error)
        continue
      image = example["image"]
      sizes[f"{image.shape[0]}x{image.shape[1]}"] += 1
      if moments:
        stats.add(image)
      if "labels" in example:
        label_counts += np.asarray(example["labels"]) > 0.5
        empty += not np.any(example["labels"])
      if "mask" in example:
        counts = np.bincount(example["mask"].ravel(), minlength=k + 1)[:k + 1]
        pixel_counts = counts if pixel_counts is None else pixel_counts + counts
      if hashes is not None:
        digest = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()
        where = f"{split}/{example['name']}"
        if digest in hashes:
          problems.append(f"{where} has the same pixels as {hashes[digest]}")
        else:
          hashes[digest] = where
  n = len(source) - sum(1 for p in problems if "same pixels" not in p)
  result = {"tiles": len(source), "image_sizes": dict(sizes.most_common()),
            "label_frequency": {c: {"tiles": int(v), "share": float(v / max(n, 1))}
                                for c, v in zip(class_names, label_counts)},
            "empty_label_vectors": int(empty), "problems": problems}
  if pixel_counts is not None:
    names = list(class_names) + ["background"]
    total = max(int(pixel_counts.sum()), 1)
    result["mask_pixel_share"] = {c: float(v / total) for c, v in zip(names, pixel_counts)}
  if moments:
    result["mean"], result["std"] = stats.mean_std()
  return result


def raw_window(paths: list, low: float = 0.5, high: float = 99.5, limit: int = 256,
               pixels_each: int = 65536) -> dict | None:
  """The training images' own values (before any intensity rule) at the `low` and `high`
  percentiles, from up to `limit` files (each subsampled to about `pixels_each` values): the
  dataset-wide `data.intensity=window:lo,hi` for images wider than 8 bits; None for 8-bit sets."""
  step = max(1, len(paths) // limit)
  values, dtype = [], None
  for path in paths[::step][:limit]:
    pixels = intensity.read_raw(path).pixels
    dtype = dtype or str(pixels.dtype)
    flat = pixels.reshape(-1)
    values.append(flat[::max(1, flat.size // pixels_each)].astype(np.float64))
  if not values or dtype == "uint8":
    return None
  lo, hi = np.percentile(np.concatenate(values), (low, high))
  return {"dtype": dtype, "percentiles": [low, high], "window": [float(lo), float(hi)],
          "intensity": f"window:{lo:g},{hi:g}"}


def markdown(stats: dict, name: str) -> str:
  """The statistics as a readable report."""
  lines = [f"# {name}", ""]
  for split, s in stats["splits"].items():
    lines += [f"## {split}: {s['tiles']} tiles", "",
              "sizes: " + ", ".join(f"{k} ({v})" for k, v in s["image_sizes"].items()), "",
              "| class | tiles | share |" + (" mask pixels |" if "mask_pixel_share" in s else ""),
              "|---|---|---|" + ("---|" if "mask_pixel_share" in s else "")]
    for c, f in s["label_frequency"].items():
      pixels = f" {s['mask_pixel_share'][c]:.3f} |" if "mask_pixel_share" in s else ""
      lines.append(f"| {c} | {f['tiles']} | {f['share']:.3f} |{pixels}")
    if "mask_pixel_share" in s:
      lines.append(f"| background | | | {s['mask_pixel_share']['background']:.3f} |")
    lines += ["", f"empty label vectors: {s['empty_label_vectors']}"]
    if "mean" in s:
      lines.append("RGB mean " + ", ".join(f"{v:.4f}" for v in s["mean"]) + "; std "
                   + ", ".join(f"{v:.4f}" for v in s["std"]))
    if s.get("raw_window"):
      w = s["raw_window"]
      lines.append(f"raw {w['dtype']} values, {w['percentiles'][0]:g}th-{w['percentiles'][1]:g}th "
                   f"percentile over the set: {w['window'][0]:g} to {w['window'][1]:g}; "
                   f"as one window for every image: --config.data.intensity={w['intensity']}")
    lines.append("")
  problems = [p for s in stats["splits"].values() for p in s["problems"]]
  lines += [f"## Check: {len(problems)} problem(s)", ""] + [f"- {p}" for p in problems]
  return "\n".join(lines) + "\n"
