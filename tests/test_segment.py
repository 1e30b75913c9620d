"""Segmentation: loss, gate, MRN geometry and DeepLabV3+ size against independent references;
the segment phase end to end on tiny settings, with its refusals (the pipeline: test_pipeline.py)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from wsss_jax.data import transforms
from wsss_jax.errors import UserError
from wsss_jax.models import segmentation
from wsss_jax.phases import pseudo_masks, segment
from wsss_jax.tasks import segment as segment_task


def _numpy_ce(logits, labels, k):
  valid = labels < k
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  return -(picked * valid).sum() / valid.sum()


def test_multilayer_loss_is_the_weighted_ce_with_background_ignored():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
  batch = {f"mask_{l}": rng.choice([0, 1, 2, 3, 4, 255], size=(2, 5, 5)) for l in "abc"}
  weights = {"a": 0.2, "b": 0.2, "c": 0.6}
  loss, parts = segment_task.multilayer_loss(jnp.asarray(logits), batch, weights, 4)
  want = sum(w * _numpy_ce(logits, batch[f"mask_{l}"], 4) for l, w in weights.items())
  assert float(loss) == pytest.approx(want, rel=1e-5)
  moved = dict(batch)  # changing what background / outside pixels say changes nothing
  moved["mask_c"] = np.where(batch["mask_c"] >= 4, 259 - batch["mask_c"], batch["mask_c"])
  assert float(segment_task.multilayer_loss(jnp.asarray(logits), moved, weights, 4)[0]) == \
      pytest.approx(float(loss), rel=1e-6)
  empty = {k: np.full((2, 5, 5), 4) for k in batch}
  assert float(segment_task.multilayer_loss(jnp.asarray(logits), empty, weights, 4)[0]) == 0.0


def _numpy_dice_loss(logits, labels, k, dice_classes):
  """Per-pixel loops: 1 - mean over the first dice_classes of (2 TP + 1) / (P + Y + 1)."""
  total = []
  for c in range(dice_classes):
    overlap = predicted = present = 0.0
    for index in np.ndindex(labels.shape):
      if labels[index] >= k:
        continue
      z = np.exp(logits[index] - logits[index].max())
      p = z[c] / z.sum()
      predicted += p
      present += labels[index] == c
      overlap += p * (labels[index] == c)
    total.append((2 * overlap + 1) / (predicted + present + 1))
  return 1 - np.mean(total)


def test_ce_plus_dice_matches_a_per_pixel_reimplementation_and_weighs_a_rare_finding():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 6, 2)).astype(np.float32)  # one finding + background (K=1)
  labels = rng.choice([0, 1, 255], size=(2, 6, 6), p=[0.1, 0.8, 0.1])
  batch = {"mask_a": labels}
  loss, _ = segment_task.multilayer_loss(jnp.asarray(logits), batch, {"a": 1.0}, 2, "ce+dice", 1)
  want = _numpy_ce(logits, labels, 2) + _numpy_dice_loss(logits, labels, 2, 1)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  # all-background prediction on a rare finding: CE alone is small, the Dice term is near 1
  rare = np.ones((1, 20, 20), np.int64)
  rare[0, :2, :2] = 0
  background = np.zeros((1, 20, 20, 2), np.float32)
  background[..., 1] = 5.0
  ce = float(segment_task.multilayer_loss(jnp.asarray(background), {"mask_a": rare}, {"a": 1.0}, 2)[0])
  both = float(segment_task.multilayer_loss(jnp.asarray(background), {"mask_a": rare}, {"a": 1.0}, 2,
                                       "ce+dice", 1)[0])
  assert ce < 0.1 and both - ce > 0.8


def test_loss_follows_the_setting_unless_given():
  cfg = load_config("segment", "dataset=synthetic_lesions")
  assert segment.loss_kind(cfg) == "ce+dice"
  assert segment.loss_kind(segment.phase_config(load_config("segment"))) == "ce"
  with pytest.raises(ValueError, match="settle the data section first"):
    segment.loss_kind(load_config("segment"))  # "dataset" is a mode, never read as tissue
  cfg.loss = "ce"
  assert segment.loss_kind(cfg) == "ce"
  cfg.loss = "dice"
  with pytest.raises(UserError, match="loss='dice'"):
    segment.validate(cfg)


def test_gate_excludes_classes_where_the_authors_multiplication_does_not():
  logits = jnp.array([3.0, -1.0, -2.0]).reshape(1, 1, 1, 3)
  probs = jnp.array([[0.05, 0.5, 0.9]])
  argmax = lambda mode: int(jnp.argmax(segment_task.gate(logits, probs, mode, 0.1)))  # noqa: E731
  assert argmax("off") == 0
  assert argmax("exclude") == 1            # class 0 (p <= 0.1) can no longer win
  logits2 = jnp.array([-0.5, -1.0, -2.0]).reshape(1, 1, 1, 3)
  assert int(jnp.argmax(segment_task.gate(logits2, probs, "multiply", 0.1))) == 0  # zeroed, still wins
  none = jnp.array([[0.01, 0.02, 0.1]])   # every class fails: the tile keeps its logits
  np.testing.assert_array_equal(segment_task.gate(logits, none, "exclude", 0.1), logits)


def test_mrn_context_crop_is_the_targets_field_of_view():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
  pair = transforms.cut_pair({"image": image, "mask": image[..., 0]}, 48, 40, 32, 2)
  np.testing.assert_array_equal(pair["image"], image[32:64, 24:56])
  np.testing.assert_array_equal(pair["mask"], image[32:64, 24:56, 0])
  np.testing.assert_array_equal(pair["context"], transforms.downsample(image[16:80, 8:72], 2))
  # The central half of the context is the target at half resolution ...
  crop = segmentation.centre_crop(jnp.asarray(pair["context"][None]), 2)[0]
  np.testing.assert_array_equal(crop, transforms.downsample(pair["image"], 2))
  # ... on feature maps too, and outside the image the context is glass.
  x = jnp.arange(64.0).reshape(1, 8, 8, 1)
  np.testing.assert_array_equal(segmentation.centre_crop(x, 2), x[:, 2:6, 2:6])
  edge = transforms.cut_pair({"image": image}, 16, 16, 32, 2)
  assert (edge["context"][:8, :8] == 255).all()
  assert transforms.window_starts(224, 64) == [0, 64, 128, 160]
  assert transforms.window_starts(64, 64) == [0]


@pytest.mark.parametrize("dilation", [2, 8, 12])
def test_atrous_conv_equals_the_zero_padded_dilated_convolution(dilation):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 5))
  module = segmentation.AtrousConv(3, 3, dilation)
  variables = module.init(jax.random.PRNGKey(1), x)
  k = variables["params"]["kernel"]
  padded = np.pad(np.asarray(x), ((0, 0), (dilation,) * 2, (dilation,) * 2, (0, 0)))
  want = np.zeros((2, 8, 8, 3))
  for i in range(3):  # direct sum over the 9 taps of the zero-padded input
    for j in range(3):
      patch = padded[:, i * dilation:i * dilation + 8, j * dilation:j * dilation + 8]
      want += np.einsum("bhwc,cd->bhwd", patch, np.asarray(k[i, j]))
  np.testing.assert_allclose(module.apply(variables, x), want, rtol=1e-5, atol=1e-5)


def test_deeplabv3plus_resnet101_has_the_published_parameter_count():
  cfg = ml_collections.ConfigDict(dict(name="deeplabv3plus", backbone="resnet101", width=1.0,
                                       output_stride=16, multi_grid=(1, 2, 4),
                                       aspp_rates=(6, 12, 18)))
  model = segmentation.build_segmenter(cfg, 4)
  x = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x))
  count = sum(a.size for a in jax.tree.leaves(shapes["params"]))
  trunk = 44_549_160 - (2048 * 1000 + 1000)  # torchvision resnet101 without its fc
  bn = 2 * 256
  aspp = (2048 * 256 + bn) + 3 * (2048 * 256 * 9 + bn) + (2048 * 256 + bn) + (1280 * 256 + bn)
  decoder = (256 * 48 + 96) + (304 * 256 * 9 + bn) + (256 * 256 * 9 + bn) + (256 * 4 + 4)
  assert count == trunk + aspp + decoder == 59_339_940
  logits = jax.eval_shape(model.apply, shapes, x)
  assert logits.shape == (1, 64, 64, 4)


# --- Phases ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pseudo_dir(tiny_classifier, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pm")
  pseudo_masks.run(load_config("pseudo_masks", f"classifier={tiny_classifier},batch=8"),
                   str(workdir))
  return str(workdir)


def _segment_config(pseudo, classifier, extra=""):
  config = load_config("segment", f"pseudo={pseudo},classifier={classifier},width=0.0625,"
                                  f"image_size=32,batch=8,epochs=2,num_train=32{extra}")
  config.data.tile_size, config.data.num_val, config.data.num_test = 48, 8, 8
  config.data.num_threads = 1
  config.log_every, config.checkpoint_every, config.async_checkpointing = 2, 100, False
  config.eval_batch_size = 8
  return config


def test_segment_phase_keeps_the_best_checkpoint_and_tests_with_each_gate(
    pseudo_dir, tiny_classifier, tmp_path):
  config = _segment_config(pseudo_dir, tiny_classifier)
  summary = segment.run(config, str(tmp_path))
  assert set(summary["test"]) == {"off", "exclude", "multiply"}
  for s in summary["test"].values():
    assert 0 <= s["mIoU"] <= 1 and 0 <= s["accuracy"] <= 1
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  val = {r["step"]: r["val/mIoU"] for r in rows if "val/mIoU" in r}
  assert sorted(val) == [4, 8]  # once per epoch
  assert summary["best_step"] == max(val, key=val.get)
  assert os.listdir(tmp_path / "best") == [str(summary["best_step"])]
  from wsss_jax.outputs import overlays  # image | truth | prediction, enlarged and labelled
  width, height = Image.open(tmp_path / "overlays" / "test.png").size
  assert width == 3 * overlays.MIN_SIDE + 4 * overlays.GAP and height > overlays.MIN_SIDE
  assert {"loss/b4_5", "loss/b5_2", "loss/bn7"} <= set(rows[0])
  again = segment.run(config, str(tmp_path))  # finished: resumes at the end, re-tests
  assert again["resumed_from"] == 8 and again["test"] == summary["test"]


def test_segment_refuses_bad_masks_and_mismatched_classifiers(pseudo_dir, tiny_classifier,
                                                              tmp_path):
  broken = tmp_path / "pm"
  shutil.copytree(os.path.join(pseudo_dir, "masks"), broken / "masks")
  os.remove(broken / "masks" / "b5_2" / "synthetic_train_7.png")
  with pytest.raises(UserError, match=r"1 of 32 pseudo masks of layer 'b5_2' are missing, "
                                      r"e.g. .*synthetic_train_7.png"):
    segment.run(_segment_config(str(broken), tiny_classifier), str(tmp_path / "a"))
  # a self-training round pointed at a segmenter that did not finish (no self labels written)
  round1 = _segment_config(str(tmp_path / "seg0" / "self_labels"), tiny_classifier)
  round1.data.mask_layers, round1.loss_weights = ("self",), (1.0,)
  with pytest.raises(UserError, match=r"32 of 32 pseudo masks of layer 'self' are missing, .*; "
                                      r"finish a segment run with self_labels.write=True"):
    segment.run(round1, str(tmp_path / "round1"))
  Image.new("P", (10, 10)).save(broken / "masks" / "b5_2" / "synthetic_train_7.png")
  with pytest.raises(UserError, match=r"synthetic_train_7.png is 10x10 but its image is 48x48"):
    segment.run(_segment_config(str(broken), tiny_classifier), str(tmp_path / "b"))
  config = _segment_config(pseudo_dir, tiny_classifier)
  config.data.num_classes, config.data.class_names = 3, ("a", "b", "c")
  with pytest.raises(UserError, match="has 4 classes but data.num_classes=3"):
    segment.run(config, str(tmp_path / "c"))
  with pytest.raises(UserError, match="supervision='weak'"):
    segment.run(_segment_config(pseudo_dir, tiny_classifier, ",supervision=weak"),
                str(tmp_path / "d"))


def test_mrn_trains_on_pairs_and_tests_by_windows(pseudo_dir, tiny_classifier, tmp_path):
  config = _segment_config(pseudo_dir, tiny_classifier, ",model=mrn")
  config.data.pair_size = config.data.image_size = 16
  config.model.mrn_depth, config.model.mrn_upsample = 2, "bilinear"
  summary = segment.run(config, str(tmp_path))
  assert summary["model"] == "mrn" and 0 <= summary["test"]["off"]["mIoU"] <= 1


def test_finding_segmenter_learns_with_the_image_level_terms(tiny_classifier, tmp_path):
  """image_loss and size_prior read the image labels during training and appear in the logged
  loss parts; in a tissue-map setting they are refused before anything starts."""
  config = _segment_config("", tiny_classifier, ",supervision=full,dataset=synthetic_lesions,"
                                                "init=False,epochs=1")
  config.gate.classifier_workdir, config.gate.modes = "", ("off",)
  config.image_loss.weight, config.size_prior.weight, config.size_prior.upper = 0.5, 1.0, 0.4
  summary = segment.run(config, str(tmp_path / "finding"))
  rows = [json.loads(l) for l in open(tmp_path / "finding" / "metrics.jsonl")]
  assert {"loss/image_label", "loss/size_prior"} <= set(rows[0])
  assert rows[0]["loss/image_label"] > 0 and "finding_IoU" in summary["test"]["off"]
  tissue = _segment_config("", tiny_classifier, ",supervision=full")
  tissue.image_loss.weight = 0.5
  with pytest.raises(UserError, match="image_loss and size_prior are terms of the finding"):
    segment.run(tissue, str(tmp_path / "tissue"))
