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

from wsss_jax import parallel, polygons, runs
from wsss_jax.data import synthetic, transforms
from wsss_jax.errors import UserError
from wsss_jax.phases import predict
from wsss_jax.runner import run_phase
from wsss_jax.tasks.common import prepare_images


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
  (tmp_path / "s.tif").write_bytes(b"")
  assert predict.find_inputs(str(tmp_path), "auto")[0] == "slides"
  assert predict.find_inputs(str(tmp_path), "tiles")[1] == [str(tmp_path / "a.png")]
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
  seg = runs.load_segmenter(segment_run, parallel.make_mesh(1))
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
  for feature in regions["features"]:
    name = feature["properties"]["classification"]["name"]
    assert _area(feature["geometry"]["coordinates"]) == areas[name]["pixels"]
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
