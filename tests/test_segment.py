"""Segmentation: loss, gate, MRN geometry and DeepLabV3+ size against independent references;
the segment and pipeline phases end to end on tiny settings, with their refusals."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import load_config, tiny_pipeline_config
from PIL import Image

from wsss_jax import masks
from wsss_jax.data import pipeline as data_pipeline
from wsss_jax.data import transforms
from wsss_jax.errors import UserError
from wsss_jax.models import segmentation
from wsss_jax.phases import pipeline, pseudo_masks, segment
from wsss_jax.runner import run_phase
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
  assert segment.loss_kind(load_config("segment")) == "ce"
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
  from wsss_jax import overlays  # image | truth | prediction, enlarged and labelled
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


def _tiny_erasing_pipeline():
  config = tiny_pipeline_config("erasing=2,upper_bound=True,paper=True")
  config.erasing.erasing.max_erased, config.erasing.erasing.stop_ratio = 0.99, 0.01
  return config


def test_pipeline_end_to_end_with_erasing_upper_bound_and_resume(tmp_path):
  """The whole pipeline once, with adversarial erasing (2 rounds) and the ground-truth upper
  bound: its classifier is erasing's round 0, round 1 trains on tiles erased where round 0's maps
  were high, the pseudo masks fuse both rounds, and a re-run resumes every phase and recomputes
  nothing. paper=True: the default adds SEAM and the CRF, each tested in its phase, and costs
  this test 75 s more (under load)."""
  result = pipeline.run(_tiny_erasing_pipeline(), str(tmp_path))
  text = open(tmp_path / "table.md").read()
  for row in ("| train | b4_5 |", "| train | bn7 |", "| test | bn7 |", "| pseudo | off |",
              "| pseudo | exclude |", "| full | off |", "Adversarial erasing: 2 round(s) fused"):
    assert row in text
  from wsss_jax import overlays  # 48 px tiles drawn at a legible 192 px, with headers and a legend
  width, height = Image.open(tmp_path / "overlays.png").size
  assert width == 4 * overlays.MIN_SIDE + 5 * overlays.GAP  # image, truth, pseudo mask, segmenter
  assert 6 * overlays.MIN_SIDE < height < 6 * overlays.MIN_SIDE + 200  # 6 tiles
  assert result["segment"]["supervision"] == "pseudo"
  assert result["segment_full"]["supervision"] == "full"
  # erasing: round 0 is the pipeline's classifier, not trained again; the masks fuse both rounds
  work, classify = tmp_path / "erasing", str(tmp_path / "classify")
  summary = result["erasing"]
  assert summary["rounds"] == [classify, str(work / "round_1")]
  assert not (work / "round_0").exists()
  assert json.load(open(work / "erasing.json"))["rounds"] == summary["rounds"]
  assert 0 < summary["report"][0]["erased_fraction_next"] <= 0.99
  assert result["pseudo_masks"]["erasing"] == {"workdir": str(work), "rounds": 2}
  assert result["pseudo_masks"]["classifier"] == classify
  assert result["pseudo_masks_test"]["erasing"]["rounds"] == 2
  # round 1 saw the mean colour exactly where erased/round_1 says
  r1 = json.load(open(work / "round_1" / "config.json"))["data"]
  assert r1["erase_dir"] == str(work / "erased" / "round_1")
  assert r1["report_dir"] == str(work / "round_1")
  data = ml_collections.ConfigDict(r1)
  erased = data_pipeline.build_source(data, "train")
  plain = data_pipeline.build_source(ml_collections.ConfigDict(dict(r1, erase_dir="")), "train")
  fill = np.round(np.asarray(data.mean) * 255).astype(np.uint8)
  for i in range(4):
    region = masks.read_binary(erased._path(i), (48, 48))
    np.testing.assert_array_equal(erased[i]["image"][region], np.tile(fill, (region.sum(), 1)))
    np.testing.assert_array_equal(erased[i]["image"][~region], plain[i]["image"][~region])
  # a re-run resumes every phase and finds the pseudo masks current: nothing is written again
  mask = tmp_path / "pseudo_masks" / "masks" / "bn7" / "synthetic_train_3.png"
  written = os.path.getmtime(mask)
  again = pipeline.run(_tiny_erasing_pipeline(), str(tmp_path))
  assert os.path.getmtime(mask) == written
  assert again["erasing"]["rounds"] == summary["rounds"]
  assert again["classify"]["resumed_from"] == again["classify"]["steps"]
  assert again["segment"]["resumed_from"] == again["segment"]["steps"]
  assert again["segment"]["test"] == result["segment"]["test"]

  # pseudo masks of a one-round plan are exactly the plain classifier's
  def pseudo(arg, out):
    pm = load_config("pseudo_masks", arg)
    pm.data.num_train = 8
    return run_phase(pm, str(tmp_path / out))

  one = tmp_path / "one_round"
  one.mkdir()
  plan = json.load(open(work / "erasing.json"))
  plan["rounds"] = [classify]
  json.dump(plan, open(one / "erasing.json", "w"))
  pseudo(f"erasing={one}", "pm1")
  pseudo(f"classifier={classify}", "pm0")
  for layer in ("b4_5", "bn7"):
    for name in os.listdir(tmp_path / "pm0" / "masks" / layer):
      a = masks.read_mask(str(tmp_path / "pm0" / "masks" / layer / name), (48, 48), 4)
      b = masks.read_mask(str(tmp_path / "pm1" / "masks" / layer / name), (48, 48), 4)
      np.testing.assert_array_equal(a, b)


def test_pipeline_paper_and_pretrain_arguments_and_a_workdir_without_checkpoints(tmp_path):
  modes = {arg: load_config("pipeline", f"pretrain={arg}") for arg in
           ("False", "True", "scratch", str(tmp_path))}
  assert modes["False"].classify.model.backbone == "resnet38"
  paper = load_config("pipeline", "paper=True")
  assert paper.classify.equivariance.weight == 0 and not paper.pseudo_masks.crf.enabled
  assert paper.segment.loss_weights == (0.2, 0.2, 0.6)
  assert modes["False"].classify.equivariance.weight == 1.0  # the default: SEAM, CRF, b4_5
  assert modes["False"].pseudo_masks.crf.enabled
  assert modes["False"].segment.data.mask_layers == ("b4_5",)
  assert modes["False"].segment.loss_weights == (1.0,)
  assert not modes["False"].run_pretrain and not modes["False"].pretrain_workdir
  assert modes["True"].run_pretrain and not modes["True"].pretrain_workdir
  assert not modes["scratch"].run_pretrain and not modes["scratch"].pretrain_workdir
  assert modes[str(tmp_path)].pretrain_workdir == str(tmp_path)
  for arg in ("True", "scratch", str(tmp_path)):
    assert modes[arg].classify.model.backbone == "vit"
    assert modes[arg].pseudo_masks.scales == (1.0,)
    assert modes[arg].classify.equivariance.weight == 0  # SEAM needs a CNN's class maps
  with pytest.raises(UserError, match=f"pretrain_workdir={tmp_path}: no pretrain checkpoints"):
    pipeline.run(modes[str(tmp_path)], str(tmp_path / "run"))
  (tmp_path / "checkpoints").mkdir()
  both = modes[str(tmp_path)]
  both.run_pretrain = True
  with pytest.raises(UserError, match="run_pretrain and pretrain_workdir"):
    pipeline.run(both, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # refused before anything is written


def test_pipeline_from_a_cnn_pretext_run_takes_its_encoder_and_width(tmp_path):
  def pretext_run(name, model):
    (tmp_path / name / "checkpoints").mkdir(parents=True)
    (tmp_path / name / "config.json").write_text(json.dumps({"phase": "pretrain", "model": model}))
    return str(tmp_path / name)

  cnn = load_config("pipeline", "pretrain=" + pretext_run("r38", {"encoder": "resnet38",
                                                                  "width": 0.25}))
  assert cnn.classify.model.backbone == "resnet38" and cnn.classify.model.width == 0.25
  assert cnn.segment.model.width == 0.25  # the segmenter starts from that classifier
  assert cnn.classify.equivariance.weight == 1.0 and cnn.pseudo_masks.scales == (1.0, 1.5, 2.0)
  r50 = load_config("pipeline", "pretrain=" + pretext_run("r50", {"encoder": "resnet50",
                                                                  "width": 0.125}))
  with pytest.raises(UserError, match="pretrained model.encoder='resnet50'; the pipeline's "
                                      "classifier is 'resnet38'"):
    pipeline.run(r50, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
