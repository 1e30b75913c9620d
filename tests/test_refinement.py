"""Masks that follow the image: PAR against a numpy re-implementation, an edge-only map made whole,
the ignore band against hand-computed cases and the segmentation loss."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.errors import UserError
from wsss_jax.pseudo import mask_rules, par
from wsss_jax.tasks import segment as segment_task


def numpy_par(maps, image, dilations, iterations, w_rgb, w_pos, pos_weight):
  """AFA's refinement written out with explicit neighbour stacks (REFERENCE.md section 10)."""
  x = np.moveaxis(image.astype(np.float64), -1, 1)  # B C H W
  r = max(dilations)
  h, w = x.shape[-2:]
  dirs = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
  offs = [(dy * d, dx * d) for d in dilations for dy, dx in dirs]

  def stack(a):
    p = np.pad(a, ((0, 0), (0, 0), (r, r), (r, r)), mode="edge")
    return np.stack([p[:, :, r + dy:r + dy + h, r + dx:r + dx + w] for dy, dx in offs], 2)

  near = stack(x)
  sigma = near.std(axis=2, ddof=1, keepdims=True)
  kappa = (-(np.abs(near - x[:, :, None]) / (sigma + 1e-8) / w_rgb) ** 2).mean(1)
  colour = np.exp(kappa - kappa.max(1, keepdims=True))
  colour /= colour.sum(1, keepdims=True)
  dist = np.array([np.hypot(dy, dx) for dy, dx in offs])
  pos = np.exp(-(dist / (dist.std(ddof=1) + 1e-8) / w_pos) ** 2)
  weights = colour + pos_weight * (pos / pos.sum())[None, :, None, None]
  m = maps.astype(np.float64)
  for _ in range(iterations):
    m = (stack(m) * weights[:, None]).sum(2)
  return m


def test_par_matches_numpy():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (2, 20, 24, 3)).astype(np.uint8)
  maps = rng.random((2, 3, 20, 24)).astype(np.float32)
  got = par.refine(jnp.asarray(maps), jnp.asarray(image), dilations=(1, 2, 5), iterations=3,
                   w_rgb=0.3, w_pos=0.3, pos_weight=0.01)
  want = numpy_par(maps, image, (1, 2, 5), 3, 0.3, 0.3, 0.01)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-5)


def disc_image(size=64, radius=16):
  yy, xx = np.mgrid[:size, :size]
  disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius ** 2
  rng = np.random.default_rng(1)
  image = np.where(disc, 200, 30)[..., None] + rng.normal(0, 4, (size, size, 1))
  return np.clip(np.repeat(image, 3, -1), 0, 255).astype(np.uint8), disc


def test_an_edge_only_map_comes_out_whole_after_par():
  """The ring failure: a map that fires on the object's edge (both sides) and not its centre
  gives a ring; after PAR on an easy image the object is whole and the dark side is background."""
  image, disc = disc_image()
  edge = disc ^ np.roll(disc, 3, 0) | disc ^ np.roll(disc, 3, 1)
  ring = np.where(edge, 1.0, 0.05)[None, None].astype(np.float32)
  labels = jnp.ones((1, 1))
  no_white = jnp.zeros((1, 64, 64), bool)

  def iou(maps):
    mask = np.asarray(mask_rules.finding_mask(maps, labels, no_white, (64, 64), 1, "otsu", 0.0))
    return ((mask == 0) & disc).sum() / ((mask == 0) | disc).sum()

  before = iou(jnp.asarray(ring))
  refined = par.refine(jnp.asarray(ring), jnp.asarray(image[None]))
  after = iou(refined)
  assert before < 0.6 and after > 0.9, (before, after)


def test_median_smoothing_removes_speckle_and_keeps_the_edge():
  image, disc = disc_image()
  speckled = image.copy()
  speckled[10, 10] = 255  # one bright speck on the dark side
  x = jnp.moveaxis(jnp.asarray(speckled[None], jnp.float32), -1, 1)
  smooth = np.asarray(par.median3(x))[0, 0]
  assert smooth[10, 10] < 60  # the speck is gone
  assert np.abs(smooth[disc].mean() - 200) < 3 and np.abs(smooth[~disc].mean() - 30) < 3


@pytest.mark.parametrize("field,value,message", [
    ("dilations", (0, 2), r"par.dilations=\(0, 2\) must be positive integers"),
    ("iterations", 0, "par.iterations=0 must be at least 1"),
    ("smooth", "gauss", "par.smooth='gauss' is not one of"),
    ("w_rgb", 0.0, "par.w_rgb=0.0 must be positive"),
    ("dilation", 2, r"par: unknown field\(s\) \['dilation'\]")])
def test_par_settings_are_checked(field, value, message):
  with pytest.raises(UserError, match=message):
    par.check_settings(dict(par.DEFAULTS, **{field: value}))


def test_finding_ignore_band_by_hand():
  # one finding, max-normalised scores along a row; threshold rule alpha 0.5, band 0.1
  row = np.array([1.0, 0.7, 0.55, 0.45, 0.3, 0.0], np.float32)
  maps = jnp.asarray(row.reshape(1, 1, 1, 6))
  none = jnp.zeros((1, 1, 6), bool)
  mask = mask_rules.finding_mask(maps, jnp.ones((1, 1)), none, (1, 6), 1, "threshold", 0.5,
                                 band=0.1)
  np.testing.assert_array_equal(np.asarray(mask)[0, 0], [0, 0, 255, 255, 1, 1])
  plain = mask_rules.finding_mask(maps, jnp.ones((1, 1)), none, (1, 6), 1, "threshold", 0.5)
  np.testing.assert_array_equal(np.asarray(plain)[0, 0], [0, 0, 0, 1, 1, 1])
  # a normal image (no label) and white glass stay background inside the band too
  negative = mask_rules.finding_mask(maps, jnp.zeros((1, 1)), none, (1, 6), 1, "threshold", 0.5,
                                     band=0.1)
  assert (np.asarray(negative) == 1).all()
  white = mask_rules.finding_mask(maps, jnp.ones((1, 1)), jnp.ones((1, 1, 6), bool), (1, 6), 1,
                                  "threshold", 0.5, band=0.1)
  assert (np.asarray(white) == 1).all()


def test_tissue_ignore_band_by_hand():
  # classes 0 and 2 present; pixel 0 clear, pixel 1 within the margin, pixel 2 white glass
  maps = np.zeros((1, 3, 1, 3), np.float32)
  maps[0, 0, 0] = [0.9, 0.55, 0.9]
  maps[0, 1, 0] = [1.0, 1.0, 1.0]  # absent: never wins, never counts as a runner-up
  maps[0, 2, 0] = [0.1, 0.5, 0.1]
  labels = jnp.array([[1.0, 0.0, 1.0]])
  white = jnp.array([[[False, False, True]]])
  mask = mask_rules.pseudo_mask(jnp.asarray(maps), labels, white, (1, 3), 3, band=0.1)
  np.testing.assert_array_equal(np.asarray(mask)[0, 0], [0, 255, 3])
  single = mask_rules.pseudo_mask(jnp.asarray(maps), jnp.array([[0.0, 0.0, 1.0]]), white,
                                  (1, 3), 3, band=0.1)
  np.testing.assert_array_equal(np.asarray(single)[0, 0], [2, 2, 3])  # nothing to be unsure of


@pytest.mark.parametrize("kind", ["ce", "ce+dice"])
def test_the_segmentation_loss_ignores_the_band(kind):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 4, 4, 2)), jnp.float32)
  labels = rng.integers(0, 2, (2, 4, 4)).astype(np.uint8)
  labels[0, :2] = 255
  grad = jax.grad(lambda z: segment_task.mask_loss(z, jnp.asarray(labels), 2, kind, 1))(logits)
  assert np.all(np.asarray(grad)[0, :2] == 0)  # the band gives no gradient
  assert np.any(np.asarray(grad)[0, 2:] != 0)


def test_pseudo_mask_phase_writes_the_band_and_the_segmenter_reads_it(tiny_classifier, tmp_path):
  from conftest import load_config
  from PIL import Image

  from wsss_jax.data import mask_files, pipeline
  from wsss_jax.phases import pseudo_masks

  config = load_config("pseudo_masks", f"classifier={tiny_classifier},band=0.2,par=True")
  config.data.num_train, config.layers = 8, ("b4_5",)
  config.par.iterations, config.par.dilations = 2, (1, 2)
  summary = pseudo_masks.run(config, str(tmp_path / "pm"))
  assert summary["ignore_band"] == 0.2 and summary["refinements"]["b4_5"] == ["par"]
  folder = tmp_path / "pm" / "masks" / "b4_5"
  masks = [np.asarray(Image.open(folder / name)) for name in sorted(os.listdir(folder))]
  share = np.mean([(m == mask_files.IGNORE).mean() for m in masks])
  assert 0 < share < 1 and summary["ignored_share"]["b4_5"] == pytest.approx(share)
  assert Image.open(folder / sorted(os.listdir(folder))[0]).getpalette()[3 * 255:3 * 256] == \
      list(mask_files.IGNORE_COLOUR)  # visible in a viewer
  seg = load_config("segment", f"pseudo={tmp_path / 'pm'},classifier={tiny_classifier}")
  seg.data.update(num_train=8, mask_layers=("b4_5",), image_size=32, tile_size=48)
  seg.loss_weights = (1.0,)
  source = pipeline.build_source(seg.data, "train")
  example = source[0]
  assert mask_files.IGNORE in np.unique(np.concatenate([source[i]["mask_b4_5"].ravel()
                                                       for i in range(len(source))]))
  assert example["mask_b4_5"].shape == example["image"].shape[:2]  # read, not refused
  with pytest.raises(UserError, match="ignore_band=1.5 must lie in"):
    pseudo_masks.validate(load_config("pseudo_masks", "band=1.5"))


# --- The negatives as pixel evidence ---------------------------------------------------------------
def _logits(finding_pixels, shape=(1, 4, 4)):
  """Two-channel logits (finding, background): +-20 so the probabilities are 0 or 1 to 1e-9."""
  z = np.full(shape + (2,), [-20.0, 20.0], np.float32)
  z[finding_pixels] = [20.0, -20.0]
  return jnp.asarray(z)


def test_image_label_loss_is_zero_for_a_clean_normal_image_and_positive_otherwise():
  normal = jnp.zeros((1, 1))
  for pooling in segment_task.POOLINGS:
    clean = segment_task.image_label_loss(_logits(np.zeros((1, 4, 4), bool)), normal, 1, pooling)
    assert float(clean) < 1e-6
    spot = np.zeros((1, 4, 4), bool)
    spot[0, 1, 1] = True
    assert float(segment_task.image_label_loss(_logits(spot), normal, 1, pooling)) > 0.01
    # a positive image that shows no finding pays too
    assert float(segment_task.image_label_loss(_logits(np.zeros((1, 4, 4), bool)),
                                               jnp.ones((1, 1)), 1, pooling)) > 1.0


def test_image_scores_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  flat = p[..., :2].reshape(2, -1, 2)
  lse = np.log(np.mean(np.exp(4.0 * flat), axis=1)) / 4.0
  top = np.sort(flat, axis=1)[:, ::-1][:, :3].mean(1)  # 10% of 30 pixels
  np.testing.assert_allclose(segment_task.image_scores(jnp.asarray(logits), 2, "lse", 4.0, 0.1),
                             lse, rtol=1e-5)
  np.testing.assert_allclose(segment_task.image_scores(jnp.asarray(logits), 2, "topk", 4.0, 0.1),
                             top, rtol=1e-5)


def test_size_prior_by_hand():
  share = np.zeros((2, 4, 4), bool)
  share[0, :2] = True  # image 0: half its pixels a finding
  share[1, 0, 0] = True  # image 1: 1/16 of its pixels
  logits = _logits(share, (2, 4, 4))
  # image 0 present with bounds [0.1, 0.3]: (0.5 - 0.3)^2; image 1 normal: (1/16 - 0)^2
  got = segment_task.size_prior_loss(logits, jnp.array([[1.0], [0.0]]), 1, 0.1, 0.3)
  assert float(got) == pytest.approx(((0.5 - 0.3) ** 2 + (1 / 16) ** 2) / 2, rel=1e-5)
  inside = segment_task.size_prior_loss(logits, jnp.array([[1.0], [1.0]]), 1, 0.05, 0.6)
  assert float(inside) == pytest.approx(0.0, abs=1e-9)


# --- Self-training labels ----------------------------------------------------------------------------
def test_self_labels_by_hand():
  """Findings: confident argmax, IGNORE below the confidence, a normal image all background.
  Tissue: absent classes excluded, the previous masks' background (K) kept."""
  # one finding (channel 0) + background (channel 1); two images of 1 x 3 pixels
  p_finding = np.array([[0.95, 0.6, 0.02], [0.95, 0.6, 0.02]], np.float32)
  logits = np.log(np.stack([p_finding, 1 - p_finding], -1))[:, None]  # (2, 1, 3, 2)
  labels = jnp.array([[1.0], [0.0]])  # image 1 is normal
  images = jnp.zeros((2, 1, 3, 3), jnp.uint8)
  got = segment_task.self_labels(jnp.asarray(logits), images, labels, jnp.zeros((2, 1, 3)),
                                 0.9, (), True)
  np.testing.assert_array_equal(np.asarray(got)[:, 0], [[0, 255, 1], [1, 1, 1]])
  # tissue: 3 classes, class 1 absent; pixel 2 was background (K = 3) in the previous masks
  probs = np.array([[0.5, 0.45, 0.05], [0.05, 0.9, 0.05], [0.9, 0.05, 0.05]], np.float32)
  logits = np.log(probs)[None, None]  # (1, 1, 3, 3)
  previous = jnp.array([[[0, 0, 3]]])
  got = segment_task.self_labels(jnp.asarray(logits), jnp.zeros((1, 1, 3, 3), jnp.uint8),
                                 jnp.array([[1.0, 0.0, 1.0]]), previous, 0.8, (), False)
  # pixel 0: 0.5 / 0.55 = 0.91 -> class 0; pixel 1: class 1 absent, 0.05 / 0.1 = 0.5 -> IGNORE
  np.testing.assert_array_equal(np.asarray(got)[0, 0], [0, 255, 3])


def test_scales_validate_keeps_the_best_scoring_subset_per_layer(tiny_classifier, tmp_path):
  from conftest import load_config

  from wsss_jax.phases import pseudo_masks

  config = load_config("pseudo_masks", f"classifier={tiny_classifier},split=val")
  config.scales, config.scales_validate, config.data.num_val = (1.0, 2.0), True, 8
  summary = pseudo_masks.run(config, str(tmp_path / "auto"))
  kept = summary["scales_kept"]
  assert set(kept) == set(summary["layers"]) and all(s[0] == 1.0 for s in kept.values())
  for subset in {tuple(s) for s in kept.values()}:  # the same scores with those scales fixed
    fixed = config.copy_and_resolve_references()
    fixed.scales, fixed.scales_validate = subset, False
    again = pseudo_masks.run(fixed, str(tmp_path / "x".join(map(str, subset))))
    for layer, s in kept.items():
      if tuple(s) == subset:
        assert again["layers"][layer]["mIoU"] == pytest.approx(summary["layers"][layer]["mIoU"])
  config.dilations = (2,)
  with pytest.raises(UserError, match="scales_validate chooses among plain multi-scale maps"):
    pseudo_masks.validate(config)
