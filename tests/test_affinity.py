"""AffinityNet and the random walk: the pair loss and the walk against numpy, a walk that fills
an object along learnt affinities, and the phase end to end (train, resume, masks written)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from wsss_jax.data import mask_files
from wsss_jax.errors import UserError
from wsss_jax.phases import affinity, pseudo_masks
from wsss_jax.tasks import affinity as task


def numpy_pairs(h, w, radius):
  """Every unordered pair of grid cells closer than `radius`, written out by brute force."""
  cells = [(y, x) for y in range(h) for x in range(w)]
  return [(i, j) for i, (y0, x0) in enumerate(cells) for j, (y1, x1) in enumerate(cells)
          if i < j and (y1 - y0) ** 2 + (x1 - x0) ** 2 < radius ** 2]


def test_affinity_loss_matches_numpy():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 4, 5)).astype(np.uint8)  # 2 = background here
  labels[0, 0, :3] = mask_files.IGNORE
  sums = {"bg": [], "fg": [], "neg": []}
  for b in range(2):
    f, lab = features[b].reshape(20, 3), labels[b].ravel()
    for i, j in numpy_pairs(4, 5, 3):
      if mask_files.IGNORE in (lab[i], lab[j]):
        continue
      a = np.exp(-np.abs(f[i] - f[j]).mean())
      kind = "neg" if lab[i] != lab[j] else ("bg" if lab[i] == 2 else "fg")
      sums[kind].append(-np.log(1 + 1e-5 - a) if kind == "neg" else -np.log(a + 1e-5))
  want = 0.25 * np.mean(sums["bg"]) + 0.25 * np.mean(sums["fg"]) + 0.5 * np.mean(sums["neg"])
  got, parts = task.affinity_loss(jnp.asarray(features), jnp.asarray(labels), 2, 3)
  assert float(got) == pytest.approx(want, rel=1e-5)
  assert float(parts["neg"]) == pytest.approx(np.mean(sums["neg"]), rel=1e-5)


def test_random_walk_matches_a_dense_numpy_walk():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(1, 3, 4, 2)).astype(np.float32)
  maps = rng.random((1, 2, 3, 4)).astype(np.float32)
  f = features[0].reshape(12, 2)
  a = np.eye(12)
  for i, j in numpy_pairs(3, 4, 3):
    a[i, j] = a[j, i] = np.exp(-np.abs(f[i] - f[j]).mean()) ** 8.0
  t = np.linalg.matrix_power(a / a.sum(1, keepdims=True), 2 ** 3)
  want = (t @ maps[0].reshape(2, 12).T).T.reshape(1, 2, 3, 4)
  got = task.random_walk(jnp.asarray(maps), jnp.asarray(features), 3, 8.0, 3)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)


def test_the_walk_fills_an_object_along_its_affinities():
  """Features equal inside an object and far outside: a map that fires on one cell of the
  object spreads over the whole object and not past its border."""
  inside = np.zeros((8, 8), bool)
  inside[2:6, 2:6] = True
  features = np.where(inside[..., None], 0.0, 5.0)[None].astype(np.float32)
  maps = np.zeros((1, 1, 8, 8), np.float32)
  maps[0, 0, 2, 2] = 1.0
  walked = np.asarray(task.random_walk(jnp.asarray(maps), jnp.asarray(features), 5, 8.0, 8))[0, 0]
  assert walked[inside].min() > 0.5 * walked[inside].max()
  assert walked[~inside].max() < 1e-3 * walked[inside].min()


def test_affinity_phase_trains_resumes_and_writes_walked_masks(tiny_classifier, tmp_path):
  pm = load_config("pseudo_masks", f"classifier={tiny_classifier},band=0.1,batch=8")
  pm.data.num_train, pm.layers = 16, ("b5_2",)
  pseudo_masks.run(pm, str(tmp_path / "pm"))
  config = load_config("affinity", f"classifier={tiny_classifier},pseudo={tmp_path / 'pm'},"
                       "layer=b5_2,width=0.0625,image_size=32,batch=8,epochs=2,num_train=16")
  config.data.tile_size, config.data.num_threads, config.async_checkpointing = 48, 1, False
  summary = affinity.run(config, str(tmp_path / "aff"))
  assert summary["steps"] == 4 and summary["mask_layer"] == "rw"
  written = os.listdir(tmp_path / "aff" / "masks" / "rw")
  assert len(written) == 16
  assert 0 <= summary["scores"]["mIoU"] <= 1 and 0 <= summary["changed_share"] <= 1
  rows = [json.loads(line) for line in open(tmp_path / "aff" / "metrics.jsonl")]
  assert {"loss/bg", "loss/fg", "loss/neg"} <= set(rows[0])
  again = affinity.run(config, str(tmp_path / "aff"))
  assert again["resumed_from"] == 4 and again["scores"] == summary["scores"]
  config.data.mask_layers = ("bn7",)
  with pytest.raises(UserError, match=r"data.mask_layers=\('bn7',\): the pseudo-mask run"):
    affinity.run(config, str(tmp_path / "other"))


def test_walked_finding_masks_apply_the_rule_after_the_walk():
  """A finding whose map peaks on part of an object: after the walk along features that are
  equal inside the object, the threshold rule (alpha 0.5, taken on the walked, max-normalised
  maps) marks the whole object and nothing outside; a normal image stays background."""
  inside = np.zeros((8, 8), bool)
  inside[2:6, 2:6] = True
  features = np.repeat(np.where(inside[..., None], 0.0, 5.0)[None], 2, 0).astype(np.float32)
  maps = np.zeros((2, 1, 8, 8), np.float32)
  maps[:, 0, 2:4, 2:4] = 1.0  # a quarter of the object
  labels = jnp.array([[1.0], [0.0]])
  masks = np.asarray(affinity.walked_masks(
      jnp.asarray(maps), jnp.asarray(features), labels, jnp.zeros((2, 8, 8)), jnp.float32(0.5),
      jnp.float32(0.0), (8, 8), "threshold", True, (5, 8.0, 8)))
  np.testing.assert_array_equal(masks[0] == 0, inside)
  assert (masks[1] == 1).all()
