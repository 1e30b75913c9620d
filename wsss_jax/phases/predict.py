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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tifffile
from PIL import Image

from wsss_jax import atomic
from wsss_jax.data import dicom, folders, intensity, mask_files, slides, transforms
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.models.segmentation import MRN
from wsss_jax.outputs import overlays, polygons
from wsss_jax.outputs.mask_pyramid import RAW_FILE, MaskPyramid
from wsss_jax.tasks.common import prepare_images
from wsss_jax.tasks.segment import gate as apply_gate, load_gate_classifier
from wsss_jax.train import earlier_runs, preemption
from wsss_jax.train.progress import Progress
from wsss_jax.train.run_record import write_config
from wsss_jax.train.writers import MetricWriter

MODES = ("auto", "tiles", "slides")
GATES = ("off", "exclude")
TILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp") + intensity.DICOM_EXTENSIONS
TIFF_EXTENSIONS = (".tif", ".tiff")
SLIDE_ONLY = TIFF_EXTENSIONS + (".svs", ".ndpi", ".mrxs", ".scn")
UNTILED_SLIDE_SIDE = 8192  # an untiled TIFF this long on a side is a slide (a scanner's export)


# --- Inputs --------------------------------------------------------------------------------------------
def tiff_is_slide(path: str) -> bool | None:
  """Whether a TIFF is a whole-slide image: tiled or pyramidal, as scanners write them, or
  untiled but very large; a microscope's field of view or a tile cut from a slide is not.
  None where the header cannot be read."""
  try:
    with tifffile.TiffFile(path) as tif:
      page, levels = tif.pages[0], len(tif.series[0].levels)
      return bool(page.is_tiled or levels > 1 or max(page.shape[:2]) >= UNTILED_SLIDE_SIDE)
  except Exception:  # any malformed file: the caller names it where it is predicted
    return None


def find_inputs(path: str, mode: str) -> tuple[str, list[str]]:
  """(tiles or slides, the files): a file is one slide; in a folder, PNG/JPEG/BMP/DICOM images
  and TIFFs that are not whole-slide images (`tiff_is_slide`) are tiles, SVS/NDPI/... files
  and whole-slide TIFFs slides (mode=auto takes the slides when there are any)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(path):
    dicom_file = path.lower().endswith(intensity.DICOM_EXTENSIONS)
    return "tiles" if mode == "tiles" or dicom_file else "slides", [path]
  if not os.path.isdir(path):
    raise UserError(f"input={path}: no such file or folder")
  names = sorted(n for n in os.listdir(path) if not n.startswith("."))
  tiles = [os.path.join(path, n) for n in names
           if n.lower().endswith(TILE_EXTENSIONS + TIFF_EXTENSIONS)]
  slide_files = [os.path.join(path, n) for n in names if n.lower().endswith(SLIDE_ONLY)]
  if mode == "auto" and not any(tiff_is_slide(f) if f.lower().endswith(TIFF_EXTENSIONS)
                                 else True for f in slide_files):
    slide_files = []  # its TIFFs are fields of view (or unreadable, then listed as such): tiles
  chosen = mode if mode != "auto" else ("slides" if slide_files else "tiles")
  files = slide_files if chosen == "slides" else tiles
  if chosen == "slides" and not files:  # PNG/JPEG files taken as (small) slides when asked
    files = tiles
  if not files:
    kinds = SLIDE_ONLY if chosen == "slides" else TILE_EXTENSIONS + TIFF_EXTENSIONS
    raise UserError(f"input={path} holds no {'slides' if chosen == 'slides' else 'images'} "
                    f"({', '.join(kinds)})")
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


def mrn_tile_probabilities(model: "Predictor", image: np.ndarray, batch: int) -> np.ndarray:
  """An MRN over a tile at its own resolution: windows of the input size covering it, each with
  its context, stitched as the segment phase's test does (transforms.stitch_windows)."""
  windows = transforms.context_windows(image, model.input_size, model.mrn)
  probs = run_batches(model.fn, windows.targets, batch, model.mesh, windows.contexts)
  return transforms.stitch_windows(probs, windows.starts, image.shape[:2])


def resize_probabilities(probs: np.ndarray, height: int, width: int) -> np.ndarray:
  """(s, s, K) -> (height, width, K), bilinear."""
  return np.asarray(jax.image.resize(jnp.asarray(probs), (height, width, probs.shape[-1]),
                                     "bilinear"))


# --- Tiles ---------------------------------------------------------------------------------------------
FRAMES = ("first", "all")
FRAME_MARK = "#frame="  # a multi-frame DICOM's frame k as a tile: "<path>#frame=<k>"


def expand_frames(files: list[str]) -> list[str]:
  """frames=all: each frame of a multi-frame DICOM (ultrasound cine) as a tile of its own."""
  out = []
  for path in files:
    frames = (dicom.num_frames(dicom.open_dataset(path, pixels=False))
              if path.lower().endswith(intensity.DICOM_EXTENSIONS) else 1)
    out += [path] if frames == 1 else [f"{path}{FRAME_MARK}{k}" for k in range(frames)]
  return out


def split_frame(entry: str) -> tuple[str, int | None]:
  path, mark, frame = entry.partition(FRAME_MARK)
  return path, (int(frame) if mark else None)


def tile_stem(entry: str) -> str:
  path, frame = split_frame(entry)
  stem = mask_files.file_stem(os.path.splitext(os.path.basename(path))[0])
  return stem if frame is None else f"{stem}_frame{frame:04d}"


def _read_tile(entry: str, rule: intensity.IntensityRule):
  """(the tile's 8-bit RGB pixels by the run's intensity rule, its pixel size in um or None),
  or the one-line reason it cannot be read."""
  path, frame = split_frame(entry)
  try:
    raw = intensity.read_raw(path) if frame is None else dicom.read(path, frame)
    return intensity.to_rgb8(raw, rule), raw.pixel_size_um
  except UserError as e:
    return str(e)


def predict_tiles(config, workdir: str, files: list, model: "Predictor",
                  stop: preemption.StopSignal) -> tuple[dict, list]:
  """masks/, probabilities/, tiles.jsonl and the overlay of a folder of tiles; (summary, figures).
  A SIGTERM / SIGINT stops it after the batch in hand (`Preempted`); the re-run does the rest."""
  mask_dir = os.path.join(workdir, "masks")
  os.makedirs(mask_dir, exist_ok=True)
  if config.save_probabilities:
    os.makedirs(os.path.join(workdir, "probabilities"), exist_ok=True)
  stems = [tile_stem(f) for f in files]
  todo = [(f, s) for f, s in zip(files, stems)
          if not os.path.exists(os.path.join(mask_dir, s + ".png"))]  # resumed: done ones kept
  progress = Progress("predict tiles", len(files), config.progress_every_s)
  done = len(files) - len(todo)
  progress.update(done)  # starts the clock
  shown, unreadable = [], []
  started = time.perf_counter()
  chunks = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool, \
       open(os.path.join(workdir, "tiles.jsonl"), "a", encoding="utf-8") as record:
    read = lambda c: [_read_tile(f, model.intensity) for f, _ in c]
    for chunk, images in zip(chunks, pool.map(read, chunks)):
      unreadable += [(path, why) for (path, _), why in zip(chunk, images) if isinstance(why, str)]
      done += len(chunk)
      readable = [(c, im) for c, im in zip(chunk, images) if not isinstance(im, str)]
      for row, image, mask in predict_chunk(config, workdir, readable, model):
        record.write(json.dumps(row) + "\n")
        if len(shown) < config.overlays:
          shown.append((image, None, {"prediction": mask}))
      record.flush()
      progress.update(done)
      if stop.reached(done) and done < len(files):
        raise preemption.Preempted(
            f"preempted (SIGTERM or SIGINT): stopped after {done} of {len(files)} tiles, their "
            f"masks written; run the same command again to predict the rest")
  report_unreadable(workdir, unreadable, len(files))
  figures = []
  if shown:
    title = (f"predict: segmenter {model.model_name}, {len(shown)} of "
             f"{len(files) - len(unreadable)} tiles")  # the unreadable ones have no mask
    figure = overlays.mask_figure(shown, model.palette, model.names, title)
    overlays.save(os.path.join(workdir, "overlays", "predict.png"), figure, title)
    figures.append(("predict/tiles", figure))
  return {"mode": "tiles", "num_tiles": len(files), "predicted_now": len(todo) - len(unreadable),
          "unreadable": [os.path.basename(p) for p, _ in unreadable],
          "seconds": time.perf_counter() - started}, figures


def predict_chunk(config, workdir: str, chunk: list, model: "Predictor"):
  """Yields (tiles.jsonl row, tile, mask) for each ((path, stem), tile) of a chunk, its mask
  (and probabilities) written."""
  if not chunk:
    return
  size = model.input_size
  inputs = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                     for _, (im, _) in chunk])
  if not model.mrn:
    probs = run_batches(model.fn, inputs, config.batch_size, model.mesh)
  scores = model.gate_scores(inputs) if model.gate_scores else None
  for j, ((path, stem), (image, pixel_um)) in enumerate(chunk):
    p = (mrn_tile_probabilities(model, image, config.batch_size) if model.mrn
         else resize_probabilities(probs[j], *image.shape[:2]))
    logp = np.log(np.maximum(p, 1e-12))
    if scores is not None:
      logp = np.asarray(apply_gate(jnp.asarray(logp[None]), jnp.asarray(scores[j:j + 1]),
                                   "exclude", model.epsilon))[0]
    mask = np.argmax(logp, -1).astype(np.uint8)
    if config.save_probabilities:
      with atomic.replacing(os.path.join(workdir, "probabilities", stem + ".npz")) as tmp:
        np.savez_compressed(tmp, probabilities=p.transpose(2, 0, 1).astype(np.float16))
    mask_files.write_mask(os.path.join(workdir, "masks", stem + ".png"), mask, model.palette)
    shares = np.bincount(mask.ravel(), minlength=len(model.names)) / mask.size
    row = {"tile": os.path.basename(path), "mask": f"masks/{stem}.png",
           "share": {n: round(float(v), 6) for n, v in zip(model.names, shares)}}
    row |= tile_records(workdir, path, stem, mask, pixel_um, model)
    if scores is not None:
      row["gate_scores"] = {n: round(float(v), 6) for n, v in zip(model.names, scores[j])}
    yield row, image, mask


def tile_records(workdir: str, entry: str, stem: str, mask: np.ndarray, pixel_um, model) -> dict:
  """Where the file records its pixel size, each class's area in mm^2; for a DICOM image (or
  one of its frames), a DICOM Segmentation over it (segmentations/<stem>.dcm) that a DICOM
  viewer overlays."""
  out, (path, frame) = {}, split_frame(entry)
  if pixel_um is not None:
    counts = np.bincount(mask.ravel(), minlength=len(model.names))
    out["area_mm2"] = {n: round(float(c) * pixel_um[0] * pixel_um[1] * 1e-6, 6)
                       for n, c in zip(model.names, counts)}
  if path.lower().endswith(intensity.DICOM_EXTENSIONS) and (
      mask != model.background_index).any():  # a normal image has no segment to store
    target = os.path.join(workdir, "segmentations", stem + ".dcm")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with atomic.replacing(target) as tmp:
      dicom.write_segmentation(path, mask, model.names, model.background_index, tmp,
                               frame or 0)
    out["segmentation"] = f"segmentations/{stem}.dcm"
  return out


def report_unreadable(workdir: str, unreadable: list, total: int) -> None:
  """New data has the odd broken file: it is named in unreadable_tiles.txt, the others predicted."""
  if not unreadable:
    return
  listing = os.path.join(workdir, "unreadable_tiles.txt")
  atomic.write_text(listing, "".join(f"{why}\n" for _, why in unreadable))
  print(f"predict: {len(unreadable)} of {total} tiles could not be read and have no "
        f"mask (listed in {listing})", flush=True)


# --- Slides --------------------------------------------------------------------------------------------
def slide_microns_per_pixel(path: str) -> float | None:
  """Level-0 pixel size from the TIFF resolution tags (or an SVS description's MPP), or None."""
  try:
    with tifffile.TiffFile(path) as tif:
      page = tif.pages[0]
      desc = page.description or ""
      if "MPP" in desc:
        for part in desc.split("|"):
          if part.strip().startswith("MPP"):
            return float(part.split("=")[1])
      size = intensity.tiff_pixel_size_um(tif)  # OME-XML, else the resolution tags
      return size[1] if size else None
  except Exception:  # noqa: BLE001 - any non-TIFF or unreadable tag: no resolution
    return None
  return None


class WindowPlan(NamedTuple):
  """Where a slide's windows lie: model px = `d` level-0 px; rows of windows start at `ys`."""
  d: float
  height: int               # level-0 px
  width: int
  hm: int                   # model px
  wm: int
  win: int
  ys: list
  xs: list
  keep: np.ndarray          # [window row, window column]: enough tissue to compute
  columns: np.ndarray       # level-0 column -> model column

  def row_origins(self, i: int) -> list:
    """Level-0 (top, left) of row i's computed windows."""
    return [(int(round(self.ys[i] * self.d)), int(round(x * self.d)))
            for x, k in zip(self.xs, self.keep[i]) if k]


def window_plan(slide, model: "Predictor", config) -> WindowPlan:
  height, width = slide.shape
  d = model.model_downsample * config.downsample    # level-0 px per model px
  win = model.input_size
  hm, wm = math.ceil(height / d), math.ceil(width / d)
  stride = max(1, int(round(win * (1 - config.overlap))))
  ys, xs = transforms.window_starts(hm, win, stride), transforms.window_starts(wm, win, stride)
  share = (slides.tissue_shares(slide, ((y * d, x * d) for y in ys for x in xs), win * d)
           if model.min_tissue > 0 else np.ones(len(ys) * len(xs)))
  keep = (share >= model.min_tissue).reshape(len(ys), len(xs))
  columns = np.minimum((np.arange(width) / d).astype(np.int64), wm - 1)
  return WindowPlan(d, height, width, hm, wm, win, ys, xs, keep, columns)


def read_row(slide, plan: WindowPlan, i: int, mrn: int):
  """Row i's windows, and for MRN each window's context (same centre, side x scale)."""
  origins = plan.row_origins(i)
  targets = [slide.read_region(top, left, plan.win, plan.d) for top, left in origins]
  if not mrn:
    return targets, None
  dc, shift = plan.d * mrn, plan.win * plan.d * (mrn - 1) / 2
  return targets, [slide.read_region(int(round(top - shift)), int(round(left - shift)),
                                     plan.win, dc) for top, left in origins]


class OpenRows:
  """The Hann-weighted running sums of the model rows that later windows still touch, the class
  counts so far, and their record in progress.npz (written then renamed) for a resume."""

  def __init__(self, plan: WindowPlan, num_outputs: int, background: int, progress_path: str):
    self.plan, self.background, self.path = plan, background, progress_path
    self.acc = np.zeros((plan.win, plan.wm, num_outputs), np.float32)
    self.wsum = np.zeros((plan.win, plan.wm), np.float32)
    self.counts = np.zeros(max(num_outputs, background + 1), np.int64)
    self.first_row = self.level0_rows = 0

  def resume(self) -> None:
    saved = np.load(self.path)
    self.first_row, self.counts = int(saved["rows_done"]), saved["counts"]
    self.level0_rows = int(saved["level0_rows"])
    self.acc[:saved["acc"].shape[0]] = saved["acc"]
    self.wsum[:saved["wsum"].shape[0]] = saved["wsum"]

  def add(self, probs, xs, weights) -> None:
    for p, x in zip(probs, xs):
      self.acc[:, x:x + self.plan.win] += p * weights[..., None]
      self.wsum[:, x:x + self.plan.win] += weights

  def pop(self, n: int) -> tuple:
    """The first n rows' sums, finished; the open rows slide up by n."""
    done = self.acc[:n], self.wsum[:n]
    self.acc = np.concatenate([self.acc[n:], np.zeros((n,) + self.acc.shape[1:], np.float32)])
    self.wsum = np.concatenate([self.wsum[n:], np.zeros((n, self.plan.wm), np.float32)])
    return done

  def finish(self, pyramid, done_acc, done_wsum, y, n, rows_done, open_acc, open_wsum) -> None:
    """Labels of finished model rows -> level-0 mask rows, class counts, progress record."""
    plan = self.plan
    labels = np.where(done_wsum > 0, np.argmax(done_acc, -1), self.background).astype(np.uint8)
    r0, r1 = int(math.ceil(y * plan.d)), min(plan.height, int(math.ceil((y + n) * plan.d)))
    rows = np.minimum(((np.arange(r0, r1) / plan.d) - y).astype(np.int64), n - 1)
    level0 = labels[rows][:, plan.columns]
    pyramid.add_rows(r0, level0)  # raw rows for a resume; every level's tiles encoded
    self.counts[:] += np.bincount(level0.ravel(), minlength=len(self.counts))[:len(self.counts)]
    with atomic.replacing(self.path) as tmp:
      np.savez(tmp, rows_done=rows_done, counts=self.counts, acc=open_acc, wsum=open_wsum,
               level0_rows=r1)


def predict_slide(config, workdir: str, path: str, model: "Predictor",
                  stop: preemption.StopSignal) -> tuple[dict, list]:
  """One slide (see the module docstring); (its summary, its figures)."""
  name = mask_files.file_stem(os.path.splitext(os.path.basename(path))[0])
  out = os.path.join(workdir, name)
  os.makedirs(out, exist_ok=True)
  if os.path.exists(os.path.join(out, "areas.json")):
    print(f"predict {name}: finished before; kept", flush=True)
    with open(os.path.join(out, "areas.json"), encoding="utf-8") as f:
      return json.load(f), []
  started = time.perf_counter()
  slide = slides.Slide(path, model.intensity)
  plan = window_plan(slide, model, config)
  rows = OpenRows(plan, model.num_outputs, model.background_index,
                  os.path.join(out, "progress.npz"))
  # rows in a raw file without a progress record are redone
  if os.path.exists(rows.path) and os.path.exists(os.path.join(out, RAW_FILE)):
    rows.resume()
    print(f"predict {name}: resuming at window row {rows.first_row + 1} of {len(plan.ys)}",
          flush=True)
  pyramid = MaskPyramid(out, plan.height, plan.width, config.tiff_tile, model.palette,
                        model.view_side, resume_rows=rows.level0_rows)
  timing, thumb = compute_rows(config, slide, plan, rows, pyramid, model, name, stop)
  t0 = time.perf_counter()
  pyramid.close(os.path.join(out, "mask.tif"))
  summary, figure = finish_slide(config, out, name, path, thumb, pyramid, rows.counts, model)
  timing["finish"] += time.perf_counter() - t0
  os.remove(rows.path)
  slide.close()
  total = time.perf_counter() - started
  computed = int(plan.keep.sum())
  summary |= {"windows": int(plan.keep.size), "windows_computed": computed,
              "windows_per_sec": computed / max(timing["compute"], 1e-9),
              "megapixels_per_sec": plan.height * plan.width / 1e6 / max(total, 1e-9),
              "seconds": total, "time_share": {k: v / max(total, 1e-9) for k, v in
                                               timing.items()}}
  atomic.write_json(os.path.join(out, "areas.json"), summary)
  return summary, [(f"predict/{name}", figure)]


def compute_rows(config, slide, plan: WindowPlan, rows: OpenRows, pyramid, model: "Predictor",
                 name: str, stop: preemption.StopSignal) -> tuple[dict, np.ndarray]:
  """Every row of windows from rows.first_row on: read ahead by a thread, computed, and handed
  to a row writer while the next computes; (wall time per activity, the slide's thumbnail).
  A SIGTERM / SIGINT stops it at a row boundary, the rows so far recorded for the re-run."""
  ys, xs, weights = plan.ys, plan.xs, hann_weights(plan.win)
  progress = Progress(f"predict {name}", len(ys) * len(xs), config.progress_every_s)
  progress.update(rows.first_row * len(xs))  # starts the clock
  # wall time the main thread spends waiting for a row's reads, computing, handing finished
  # rows to the row writer (and waiting for the one before), and finishing the outputs
  timing = {"read_wait": 0.0, "compute": 0.0, "write": 0.0, "finish": 0.0}
  finishing = None
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool, \
       concurrent.futures.ThreadPoolExecutor(max_workers=1) as row_writer:
    thumbnail = pool.submit(slide.thumbnail, model.thumbnail_side)  # read while rows compute
    try:
      pending = (pool.submit(read_row, slide, plan, rows.first_row, model.mrn)
                 if rows.first_row < len(ys) else None)
      for i in range(rows.first_row, len(ys)):
        t0 = time.perf_counter()
        tiles, contexts = pending.result()
        timing["read_wait"] += time.perf_counter() - t0
        if i + 1 < len(ys):  # read ahead
          pending = pool.submit(read_row, slide, plan, i + 1, model.mrn)
        t0 = time.perf_counter()
        if tiles:
          probs = run_batches(model.fn, np.stack(tiles), config.batch_size, model.mesh,
                              np.stack(contexts) if contexts else None)
          rows.add(probs, [x for x, k in zip(xs, plan.keep[i]) if k], weights)
        timing["compute"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        end = ys[i + 1] if i + 1 < len(ys) else plan.hm   # model rows no later window touches
        n = min(end - ys[i], plan.win)
        done_acc, done_wsum = rows.pop(n)
        if finishing is not None:
          finishing.result()  # one row in flight: its failure surfaces here
        finishing = row_writer.submit(rows.finish, pyramid, done_acc, done_wsum, ys[i], n, i + 1,
                                      rows.acc.copy(), rows.wsum.copy())
        timing["write"] += time.perf_counter() - t0
        progress.update((i + 1) * len(xs))
        if stop.reached(i) and i + 1 < len(ys):
          finishing.result()  # the row and its progress record are on disk
          raise preemption.Preempted(
              f"preempted (SIGTERM or SIGINT): slide {name} stopped after window row {i + 1} "
              f"of {len(ys)}; run the same command again to resume there")
      if finishing is not None:
        finishing.result()
    except BaseException:
      pyramid.release()  # its raw rows stay for the next run to resume from
      raise
    return timing, thumbnail.result()[0]


def finish_slide(config, out, name, path, thumb, pyramid, counts,
                 model: "Predictor") -> tuple[dict, np.ndarray]:
  """overlay.png, areas.csv and regions.geojson of a predicted slide; (its summary, overlay)."""
  names, background = model.names, model.background_index
  mpp = slide_microns_per_pixel(path)
  areas = class_areas(counts, names, background, mpp, model.setting)
  atomic.write_text(os.path.join(out, "areas.csv"), areas_csv(areas))
  # GeoJSON and the overlay from the pyramid's view (at most view_side px on its longer side),
  # the two at once: tracing and PNG compression are mostly outside the interpreter lock
  step, small = pyramid.view_step, pyramid.view
  colours = np.asarray(model.palette, np.uint8).reshape(-1, 3)

  def write_regions():
    regions = polygons.feature_collection(small, names, background, scale=step,
                                          tolerance=config.geojson_tolerance, colours=colours)
    atomic.write_json(os.path.join(out, "regions.geojson"), regions, indent=None)

  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    regions = pool.submit(write_regions)
    th, tw = thumb.shape[:2]
    shown = np.asarray(Image.fromarray(small).resize((tw, th), Image.NEAREST))
    legend = [(n, colours[i]) for i, n in enumerate(names) if i != background]
    title = f"{name}: segmenter {model.model_name}"
    figure = overlays.grid_figure(
        [[thumb, overlays.blend(thumb, shown, model.palette, background)]],
        ["slide", "prediction"], title, legend)
    overlays.save(os.path.join(out, "overlay.png"), figure, title)
    regions.result()
  return {"slide": path, "name": name, "shape": [pyramid.height, pyramid.width],
          "microns_per_pixel": mpp,
          "areas": areas, "outputs": ["mask.tif", "overlay.png", "areas.csv", "areas.json",
                                      "regions.geojson"]}, figure


def class_areas(counts, names: list, background: int, mpp: float | None, setting: str) -> list:
  """Per class: pixels, mm^2 (with a pixel size), share of the slide and of the tissue."""
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
                                      and setting == "tissue" else None)})
  return areas


def areas_csv(areas: list) -> str:
  lines = ["class,pixels,mm2,share_of_slide,share_of_tissue\n"]
  for a in areas:
    cells = ["" if a[key] is None else f"{a[key]:.6f}"
             for key in ("mm2", "share_of_slide", "share_of_tissue")]
    lines.append(f"{a['class']},{a['pixels']}," + ",".join(cells) + "\n")
  return "".join(lines)


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
  if config.frames not in FRAMES:
    raise UserError(f"frames={config.frames!r} is not one of {FRAMES}")
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


def check_slides(files: list[str], model: "Predictor", config) -> None:
  """Every slide opens and holds one window at least, before anything is written."""
  win = model.input_size
  side = win * model.model_downsample * config.downsample   # a window in level-0 px
  for path in files:
    slide = slides.Slide(path, model.intensity)  # an unreadable slide is named in one line
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
    atomic.write_json(path, record, indent=None)


class Predictor(NamedTuple):
  """A finished segmenter as predict applies it."""
  fn: Callable              # jitted uint8 windows (and MRN contexts) -> class probabilities
  mesh: Any
  input_size: int           # model px a side of one window
  num_outputs: int
  background_index: int
  names: list               # class names, background last
  palette: list
  model_name: str
  epsilon: float            # the gate's epsilon
  setting: str
  mrn: int                  # an MRN's context scale; 0 for DeepLabV3+
  model_downsample: float   # slide px per model px before config.downsample
  gate_scores: Callable | None
  min_tissue: float         # windows with less tissue are background
  view_side: int = 2048     # the GeoJSON's and overlay's view of the mask
  thumbnail_side: int = 1024
  # the segment run's data.intensity: new images mapped to its input as its own were
  intensity: intensity.IntensityRule = intensity.IntensityRule()


def predictor(seg: earlier_runs.Segmenter, config, mesh, mode: str) -> Predictor:
  data = folders.settle(ml_collections.ConfigDict(seg.config["data"]))
  k = int(data.num_classes)
  setting = data.setting
  palette_name = folders.resolve(data, "palette", seg.config.get("palette", folders.FROM_DATASET))
  mrn = isinstance(seg.model, MRN)
  return Predictor(
      fn=make_probabilities(seg, data, mesh), mesh=mesh, input_size=int(data.image_size),
      num_outputs=int(seg.meta["num_classes"]), background_index=k,
      names=list(data.class_names) + ["background"],
      palette=mask_files.palette_bytes(palette_name, k + 1),
      model_name=seg.config["model"]["name"], epsilon=seg.config["gate"]["epsilon"],
      setting=setting,
      # DeepLabV3+ saw whole tiles resized to its input; MRN pairs at the tiles' resolution
      mrn=int(data.get("context_scale", 2)) if mrn else 0,
      model_downsample=(1.0 if mrn else
                        float(data.get("tile_size", data.image_size)) / data.image_size),
      gate_scores=_gate_scores(seg, config, mesh) if mode == "tiles" else None,
      # the tissue mask reads H&E colour: findings on grey images (ultrasound, X-ray,
      # fluorescence) compute every window unless a share is given
      min_tissue=(config.min_tissue if config.min_tissue >= 0 else
                  0.1 if setting == "tissue" else 0.0),
      intensity=intensity.parse_rule(data.get("intensity", "auto")))


def run(config, workdir: str) -> dict:
  validate(config)
  mesh = parallel.mesh_from_config(config)
  parallel.check_batch_size(config.batch_size, mesh)
  seg = earlier_runs.load_segmenter(config.model_workdir, mesh, field="model")
  mode, files = find_inputs(config.input, config.mode)
  if mode == "tiles" and config.frames == "all":
    files = expand_frames(files)
  model = predictor(seg, config, mesh, mode)
  if mode == "slides":
    check_slides(files, model, config)
  accept_workdir(config, workdir, seg)  # nothing is written before this point
  print(f"predict: {len(files)} {mode} with the segment run {seg.workdir} (step {seg.step})",
        flush=True)
  with preemption.StopSignal() as stop:
    if mode == "tiles":
      result, figures = predict_tiles(config, workdir, files, model, stop)
    else:
      done = [predict_slide(config, workdir, f, model, stop) for f in files]
      result = {"mode": "slides", "slides": [summary for summary, _ in done]}
      figures = [figure for _, shown in done for figure in shown]
  summary = {"phase": "predict", "model": seg.workdir, "model_step": seg.step,
             "input": os.path.abspath(config.input), "class_names": model.names, **result}
  writer = MetricWriter(workdir, parallel.is_main_process())
  for tag, figure in figures:  # the overlays in TensorBoard too
    writer.image(tag, seg.step, figure)
  writer.summary(summary)
  writer.close()
  return summary
