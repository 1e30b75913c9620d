"""Evaluation metrics, in numpy on the host: multi-label classification (per-class precision,
recall, F1 and average precision; exact-match accuracy) and, for segmentation, the IoU family."""
from __future__ import annotations

import numpy as np


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


def iou_scores(confusion: np.ndarray, class_names) -> dict:
  """IoU per class = TP / (TP + FP + FN); mIoU over classes that occur (in truth or prediction);
  FwIoU weights IoU by each class's share of the truth; pixel accuracy = trace / total."""
  c = np.asarray(confusion, np.float64)
  tp, truth, pred = np.diag(c), c.sum(1), c.sum(0)
  union = truth + pred - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
  total = c.sum()
  freq = truth / total if total else np.zeros_like(truth)
  out = {"mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
         "FwIoU": float(np.nansum(freq * np.nan_to_num(iou))),
         "accuracy": float(tp.sum() / total) if total else float("nan")}
  for k, name in enumerate(class_names):
    out[f"IoU/{name}"] = float(iou[k])
  return out
