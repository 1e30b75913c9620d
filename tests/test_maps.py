"""The maps phase end to end on a tiny trained classifier, and the map-quality measures against
closed forms."""
import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from wsss_jax import metrics
from wsss_jax.data import pipeline
from wsss_jax.errors import UserError
from wsss_jax.phases import maps
from wsss_jax.relevance import quality
from wsss_jax import runs


@pytest.fixture
def classifier(tiny_classifier):
  return tiny_classifier


def _maps_config(classifier, methods="gradcam+lrp:EpsilonPlusFlat+patternattribution"):
  config = load_config("maps", f"classifier={classifier},methods={methods},batch=8")
  config.data.num_val = 8  # one batch: its maps/s must come from a timed call, not be nan
  config.quality.num_images, config.quality.steps = 8, 4
  config.patterns.num_images = 16
  config.overlays = 2
  return config


def test_maps_phase_writes_maps_overlays_and_a_scored_summary(classifier, tmp_path):
  config = _maps_config(classifier)
  summary = maps.run(config, str(tmp_path))
  assert set(summary["methods"]) == {"gradcam", "lrp:EpsilonPlusFlat", "patternattribution"}
  gradcam = summary["methods"]["gradcam"]
  assert [l.split("/")[-1] for l in gradcam["layers"]] == ["b4_5", "b5_2", "bn7"]
  for s in summary["methods"].values():
    assert s["num_images"] == 8 and s["maps_per_sec"] > 0
    assert 0 <= s["deletion_auc"] <= 1 and 0 <= s["insertion_auc"] <= 1
    assert 0 <= s["average_drop"] <= 1 and 0 <= s["increase_in_confidence"] <= 1
  assert json.load(open(tmp_path / "summary.json"))["methods"].keys() == summary["methods"].keys()
  assert "| gradcam | b4_5" in open(tmp_path / "table.md").read()
  for name in ("gradcam", "lrp_EpsilonPlusFlat", "patternattribution"):
    assert os.path.getsize(tmp_path / "overlays" / f"{name}.png") > 0
  assert os.path.exists(tmp_path / "patterns" / "meta.json")

  # The pseudo-mask IoU, recomputed from the written maps and the ground truth.
  data = runs.data_config(config, json.load(open(os.path.join(classifier, "config.json")))["data"])
  confusion = 0
  files = sorted(glob.glob(str(tmp_path / "maps" / "gradcam" / "*.npz")))
  assert len(files) == 8
  for b in pipeline.eval_batches(data, 8, "val", keys=("labels", "mask", "name")):
    for i, name in enumerate(b["name"]):
      saved = np.load(tmp_path / "maps" / "gradcam" / maps._file_name(name))
      bn7 = saved["backbone.bn7"].astype(np.float32)
      assert bn7.shape == (4, 32, 32)
      present = b["labels"][i] > 0
      pred = np.argmax(np.where(present[:, None, None], bn7, -np.inf), axis=0)
      confusion = confusion + metrics.confusion_matrix(pred, b["mask"][i], 4, ignore=4)
  want = metrics.iou_scores(confusion, data.class_names)["mIoU"]
  assert gradcam["layers"]["backbone/bn7"]["mIoU"] == pytest.approx(want, abs=0.02)  # fp16 ties


def test_bad_maps_requests(classifier, tmp_path):
  with pytest.raises(UserError, match="no checkpoint"):
    maps.run(_maps_config(str(tmp_path / "nothing")), str(tmp_path / "a"))
  with pytest.raises(UserError, match="unknown relevance method 'gradkam'"):
    maps.run(_maps_config(classifier, "gradkam"), str(tmp_path / "b"))
  with pytest.raises(UserError, match="neither an LRP composite"):
    maps.run(_maps_config(classifier, "lrp:Bogus"), str(tmp_path / "c"))


def test_iou_scores_by_hand():
  conf = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]])  # rows truth, columns prediction
  s = metrics.iou_scores(conf, ["a", "b", "c"])
  assert s["IoU/a"] == pytest.approx(3 / 4) and s["IoU/b"] == pytest.approx(2 / 5)
  assert s["IoU/c"] == 0.0  # predicted twice, never true
  assert s["mIoU"] == pytest.approx((3 / 4 + 2 / 5 + 0) / 3)
  assert s["FwIoU"] == pytest.approx(4 / 8 * 3 / 4 + 4 / 8 * 2 / 5)
  assert s["accuracy"] == pytest.approx(5 / 8)
  got = metrics.confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 1, 4, 1]), 3, ignore=4)
  np.testing.assert_array_equal(got, [[1, 0, 0], [0, 1, 1], [0, 0, 0]])


def test_deletion_insertion_and_confidence_in_closed_form():
  """logit = sum of the pixels in a region S of n pixels, images of ones, baseline 0: deleting
  the top-ranked fraction f of pixels with the perfect map leaves n - f HW in S."""
  h = w = 4
  region = np.zeros((h, w), bool)
  region[:2, :3] = True  # n = 6
  n = region.sum()

  def apply_fn(variables, x):
    return (x[..., 0] * jnp.asarray(region)).sum(axis=(1, 2))[:, None] * variables

  images = jnp.ones((1, h, w, 1))
  perfect = jnp.asarray(np.where(region, 1.0 + np.arange(16).reshape(4, 4) / 100, 0.0))[None, None]
  deletion, insertion = quality.deletion_insertion(apply_fn, 1.0, images, perfect, steps=4)
  fractions = np.arange(5) / 4
  remaining = np.maximum(n - np.round(fractions * 16), 0)
  np.testing.assert_allclose(deletion[0, 0], 1 / (1 + np.exp(-remaining)), rtol=1e-5)
  # insertion from the blurred image (all ones stay ones): the score is constant
  np.testing.assert_allclose(insertion[0, 0], 1 / (1 + np.exp(-n)), rtol=1e-5)
  want_auc = ((1 / (1 + np.exp(-remaining)))[1:] + (1 / (1 + np.exp(-remaining)))[:-1]).sum() / 8
  assert float(quality.area_under(deletion)[0, 0]) == pytest.approx(want_auc, rel=1e-5)
  half = jnp.full((1, 1, h, w), 0.5)
  drop, increase = quality.confidence_change(apply_fn, 1.0, images, half)
  y, o = 1 / (1 + np.exp(-n)), 1 / (1 + np.exp(-n / 2))
  assert float(drop[0, 0]) == pytest.approx((y - o) / y, rel=1e-5)
  assert not bool(increase[0, 0])


def test_gaussian_blur_matches_numpy():
  x = np.random.default_rng(0).random((1, 9, 9, 2)).astype(np.float32)
  got = np.asarray(quality.gaussian_blur(jnp.asarray(x), sigma=1.5, size=5))
  t = np.arange(5) - 2
  k = np.exp(-0.5 * (t / 1.5) ** 2)
  k /= k.sum()
  p = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  want = np.zeros_like(x)
  for i in range(5):
    for j in range(5):
      want += k[i] * k[j] * p[:, i:i + 9, j:j + 9]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
