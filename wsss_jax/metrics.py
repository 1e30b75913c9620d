"""Evaluation metrics: multi-label classification (per-class precision, recall, F1 and average
precision; exact-match accuracy) and, for segmentation, the IoU family.

Segmentation scoring has two conventions in the multi-layer pseudo-supervision work, selectable by
name (`CONVENTIONS`), both over the tissue classes 0..K-1 with K = the background index:
  stage1: the authors' pseudo-mask scoring: a (K+1) x (K+1) matrix over every pixel, the prediction
    forced to background where the ground truth is background and that cell zeroed; a background
    prediction on tissue stays in the matrix and counts as a miss of that tissue class.
  stage2: the authors' segmentation scoring: ground-truth background pixels dropped, a K x K
    matrix; a prediction outside the K classes (background) is dropped too.
  finding: findings against a background: background is a class like the others, a
    (K+1) x (K+1) matrix over every pixel (background last), scored with the class names plus
    'background' so that mIoU averages the findings and the background (the VOC and lesion
    convention).
stage1 and stage2 agree whenever the prediction never says background (a K-class segmenter); they differ on
pseudo masks with a background channel, where stage1 is the stricter one.
The confusion matrix of a batch is computed on device (`device_confusion`: one scatter-add over
the sharded batch, summed over devices and hosts by XLA) and accumulated on the host in int64.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.errors import UserError


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """AP = sum_n (R_n - R_{n-1}) P_n over the ranking by decreasing score (scikit-learn's
  definition; tied scores form one threshold). NaN when the class has no positive."""
  labels = np.asarray(labels) > 0.5
  if not labels.any():
    return float("nan")
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  s, y = np.asarray(scores, np.float64)[order], labels[order]
  last_of_tie = np.r_[np.diff(s) != 0, True]  # one threshold per distinct score
  tp = np.cumsum(y)[last_of_tie]
  predicted = (np.arange(1, len(y) + 1))[last_of_tie]
  precision, recall = tp / predicted, tp / labels.sum()
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_metrics(probs: np.ndarray, labels: np.ndarray, class_names,
                       threshold: float = 0.5) -> dict:
  """Per-class precision / recall / F1 / AP at `threshold`, their means, exact-match accuracy.

  probs, labels: (N, K). A class without positives gets AP NaN and is left out of mAP.
  """
  probs, truth = np.asarray(probs, np.float64), np.asarray(labels) > 0.5
  pred = probs > threshold
  tp = (pred & truth).sum(0).astype(np.float64)
  fp, fn = (pred & ~truth).sum(0), (~pred & truth).sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
    recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
  ap = np.array([average_precision(probs[:, k], truth[:, k]) for k in range(truth.shape[1])])
  out = {"exact_match": float(np.mean(np.all(pred == truth, axis=1))),
         "mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
         "mean_f1": float(f1.mean()), "num_examples": int(len(truth))}
  for k, name in enumerate(class_names):
    out |= {f"precision/{name}": float(precision[k]), f"recall/{name}": float(recall[k]),
            f"f1/{name}": float(f1[k]), f"AP/{name}": float(ap[k])}
  return out


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, num_classes: int,
                     ignore: int | None = None) -> np.ndarray:
  """(num_classes, num_classes) counts, rows = truth, columns = prediction; pixels whose truth
  is `ignore` (or outside [0, num_classes)) are left out."""
  pred, truth = np.asarray(pred).ravel().astype(np.int64), np.asarray(truth).ravel().astype(np.int64)
  keep = (truth >= 0) & (truth < num_classes) & (pred >= 0) & (pred < num_classes)
  if ignore is not None:
    keep &= truth != ignore
  return np.bincount(truth[keep] * num_classes + pred[keep],
                     minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_scores(confusion: np.ndarray, class_names, findings=()) -> dict:
  """Scores of the first len(class_names) classes of a (square) confusion matrix; further rows
  and columns (a background class) count in the unions and the total only.

  IoU_k = TP / (TP + FP + FN) and Dice_k = 2 TP / (2 TP + FP + FN), NaN for a class absent from
  both truth and prediction; mIoU / mDice average the non-NaN classes; FwIoU weights IoU by each
  class's share of the truth pixels; pixel accuracy = trace / total. `findings` (names among
  class_names) adds finding_IoU / finding_Dice, their own means: the medical convention, which a
  large background class cannot inflate.
  """
  c = np.asarray(confusion, np.float64)
  k = len(class_names)
  tp, truth, pred = np.diag(c)[:k], c.sum(1)[:k], c.sum(0)[:k]
  union = truth + pred - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
    dice = np.where(truth + pred > 0, 2 * tp / (truth + pred), np.nan)
  total = c.sum()
  freq = truth / total if total else np.zeros_like(truth)
  out = {"mIoU": _nanmean(iou), "FwIoU": float(np.nansum(freq * np.nan_to_num(iou))),
         "accuracy": float(tp.sum() / total) if total else float("nan"), "mDice": _nanmean(dice)}
  for i, name in enumerate(class_names):
    out[f"IoU/{name}"] = float(iou[i])
    out[f"Dice/{name}"] = float(dice[i])
  if findings:
    index = [list(class_names).index(name) for name in findings]
    out["finding_IoU"], out["finding_Dice"] = _nanmean(iou[index]), _nanmean(dice[index])
  return out


def headline(scores: dict) -> list:
  """(name, value) pairs a table or a log line shows first: mIoU, the findings' own IoU and
  Dice where scored, FwIoU, accuracy."""
  names = ["mIoU"] + ["finding_IoU", "finding_Dice"] * ("finding_IoU" in scores) + [
      "FwIoU", "accuracy"]
  return [(name, scores[name]) for name in names]


def _nanmean(x) -> float:
  return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


CONVENTIONS = ("stage1", "stage2", "finding")


def check_convention(convention: str) -> None:
  if convention not in CONVENTIONS:
      raise UserError(f"scoring convention {convention!r} is not one of {CONVENTIONS}")


def device_confusion(pred, truth, num_classes: int, background: int, convention: str,
                     valid=None):
  """The confusion matrix of a batch under `convention`, on device: (M, M) int32 with
  M = num_classes + 1 for stage1 and finding (background last) and num_classes for stage2.

  pred, truth: integer arrays of the same shape (B, H, W), possibly sharded along B; `valid` (B,)
  marks real rows of a padded batch. Truth values outside [0, num_classes] are ignored.
  """
  check_convention(convention)
  pred, truth = pred.astype(jnp.int32), truth.astype(jnp.int32)
  keep = (truth >= 0) & (truth <= num_classes) & (pred >= 0) & (pred <= num_classes)
  if valid is not None:
    keep &= valid.reshape((-1,) + (1,) * (truth.ndim - 1))
  if convention == "finding":
    m = num_classes + 1
    truth = jnp.where(truth == background, num_classes, truth)
    pred = jnp.where(pred == background, num_classes, pred)
  elif convention == "stage1":
    m = num_classes + 1
    # background truth and prediction both map to index num_classes; the forced cell is dropped.
    truth = jnp.where(truth == background, num_classes, truth)
    pred = jnp.where((pred == background) | (truth == num_classes), num_classes, pred)
    keep &= truth != num_classes
  else:
    m = num_classes
    keep &= (truth != background) & (pred != background) & (truth < num_classes) & (
        pred < num_classes)
  index = jnp.where(keep, truth * m + pred, 0)
  counts = jnp.zeros(m * m, jnp.int32).at[index.ravel()].add(keep.ravel().astype(jnp.int32))
  return counts.reshape(m, m)


device_confusion_jit = jax.jit(device_confusion, static_argnums=(2, 3, 4))


def segmentation_scores(pred, truth, class_names, background: int,
                        convention: str = "stage2") -> dict:
  """Host-side convenience: scores of numpy predictions against ground truth (one batch)."""
  conf = device_confusion_jit(jnp.asarray(pred), jnp.asarray(truth), len(class_names),
                              background, convention)
  return iou_scores(np.asarray(conf, np.int64), class_names)
