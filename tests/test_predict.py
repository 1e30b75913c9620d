"""The predict phase on new tiles and on a pyramidal TIFF slide, with a real (tiny) segment run:
masks against the model applied directly, the pyramid, areas and GeoJSON against the mask, a
resumed run against an uninterrupted one; and the polygon tracer against hand-drawn cases."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tifffile
from conftest import load_config
from PIL import Image

from wsss_jax.data import synthetic, transforms
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.outputs import polygons
from wsss_jax.phases import predict
from wsss_jax.runner import run_phase
from wsss_jax.tasks.common import prepare_images
from wsss_jax.train import earlier_runs, preemption


# --- Polygons -------------------------------------------------------------------------------------------
def _area(coords) -> float:
  """Exterior area minus the holes' (shoelace)."""
  def ring_area(ring):
    r = np.asarray(ring)
    return abs(np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1])) / 2
  return sum(ring_area(p[0]) - sum(ring_area(h) for h in p[1:]) for p in coords)


def test_polygons_of_a_ring_with_a_hole_and_of_corner_touching_pixels():
  m = np.zeros((6, 6), bool)
  m[1:5, 1:5], m[2:4, 2:4] = True, False
  (poly,) = polygons.polygons(m)
  assert poly[0][0] == poly[0][-1] and poly[1][0] == poly[1][-1]  # closed rings
  assert set(map(tuple, poly[0])) == {(1, 1), (1, 5), (5, 5), (5, 1)}  # the exterior
  assert set(map(tuple, poly[1])) == {(2, 2), (2, 4), (4, 4), (4, 2)}  # the hole
  assert _area([poly]) == m.sum() == 12
  d = np.zeros((3, 3), bool)
  d[0, 0] = d[1, 1] = True  # 4-connectivity: two squares
  assert len(polygons.polygons(d)) == 2 and _area(polygons.polygons(d)) == 2


def test_polygon_areas_equal_the_pixel_counts_of_random_masks():
  rng = np.random.default_rng(0)
  for _ in range(5):
    m = rng.random((24, 31)) < 0.45
    assert _area(polygons.polygons(m)) == m.sum()
    assert _area(polygons.polygons(m, scale=4.0)) == 16 * m.sum()  # level-0 coordinates


def _rasterise(coords, h: int, w: int) -> np.ndarray:
  """Even-odd fill of every ring at the pixel centres (an independent point-in-polygon)."""
  yy, xx = np.mgrid[0:h, 0:w] + 0.5
  inside = np.zeros((h, w), bool)
  for ring in (np.asarray(r) for poly in coords for r in poly):
    for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]):
      if y0 != y1:
        inside ^= (yy > min(y0, y1)) & (yy < max(y0, y1)) & (xx < x0 + (x1 - x0) * (yy - y0) /
                                                              (y1 - y0))
  return inside


def test_rings_are_simple_and_rasterise_back_to_random_masks():
  from scipy import ndimage
  rng = np.random.default_rng(1)
  for _ in range(60):
    h, w = rng.integers(1, 20, 2)
    m = rng.random((h, w)) < rng.random()
    coords = polygons.polygons(m)
    np.testing.assert_array_equal(_rasterise(coords, h, w), m)
    assert len(coords) == ndimage.label(m)[1]  # one polygon per 4-connected region
    for ring in (r for poly in coords for r in poly):  # no ring touches itself
      assert len(set(map(tuple, ring[:-1]))) == len(ring) - 1


def test_corner_touching_holes_and_a_pinched_exterior_are_split_into_simple_rings():
  m = np.ones((5, 5), bool)
  m[1, 1] = m[2, 2] = False  # two holes meeting at one corner (8-connected background)
  (poly,) = polygons.polygons(m)
  assert len(poly) == 3 and _area([poly]) == 23
  assert sorted(len(r) for r in poly[1:]) == [5, 5]  # two unit squares, not one figure of 8
  u = np.array([[1, 1, 1, 0],
                [1, 0, 1, 0],
                [1, 1, 0, 1],   # the hole at (1, 1) reaches the outside through a corner
                [0, 0, 0, 0]], bool)
  u[2, 3] = False
  (poly,) = polygons.polygons(u)
  assert len(poly) == 2 and _area([poly]) == u.sum()  # an exterior and a hole touching it


def _douglas_peucker(points: np.ndarray, tolerance: float) -> list:
  """The recursive textbook version on an open polyline: indices kept."""
  a, b = points[0], points[-1]
  if len(points) < 3:
    return [0, len(points) - 1]
  ab = b - a
  d = np.abs(ab[0] * (points[1:-1, 1] - a[1]) - ab[1] * (points[1:-1, 0] - a[0]))
  d = d / (np.hypot(*ab) or 1.0)
  k = int(np.argmax(d)) + 1
  if d[k - 1] <= tolerance:
    return [0, len(points) - 1]
  left = _douglas_peucker(points[:k + 1], tolerance)
  right = _douglas_peucker(points[k:], tolerance)
  return left[:-1] + [k + i for i in right]


def test_simplify_rings_equals_the_recursive_douglas_peucker():
  rng = np.random.default_rng(3)
  rings = []
  for _ in range(20):
    r = np.cumsum(rng.normal(size=(int(rng.integers(6, 40)), 2)), 0)
    rings.append(np.concatenate([r, r[:1]]))
  for ring, got in zip(rings, polygons.simplify_rings(rings, 0.8)):
    far = int(np.argmax(np.hypot(*(ring[:-1] - ring[0]).T)))  # split at the far point first
    kept = _douglas_peucker(ring[:far + 1], 0.8)[:-1] + [
        far + i for i in _douglas_peucker(ring[far:], 0.8)]
    want = ring[kept] if len(kept) >= 4 else ring
    np.testing.assert_allclose(got, want)


def test_simplify_keeps_a_closed_ring_within_the_tolerance():
  y, x = np.mgrid[0:40, 0:40]
  disc = (y - 20) ** 2 + (x - 20) ** 2 < 15 ** 2
  full = polygons.polygons(disc)[0][0]
  coarse = polygons.polygons(disc, tolerance=1.0)[0][0]
  assert coarse[0] == coarse[-1] and 4 <= len(coarse) < len(full)
  assert abs(_area([[coarse]]) - disc.sum()) / disc.sum() < 0.05


# --- Inputs and windows ---------------------------------------------------------------------------
def test_hann_windows_and_window_starts():
  w = predict.hann_weights(8)
  assert w.shape == (8, 8) and (w > 0).all() and w.max() <= 1
  np.testing.assert_allclose(w, np.outer(np.sin(np.pi * (np.arange(8) + .5) / 8) ** 2,
                                         np.sin(np.pi * (np.arange(8) + .5) / 8) ** 2))
  assert transforms.window_starts(100, 32, 24) == [0, 24, 48, 68]
  assert transforms.window_starts(20, 32, 24) == [0]


def test_inputs_are_found_by_extension_and_a_folder_without_images_is_one_line(tmp_path):
  (tmp_path / "a.png").write_bytes(b"")
  (tmp_path / "notes.txt").write_text("x")
  assert predict.find_inputs(str(tmp_path), "auto") == ("tiles", [str(tmp_path / "a.png")])
  # a microscope's field of view (an untiled TIFF) is a tile; an unreadable one is listed with
  # the tiles (predict names it in unreadable_tiles.txt)
  tifffile.imwrite(tmp_path / "field.tif", np.zeros((160, 160), np.uint16))
  (tmp_path / "broken.tif").write_bytes(b"not a TIFF")
  fields = [str(tmp_path / n) for n in ("a.png", "broken.tif", "field.tif")]
  assert predict.find_inputs(str(tmp_path), "auto") == ("tiles", fields)
  # a scanner's slide (tiled, or untiled and very long) makes the folder's TIFFs slides
  tifffile.imwrite(tmp_path / "s.tif", np.zeros((256, 256, 3), np.uint8), tile=(64, 64))
  assert predict.find_inputs(str(tmp_path), "auto") == (
      "slides", [str(tmp_path / n) for n in ("broken.tif", "field.tif", "s.tif")])
  os.remove(tmp_path / "s.tif")
  tifffile.imwrite(tmp_path / "s.tif", np.zeros((8, predict.UNTILED_SLIDE_SIDE), np.uint8))
  assert predict.find_inputs(str(tmp_path), "auto")[0] == "slides"
  assert predict.find_inputs(str(tmp_path), "tiles")[1] == fields + [str(tmp_path / "s.tif")]
  (tmp_path / "s.svs").write_bytes(b"")
  os.remove(tmp_path / "s.tif")
  assert predict.find_inputs(str(tmp_path), "auto")[0] == "slides"  # SVS: always a slide
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(UserError, match="holds no images"):
    predict.find_inputs(str(empty), "auto")
  with pytest.raises(UserError, match="no such file"):
    predict.find_inputs(str(tmp_path / "missing"), "auto")


# --- The phase ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def segment_run(tiny_classifier, tmp_path_factory):
  """A tiny DeepLabV3+ trained on the ground truth (1/16 width, 32 px inputs of 48 px tiles)."""
  workdir = tmp_path_factory.mktemp("seg")
  config = load_config("segment", f"supervision=full,classifier={tiny_classifier},width=0.0625,"
                                  "image_size=32,batch=8,epochs=1,num_train=16")
  config.data.tile_size, config.data.num_val, config.data.num_test = 48, 4, 4
  config.data.num_threads, config.eval_batch_size = 1, 4
  config.log_every, config.checkpoint_every, config.async_checkpointing = 2, 100, False
  run_phase(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def mrn_run(tiny_classifier, tmp_path_factory):
  """A tiny MRN (32 px target and context windows of 48 px tiles) trained on the ground truth."""
  workdir = tmp_path_factory.mktemp("mrn")
  config = load_config("segment", f"supervision=full,classifier={tiny_classifier},model=mrn,"
                                  "width=0.0625,batch=8,epochs=1,num_train=16")
  config.data.pair_size = config.data.image_size = 32
  config.data.tile_size, config.data.num_val, config.data.num_test = 48, 4, 4
  config.data.num_threads, config.eval_batch_size = 1, 4
  config.log_every, config.checkpoint_every, config.async_checkpointing = 2, 100, False
  run_phase(config, str(workdir))
  return str(workdir)


@pytest.mark.parametrize("which", ["deeplab", "mrn"])
def test_tiles_get_the_masks_the_segment_phase_predicted_for_them(which, segment_run, mrn_run,
                                                                   tmp_path):
  """The segment phase kept its own test predictions (overlays/test.npz, gate off): predict on
  the same tiles as files gives the same masks, for DeepLabV3+ (resized tile) and MRN (windows
  with their context)."""
  run = segment_run if which == "deeplab" else mrn_run
  shown = np.load(os.path.join(run, "overlays", "test.npz"))
  folder = tmp_path / "tiles"
  folder.mkdir()
  for i, image in enumerate(shown["image"]):
    Image.fromarray(image).save(folder / f"t{i}.png")
  run_phase(_predict_config(run, str(folder), ",gate=off"), str(tmp_path / "out"))
  for i, want in enumerate(shown["prediction"]):
    got = np.asarray(Image.open(tmp_path / "out" / "masks" / f"t{i}.png"))
    agree = (got == want).mean()
    # the segment phase resizes with grain's transform and takes the argmax of resized logits,
    # predict resizes with PIL and takes it of resized probabilities: a few border pixels differ
    assert agree == 1.0 if which == "mrn" else agree > 0.98, (i, agree)


def test_an_mrn_slide_is_predicted_with_contexts(mrn_run, tmp_path):
  path, image = _slide(tmp_path / "slide.tif", rows=2, cols=2)
  summary = run_phase(_predict_config(mrn_run, path, ",min_tissue=0"), str(tmp_path / "out"))
  (only,) = summary["slides"]
  assert sum(a["pixels"] for a in only["areas"]) == image.shape[0] * image.shape[1]
  assert tifffile.imread(tmp_path / "out" / "slide" / "mask.tif").shape == image.shape[:2]


def _tiles(folder, n=5, size=48):
  folder.mkdir()
  for i in range(n):
    Image.fromarray(synthetic.generate_tile(11, "test", i, size)[0]).save(folder / f"t{i}.png")
  (folder / "README.txt").write_text("not an image")
  return str(folder)


def _predict_config(model, source, extra=""):
  config = load_config("predict", f"model={model},input={source},batch=4{extra}")
  config.progress_every_s = 0.0
  return config


def test_tiles_are_the_segmenter_applied_directly_and_a_rerun_resumes(segment_run, tmp_path):
  source = _tiles(tmp_path / "tiles")
  out = tmp_path / "pred"
  summary = run_phase(_predict_config(segment_run, source, ",gate=off,probs=True"), str(out))
  assert summary["num_tiles"] == 5 and summary["predicted_now"] == 5
  seg = earlier_runs.load_segmenter(segment_run, parallel.make_mesh(1))
  data = seg.config["data"]
  image = np.asarray(Image.open(os.path.join(source, "t2.png")))
  small = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR))
  cfg = ml_collections.ConfigDict(data)
  logits = seg.model.apply(seg.variables, prepare_images(jnp.asarray(small[None]), cfg,
                                                         jnp.float32))
  probs = jax.image.resize(jax.nn.softmax(logits[0]), (48, 48, logits.shape[-1]), "bilinear")
  want = np.argmax(np.asarray(probs), -1)
  got = np.asarray(Image.open(out / "masks" / "t2.png"))
  assert (got == want).mean() > 0.999
  saved = np.load(out / "probabilities" / "t2.npz")["probabilities"]
  assert saved.dtype == np.float16 and saved.shape == (logits.shape[-1], 48, 48)
  rows = [json.loads(l) for l in open(out / "tiles.jsonl")]
  assert {r["tile"] for r in rows} == {f"t{i}.png" for i in range(5)}
  assert Image.open(out / "overlays" / "predict.png").size[0] > 192
  events = b"".join(open(os.path.join(d, f), "rb").read()
                    for d, _, fs in os.walk(out / "tensorboard") for f in fs)
  assert b"predict/tiles" in events  # the overlay as a TensorBoard image too
  os.remove(out / "masks" / "t4.png")  # a killed run: one tile left
  again = run_phase(_predict_config(segment_run, source, ",gate=off"), str(out))
  assert again["predicted_now"] == 1


def _slide(path, rows=3, cols=3, tile=48):
  image = np.concatenate([np.concatenate([synthetic.generate_tile(13, "test", r * cols + c,
                                                                  tile)[0]
                                          for c in range(cols)], 1) for r in range(rows)], 0)
  tifffile.imwrite(path, image, tile=(64, 64), resolution=(1 / 0.5e-4, 1 / 0.5e-4),
                   resolutionunit=3)
  return str(path), image


def test_a_slide_gives_a_pyramid_areas_and_regions_that_agree(segment_run, tmp_path):
  path, image = _slide(tmp_path / "slide.tif")
  config = _predict_config(segment_run, path, ",overlap=0.5,min_tissue=0")
  config.tiff_tile = 16  # a pyramid even for this small slide
  config.geojson_tolerance = 0.0  # exact rings: their areas are the pixel counts
  summary = run_phase(config, str(tmp_path / "out"))["slides"][0]
  out = tmp_path / "out" / "slide"
  with tifffile.TiffFile(out / "mask.tif") as tif:
    levels = [level.asarray() for level in tif.series[0].levels]
  mask = levels[0]
  assert mask.shape == image.shape[:2] and len(levels) >= 3
  np.testing.assert_array_equal(levels[1], mask[::2, ::2])  # nearest, level by level
  areas = {a["class"]: a for a in summary["areas"]}
  counts = np.bincount(mask.ravel(), minlength=5)
  for index, name in enumerate(["TE", "NEC", "LYM", "TAS", "background"]):
    assert areas[name]["pixels"] == counts[index]
    assert areas[name]["mm2"] == pytest.approx(counts[index] * 0.0005 ** 2)
  regions = json.load(open(out / "regions.geojson"))
  names = ["TE", "NEC", "LYM", "TAS", "background"]
  for feature in regions["features"]:
    name = feature["properties"]["classification"]["name"]
    assert _area(feature["geometry"]["coordinates"]) == areas[name]["pixels"]
    np.testing.assert_array_equal(  # the polygons rasterise back to the class's pixels
        _rasterise(feature["geometry"]["coordinates"], *mask.shape), mask == names.index(name))
  assert not [p for p in os.listdir(out) if "tmp" in p or p.endswith(".u8")]


def test_a_killed_slide_run_resumes_to_the_same_mask(segment_run, tmp_path, monkeypatch):
  path, _ = _slide(tmp_path / "slide.tif")
  config = _predict_config(segment_run, path, ",overlap=0.5,min_tissue=0")
  run_phase(config, str(tmp_path / "whole"))
  calls = {"n": 0}
  real = predict.run_batches

  def dies_on_the_third_row(*args):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt  # as a kill between rows
    return real(*args)
  monkeypatch.setattr(predict, "run_batches", dies_on_the_third_row)
  with pytest.raises(KeyboardInterrupt):
    run_phase(config, str(tmp_path / "resumed"))
  assert os.path.exists(tmp_path / "resumed" / "slide" / "progress.npz")
  assert not os.path.exists(tmp_path / "resumed" / "slide" / "mask.tif")
  monkeypatch.setattr(predict, "run_batches", real)
  run_phase(config, str(tmp_path / "resumed"))
  whole = tifffile.imread(tmp_path / "whole" / "slide" / "mask.tif")
  resumed = tifffile.imread(tmp_path / "resumed" / "slide" / "mask.tif")
  np.testing.assert_array_equal(resumed, whole)


def test_a_workdir_that_is_not_a_segment_run_is_one_line(tiny_classifier, tmp_path):
  with pytest.raises(UserError, match="holds a classify run, not a segment run"):
    run_phase(_predict_config(tiny_classifier, str(tmp_path)), str(tmp_path / "out"))


# --- Stitching, memory and the mask pyramid, with a stand-in conv net --------------------------------
def _conv_net(kernel: int, classes: int = 3, seed: int = 0):
  """A random two-layer conv net with zero ('SAME') padding: translation equivariant, up to
  the zeros it sees within kernel // 2 px of an input's border."""
  rng = np.random.default_rng(seed)
  w1 = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 8)) / kernel, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(1, 1, 8, classes)), jnp.float32)
  dims = ("NHWC", "HWIO", "NHWC")

  @jax.jit
  def probabilities(images_u8):
    x = images_u8.astype(jnp.float32) / 127.5 - 1
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=dims))
    return jax.nn.softmax(jax.lax.conv_general_dilated(h, w2, (1, 1), "SAME",
                                                       dimension_numbers=dims), -1)
  return probabilities


def _slide_run(fn, path, workdir, window, overlap, small_side=None, classes=3):
  """predict_slide on `path` with `fn` as the model (level-0 px = model px); the mask."""
  config = _predict_config("unused", path, f",overlap={overlap},min_tissue=0")
  config.tiff_tile = 64
  palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255][:3 * (classes + 1)]
  model = predict.Predictor(
      fn, parallel.mesh_from_config(config), input_size=window, num_outputs=classes,
      background_index=classes, names=[f"c{i}" for i in range(classes)] + ["background"],
      palette=palette, model_name="conv", epsilon=0.0, setting="findings", mrn=0,
      model_downsample=1.0, gate_scores=None, min_tissue=0.0)
  if small_side:  # the GeoJSON's view and the overlay's thumbnail (their defaults: 2048, 1024)
    model = model._replace(view_side=small_side, thumbnail_side=small_side)
  os.makedirs(workdir, exist_ok=True)
  with preemption.StopSignal() as stop:
    predict.predict_slide(config, str(workdir), path, model, stop)
  return tifffile.imread(os.path.join(workdir, os.path.splitext(os.path.basename(path))[0],
                                      "mask.tif"))


def _window_border_lines(size: int, window: int, stride: int) -> np.ndarray:
  """Rows (or columns) within 2 px of a window's edge, the slide's own edges left out."""
  near = np.zeros(size, bool)
  for start in transforms.window_starts(size, window, stride):
    for edge in (start, start + window):
      near[max(0, edge - 2):edge + 2] = True
  near[:2] = near[-2:] = False
  return near


def test_stitched_windows_equal_the_whole_image_and_leave_no_seams(tmp_path):
  path, image = _slide(tmp_path / "slide.tif", rows=4, cols=4)   # 192 x 192
  pointwise = _conv_net(1)   # exactly translation equivariant: stitching must be exact
  whole = np.argmax(np.asarray(pointwise(jnp.asarray(image[None])))[0], -1)
  np.testing.assert_array_equal(_slide_run(pointwise, path, tmp_path / "p", 32, 0.5), whole)
  # 5 x 5 kernels see zeros near each window's edge: without overlap the windows' borders show
  # as seams against the whole-image prediction; Hann-blended overlap hides them
  net = _conv_net(5)
  whole = np.argmax(np.asarray(net(jnp.asarray(image[None])))[0], -1)
  lines = _window_border_lines(192, 32, 16)
  border = lines[:, None] | lines[None, :]
  blended = _slide_run(net, path, tmp_path / "hann", 32, 0.5) != whole
  abutting = _slide_run(net, path, tmp_path / "box", 32, 0.0) != whole
  box_lines = _window_border_lines(192, 32, 32)
  assert abutting[box_lines[:, None] | box_lines[None, :]].mean() > 0.05  # the seams exist
  assert blended[border].mean() < 0.01 and blended.mean() < 0.01


def test_host_memory_stays_flat_as_the_slide_grows(tmp_path, monkeypatch):
  import gc
  import tracemalloc
  net, thresholds = _conv_net(3), gc.get_threshold()
  rng = np.random.default_rng(0)
  peaks, finish = {}, predict.finish_slide

  def finish_after_peak(*args):  # the outputs drawn from the thumbnail and the view follow
    peaks[height] = tracemalloc.get_traced_memory()[1]
    return finish(*args)
  for height in (2048, 8192):
    path = str(tmp_path / f"tall{height}.tif")
    blocks = rng.integers(0, 256, (height // 16, 16, 3), np.uint8)   # 16 px squares
    tifffile.imwrite(path, np.kron(blocks, np.ones((16, 16, 1), np.uint8)), tile=(64, 64))
    _slide_run(net, path, tmp_path / f"warm{height}", 32, 0.25)  # compiled, caches filled
    monkeypatch.setattr(predict, "finish_slide", finish_after_peak)
    gc.collect()
    gc.set_threshold(50)  # JAX's per-call garbage collected often: the peak is what is held
    tracemalloc.start()
    try:
      _slide_run(net, path, tmp_path / f"out{height}", 32, 0.25, small_side=64)
    finally:
      tracemalloc.stop()
      gc.set_threshold(*thresholds)
    monkeypatch.setattr(predict, "finish_slide", finish)
  # four times the pixels, the same peak over the windows and the TIFF: rows stream through,
  # and the peak grows by less than a quarter of the RGB bytes the slide gained (holding the
  # image would add all of them, holding the mask a third); the peak varies by a few hundred
  # KB with the threads' timing (batches in flight), which a tenth (472 KB) did not absorb
  assert peaks[8192] - peaks[2048] < 0.25 * (8192 - 2048) * 256 * 3, peaks


@pytest.mark.parametrize("height,width", [(300, 517), (64, 64), (129, 40)])
def test_the_mask_pyramid_equals_nearest_levels_of_the_mask_however_rows_arrive(
    tmp_path, height, width):
  from wsss_jax.outputs.mask_pyramid import MaskPyramid
  rng = np.random.default_rng(height)
  mask = (rng.random((height, width)) * 3).astype(np.uint8)
  cuts = np.unique(np.r_[0, rng.integers(1, height, 6), height])
  pyramid = MaskPyramid(str(tmp_path), height, width, 16, [0] * 12, view_side=50)
  for a, b in zip(cuts[:-1], cuts[1:]):
    pyramid.add_rows(int(a), mask[a:b])
    if b > height // 2 and not os.path.exists(tmp_path / "half"):  # killed here ...
      pyramid.release()
      (tmp_path / "half").write_text(str(b))
      pyramid = MaskPyramid(str(tmp_path), height, width, 16, [0] * 12, view_side=50,
                            resume_rows=int(b))  # ... and resumed from the raw rows
  step = pyramid.view_step
  np.testing.assert_array_equal(pyramid.view, mask[::step, ::step])
  with pytest.raises(ValueError, match="in order"):
    pyramid.add_rows(0, mask[:1])
  pyramid.close(str(tmp_path / "mask.tif"))
  with tifffile.TiffFile(tmp_path / "mask.tif") as tif:
    levels = [level.asarray() for level in tif.series[0].levels]
  assert len(levels) == len(pyramid.levels)
  for level, want in zip(levels, [mask[::f, ::f] for f in (1, 2, 4, 8, 16, 32)]):
    np.testing.assert_array_equal(level, want)
  assert sorted(os.listdir(tmp_path)) == ["half", "mask.tif"]  # raw and spill files gone


def test_bad_inputs_are_one_line_each_and_leave_nothing_written(segment_run, mrn_run, tmp_path):
  out = tmp_path / "out"
  broken = tmp_path / "broken.tif"
  broken.write_bytes(b"II*\x00" + b"\x17" * 300)  # a TIFF header, then garbage
  with pytest.raises(UserError, match="broken.tif cannot be read"):
    run_phase(_predict_config(segment_run, str(broken)), str(out))
  small = tmp_path / "small.tif"   # a window is 32 model px = 48 slide px for this model
  tifffile.imwrite(small, np.zeros((40, 60, 3), np.uint8))
  with pytest.raises(UserError, match="60 x 40 px, smaller than one window"):
    run_phase(_predict_config(segment_run, str(small)), str(out))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("no images here")
  with pytest.raises(UserError, match="holds no images"):
    run_phase(_predict_config(segment_run, str(empty)), str(out))
  assert os.listdir(out) == []  # refused before anything was written
  tiles = _tiles(tmp_path / "tiles", n=3)
  (tmp_path / "tiles" / "t1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  summary = run_phase(_predict_config(segment_run, tiles, ",gate=off"), str(out))
  assert summary["unreadable"] == ["t1.png"] and summary["predicted_now"] == 2
  assert sorted(os.listdir(out / "masks")) == ["t0.png", "t2.png"]
  assert "t1.png" in (out / "unreadable_tiles.txt").read_text()
  title = Image.open(out / "overlays" / "predict.png").text["Title"]
  assert title.endswith(", 2 of 2 tiles"), title  # the unreadable tile is not counted as shown
  before = {p: (out / p).read_bytes() for p in ("config.json", "model.json")}
  with pytest.raises(UserError, match="holds predictions of the segment run .* use another"):
    run_phase(_predict_config(mrn_run, tiles, ",gate=off"), str(out))
  assert {p: (out / p).read_bytes() for p in before} == before  # the first run's record kept


def test_sigterm_stops_predict_at_a_tile_boundary_and_the_rerun_does_the_rest(segment_run,
                                                                              tmp_path):
  """A real `python -m wsss_jax.main` predict of 80 tiles, SIGTERM once some are written: exit
  75 with one line, every mask written is whole, the re-run predicts exactly the rest."""
  import signal
  import subprocess
  import sys
  import time
  source = tmp_path / "tiles"
  source.mkdir()
  for i in range(80):
    Image.fromarray(synthetic.generate_tile(12, "test", i % 7, 48)[0]).save(source / f"t{i:03d}.png")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  cmd = [sys.executable, "-m", "wsss_jax.main",
         f"--config=configs/predict.py:model={segment_run},input={source},batch=1,gate=off",
         f"--workdir={tmp_path / 'out'}", "--config.num_devices=1"]
  proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  record, deadline = tmp_path / "out" / "tiles.jsonl", time.time() + 300
  while time.time() < deadline and (not record.exists() or record.read_text().count("\n") < 3):
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 75, stderr[-2000:]
  assert stderr.count("\n") == 1 and stderr.startswith("preempted"), stderr
  done = int(stderr.split("after ")[1].split(" of 80")[0])
  masks = sorted(os.listdir(tmp_path / "out" / "masks"))
  assert 3 <= done == len(masks) < 80
  for name in masks:  # written whole (atomically), never half
    assert np.asarray(Image.open(tmp_path / "out" / "masks" / name)).shape == (48, 48)
  again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  summary = json.loads(again.stdout.strip().splitlines()[-1])
  assert summary["predicted_now"] == 80 - done
  assert len(os.listdir(tmp_path / "out" / "masks")) == 80
