"""Pseudo masks: the background rule, the mask rule and the PNG files against hand-made cases,
and the phase end to end on a tiny classifier (its scores recomputed from the written files)."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from wsss_jax.data import mask_files, synthetic, transforms
from wsss_jax.errors import UserError
from wsss_jax.phases import pseudo_masks
from wsss_jax.pseudo import mask_rules
from wsss_jax.train import earlier_runs


def test_grey_is_opencv_rgb2gray():
  pixel = np.array([[[255, 200, 100]]], np.uint8)
  assert mask_rules.grey(pixel)[0, 0] == round(0.299 * 255 + 0.587 * 200 + 0.114 * 100)  # 205


def test_background_keeps_white_regions_of_50_pixels_or_more_4_connected():
  image = np.zeros((40, 40, 3), np.uint8)
  image[0:10, 0:5] = 255            # 50 px: kept
  image[20:27, 20:27] = 255         # 49 px: removed
  image[30:37, 0:7] = 255           # 49 px ...
  image[37:40, 7:10] = 255          # ... touching only by a corner: two objects, both removed
  bg = mask_rules.background_mask(image, "white", 200, 50)
  want = np.zeros((40, 40), bool)
  want[0:10, 0:5] = True
  np.testing.assert_array_equal(bg, want)
  assert not mask_rules.background_mask(image, "none").any()
  image[36, 7] = 255                # now 4-connected: 49 + 9 + 1 = 59 px, kept
  assert mask_rules.background_mask(image)[30:40, 0:10].sum() == 59


def test_pseudo_mask_rule_by_hand():
  maps = jnp.zeros((2, 3, 2, 2)).at[0, 0].set(0.2).at[0, 1].set(
      jnp.array([[0.9, 0.1], [0.5, 0.0]])).at[0, 2].set(1.0)
  labels = jnp.array([[1, 1, 0], [0, 0, 0]])  # class 2 absent though its map is highest
  background = jnp.zeros((2, 2, 2), bool).at[0, 1, 1].set(True)
  got = np.asarray(mask_rules.pseudo_mask(maps, labels, background, (2, 2), 3))
  np.testing.assert_array_equal(got[0], [[1, 0], [1, 3]])
  np.testing.assert_array_equal(got[1], [[3, 3], [3, 3]])  # no positive label: all background


def test_mask_files_round_trip_and_refusals(tmp_path):
  palette = mask_files.palette_bytes("luad", 5)
  mask = np.array([[0, 1], [4, 3]], np.uint8)
  path = str(tmp_path / "m.png")
  mask_files.write_mask(path, mask, palette)
  with Image.open(path) as im:
    assert im.mode == "P" and im.getpalette()[:15] == palette
  np.testing.assert_array_equal(mask_files.read_mask(path, (2, 2), 4), mask)
  assert os.listdir(tmp_path) == ["m.png"]
  with pytest.raises(UserError, match="is 2x2 but its image is 3x3"):
    mask_files.read_mask(path, (3, 3), 4)
  with pytest.raises(UserError, match="palette index 4, outside the class range 0..3"):
    mask_files.read_mask(path, (2, 2), 3)
  with pytest.raises(UserError, match="missing"):
    mask_files.read_mask(str(tmp_path / "none.png"), (2, 2), 4)
  data = open(path, "rb").read()
  open(tmp_path / "cut.png", "wb").write(data[:len(data) // 2])
  with pytest.raises(UserError, match="cut.png cannot be read"):
    mask_files.read_mask(str(tmp_path / "cut.png"), (2, 2), 4)
  Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
  with pytest.raises(UserError, match="is a RGB image"):
    mask_files.read_mask(str(tmp_path / "rgb.png"), (2, 2), 4)


def _stage1(pred, truth, k=4):
  pred = pred.copy()
  pred[truth == k] = k
  hist = np.zeros((k + 1, k + 1))
  np.add.at(hist, (truth.ravel(), pred.ravel()), 1)
  hist[k, k] = 0
  tp = np.diag(hist)[:k]
  union = hist.sum(0)[:k] + hist.sum(1)[:k] - tp
  return np.nanmean(np.where(union > 0, tp / np.maximum(union, 1), np.nan))


def test_phase_writes_one_mask_per_tile_and_layer_and_scores_them(tiny_classifier, tmp_path):
  config = load_config("pseudo_masks", f"classifier={tiny_classifier},batch=8")
  summary = pseudo_masks.run(config, str(tmp_path))
  assert summary["num_images"] == 32 and summary["layers_written"] == ["b4_5", "b5_2", "bn7"]
  assert os.path.getsize(tmp_path / "overlays" / "pseudo_masks.png") > 0
  assert "| b5_2 |" in open(tmp_path / "table.md").read()
  for layer in ("b4_5", "b5_2", "bn7"):
    files = sorted(glob.glob(str(tmp_path / "masks" / layer / "*.png")))
    assert len(files) == 32 and not glob.glob(str(tmp_path / "masks" / layer / "*.tmp*"))
    preds, truths = [], []
    for i in range(32):
      image, truth, labels = synthetic.generate_tile(0, "train", i, 48)
      pred = mask_files.read_mask(str(tmp_path / "masks" / layer / f"synthetic_train_{i}.png"),
                             (48, 48), 4)
      tissue = pred < 4
      assert set(np.unique(pred[tissue])) <= set(np.flatnonzero(labels))  # present classes only
      np.testing.assert_array_equal(pred == 4, mask_rules.background_mask(image))  # the white rule
      preds.append(pred)
      truths.append(truth)
    want = _stage1(np.stack(preds), np.stack(truths))
    assert summary["layers"][layer]["mIoU"] == pytest.approx(want, abs=1e-9)


def test_phase_refusals(tiny_classifier, tmp_path):
  config = load_config("pseudo_masks", f"classifier={tiny_classifier},background=grey")
  with pytest.raises(UserError, match="background.rule='grey'"):
    pseudo_masks.run(config, str(tmp_path))
  with pytest.raises(UserError, match="no checkpoint"):
    pseudo_masks.run(load_config("pseudo_masks", f"classifier={tmp_path}/none"), str(tmp_path))


def test_crf_option_refines_each_mask_of_the_phase(tiny_classifier, tmp_path):
  """crf=True writes refine_labels(mask of the plain run, tile, labels, background rule)."""
  from wsss_jax.pseudo import crf
  runs = {}
  for use_crf in (False, True):
    config = load_config("pseudo_masks", f"classifier={tiny_classifier},batch=8,crf={use_crf}")
    config.layers = ("bn7",)
    runs[use_crf] = pseudo_masks.run(config, str(tmp_path / str(use_crf)))
  assert runs[True]["crf"]["iterations"] == 10 and runs[False]["crf"] is None
  tiles = [synthetic.generate_tile(0, "train", i, 48) for i in range(32)]
  read = lambda run: np.stack([mask_files.read_mask(  # noqa: E731
      str(tmp_path / run / "masks" / "bn7" / f"synthetic_train_{i}.png"), (48, 48), 4)
      for i in range(32)])
  images = np.stack([t[0] for t in tiles])
  # every tile refined on its own (lax.map inside), all in one compiled call
  refine = jax.jit(lambda m, x, y, bg: crf.refine_labels(m, x, y, bg, 4, crf.DEFAULTS))
  want = refine(read("False"), images, np.stack([t[2] for t in tiles]),
                np.stack([mask_rules.background_mask(t[0]) for t in tiles]))
  assert np.mean(np.asarray(want) == read("True")) > 0.999
  config.crf.bi_sxy = 0.0
  with pytest.raises(UserError, match="crf.bi_sxy=0.0 must be positive"):
    pseudo_masks.run(config, str(tmp_path / "bad"))


def test_multi_dilation_maps_fuse_the_trained_rate_with_the_others(tiny_classifier, tmp_path):
  """dilations=(8,): the masks are the argmax of H_4 + H_8 (each map computed with b7 at that
  rate on the same weights), checked against maps computed here with the maps API."""
  from wsss_jax import relevance
  from wsss_jax.device import parallel
  config = load_config("pseudo_masks", f"classifier={tiny_classifier},batch=8")
  config.layers, config.dilations, config.data.num_train = ("bn7",), (8,), 8
  summary = pseudo_masks.run(config, str(tmp_path))
  assert summary["dilations"] == [8]
  mesh = parallel.make_mesh(1)
  model, variables, meta, _, data = earlier_runs.load_classifier(tiny_classifier, mesh)
  models = [model] + pseudo_masks.dilated_models(meta, (8,))
  assert models[1].backbone.last_dilation == 8 and models[0].backbone.last_dilation == 4
  images, labels, bg = [], [], []
  for i in range(8):
    image, _, lab = synthetic.generate_tile(0, "train", i, 48)
    images.append(transforms.Resize(32)({"image": image})["image"])  # the pipeline's own input
    labels.append(lab)
    bg.append(mask_rules.background_mask(image))
  x = jnp.asarray(np.stack(images) / 255.0, jnp.float32)
  labels = jnp.asarray(np.stack(labels))
  fused = [relevance.relevance_fn("gradcam", m.apply, layers=["bn7"], upsample=False,
                                  normalize=config.normalize, only_present=True,
                                  relu=pseudo_masks.relu_choice(config.relu, "tissue")
                                  ).maps(variables, x, labels) for m in models]
  want = np.asarray(mask_rules.pseudo_mask([f[next(iter(f))] for f in fused], labels,
                                      jnp.asarray(np.stack(bg)), (48, 48), 4))
  got = np.stack([mask_files.read_mask(str(tmp_path / "masks" / "bn7" / f"synthetic_train_{i}.png"),
                                   (48, 48), 4) for i in range(8)])
  assert np.mean(got == want) > 0.995  # float noise at argmax ties only
  config.dilations = (0,)
  with pytest.raises(UserError, match=r"dilations=\(0,\) must be positive"):
    pseudo_masks.run(config, str(tmp_path / "bad"))


def test_a_preempted_pass_resumes_to_the_masks_and_scores_of_an_uninterrupted_one(
    tiny_classifier, tmp_path, monkeypatch):
  """SIGTERM while the third batch's masks are written: the pass stops after a batch, keeps
  its masks and tally; the re-run computes only the rest, and masks and scores equal a pass
  that was never stopped."""
  import signal
  from wsss_jax.errors import Preempted
  config = load_config("pseudo_masks", f"classifier={tiny_classifier},batch=4")
  config.scales, config.progress_every_s = (1.0,), 0.0
  straight = pseudo_masks.run(config, str(tmp_path / "straight"))
  write, calls = pseudo_masks.write_batch, []

  def write_then_notice(*args):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return write(*args)

  monkeypatch.setattr(pseudo_masks, "write_batch", write_then_notice)
  with pytest.raises(Preempted, match=r"stopped after \d+ of 32 tiles") as stopped:
    pseudo_masks.run(config, str(tmp_path / "run"))
  done = int(str(stopped.value).split("after ")[1].split(" of")[0])
  assert 12 <= done < 32 and os.path.exists(tmp_path / "run" / pseudo_masks.PROGRESS_FILE)
  monkeypatch.setattr(pseudo_masks, "write_batch", write)
  calls.clear()
  resumed = pseudo_masks.run(config, str(tmp_path / "run"))
  assert resumed["num_images"] == 32
  assert not os.path.exists(tmp_path / "run" / pseudo_masks.PROGRESS_FILE)
  for layer, scores in straight["layers"].items():
    assert resumed["layers"][layer] == scores, layer
    for path in glob.glob(str(tmp_path / "straight" / "masks" / layer / "*.png")):
      other = path.replace(str(tmp_path / "straight"), str(tmp_path / "run"))
      np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(other)))
