"""Segmentation scoring (confusion, IoU, mIoU, FwIoU, the stage-1/2 conventions) against
hand-computed matrices and a numpy re-implementation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax import metrics
from wsss_jax.device import parallel
from wsss_jax.errors import UserError

BG = 4
NAMES = ("a", "b", "c", "d")


def test_stage1_and_stage2_by_hand():
  truth = np.array([[0, 0, 1, 4, 4, 2]])
  pred = np.array([[0, 4, 1, 1, 4, 0]])
  s1 = np.asarray(metrics.device_confusion(jnp.asarray(pred), jnp.asarray(truth), 4, BG, "stage1"))
  want1 = np.zeros((5, 5), int)
  want1[0, 0], want1[0, 4], want1[1, 1], want1[2, 0] = 1, 1, 1, 1  # bg rows gone; bg-pred kept
  np.testing.assert_array_equal(s1, want1)
  s2 = np.asarray(metrics.device_confusion(jnp.asarray(pred), jnp.asarray(truth), 4, BG, "stage2"))
  want2 = np.zeros((4, 4), int)
  want2[0, 0], want2[1, 1], want2[2, 0] = 1, 1, 1  # the background prediction is dropped
  np.testing.assert_array_equal(s2, want2)
  a = metrics.iou_scores(s1, NAMES)
  # a: TP 1, truth 2, pred 2 -> IoU 1/3, Dice 1/2; b: 1/1; c: 0 (truth 1, pred 0); d: NaN.
  assert a["IoU/a"] == pytest.approx(1 / 3) and a["Dice/a"] == pytest.approx(0.5)
  assert a["IoU/b"] == 1.0 and a["IoU/c"] == 0.0 and np.isnan(a["IoU/d"])
  assert a["mIoU"] == pytest.approx((1 / 3 + 1 + 0) / 3)
  assert a["accuracy"] == pytest.approx(2 / 4)
  assert a["FwIoU"] == pytest.approx(2 / 4 * 1 / 3 + 1 / 4 * 1)
  b = metrics.iou_scores(s2, NAMES)
  assert b["IoU/a"] == pytest.approx(1 / 2) and b["accuracy"] == pytest.approx(2 / 3)


def test_conventions_agree_without_background_predictions():
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 5, (3, 16, 16))
  pred = rng.integers(0, 4, (3, 16, 16))
  s1 = metrics.segmentation_scores(pred, truth, NAMES, BG, "stage1")
  s2 = metrics.segmentation_scores(pred, truth, NAMES, BG, "stage2")
  for k in s1:
    assert s1[k] == pytest.approx(s2[k], nan_ok=True), k


def _numpy_stage1(pred, truth, k):
  """The authors' rule written plainly: force, count, zero the background cell."""
  pred = pred.copy()
  pred[truth == BG] = BG
  hist = np.zeros((k + 1, k + 1))
  for t, p in zip(truth.ravel(), pred.ravel()):
    hist[t, p] += 1
  hist[BG, BG] = 0
  return hist


def test_sharded_device_confusion_matches_numpy_and_ignores_padding():
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(1)
  truth = rng.integers(0, 5, (8, 12, 12))
  pred = rng.integers(0, 5, (8, 12, 12))
  valid = np.arange(8) < 6
  got = metrics.device_confusion_jit(parallel.shard_identical(pred, mesh),
                                     parallel.shard_identical(truth, mesh), 4, BG, "stage1",
                                     jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(got), _numpy_stage1(pred[:6], truth[:6], 4))
  assert jax.device_count() == 8


def test_empty_matrix_and_unknown_convention():
  s = metrics.iou_scores(np.zeros((5, 5)), NAMES)
  assert np.isnan(s["mIoU"]) and np.isnan(s["accuracy"]) and s["FwIoU"] == 0.0
  with pytest.raises(UserError, match="stage3"):
    metrics.segmentation_scores(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), NAMES, BG, "stage3")


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
