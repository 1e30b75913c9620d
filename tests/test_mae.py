import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from wsss_jax.errors import UserError
from wsss_jax.models import mae


@pytest.mark.parametrize("ratio", [0.75, 0.9, 0.5])
def test_random_masking_invariants(ratio):
  batch, length = 16, 49
  m = mae.random_masking(jax.random.PRNGKey(0), batch, length, ratio)
  len_keep = int(length * (1 - ratio))
  ids_keep, ids_restore, mask = map(np.asarray, m)
  assert ids_keep.shape == (batch, len_keep)
  # exact kept count in every sample
  np.testing.assert_array_equal(mask.sum(1), length - len_keep)
  for b in range(batch):
    assert len(set(ids_keep[b])) == len_keep                 # no token kept twice
    np.testing.assert_array_equal(mask[b, ids_keep[b]], 0)   # kept tokens are the visible ones
    # ids_restore is a permutation, and inverts the shuffle: restore[shuffle] == arange
    assert sorted(ids_restore[b]) == list(range(length))
    shuffle = np.argsort(ids_restore[b])
    np.testing.assert_array_equal(shuffle[:len_keep], ids_keep[b])
  # masks differ between samples (per-sample noise)
  assert len({tuple(r) for r in mask}) > batch // 2


@pytest.mark.parametrize("sampling", mae.MASK_SAMPLINGS)
@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_every_mask_sampling_keeps_an_exact_count_and_a_consistent_permutation(sampling, ratio):
  batch, grid = 8, 7
  m = mae.sample_masking(jax.random.PRNGKey(0), batch, grid, ratio, sampling)
  length, len_keep = grid * grid, int(grid * grid * (1 - ratio))
  ids_keep, ids_restore, mask = map(np.asarray, m)
  np.testing.assert_array_equal(mask.sum(1), length - len_keep)
  for b in range(batch):
    np.testing.assert_array_equal(np.sort(np.argsort(ids_restore[b])[:len_keep]),
                                  np.sort(ids_keep[b]))
    np.testing.assert_array_equal(np.flatnonzero(mask[b] == 0), np.sort(ids_keep[b]))


def test_grid_masking_keeps_one_patch_in_four():
  """Ratio 0.75 on an 8 x 8 grid: the 16 visible patches are one (row, column) parity class."""
  m = mae.sample_masking(jax.random.PRNGKey(2), 32, 8, 0.75, "grid")
  visible = 1 - np.asarray(m.mask).reshape(32, 8, 8)
  offsets = set()
  for v in visible:
    rows, cols = np.nonzero(v)
    assert len({r % 2 for r in rows}) == 1 and len({c % 2 for c in cols}) == 1
    offsets.add((rows[0] % 2, cols[0] % 2))
  assert len(offsets) == 4  # the offset is random per sample


def _masked_neighbour_share(mask, grid):
  """Mean share of a masked patch's 4-neighbours (inside the image) that are masked."""
  m = mask.reshape(-1, grid, grid).astype(bool)
  shares = []
  for x in m:
    p = np.pad(x, 1)
    n = p[:-2, 1:-1].astype(int) + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    inside = np.pad(np.ones_like(x), 1)
    k = inside[:-2, 1:-1].astype(int) + inside[2:, 1:-1] + inside[1:-1, :-2] + inside[1:-1, 2:]
    shares.append((n / k)[x].mean())
  return float(np.mean(shares))


def test_block_masking_masks_contiguous_rectangles():
  """At ratio 0.4 on 14 x 14 patches, block-wise masks are far more clustered than random ones
  (random: a masked patch's neighbour is masked with probability ~0.4)."""
  block = np.asarray(mae.sample_masking(jax.random.PRNGKey(3), 64, 14, 0.4, "block").mask)
  rand = np.asarray(mae.sample_masking(jax.random.PRNGKey(3), 64, 14, 0.4, "random").mask)
  assert _masked_neighbour_share(rand, 14) == pytest.approx(0.4, abs=0.03)
  assert _masked_neighbour_share(block, 14) > 0.7
  # the first rectangle drawn is masked whole: the masked set contains a block of >= 16 patches
  scores = np.asarray(mae.block_scores(jax.random.PRNGKey(4), 1, 14, 0.4))[0].reshape(14, 14)
  first = np.floor(scores) == np.floor(scores.max())  # the top tier: integer rank + noise in [0, 1)
  rows, cols = np.nonzero(first)
  assert first.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1) >= 16  # a full rectangle


def test_centre_masking_draws_patches_with_gaussian_weights():
  """One masked patch per sample: it is patch i with probability w_i / sum w (Gumbel-max),
  w_i = exp(-d_i^2 / (2 width^2)), d_i the distance of its centre from the image's in half-sides."""
  grid, width, n = 4, 0.4, 40000
  ratio = 0.05  # int(16 (1 - 0.05)) = 15 kept: one masked patch
  m = mae.sample_masking(jax.random.PRNGKey(5), n, grid, ratio, "centre", width)
  assert np.all(np.asarray(m.mask).sum(1) == 1)
  freq = np.asarray(m.mask).mean(0)
  c = (np.arange(grid) + 0.5 - grid / 2) / (grid / 2)
  d2 = (c[:, None] ** 2 + c[None, :] ** 2).reshape(-1)
  w = np.exp(-d2 / (2 * width**2))
  np.testing.assert_allclose(freq, w / w.sum(), atol=0.01)
  assert freq[5] > 5 * freq[0]  # an inner patch far more often than a corner


def test_masking_is_uniform_over_positions():
  m = mae.random_masking(jax.random.PRNGKey(1), 4000, 16, 0.75)
  freq = np.asarray(m.mask).mean(0)
  np.testing.assert_allclose(freq, 0.75, atol=0.03)


@pytest.mark.parametrize("how", mae.GATHERS)
def test_gather_tokens_matches_numpy(how):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 4))
  ids = jax.random.randint(jax.random.PRNGKey(1), (3, 6), 0, 10)
  got = mae.gather_tokens(x, ids, how)
  want = np.stack([np.asarray(x)[b, np.asarray(ids)[b]] for b in range(3)])
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_restore_order_puts_visible_tokens_back_and_mask_tokens_elsewhere():
  length, dim = 12, 3
  m = mae.random_masking(jax.random.PRNGKey(2), 4, length, 0.75)
  x = jnp.arange(4 * length * dim, dtype=jnp.float32).reshape(4, length, dim)
  visible = mae.gather_tokens(x, m.ids_keep)
  fill = jnp.full((1, 1, dim), -1.0)
  out = np.asarray(mae.restore_order(visible, fill, m.ids_restore))
  mask = np.asarray(m.mask).astype(bool)
  np.testing.assert_array_equal(out[~mask], np.asarray(x)[~mask])  # visible at own positions
  np.testing.assert_array_equal(out[mask], -1.0)                   # mask tokens at hidden ones


def test_patchify_layout_and_roundtrip():
  p = 4
  img = np.random.default_rng(0).random((2, 8, 12, 3)).astype(np.float32)
  patches = np.asarray(mae.patchify(jnp.asarray(img), p))
  assert patches.shape == (2, 6, p * p * 3)
  # patch (row 1, col 2) = pixels [4:8, 8:12], flattened (y, x, c)
  np.testing.assert_array_equal(patches[:, 1 * 3 + 2], img[:, 4:8, 8:12].reshape(2, -1))
  square = jnp.asarray(img[:, :8, :8])
  np.testing.assert_array_equal(mae.unpatchify(mae.patchify(square, p), p), square)


def test_norm_pix_targets_use_the_unbiased_variance_of_the_reference():
  img = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 3)) * 3 + 1
  t = np.asarray(mae.pixel_targets(img, 4, True))
  raw = np.asarray(mae.patchify(img, 4))
  n = raw.shape[-1]  # 4 x 4 x 3 values per patch
  mean = raw.sum(-1, keepdims=True) / n
  unbiased = ((raw - mean) ** 2).sum(-1, keepdims=True) / (n - 1)  # torch.var's default
  want = (raw - mean) / np.sqrt(unbiased + 1e-6)
  np.testing.assert_allclose(t, want, atol=1e-5)
  population = (raw - mean) / np.sqrt(((raw - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
  assert np.abs(t - population).max() > 1e-3  # the ddof-0 form would not pass
  np.testing.assert_allclose(mae.pixel_targets(img, 4, False), raw)


def test_masked_mse_ignores_visible_patches():
  rng = np.random.default_rng(0)
  pred, target = rng.random((2, 5, 6)), rng.random((2, 5, 6))
  mask = np.array([[1, 0, 1, 0, 0], [0, 0, 1, 1, 1]], np.float32)
  want = sum(((pred[b, l] - target[b, l]) ** 2).mean() for b in range(2) for l in range(5)
             if mask[b, l]) / mask.sum()
  assert float(mae.masked_mse(pred, target, mask)) == pytest.approx(want, rel=1e-6)
  garbage = pred.copy()
  garbage[mask == 0] = 1e6  # predictions on visible patches do not enter the loss
  assert float(mae.masked_mse(garbage, target, mask)) == pytest.approx(want, rel=1e-6)


def _cfg(**kw):
  c = dict(variant="mu/8", mask_ratio=0.75, norm_pix_loss=True, gather="take", decoder_width=32,
           decoder_depth=1, decoder_heads=2)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_mae_loss_is_masked_mse_of_its_own_prediction():
  model = mae.build_mae(_cfg(), 32)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
  variables = model.init({"params": jax.random.PRNGKey(1), "mask": jax.random.PRNGKey(2)}, x)
  out = model.apply(variables, x, rngs={"mask": jax.random.PRNGKey(3)})
  assert out.pred.shape == (3, 16, 8 * 8 * 3)
  np.testing.assert_array_equal(np.asarray(out.mask).sum(1), 12)
  target = np.asarray(mae.pixel_targets(x, 8, True))
  per_patch = ((np.asarray(out.pred) - target) ** 2).mean(-1)
  want = (per_patch * np.asarray(out.mask)).sum() / np.asarray(out.mask).sum()
  assert float(out.loss) == pytest.approx(want, rel=1e-5)


def test_encoder_never_sees_masked_patches():
  """Changing only hidden pixels leaves the encoder's output (the latent) unchanged."""
  model = mae.build_mae(_cfg(), 32)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = model.init({"params": jax.random.PRNGKey(1), "mask": jax.random.PRNGKey(2)}, x)
  masking = mae.random_masking(jax.random.PRNGKey(4), 2, 16, 0.75)
  pixel_mask = mae.unpatchify(jnp.repeat(masking.mask[..., None], 8 * 8 * 3, -1), 8)
  y = x + 5.0 * pixel_mask  # perturb hidden patches only
  enc = lambda im: model.apply(variables, im, masking, method=mae.MaskedAutoencoder.encode_visible)
  np.testing.assert_allclose(enc(x), enc(y), atol=1e-5)
  assert not np.allclose(enc(x), enc(x + 5.0 * (1 - pixel_mask)), atol=1e-3)


def test_onehot_and_take_gathers_give_the_same_model():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  outs = []
  for how in mae.GATHERS:
    model = mae.build_mae(_cfg(gather=how), 32)
    variables = model.init({"params": jax.random.PRNGKey(1), "mask": jax.random.PRNGKey(2)}, x)
    outs.append(model.apply(variables, x, rngs={"mask": jax.random.PRNGKey(3)}).loss)
  assert float(outs[0]) == pytest.approx(float(outs[1]), rel=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("mask_ratio", 1.0, "mask_ratio"), ("mask_ratio", 0.0, "mask_ratio"),
    ("gather", "scatter", "model.gather"), ("decoder_heads", 5, "decoder_width"),
    ("mask_sampling", "checkerboard", "model.mask_sampling='checkerboard'"),
    ("centre_width", 0.0, "model.centre_width=0.0 must be positive")])
def test_build_mae_rejects_bad_settings(field, value, match):
  with pytest.raises(UserError, match=match):
    mae.build_mae(_cfg(**{field: value}), 32)
