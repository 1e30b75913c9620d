"""A figure of a finished pipeline run (configs/pipeline.py): for the test tiles the segment phase
kept, the tile | the classifier's relevance map of the first present class (blended heat map) |
the pseudo mask | the segmenter's prediction | the ground truth. The classifier and segmenter are
those the run kept (input side, band width and self-training round chosen on val), found under
the run wherever it was moved. The README's figure comes from it.

  python -m benchmarks.pipeline_figure --workdir=runs/les --out=docs/figure.png --rows=3
"""
from __future__ import annotations

import argparse
import json
import os
from typing import NamedTuple

import numpy as np

from wsss_jax.data import mask_files


class Figure(NamedTuple):
  rows: list          # per tile: tile, heat map, pseudo mask, segmenter, ground truth (RGB)
  layer: str          # the pseudo-mask layer the segmenter learnt from
  names: list         # class names
  palette: list       # mask colours, flat RGB
  dataset: str        # the data's name (synthetic_lesions, a folder's name)


def figure_rows(workdir: str, num_rows: int, method: str) -> Figure:
  """The figure's rows for the first `num_rows` test tiles the kept segmenter's run showed."""
  import jax.numpy as jnp
  import ml_collections
  from PIL import Image

  from wsss_jax import relevance
  from wsss_jax.device import parallel
  from wsss_jax.outputs import overlays
  from wsss_jax.tasks.common import prepare_images
  from wsss_jax.train import earlier_runs

  summary = json.load(open(os.path.join(workdir, "summary.json")))
  segment_dir = earlier_runs.pipeline_segmenter(workdir, "--workdir")  # found wherever it moved
  seg_config = json.load(open(os.path.join(segment_dir, "config.json")))
  layer = summary.get("mask_layer") or seg_config["data"]["mask_layers"][-1]
  pm = summary["pseudo_masks_test"]
  names = list(summary["class_names"])
  k = len(names)
  shown = np.load(os.path.join(segment_dir, "overlays", "test.npz"))
  model, variables, meta, _, data = earlier_runs.load_classifier(
      earlier_runs.pipeline_classifier(workdir, "--workdir"), parallel.make_mesh(1))
  size = meta["image_size"]
  palette = mask_files.palette_bytes(pm["palette"], k + 1)
  rows = []
  for i in range(min(num_rows, len(shown["image"]))):
    image, truth, pred, labels = (shown[key][i] for key in ("image", "truth", "prediction",
                                                            "labels"))
    small = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    x = prepare_images(jnp.asarray(small[None]), ml_collections.ConfigDict(data), jnp.float32)
    present = int(np.argmax(labels)) if labels.any() else 0
    maps = relevance.relevance(method, model.apply, variables, x, layers=[layer],
                               labels=jnp.asarray(labels[None]), upsample=True, relu=True,
                               normalize="class")
    heat = np.asarray(next(iter(maps.values()))[0, present])  # keyed by the full layer path
    heat = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize(
        image.shape[1::-1], Image.BILINEAR)) / 255.0
    blended = (0.5 * image / 255.0 + 0.5 * overlays.heat(heat)) * 255
    stem = mask_files.file_stem(str(shown["name"][i]))
    pseudo = mask_files.read_mask(os.path.join(workdir, "pseudo_masks_test", "masks", layer,
                                               stem + ".png"), truth.shape, k)
    rows.append([image, blended.round().astype(np.uint8),
                 overlays.blend(image, pseudo, palette, k),
                 overlays.blend(image, pred, palette, k), overlays.blend(image, truth, palette, k)])
  return Figure(rows, layer, names, palette, seg_config["data"].get("name") or workdir)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a finished pipeline run")
  parser.add_argument("--out", required=True)
  parser.add_argument("--rows", type=int, default=3)
  parser.add_argument("--method", default="gradcam")
  args = parser.parse_args()
  from wsss_jax.outputs import overlays

  fig = figure_rows(args.workdir, args.rows, args.method)
  colours = np.asarray(fig.palette, np.uint8).reshape(-1, 3)
  legend = [(n, colours[i]) for i, n in enumerate(fig.names)]
  figure = overlays.grid_figure(
      fig.rows, ["tile", f"{args.method} map ({fig.layer})", f"pseudo mask ({fig.layer})",
                 "segmenter", "ground truth"],
      f"{fig.dataset}: test tiles through the pipeline ({args.method} maps; the segmenter "
      f"learnt from the {fig.layer} pseudo masks)",
      legend)
  overlays.save(os.path.abspath(args.out), figure)
  print(f"wrote {args.out} ({figure.shape[1]}x{figure.shape[0]})")


if __name__ == "__main__":
  main()
