"""What the tanh GELU changes in a trained ViT classifier: the same checkpoint (trained with the
exact erf GELU) evaluated both ways on a split, max |logit difference| and the split's metrics.

  python -m benchmarks.gelu_effect --classifier=runs/les_vit/classify --split=test

A model trained with one GELU and run with the other sees this shift; training with `gelu=tanh`
from the start (or fine-tuning an erf checkpoint) lets the weights absorb it.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wsss_jax import metrics
from wsss_jax.data import pipeline
from wsss_jax.device import parallel
from wsss_jax.models.classifier import build_classifier
from wsss_jax.tasks.common import prepare_images
from wsss_jax.train import earlier_runs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--classifier", required=True, help="a classify run with a ViT backbone")
  parser.add_argument("--split", default="val")
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  mesh = parallel.mesh_from_config(ml_collections.ConfigDict({"num_devices": -1}))
  clf = earlier_runs.load_classifier(args.classifier, mesh)
  data = ml_collections.ConfigDict(clf.data)
  variables = clf.variables
  results, logits = {}, {}
  for gelu in ("exact", "tanh"):
    model_cfg = ml_collections.ConfigDict(clf.meta["model"])
    model_cfg.gelu = gelu
    model = build_classifier(model_cfg, clf.meta["image_size"], clf.meta["num_classes"])
    apply = jax.jit(lambda v, x: model.apply(v, prepare_images(x, data, jnp.float32),
                                                  train=False))
    out, labels = [], []
    for b in pipeline.eval_batches(data, args.batch, args.split):
      out.append(np.asarray(apply(variables, b["image"]))[b["valid"]])
      labels.append(b["labels"][b["valid"]])
    logits[gelu] = np.concatenate(out)
    m = metrics.multilabel_metrics(1 / (1 + np.exp(-logits[gelu])), np.concatenate(labels),
                                   data.class_names)
    results[gelu] = {k: v for k, v in m.items() if isinstance(v, float)}
  diff = np.abs(logits["exact"] - logits["tanh"])
  report = {"classifier": args.classifier, "split": args.split, "images": len(diff),
            "max_abs_logit_difference": float(diff.max()),
            "mean_abs_logit_difference": float(diff.mean()), "metrics": results}
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
