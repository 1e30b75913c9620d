"""Predict phase: a trained segmenter applied to new images: a folder of tiles, one slide, or a
folder of slides.

Tiles (PNG / JPEG / BMP): each tile is resized to the model's input, segmented, the class scores
brought back to the tile's size (an MRN instead reads windows of its input size at the tile's own
resolution, each with its context, as the segment phase tests it); out come masks/<tile>.png (palette as in training), optionally
probabilities/<tile>.npz (float16, one map per output class), tiles.jsonl (per tile: the
classification gate's scores where the segment run had a gate classifier, and each class's share
of the pixels) and overlays/predict.png.

Slides (TIFF / SVS / any format `data/slides.py` reads): windows at the model's resolution
(a training tile of `data.tile_size` px became `data.image_size` model px for DeepLabV3+; MRN
pairs are at the slide's resolution, each window with its context; `downsample` scales that
further) slide over the image with `overlap`, each window's class probabilities weighted by
a Hann window (zero weight at the border, so seams fade out) and summed; windows with less than
`min_tissue` tissue (the slide module's tissue mask) are not computed and come out as
background. Rows of windows are read by a thread pool ahead of the device, and a row writer
takes each finished row while the next computes: the running sums are kept only for the rows
still open, and every pyramid level's tiles are encoded as their rows arrive (`MaskPyramid`),
so memory stays flat as the slide grows and little is left to do after the last window.
Per slide, in <slide name>/:
mask.tif (a tiled pyramidal TIFF of class indices, each further level half the size),
overlay.png (thumbnail with the mask blended and a legend), areas.csv / areas.json (per class:
pixels, mm^2 when the slide states its resolution, share of the tissue) and regions.geojson
(one MultiPolygon per class in level-0 pixel coordinates, QuPath's `classification` property,
simplified by `geojson_tolerance` px). A killed run restarts where it stopped: each finished row
of windows is recorded (progress.npz, written then renamed; the mask's rows so far in a raw
file) and every output appears under its final name only when complete. The inputs are
checked (every slide opens and holds a window) and a workdir holding another model's
predictions refused before anything is written; unreadable tiles are skipped and listed.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from wsss_jax.data import folders, mask_files, slides, transforms
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.models.segmentation import MRN
from wsss_jax.outputs import overlays, polygons
from wsss_jax.outputs.mask_pyramid import RAW_FILE, MaskPyramid
from wsss_jax.tasks.common import prepare_images
from wsss_jax.tasks.segment import gate as apply_gate, load_gate_classifier
from wsss_jax.train import earlier_runs
from wsss_jax.train.progress import Progress
from wsss_jax.train.run_record import write_config
from wsss_jax.train.writers import MetricWriter

MODES = ("auto", "tiles", "slides")
GATES = ("off", "exclude")
TILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
SLIDE_ONLY = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn")


# --- Inputs --------------------------------------------------------------------------------------------
def find_inputs(path: str, mode: str) -> tuple[str, list[str]]:
  """(tiles or slides, the files): a file is one slide; a folder's PNG/JPEG/BMP images are tiles
  and its TIFF/SVS/... files slides (mode=auto takes the slides when there are any)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(path):
    return "slides" if mode != "tiles" else "tiles", [path]
  if not os.path.isdir(path):
    raise UserError(f"input={path}: no such file or folder")
  names = sorted(n for n in os.listdir(path) if not n.startswith("."))
  tiles = [os.path.join(path, n) for n in names if n.lower().endswith(TILE_EXTENSIONS)]
  slide_files = [os.path.join(path, n) for n in names if n.lower().endswith(SLIDE_ONLY)]
  chosen = mode if mode != "auto" else ("slides" if slide_files else "tiles")
  files = slide_files if chosen == "slides" else tiles
  if chosen == "slides" and not files:  # PNG/JPEG files taken as (small) slides when asked
    files = tiles
  if not files:
    raise UserError(f"input={path} holds no {'slides' if chosen == 'slides' else 'images'} "
                    f"({', '.join(SLIDE_ONLY if chosen == 'slides' else TILE_EXTENSIONS)})")
  return chosen, files


def hann_weights(size: int) -> np.ndarray:
  """(size, size) separable Hann window sin^2(pi (i + 0.5) / size): positive everywhere, 1 at the
  centre, near 0 at the border, so overlapping windows blend without seams."""
  w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
  return np.outer(w, w).astype(np.float32)


# --- The model -----------------------------------------------------------------------------------------
def make_probabilities(seg: earlier_runs.Segmenter, data, mesh):
  """Jitted uint8 (B, s, s, 3) at the model's input size (and, for MRN, their contexts) ->
  (B, s, s, K') class probabilities."""
  model, variables = seg.model, seg.variables

  @jax.jit
  def probabilities(images_u8, context_u8=None):
    context = None if context_u8 is None else prepare_images(context_u8, data, jnp.float32)
    logits = model.apply(variables, prepare_images(images_u8, data, jnp.float32),
                         context=context)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return probabilities


def run_batches(fn, images: np.ndarray, batch: int, mesh, contexts=None) -> np.ndarray:
  """`fn` over `images` (and MRN `contexts`) in batches of `batch` (the last padded), each batch
  split over the devices."""
  out = []
  for i in range(0, len(images), batch):
    parts = [images[i:i + batch]] + ([contexts[i:i + batch]] if contexts is not None else [])
    pad = batch - len(parts[0])
    if pad:
      parts = [np.concatenate([p, np.repeat(p[-1:], pad, 0)]) for p in parts]
    placed = [jax.device_put(p, parallel.batch_sharded(mesh)) for p in parts]
    out.append(np.asarray(parallel.to_host(fn(*placed)))[:batch - pad])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def mrn_tile_probabilities(fn, image: np.ndarray, size: int, scale: int, batch: int,
                           mesh) -> np.ndarray:
  """An MRN over a tile at its own resolution: windows of `size` covering it, each with its
  context (the scale x larger region around it, down-sampled), stitched (a later window
  overwrites the overlap, as the segment phase's test does)."""
  h, w = image.shape[:2]
  starts = [(y, x) for y in transforms.window_starts(h, size)
            for x in transforms.window_starts(w, size)]
  pairs = [transforms.cut_pair({"image": image}, y + size // 2, x + size // 2, size, scale)
           for y, x in starts]
  probs = run_batches(fn, np.stack([p["image"] for p in pairs]), batch, mesh,
                      np.stack([p["context"] for p in pairs]))
  out = np.zeros((h, w, probs.shape[-1]), np.float32)
  for p, (y, x) in zip(probs, starts):
    out[y:y + size, x:x + size] = p[:h - y, :w - x]
  return out


def resize_probabilities(probs: np.ndarray, height: int, width: int) -> np.ndarray:
  """(s, s, K) -> (height, width, K), bilinear."""
  return np.asarray(jax.image.resize(jnp.asarray(probs), (height, width, probs.shape[-1]),
                                     "bilinear"))


# --- Tiles ---------------------------------------------------------------------------------------------
def _read_tile(path: str):
  """The tile's pixels, or the one-line reason it cannot be read."""
  try:
    return folders.read_image(path)
  except UserError as e:
    return str(e)


def predict_tiles(config, workdir, files, fn, ctx) -> dict:
  size, mesh = ctx["input_size"], ctx["mesh"]
  mask_dir = os.path.join(workdir, "masks")
  prob_dir = os.path.join(workdir, "probabilities")
  os.makedirs(mask_dir, exist_ok=True)
  if config.save_probabilities:
    os.makedirs(prob_dir, exist_ok=True)
  stems = [mask_files.file_stem(os.path.splitext(os.path.basename(f))[0]) for f in files]
  todo = [(f, s) for f, s in zip(files, stems)
          if not os.path.exists(os.path.join(mask_dir, s + ".png"))]  # resumed: done ones kept
  progress = Progress("predict tiles", len(files), config.progress_every_s)
  done = len(files) - len(todo)
  progress.update(done)  # starts the clock
  shown, unreadable = [], []
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
  record = open(os.path.join(workdir, "tiles.jsonl"), "a", encoding="utf-8")
  started = time.perf_counter()
  try:
    chunks = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    reading = pool.map(lambda c: [_read_tile(f) for f, _ in c], chunks)
    for chunk, images in zip(chunks, reading):
      unreadable += [(path, why) for (path, _), why in zip(chunk, images) if isinstance(why, str)]
      done += len(chunk)
      chunk = [c for c, im in zip(chunk, images) if not isinstance(im, str)]
      images = [im for im in images if not isinstance(im, str)]
      if not chunk:
        progress.update(done)
        continue
      inputs = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                         for im in images])
      if not ctx["mrn"]:
        probs = run_batches(fn, inputs, config.batch_size, mesh)
      scores = ctx["gate_scores"](inputs) if ctx["gate_scores"] else None
      for j, ((path, stem), image) in enumerate(zip(chunk, images)):
        p = (mrn_tile_probabilities(fn, image, size, ctx["mrn"], config.batch_size, mesh)
             if ctx["mrn"] else resize_probabilities(probs[j], *image.shape[:2]))
        logp = np.log(np.maximum(p, 1e-12))
        if scores is not None:
          logp = np.asarray(apply_gate(jnp.asarray(logp[None]), jnp.asarray(scores[j:j + 1]),
                                       "exclude", ctx["epsilon"]))[0]
        mask = np.argmax(logp, -1).astype(np.uint8)
        if config.save_probabilities:
          tmp = os.path.join(prob_dir, stem + ".tmp.npz")
          np.savez_compressed(tmp, probabilities=p.transpose(2, 0, 1).astype(np.float16))
          os.replace(tmp, os.path.join(prob_dir, stem + ".npz"))
        mask_files.write_mask(os.path.join(mask_dir, stem + ".png"), mask, ctx["palette"])
        shares = np.bincount(mask.ravel(), minlength=len(ctx["names"])) / mask.size
        row = {"tile": os.path.basename(path), "mask": f"masks/{stem}.png",
               "share": {n: round(float(v), 6) for n, v in zip(ctx["names"], shares)}}
        if scores is not None:
          row["gate_scores"] = {n: round(float(v), 6) for n, v in
                                zip(ctx["names"], scores[j])}
        record.write(json.dumps(row) + "\n")
        if len(shown) < config.overlays:
          shown.append((image, None, {"prediction": mask}))
      record.flush()
      progress.update(done)
  finally:
    record.close()
    pool.shutdown(wait=True)
  if unreadable:  # new data has the odd broken file: it is named, the others predicted
    listing = os.path.join(workdir, "unreadable_tiles.txt")
    with open(listing, "w", encoding="utf-8") as f:
      f.writelines(f"{why}\n" for _, why in unreadable)
    print(f"predict: {len(unreadable)} of {len(files)} tiles could not be read and have no "
          f"mask (listed in {listing})", flush=True)
  if shown:
    figure = overlays.mask_figure(shown, ctx["palette"], ctx["names"],
                                  f"predict: segmenter {ctx['model_name']} on {len(files)} tiles")
    overlays.save(os.path.join(workdir, "overlays", "predict.png"), figure)
    ctx["figures"].append(("predict/tiles", figure))
  return {"mode": "tiles", "num_tiles": len(files), "predicted_now": len(todo) - len(unreadable),
          "unreadable": [os.path.basename(p) for p, _ in unreadable],
          "seconds": time.perf_counter() - started}


# --- Slides --------------------------------------------------------------------------------------------
def slide_microns_per_pixel(path: str) -> float | None:
  """Level-0 pixel size from the TIFF resolution tags (or an SVS description's MPP), or None."""
  try:
    import tifffile
    with tifffile.TiffFile(path) as tif:
      page = tif.pages[0]
      desc = page.description or ""
      if "MPP" in desc:
        for part in desc.split("|"):
          if part.strip().startswith("MPP"):
            return float(part.split("=")[1])
      tags = page.tags
      if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit = num / den if den else 0
        if per_unit > 0 and unit in (2, 3):
          return (25400.0 if unit == 2 else 10000.0) / per_unit
  except Exception:  # noqa: BLE001 - any non-TIFF or unreadable tag: no resolution
    return None
  return None


def _save_progress(path: str, **arrays) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def predict_slide(config, workdir, path, fn, ctx) -> dict:
  """One slide (see the module docstring); returns its summary."""
  win, k, mesh = ctx["input_size"], ctx["num_outputs"], ctx["mesh"]
  background = ctx["background_index"]
  name = mask_files.file_stem(os.path.splitext(os.path.basename(path))[0])
  out = os.path.join(workdir, name)
  os.makedirs(out, exist_ok=True)
  if os.path.exists(os.path.join(out, "areas.json")):
    print(f"predict {name}: finished before; kept", flush=True)
    with open(os.path.join(out, "areas.json"), encoding="utf-8") as f:
      return json.load(f)
  slide = slides.Slide(path)
  height, width = slide.shape
  d = ctx["model_downsample"] * config.downsample    # level-0 px per model px
  hm, wm = math.ceil(height / d), math.ceil(width / d)
  stride = max(1, int(round(win * (1 - config.overlap))))
  ys, xs = transforms.window_starts(hm, win, stride), transforms.window_starts(wm, win, stride)
  weights = hann_weights(win)
  progress_path = os.path.join(out, "progress.npz")
  # rows in a raw file without a progress record are redone
  resume = os.path.exists(progress_path) and os.path.exists(os.path.join(out, RAW_FILE))
  acc = np.zeros((win, wm, k), np.float32)      # open rows: running sums and weights
  wsum = np.zeros((win, wm), np.float32)
  counts = np.zeros(max(k, background + 1), np.int64)
  first_row, level0_rows = 0, 0
  if resume:
    saved = np.load(progress_path)
    first_row, counts, level0_rows = (int(saved["rows_done"]), saved["counts"],
                                      int(saved["level0_rows"]))
    acc[:saved["acc"].shape[0]], wsum[:saved["wsum"].shape[0]] = saved["acc"], saved["wsum"]
    print(f"predict {name}: resuming at window row {first_row + 1} of {len(ys)}", flush=True)
  pyramid = MaskPyramid(out, height, width, config.tiff_tile, ctx["palette"],
                        ctx.get("view_side", 2048), resume_rows=level0_rows)
  min_tissue = ctx["min_tissue"]
  share = (slides.tissue_shares(slide, ((y * d, x * d) for y in ys for x in xs), win * d)
           if min_tissue > 0 else np.ones(len(ys) * len(xs)))
  keep = (share >= min_tissue).reshape(len(ys), len(xs))   # [window row, window column]
  columns = np.minimum((np.arange(width) / d).astype(np.int64), wm - 1)
  progress = Progress(f"predict {name}", len(ys) * len(xs), config.progress_every_s)
  progress.update(first_row * len(xs))  # starts the clock
  # wall time the main thread spends waiting for a row's reads (they run ahead in a thread),
  # computing, handing finished rows to the row writer (and waiting for the one before), and
  # finishing the outputs (copying the encoded tiles into the TIFF, GeoJSON, overlay)
  timing = {"read_wait": 0.0, "compute": 0.0, "write": 0.0, "finish": 0.0}
  started = time.perf_counter()

  def read_row(i):
    """Row i's windows, and for MRN each window's context (same centre, side x scale)."""
    origins = [(int(round(ys[i] * d)), int(round(x * d))) for x, k in zip(xs, keep[i]) if k]
    targets = [slide.read_region(top, left, win, d) for top, left in origins]
    if not ctx["mrn"]:
      return targets, None
    dc, shift = d * ctx["mrn"], win * d * (ctx["mrn"] - 1) / 2
    return targets, [slide.read_region(int(round(top - shift)), int(round(left - shift)), win,
                                       dc) for top, left in origins]

  def finish_rows(done_acc, done_wsum, y, n, rows_done, open_acc, open_wsum):
    """Labels of finished model rows -> level-0 mask rows, class counts, progress record."""
    labels = np.where(done_wsum > 0, np.argmax(done_acc, -1), background).astype(np.uint8)
    r0, r1 = int(math.ceil(y * d)), min(height, int(math.ceil((y + n) * d)))
    rows = np.minimum(((np.arange(r0, r1) / d) - y).astype(np.int64), n - 1)
    level0 = labels[rows][:, columns]
    pyramid.add_rows(r0, level0)  # raw rows for a resume; every level's tiles encoded
    counts[:] += np.bincount(level0.ravel(), minlength=len(counts))[:len(counts)]
    _save_progress(progress_path, rows_done=rows_done, counts=counts, acc=open_acc,
                   wsum=open_wsum, level0_rows=r1)

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
  row_writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  finishing = None
  # for the overlay, read while rows compute
  thumbnail = pool.submit(slide.thumbnail, ctx.get("thumbnail_side", 1024))
  try:
    pending = pool.submit(read_row, first_row) if first_row < len(ys) else None
    for i in range(first_row, len(ys)):
      y = ys[i]
      t0 = time.perf_counter()
      tiles, contexts = pending.result()
      timing["read_wait"] += time.perf_counter() - t0
      pending = pool.submit(read_row, i + 1) if i + 1 < len(ys) else None  # read ahead
      t0 = time.perf_counter()
      if tiles:
        probs = run_batches(fn, np.stack(tiles), config.batch_size, mesh,
                            np.stack(contexts) if contexts else None)
        for p, x in zip(probs, [x for x, k in zip(xs, keep[i]) if k]):
          acc[:, x:x + win] += p * weights[..., None]
          wsum[:, x:x + win] += weights
      timing["compute"] += time.perf_counter() - t0
      t0 = time.perf_counter()
      end = ys[i + 1] if i + 1 < len(ys) else hm   # model rows no later window touches
      n = min(end - y, win)
      done_acc, done_wsum = acc[:n], wsum[:n]
      acc = np.concatenate([acc[n:], np.zeros((n, wm, k), np.float32)])  # slide the open rows
      wsum = np.concatenate([wsum[n:], np.zeros((n, wm), np.float32)])
      if finishing is not None:
        finishing.result()  # one row in flight: its failure surfaces here
      # the finished rows are written by the row writer while the next row computes
      finishing = row_writer.submit(finish_rows, done_acc, done_wsum, y, n, i + 1, acc.copy(),
                                    wsum.copy())
      timing["write"] += time.perf_counter() - t0
      progress.update((i + 1) * len(xs))
    if finishing is not None:
      finishing.result()
  except BaseException:
    pyramid.release()  # its raw rows stay for the next run to resume from
    raise
  finally:
    pool.shutdown(wait=True)
    row_writer.shutdown(wait=True)
  t0 = time.perf_counter()
  pyramid.close(os.path.join(out, "mask.tif"))
  summary = finish_slide(config, out, name, path, thumbnail.result()[0], pyramid, counts, ctx)
  timing["finish"] += time.perf_counter() - t0
  os.remove(progress_path)
  slide.close()
  total = time.perf_counter() - started
  computed = int(keep.sum())
  summary |= {"windows": int(keep.size), "windows_computed": computed,
              "windows_per_sec": computed / max(timing["compute"], 1e-9),
              "megapixels_per_sec": height * width / 1e6 / max(total, 1e-9),
              "seconds": total, "time_share": {k: v / max(total, 1e-9) for k, v in
                                               timing.items()}}
  with open(os.path.join(out, "areas.json.tmp"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  os.replace(os.path.join(out, "areas.json.tmp"), os.path.join(out, "areas.json"))
  return summary


def finish_slide(config, out, name, path, thumb, pyramid, counts, ctx) -> dict:
  """overlay.png, areas.csv and regions.geojson of a predicted slide; its summary."""
  names, background = ctx["names"], ctx["background_index"]
  mpp = slide_microns_per_pixel(path)
  total = int(counts.sum())
  tissue = total - int(counts[background]) if background < len(counts) else total
  areas = []
  for index, n in enumerate(names):
    pixels = int(counts[index]) if index < len(counts) else 0
    areas.append({"class": n, "pixels": pixels,
                  "mm2": pixels * (mpp / 1000) ** 2 if mpp else None,
                  "share_of_slide": pixels / total if total else None,
                  # tissue maps: the classes' shares of the tissue (background = glass)
                  "share_of_tissue": (pixels / tissue if tissue and index != background
                                      and ctx["setting"] == "tissue" else None)})
  with open(os.path.join(out, "areas.csv.tmp"), "w", encoding="utf-8") as f:
    f.write("class,pixels,mm2,share_of_slide,share_of_tissue\n")
    for a in areas:
      cells = ["" if a[key] is None else f"{a[key]:.6f}"
               for key in ("mm2", "share_of_slide", "share_of_tissue")]
      f.write(f"{a['class']},{a['pixels']}," + ",".join(cells) + "\n")
  os.replace(os.path.join(out, "areas.csv.tmp"), os.path.join(out, "areas.csv"))
  # GeoJSON and the overlay from the pyramid's view (at most 2048 px on its longer side), the
  # two at once: tracing and PNG compression are mostly outside the interpreter lock
  step, small = pyramid.view_step, pyramid.view
  colours = np.asarray(ctx["palette"], np.uint8).reshape(-1, 3)

  def write_regions():
    regions = polygons.feature_collection(small, names, background, scale=step,
                                          tolerance=config.geojson_tolerance, colours=colours)
    with open(os.path.join(out, "regions.geojson.tmp"), "w", encoding="utf-8") as f:
      f.write(json.dumps(regions))  # json.dumps runs the C encoder; json.dump does not
    os.replace(os.path.join(out, "regions.geojson.tmp"), os.path.join(out, "regions.geojson"))

  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    regions = pool.submit(write_regions)
    th, tw = thumb.shape[:2]
    shown = np.asarray(Image.fromarray(small).resize((tw, th), Image.NEAREST))
    legend = [(n, colours[i]) for i, n in enumerate(names) if i != background]
    figure = overlays.grid_figure(
        [[thumb, overlays.blend(thumb, shown, ctx["palette"], background)]],
        ["slide", "prediction"], f"{name}: segmenter {ctx['model_name']}", legend)
    overlays.save(os.path.join(out, "overlay.png"), figure)
    ctx["figures"].append((f"predict/{name}", figure))
    regions.result()
  return {"slide": path, "name": name, "shape": [pyramid.height, pyramid.width],
          "microns_per_pixel": mpp,
          "areas": areas, "outputs": ["mask.tif", "overlay.png", "areas.csv", "areas.json",
                                      "regions.geojson"]}


# --- The run -------------------------------------------------------------------------------------------
def validate(config) -> None:
  if not config.input:
    raise UserError("input= is required: a folder of images, a slide, or a folder of slides")
  if config.mode not in MODES:
    raise UserError(f"mode={config.mode!r} is not one of {MODES}")
  if config.gate not in GATES:
    raise UserError(f"gate={config.gate!r} is not one of {GATES}")
  if not 0 <= config.overlap < 1:
    raise UserError(f"overlap={config.overlap} must lie in [0, 1)")
  if config.batch_size <= 0 or config.downsample <= 0:
    raise UserError("batch_size and downsample must be positive")


def _gate_scores(seg, config, mesh):
  """uint8 inputs -> the segment run's gate classifier's probabilities, or None."""
  if config.gate == "off":
    return None
  classifier = load_gate_classifier(ml_collections.ConfigDict(seg.config), mesh)
  if classifier is None:
    return None
  size = classifier["image_size"]

  def scores(inputs):
    resized = np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR))
                        for x in inputs])
    return np.asarray(classifier["predict"](jnp.asarray(resized)))
  return scores


MODEL_RECORD = "model.json"


def check_slides(files: list[str], ctx: dict, config) -> None:
  """Every slide opens and holds one window at least, before anything is written."""
  win = ctx["input_size"]
  side = win * ctx["model_downsample"] * config.downsample   # a window in level-0 px
  for path in files:
    slide = slides.Slide(path)  # an unreadable slide is named in one line
    height, width = slide.shape
    slide.close()
    if min(height, width) < side:
      raise UserError(f"slide {path} is {width} x {height} px, smaller than one window "
                      f"({win} model px = {side:.0f} slide px): predict it with mode=tiles "
                      f"(resized to the model's input) or a smaller downsample")


def accept_workdir(config, workdir: str, seg: earlier_runs.Segmenter) -> None:
  """Refuses a workdir holding predictions of another model (a resumed run would mix the two);
  otherwise records this run (config.json, and the model it uses)."""
  record = {"model": os.path.abspath(seg.workdir), "step": int(seg.step)}
  path = os.path.join(workdir, MODEL_RECORD)
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        found = json.load(f)
    except (OSError, ValueError):
      found = {"model": "an unreadable record", "step": "?"}
    if found != record:
      raise UserError(f"--workdir={workdir} holds predictions of the segment run "
                      f"{found.get('model')} (step {found.get('step')}); this run uses "
                      f"{record['model']} (step {record['step']}): use another --workdir")
  write_config(config, workdir)
  if parallel.is_main_process():
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(record, f)
    os.replace(path + ".tmp", path)


def run(config, workdir: str) -> dict:
  validate(config)
  mesh = parallel.mesh_from_config(config)
  parallel.check_batch_size(config.batch_size, mesh)
  seg = earlier_runs.load_segmenter(config.model_workdir, mesh, field="model")
  data = ml_collections.ConfigDict(seg.config["data"])
  k = int(data.num_classes)
  outputs = int(seg.meta["num_classes"])
  names = list(data.class_names) + ["background"]
  palette_name = folders.resolve(data, "palette", seg.config.get("palette", ""))
  palette = mask_files.palette_bytes(palette_name, k + 1)
  mode, files = find_inputs(config.input, config.mode)
  ctx = {"mesh": mesh, "input_size": int(data.image_size), "figures": [], "num_outputs": outputs,
         "background_index": k, "names": names, "palette": palette,
         "model_name": seg.config["model"]["name"], "epsilon": seg.config["gate"]["epsilon"],
         "setting": folders.resolve(data, "setting"),
         # DeepLabV3+ saw whole tiles resized to its input; MRN pairs at the tiles' resolution
         "mrn": int(data.get("context_scale", 2)) if isinstance(seg.model, MRN) else 0,
         "model_downsample": (1.0 if isinstance(seg.model, MRN) else
                              float(data.get("tile_size", data.image_size)) / data.image_size),
         "gate_scores": _gate_scores(seg, config, mesh) if mode == "tiles" else None,
         # the tissue mask reads H&E colour: findings on grey images (ultrasound, X-ray,
         # fluorescence) compute every window unless a share is given
         "min_tissue": (config.min_tissue if config.min_tissue >= 0 else
                        0.1 if folders.resolve(data, "setting") == "tissue" else 0.0)}
  if mode == "slides":
    check_slides(files, ctx, config)
  accept_workdir(config, workdir, seg)  # nothing is written before this point
  fn = make_probabilities(seg, data, mesh)
  print(f"predict: {len(files)} {mode} with the segment run {seg.workdir} (step {seg.step})",
        flush=True)
  if mode == "tiles":
    result = predict_tiles(config, workdir, files, fn, ctx)
  else:
    result = {"mode": "slides", "slides": [predict_slide(config, workdir, f, fn, ctx)
                                           for f in files]}
  summary = {"phase": "predict", "model": seg.workdir, "model_step": seg.step,
             "input": os.path.abspath(config.input), "class_names": names, **result}
  writer = MetricWriter(workdir, parallel.is_main_process())
  for tag, figure in ctx["figures"]:  # the overlays in TensorBoard too
    writer.image(tag, seg.step, figure)
  writer.summary(summary)
  writer.close()
  return summary
