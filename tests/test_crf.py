"""Dense CRF mean-field against a brute-force numpy implementation of the paper's update."""
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.errors import UserError
from wsss_jax.pseudo import crf


def _numpy_mean_field(unary, image, iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
  """Every pair (i, j != i): the dense kernel written out, then Algorithm 1 of the paper."""
  l, h, w = unary.shape
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  pos = np.stack([rows, cols], -1).reshape(-1, 2).astype(np.float64)
  rgb = image.reshape(-1, 3).astype(np.float64)
  dp = ((pos[:, None] - pos[None]) ** 2).sum(-1)
  dc = ((rgb[:, None] - rgb[None]) ** 2).sum(-1)
  radius = int(np.ceil(3 * pos_sxy))  # the smoothness kernel is truncated at 3 sigma per axis
  inside = (np.abs(pos[:, None] - pos[None]) <= radius).all(-1)
  k = (pos_compat * np.exp(-dp / (2 * pos_sxy**2)) * inside
       + bi_compat * np.exp(-dp / (2 * bi_sxy**2) - dc / (2 * bi_srgb**2)))
  np.fill_diagonal(k, 0.0)
  u = unary.reshape(l, -1).T
  q = np.exp(-u) / np.exp(-u).sum(1, keepdims=True)
  for _ in range(iterations):
    m = k @ q
    e = -u - (m.sum(1, keepdims=True) - m)
    q = np.exp(e - e.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
  return q.T.reshape(l, h, w)


def test_mean_field_equals_the_dense_numpy_update():
  rng = np.random.default_rng(0)
  unary = rng.normal(size=(3, 9, 11)).astype(np.float32)
  image = rng.integers(0, 256, (9, 11, 3)).astype(np.float32)
  settings = dict(iterations=4, pos_sxy=1.5, pos_compat=0.3, bi_sxy=6.0, bi_srgb=60.0,
                  bi_compat=0.5)
  q = crf.mean_field(jnp.asarray(unary), jnp.asarray(image), downsample=1, **settings)
  np.testing.assert_allclose(np.asarray(q), _numpy_mean_field(unary, image, **settings),
                             atol=2e-5)


def _two_colour_tile(size=48, edge=24):
  image = np.zeros((size, size, 3), np.uint8)
  image[:, :edge] = (200, 60, 60)
  image[:, edge:] = (60, 60, 200)
  image = np.clip(image + np.random.default_rng(1).normal(0, 6, image.shape), 0, 255)
  truth = np.zeros((size, size), np.uint8)
  truth[:, edge:] = 1
  return image.astype(np.uint8), truth


@pytest.mark.parametrize("downsample", [1, 4])
def test_refinement_moves_a_shifted_boundary_to_the_colour_edge(downsample):
  image, truth = _two_colour_tile()
  mask = np.zeros_like(truth)
  mask[:, 30:] = 1  # the pseudo mask's boundary is 6 px right of the colour edge
  cfg = dict(crf.DEFAULTS, downsample=downsample)
  out = np.asarray(crf.refine_labels(jnp.asarray(mask[None]), jnp.asarray(image[None]),
                                     jnp.asarray([[1.0, 1.0, 0.0]]),
                                     jnp.zeros((1, 48, 48), bool), 3, cfg))[0]
  before, after = (mask == truth).mean(), (out == truth).mean()
  assert before == pytest.approx(1 - 6 / 48)
  assert after > before + 0.08, (before, after)
  assert set(np.unique(out)) <= {0, 1}  # the absent class 2 and the background never appear


def test_background_pixels_and_empty_tiles_stay_background():
  image, truth = _two_colour_tile()
  background = np.zeros((2, 48, 48), bool)
  background[0, :10, :10] = True
  masks = np.stack([truth, truth])
  masks[0][background[0]] = 3
  labels = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # the second tile has no class
  out = np.asarray(crf.refine_labels(jnp.asarray(masks), jnp.asarray(np.stack([image, image])),
                                     jnp.asarray(labels), jnp.asarray(background), 3,
                                     crf.DEFAULTS))
  assert np.all(out[0][background[0]] == 3) and not np.any(out[0][~background[0]] == 3)
  assert np.all(out[1] == 3)


@pytest.mark.parametrize("field,value,match", [
    ("pos_sxy", 0.0, "crf.pos_sxy=0.0 must be positive"),
    ("bi_srgb", -1.0, "crf.bi_srgb=-1.0 must be positive"),
    ("iterations", 0, "crf.iterations=0 must be at least 1"),
    ("gt_prob", 1.0, "crf.gt_prob=1.0 must lie in"),
    ("bi_compat", -2.0, "crf.bi_compat=-2.0 must be >= 0")])
def test_bad_crf_settings_are_refused(field, value, match):
  with pytest.raises(UserError, match=match):
    crf.check_settings(dict(crf.DEFAULTS, **{field: value}))
