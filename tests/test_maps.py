"""The maps phase end to end on a tiny classifier: the maps it writes equal the relevance API's
maps of the same tiles, its pseudo-mask IoU equals one computed here from those maps."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from wsss_jax import metrics, relevance, runner
from wsss_jax.data import synthetic, transforms
from wsss_jax.data.synthetic import BACKGROUND
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.phases import maps
from wsss_jax.relevance import quality
from wsss_jax.train import earlier_runs


def test_maps_phase_writes_the_relevance_maps_and_scores_them(tiny_classifier, tmp_path):
  config = load_config("maps", f"classifier={tiny_classifier},methods=gradcam,batch=8")
  config.layers, config.data.num_val = ("bn7",), 8
  config.quality.num_images, config.quality.steps = 8, 4
  summary = maps.run(config, str(tmp_path))
  result = summary["methods"]["gradcam"]
  assert result["num_images"] == 8 and 0 <= result["deletion_auc"] <= 1
  clf = earlier_runs.load_classifier(tiny_classifier, parallel.make_mesh(1))
  tiles = [synthetic.generate_tile(0, "val", i, 48) for i in range(8)]
  resized = [transforms.Resize(32)({"image": t[0], "mask": t[1]}) for t in tiles]  # as the phase
  x = jnp.asarray(np.stack([r["image"] for r in resized]) / 255.0, jnp.float32)
  labels = np.stack([t[2] for t in tiles])
  want = relevance.relevance_fn("gradcam", clf.model.apply, layers=["bn7"], target="logit",
                                normalize="joint", only_present=True, relu=None
                                ).maps(clf.variables, x, jnp.asarray(labels))
  layer, want = next(iter(want.items()))
  written = np.load(os.path.join(tmp_path, "maps", "gradcam", os.listdir(
      tmp_path / "maps" / "gradcam")[0]))
  assert list(written) == [layer.replace("/", ".")]
  got = np.stack([np.load(tmp_path / "maps" / "gradcam" / f"synthetic_val_{i}.npz")[
      layer.replace("/", ".")] for i in range(8)]).astype(np.float32)
  np.testing.assert_allclose(got, np.asarray(want), atol=2e-3)  # float16 files
  confusion = metrics.confusion_matrix(np.asarray(quality.pseudo_masks(np.asarray(want), labels)),
                                       np.stack([r["mask"] for r in resized]), 4, ignore=BACKGROUND)
  assert result["layers"][layer]["mIoU"] == pytest.approx(
      metrics.iou_scores(confusion, synthetic.CLASS_NAMES)["mIoU"], abs=0.02)
  assert (tmp_path / "overlays" / "gradcam.png").exists() and (tmp_path / "table.md").exists()
  config.relu = "maybe"
  with pytest.raises(UserError, match="relu='maybe' is not one of"):
    runner.run_phase(config, str(tmp_path / "bad"))
  assert os.listdir(tmp_path / "bad") == []  # refused before its config.json is recorded
