"""Findings against a background: the background rules against numpy, maps that point at the
finding of a trained classifier, the embedded lesion dataset, finding folders, and dataset
presets that never overwrite what the user gave."""
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config
from PIL import Image
from tiny_models import SmallCNN

from wsss_jax import metrics, relevance as R
from wsss_jax.data import cells, lesions, pipeline
from wsss_jax.errors import UserError
from wsss_jax.phases import pseudo_masks
from wsss_jax.pseudo import mask_rules
from wsss_jax.tasks import segment as segment_task
from wsss_jax.train.progress import Progress


# --- Background rules against numpy ---------------------------------------------------------------
def np_otsu(values, bins=256):
  """Otsu by brute force: every bin edge t, the between-class variance of the pixels themselves."""
  v = np.clip((values * bins).astype(int), 0, bins - 1)
  best, best_t = -1.0, None
  for t in range(1, bins):
    lo, hi = v < t, v >= t
    if not lo.any() or not hi.any():
      continue
    c = (v + 0.5) / bins
    between = lo.mean() * hi.mean() * (c[lo].mean() - c[hi].mean()) ** 2
    if between > best + 1e-12:
      best, best_t = between, t
  return (best_t or 1) / bins  # a constant image: the first edge, as mask_rules.otsu_threshold


def np_finding_mask(maps, labels, rule, alpha, level=None):
  """The finding rule written out per pixel for one image: maps (K, H, W) at mask size."""
  k = maps.shape[0]
  present = labels > 0
  m = np.where(present[:, None, None], np.maximum(maps, 0), 0.0)
  peak = m.max()
  s = m / peak if peak > 0 else m
  top = s.max(axis=0)
  bg = {"threshold": lambda: np.full(top.shape, alpha),
        "power": lambda: (1 - top) ** alpha,
        "otsu": lambda: np.full(top.shape, np_otsu(top.ravel())),
        "negatives": lambda: np.full(top.shape, level / peak)}[rule]()
  out = np.where(top > bg, s.argmax(axis=0), k)
  return out if present.any() else np.full(top.shape, k)


@pytest.mark.parametrize("rule,alpha,level", [("threshold", 0.35, None), ("power", 3.0, None),
                                              ("otsu", 0.0, None), ("negatives", 0.0, 0.8)])
def test_finding_rules_match_numpy(rule, alpha, level):
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(3, 2, 16, 16)).astype(np.float32) * 2  # signed, as raw Grad-CAM
  maps[0, 1, 4:9, 5:11] += 6  # a clear finding in the first image
  labels = np.array([[1, 1], [0, 1], [0, 0]], np.float32)  # a negative image last
  out = mask_rules.finding_mask(jnp.asarray(maps), jnp.asarray(labels), jnp.zeros((3, 16, 16), bool),
                           (16, 16), 2, rule, alpha, level)
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(out[i]), np_finding_mask(maps[i], labels[i], rule,
                                                                       alpha, level))
  assert (np.asarray(out[2]) == 2).all()  # the negative image is all background


def test_otsu_threshold_matches_brute_force_on_bimodal_and_skewed_data():
  rng = np.random.default_rng(1)
  rows = [np.concatenate([rng.normal(0.2, 0.05, 300), rng.normal(0.7, 0.1, 100)]),
          rng.beta(2, 8, 400)]
  rows = np.clip(np.stack(rows), 0, 1).astype(np.float32)
  got = np.asarray(mask_rules.otsu_threshold(jnp.asarray(rows)))
  for row, t in zip(rows, got):
    assert t == pytest.approx(np_otsu(row), abs=1e-6)
  assert 0.35 < got[0] < 0.55  # between the two modes


def test_white_glass_combines_with_a_map_rule():
  assert mask_rules.split_rule("white+otsu") == ("white", "otsu")
  assert mask_rules.split_rule("threshold") == ("none", "threshold")
  assert mask_rules.split_rule("white") == ("white", None)
  maps = jnp.ones((1, 1, 4, 4))
  white = jnp.zeros((1, 4, 4), bool).at[0, 0, :].set(True)
  out = np.asarray(mask_rules.finding_mask(maps, jnp.ones((1, 1)), white, (4, 4), 1, "threshold", 0.5))
  assert (out[0, 0] == 1).all() and (out[0, 1:] == 0).all()


@pytest.mark.parametrize("rule,alpha", [("threshold", 0.0), ("threshold", 1.5),
                                        ("negatives", 2.0), ("power", -1.0)])
def test_alpha_outside_its_range_is_one_clear_error(rule, alpha):
  with pytest.raises(UserError, match=r"background.alpha=.*(outside \(0, 1\]|must be positive)"):
    pseudo_masks.parse_alpha(str(alpha), rule)
  assert pseudo_masks.parse_alpha("default", rule) == mask_rules.DEFAULT_ALPHA[rule]
  assert pseudo_masks.parse_alpha("auto", rule) == "auto"
  with pytest.raises(UserError, match="background.alpha='' is not a number, 'default' or 'auto'"):
    pseudo_masks.parse_alpha("", rule)


def test_finding_scoring_counts_background_as_a_class():
  truth = np.array([[[0, 0, 1, 1]]])
  pred = np.array([[[0, 1, 1, 1]]])
  conf = np.asarray(metrics.device_confusion(jnp.asarray(pred), jnp.asarray(truth), 1, 1,
                                             "finding"))
  np.testing.assert_array_equal(conf, [[1, 1], [0, 2]])
  s = metrics.iou_scores(conf, ("lesion", "background"))
  assert s["IoU/lesion"] == pytest.approx(1 / 2) and s["IoU/background"] == pytest.approx(2 / 3)
  assert s["mIoU"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_gate_never_excludes_the_background_channel():
  logits = jnp.zeros((2, 1, 1, 2)).at[:, :, :, 0].set(1.0)  # the finding wins ungated
  probs = jnp.array([[0.9], [0.05]])  # the second image's finding fails the gate
  pred = np.asarray(jnp.argmax(segment_task.gate(logits, probs, "exclude", 0.1), -1))
  np.testing.assert_array_equal(pred.ravel(), [0, 1])


# --- Maps of a trained classifier point at the finding ---------------------------------------------
def blob_images(rng, n, size=24):
  """Noise images, half with one bright Gaussian blob (label 1), half without (label 0)."""
  y, x = np.mgrid[0:size, 0:size]
  images = rng.normal(0.3, 0.1, (n, size, size, 3)).astype(np.float32)
  labels = (np.arange(n) % 2 == 0).astype(np.float32)[:, None]
  centres = rng.integers(5, size - 5, (n, 2))
  for i in range(0, n, 2):
    blob = np.exp(-((y - centres[i, 0]) ** 2 + (x - centres[i, 1]) ** 2) / (2 * 2.0**2))
    images[i] += 0.8 * blob[..., None]
  return images, labels, centres


@pytest.fixture(scope="module")
def blob_classifier():
  model = SmallCNN(classes=1, use_bias=True)
  rng = np.random.default_rng(0)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))
  tx = optax.adam(1e-2)
  opt = tx.init(variables["params"])

  @jax.jit
  def step(params, opt, x, y):
    loss, g = jax.value_and_grad(lambda p: optax.sigmoid_binary_cross_entropy(
        model.apply({"params": p}, x), y).mean())(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  params = variables["params"]
  for _ in range(150):
    x, y, _ = blob_images(rng, 32)
    params, opt, loss = step(params, opt, x, y)
  assert float(loss) < 0.1  # it has learned the blob
  return model, {"params": params}


@pytest.mark.parametrize("method,layers", [
    ("cam", "feat"), ("gradcam", "feat"), ("layercam", "feat"), ("lrp", "input"),
    ("patternattribution", "input")])
def test_maps_of_a_trained_classifier_peak_on_the_blob(blob_classifier, method, layers):
  model, variables = blob_classifier
  x, _, centres = blob_images(np.random.default_rng(7), 16)
  x, centres = x[::2], centres[::2]  # the images with a blob
  options = {"cam_head": "head"} if method == "cam" else {}
  if method == "patternattribution":
    train = [blob_images(np.random.default_rng(s), 32)[0] for s in range(4)]
    options["patterns"] = R.fit_patterns(model.apply, variables, train)
  # the finding recipe of the pseudo-mask phase: ReLU on, raw maps, the blob's class present
  maps = R.relevance(method, model.apply, variables, jnp.asarray(x), layers=layers,
                     labels=jnp.ones((8, 1)), only_present=True, normalize="none",
                     relu=pseudo_masks.relu_choice("setting", "finding"), **options)
  maps = np.asarray(maps)[:, 0]
  if method in ("lrp", "patternattribution"):  # pixel relevance: smoothed as a mask is
    maps = np.asarray(jax.image.resize(jax.image.resize(maps, (8, 6, 6), "linear"),
                                       (8, 24, 24), "linear"))
  peaks = np.array([np.unravel_index(np.argmax(m), m.shape) for m in maps])
  distance = np.hypot(*(peaks - centres).T)
  assert (distance <= 4).mean() >= 0.75, (method, distance)


# --- The embedded lesion dataset ---------------------------------------------------------------------
def test_synthetic_lesions_is_deterministic_and_labels_follow_the_masks():
  a = lesions.generate_image(3, "val", 5, 64)
  b = lesions.generate_image(3, "val", 5, 64)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  kinds = []
  for i in range(24):
    image, mask, labels = lesions.generate_image(0, "train", i, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, lesions.BACKGROUND}
    assert labels[0] == float((mask == 0).any())
    kinds.append(labels[0])
  assert 0.25 < np.mean(kinds) < 0.75  # malignant and normal images both present


def test_intensity_threshold_does_not_solve_synthetic_lesions():
  """The lesion is dark, but so are the outside of the fan, shadows and fat lobules: the better
  polarity of an Otsu threshold on the image stays far from the lesion."""
  ious = []
  for i in range(16):
    image, mask, labels = lesions.generate_image(0, "test", i, 96)
    grey = image.mean(-1) / 255.0
    t = np_otsu(grey.ravel())
    truth = mask == 0
    best = 0.0
    for pred in (grey < t, grey >= t):
      union = (pred | truth).sum()
      best = max(best, (pred & truth).sum() / union if union else 1.0)
    ious.append(best)
  assert np.mean(ious) < 0.3


def test_synthetic_cells_is_deterministic_and_an_intensity_threshold_is_strong_on_it():
  """The fluorescence-like set: labels follow the masks, both kinds of image occur, and on the
  images with cells Otsu's threshold of the grey image finds most of them (the baseline a weak
  method must beat there), while on a normal image it always marks something."""
  a, b = cells.generate_image(3, "val", 5, 96), cells.generate_image(3, "val", 5, 96)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  kinds, ious, normal_marked = [], [], []
  for i in range(24):
    image, mask, labels = cells.generate_image(0, "test", i, 96)
    assert image.shape == (96, 96, 3) and set(np.unique(mask)) <= {0, cells.BACKGROUND}
    assert labels[0] == float((mask == 0).any())
    kinds.append(labels[0])
    grey = image.mean(-1) / 255.0
    pred, truth = grey >= np_otsu(grey.ravel()), mask == 0
    if labels[0]:
      ious.append((pred & truth).sum() / (pred | truth).sum())
    else:
      normal_marked.append(pred.mean())
  assert 0.25 < np.mean(kinds) < 0.75
  assert np.mean(ious) > 0.7 and min(normal_marked) > 0.05


def test_pipeline_reads_synthetic_lesions_through_a_phase_config():
  config = load_config("segment", "dataset=synthetic_lesions")
  assert config.data.class_names == ("lesion",) and config.data.num_classes == 1
  assert config.data.setting == "finding" and config.palette == "finding"
  config.data.num_test, config.data.tile_size = 3, 32
  source = pipeline.build_source(config.data, "test")
  assert len(source) == 3 and source[1]["labels"].shape == (1,)
  assert segment_task.output_classes(config) == 2
  cells_config = load_config("classify", "dataset=synthetic_cells")
  assert cells_config.data.class_names == ("cell",) and cells_config.data.setting == "finding"


# --- Presets never overwrite what the user gave ---------------------------------------------------
@pytest.mark.parametrize("phase,arg,field,value", [
    ("pseudo_masks", "dataset=bcss_wsss,background=white", "background.rule", "white"),
    ("pseudo_masks", "dataset=luad_histoseg,background=none", "background.rule", "none"),
    ("pseudo_masks", "dataset=folder,background=otsu", "background.rule", "otsu"),
    ("pseudo_masks", "dataset=bcss_wsss,palette=luad", "palette", "luad"),
    ("pseudo_masks", "dataset=synthetic_lesions,palette=bcss", "palette", "bcss"),
    ("segment", "dataset=folder,classes=nucleus,setting=finding", "data.class_names",
     ("nucleus",)),
    ("classify", "dataset=folder,classes=a+b+c", "data.num_classes", 3),
    ("classify", "dataset=synthetic_lesions,setting=tissue", "data.setting", "tissue"),
    ("pseudo_masks", "dataset=folder,setting=finding,background=white+power",
     "background.rule", "white+power"),
])
def test_a_given_argument_survives_the_dataset_preset(phase, arg, field, value):
  config = load_config(phase, arg)
  node = config
  for key in field.split("."):
    node = node[key]
  assert (tuple(node) if isinstance(node, (list, tuple)) else node) == value


def test_presets_fill_what_was_not_given():
  pm = load_config("pseudo_masks", "dataset=folder,classes=nucleus,setting=finding")
  assert pm.background.rule == "threshold" and pm.palette == "finding"
  assert load_config("pseudo_masks", "dataset=folder,classes=a+b").background.rule == "none"
  assert load_config("pseudo_masks", "dataset=luad_histoseg").background.rule == "white"
  pipe = load_config("pipeline", "dataset=synthetic_lesions")
  for section in ("classify", "pseudo_masks", "segment"):
    assert pipe[section].data.name == "synthetic_lesions"
    assert pipe[section].data.setting == "finding"
  assert pipe.pseudo_masks.background.alpha == "auto"
  with pytest.raises(UserError, match="background is not a class"):
    load_config("classify", "dataset=folder,classes=nucleus+background,setting=finding")
  with pytest.raises(UserError, match="setting='lesion' is not one of"):
    load_config("classify", "dataset=folder,setting=lesion")


# --- Finding folders ---------------------------------------------------------------------------------
def write_finding_folder(root, background_index=1):
  """A one-class folder: `[1]` / `[0]` training names, val masks with index K = background."""
  rng = np.random.default_rng(0)
  os.makedirs(root / "train")
  os.makedirs(root / "val" / "img")
  os.makedirs(root / "val" / "mask")
  size = 64  # classify's default input: a smaller tile would be a bad file
  for i, name in enumerate(["a+0[1]", "b+1[0]", "c-[1]", "d-[0]"]):
    Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(
        root / "train" / f"{name}.png")
  for i in range(2):
    Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(
        root / "val" / "img" / f"v{i}.png")
    mask = np.full((size, size), background_index, np.uint8)
    mask[4:20, 4:20] = 0 if i == 0 else background_index
    Image.fromarray(mask, mode="L").save(root / "val" / "mask" / f"v{i}.png")


def test_a_finding_folder_reads_negatives_and_index_k_background(tmp_path):
  write_finding_folder(tmp_path)
  config = load_config("classify", f"dataset=folder,root={tmp_path},classes=nucleus,setting=finding")
  train = pipeline.build_source(config.data, "train")
  labels = {train.name(i): train[i]["labels"][0] for i in range(len(train))}
  assert labels == {"a+0[1]": 1.0, "b+1[0]": 0.0, "c-[1]": 1.0, "d-[0]": 0.0}
  val = pipeline.build_source(config.data, "val")
  assert [val[i]["labels"][0] for i in range(2)] == [1.0, 0.0]  # a mask of only K is negative


def test_a_finding_folder_whose_masks_use_another_background_index_is_named(tmp_path):
  write_finding_folder(tmp_path, background_index=255)
  config = load_config("classify", f"dataset=folder,root={tmp_path},classes=nucleus,setting=finding")
  with pytest.raises(UserError, match=r"v0.png has palette index 255.*1 = background"):
    pipeline.build_source(config.data, "val")


def test_negatives_rule_without_negative_images_is_one_clear_error(tiny_classifier, tmp_path):
  config = load_config("pseudo_masks", f"classifier={tiny_classifier},background=negatives")
  config.data.num_train = 16
  with pytest.raises(UserError, match="has no negative image"):
    pseudo_masks.run(config, str(tmp_path))


def test_alpha_auto_picks_the_best_swept_alpha_and_par_and_crf_only_where_they_help(
    tiny_classifier, tmp_path):
  config = load_config("pseudo_masks", f"classifier={tiny_classifier},setting=finding,"
                       "background=threshold,crf=True,par=True")
  config.background.alpha, config.crf.validate, config.split = "auto", True, "val"
  config.par.validate, config.par.iterations, config.par.dilations = True, 2, (1, 2)
  config.crf.iterations = 2
  config.data.num_val = 8
  config.scales, config.scales_validate = (1.0, 2.0), True
  summary = pseudo_masks.run(config, str(tmp_path))
  sweep = summary["alpha_sweep"]
  assert set(sweep) == set(summary["layers"]) and os.path.exists(tmp_path / "alpha_sweep.png")
  text = (tmp_path / "alpha_sweep.md").read_text()
  for layer, s in sweep.items():
    assert s["alpha"] == list(pseudo_masks.ALPHA_GRID["threshold"])
    assert s["best"] == s["alpha"][int(np.nanargmax(s["mIoU"]))]
    assert summary["background_alpha"][layer] == s["best"]
    plain = max(s["mIoU"])
    assert s["par"] == (s["par_mIoU"] > plain)  # each kept only where it raised the val mIoU
    after_par = max(plain, s["par_mIoU"])
    assert s["crf"] == (s["crf_mIoU"] > after_par)
    assert summary["refinements"][layer] == ["par"] * s["par"] + ["crf"] * s["crf"]
    assert (layer in summary["crf_layers"]) == s["crf"]
    assert f"{layer}: {s['crf_mIoU']:.3f}" in text and f"{layer}: {s['par_mIoU']:.3f}" in text
    # then the scales: both (what alpha, PAR and the CRF were chosen at) or the first alone
    assert s["scales_mIoU"]["1/2"] == pytest.approx(max(after_par, s["crf_mIoU"]), abs=1e-6)
    assert summary["scales_kept"][layer] == ([1.0, 2.0] if s["scales_mIoU"]["1/2"] > s[
        "scales_mIoU"]["1"] else [1.0])
    # the phase's own scoring of the val masks (written with the chosen alpha, refinements and
    # scales) agrees with what the validation measured for that choice
    assert s["refined_mIoU"] == max(s["scales_mIoU"].values())
    assert summary["layers"][layer]["mIoU"] == pytest.approx(s["refined_mIoU"], abs=1e-6)


def test_segment_layer_auto_takes_the_best_validated_layer():
  from wsss_jax.phases import pipeline as pipeline_phase
  sweep = {"b4_5": {"mIoU": [0.5, 0.64], "refined_mIoU": 0.70},  # a refinement raised it
           "b5_2": {"mIoU": [0.66, 0.6], "refined_mIoU": 0.66}}
  summary = {"layers_written": ["b4_5", "b5_2"], "alpha_sweep": sweep}
  assert pipeline_phase.segment_layer("auto", summary) == "b4_5"
  sweep["b4_5"]["refined_mIoU"] = 0.64  # without it b4_5 scores 0.64 < 0.66
  assert pipeline_phase.segment_layer("auto", summary) == "b5_2"
  assert pipeline_phase.segment_layer("auto", {"layers_written": ["b4_5"]}) is None
  assert pipeline_phase.segment_layer("section", summary) is None
  assert pipeline_phase.segment_layer("b4_5", summary) == "b4_5"
  with pytest.raises(UserError, match="segment_layer='bn7'"):
    pipeline_phase.segment_layer("bn7", summary)


def test_pipeline_table_names_the_finding_scoring_and_its_iou_and_dice():
  from wsss_jax.phases import pipeline as pipeline_phase
  # one lesion on a 10-pixel image: truth 2 px, prediction 3 px, overlap 2 px
  confusion = np.array([[2, 0], [1, 7]])
  scores = metrics.iou_scores(confusion, ("lesion", "background"), ("lesion",))
  assert scores["finding_IoU"] == pytest.approx(2 / 3)  # TP / (TP + FP + FN)
  assert scores["finding_Dice"] == pytest.approx(4 / 5)  # 2 TP / (2 TP + FP + FN)
  assert scores["mIoU"] == pytest.approx((2 / 3 + 7 / 8) / 2)  # the background inflates it
  result = {"class_names": ["lesion"], "setting": "finding", "test_split": "test",
            "segment": {"supervision": "pseudo", "test": {"off": scores}}}
  text = pipeline_phase.table(result)
  assert "stage-2" not in text and "finding scoring: background a class" in text
  assert "| supervision | gate | mIoU | finding IoU | finding Dice | FwIoU | accuracy |" in text
  assert (f"| pseudo | off | {scores['mIoU']:.3f} | 0.667 | 0.800 | {scores['FwIoU']:.3f} | "
          f"0.900 | 0.667 | 0.875 |") in text


# --- Progress --------------------------------------------------------------------------------------
def test_progress_line_reports_done_rate_and_eta():
  now = [0.0]
  out = io.StringIO()
  p = Progress("pseudo masks", 100, every_s=5.0, stream=out, clock=lambda: now[0])
  p.update(10)       # the first update starts the clock (compilation before it is not counted)
  now[0] = 2.0
  p.update(20)       # too soon: nothing printed
  now[0] = 6.0
  p.update(40)       # 30 items in 6 s: 5/s, 60 left: 12 s
  now[0] = 8.0
  p.update(100)      # the end is always printed
  lines = out.getvalue().splitlines()
  assert lines == ["pseudo masks: 40/100 (40%) | 5.0/s | eta 12s",
                   "pseudo masks: 100/100 (100%) | 11.2/s"]


def test_crf_lets_the_background_of_a_finding_mask_stay_background():
  """Without a white-glass region the CRF had no pixel where background was allowed, so every
  positive image's pseudo mask became all finding."""
  from wsss_jax.pseudo import crf
  mask = np.ones((1, 16, 16), np.uint8)
  mask[0, :, :8] = 0  # left half the finding, right half background (index K = 1)
  image = np.zeros((1, 16, 16, 3), np.uint8)
  image[0, :, :8] = 200
  args = (jnp.asarray(mask), jnp.asarray(image), jnp.ones((1, 1)), jnp.zeros((1, 16, 16), bool), 1,
          dict(crf.DEFAULTS))
  refined = np.asarray(crf.refine_labels(*args, free_background=True))
  np.testing.assert_array_equal(refined, mask)
  assert (np.asarray(crf.refine_labels(*args)) == 0).all()  # the tissue rule: no free background


def test_a_folder_without_a_test_split_is_named_and_val_can_stand_in(tmp_path):
  from wsss_jax import runner
  write_finding_folder(tmp_path)
  config = load_config("pipeline", f"dataset=folder,root={tmp_path},classes=nucleus,"
                                   "setting=finding")
  with pytest.raises(UserError, match=r"has no test split .*--config.segment.test_split=val"):
    runner.validate_phase(config)
  config.segment.test_split = "val"
  runner.validate_phase(config)  # everything else about the folder is in order


def test_upper_bound_on_a_folder_without_training_masks_is_refused_before_any_work(tmp_path):
  """The weakly labelled case: training images without masks. upper_bound=True needs them; the
  command says so in one line before the classifier's first step, and writes nothing."""
  import subprocess
  import sys
  import time
  import shutil
  write_finding_folder(tmp_path / "data")
  shutil.copytree(tmp_path / "data" / "val", tmp_path / "data" / "test")  # only upper_bound amiss
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  started = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "wsss_jax.main", "--config=configs/pipeline.py:dataset=folder,"
       f"root={tmp_path / 'data'},classes=nucleus,setting=finding,upper_bound=True",
       f"--workdir={tmp_path / 'run'}"], cwd=root, capture_output=True, text=True, env=env,
      timeout=300)
  seconds = time.perf_counter() - started
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: supervision=full "), \
      proc.stderr
  assert "train have none" in proc.stderr or "/train have none" in proc.stderr, proc.stderr
  assert not os.path.exists(tmp_path / "run") or not os.listdir(tmp_path / "run")
  print(f"refused in {seconds:.1f} s")  # the bound is 5 s on a laptop


def test_the_pipeline_checks_what_the_background_rule_needs_before_the_first_step(tmp_path):
  """A finding folder whose training images all show the finding and whose val split has no
  masks: alpha=auto (and the negatives rule) have nothing to choose from, said at once."""
  from wsss_jax.runner import run_phase
  write_finding_folder(tmp_path / "data")
  for name in ("b+1[0]", "d-[0]"):  # no normal image left
    os.remove(tmp_path / "data" / "train" / f"{name}.png")
  import shutil
  shutil.copytree(tmp_path / "data" / "val", tmp_path / "data" / "test")
  shutil.rmtree(tmp_path / "data" / "val" / "mask")
  (tmp_path / "data" / "val" / "img" / "v0.png").rename(tmp_path / "data" / "val" / "img" / "v0-[1].png")
  (tmp_path / "data" / "val" / "img" / "v1.png").rename(tmp_path / "data" / "val" / "img" / "v1-[1].png")
  data = f"dataset=folder,root={tmp_path / 'data'},classes=nucleus,setting=finding"
  with pytest.raises(UserError, match="alpha=auto chooses alpha on val masks"):
    run_phase(load_config("pipeline", data), str(tmp_path / "run"))
  config = load_config("pipeline", data)
  config.pseudo_masks.background.rule = "negatives"
  with pytest.raises(UserError, match="rule='negatives' needs negative training images"):
    run_phase(config, str(tmp_path / "run2"))
  config = load_config("pipeline", data + ",rounds=2")
  config.pseudo_masks.background.alpha = "0.5"
  with pytest.raises(UserError, match="rounds=2 keeps the round that scores best on the val"):
    run_phase(config, str(tmp_path / "run3"))
  from wsss_jax.phases import pipeline as pipeline_phase
  auto = load_config("pipeline", data)
  assert auto.self_training.rounds == "auto" and pipeline_phase.self_training_rounds(auto) == (
      0, True)  # "auto" runs none without val masks
  assert not any(os.listdir(tmp_path / r) for r in ("run", "run2", "run3"))


def test_the_pipeline_image_size_sets_the_classifier_and_the_segmenter_input():
  pipe = load_config("pipeline", "dataset=synthetic_cells,image_size=128")
  assert pipe.classify.data.image_size == pipe.segment.data.image_size == 128
  assert pipe.image_sizes == ()
  default = load_config("pipeline", "dataset=synthetic_cells")  # the finding recipe: a choice
  assert default.classify.data.image_size == default.segment.data.image_size == 64
  assert default.image_sizes == (64, 128)
  assert load_config("pipeline").image_sizes == ()  # tissue maps: the preset's side
  assert load_config("pipeline", "dataset=synthetic_lesions,paper=True").image_sizes == ()
  assert load_config("pipeline", "image_size=auto").image_sizes == (64, 128)
  with pytest.raises(UserError, match="image_size='12x' is not a side in pixels"):
    load_config("pipeline", "image_size=12x")
  with pytest.raises(UserError, match="image_size=auto: a ViT classifier takes"):
    load_config("pipeline", "pretrain=scratch,image_size=auto")
  from wsss_jax.phases import pipeline as pipeline_phase
  with pytest.raises(UserError, match="which background.alpha=auto measures"):
    pipeline_phase.validate(load_config("pipeline", "image_size=auto"))  # tissue: no val sweep
  mismatch = load_config("pipeline", "dataset=synthetic_cells")
  mismatch.classify.data.image_size = 96
  with pytest.raises(UserError, match="classify.data.image_size=96 and image_size=auto"):
    pipeline_phase.validate(mismatch)
  mismatch.image_sizes = (96, 64)
  with pytest.raises(UserError, match=r"image_sizes=\[96, 64\]: image_size=auto tries rising"):
    pipeline_phase.validate(mismatch)
