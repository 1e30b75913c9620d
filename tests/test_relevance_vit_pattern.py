"""ViT maps against numpy (attention, rollout, Chefer et al.) and PatternNet/PatternAttribution
against closed forms and numpy statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_models import GapLinear, SmallCNN
from wsss_jax import relevance as R
from wsss_jax.errors import UserError
from wsss_jax.models.classifier import ViTClassifier
from wsss_jax.models.vit import VisionTransformer

RAW = dict(upsample=False, normalize="none", relu=False)


@pytest.fixture(scope="module")
def vit():
  model = ViTClassifier(VisionTransformer.from_variant("mu/8", 32), 3, pool="cls")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  head = variables["params"]["head"]["head"]
  head = {**head, "kernel": jax.random.normal(jax.random.PRNGKey(2), head["kernel"].shape)}
  variables = {"params": {**variables["params"], "head": {"head": head}}}
  _, state = model.apply(variables, x, mutable=["intermediates"])
  inter = state["intermediates"]["encoder"]
  attn = [np.asarray(inter[f"blocks_{i}"]["attn"]["attention_features"][0], np.float64)
          for i in range(2)]
  return model, variables, x, attn


def test_last_layer_class_token_attention(vit):
  model, variables, x, attn = vit
  mean = R.relevance("attention", model.apply, variables, x, **RAW)
  head1 = R.relevance("attention", model.apply, variables, x, head=1, **RAW)
  want = attn[-1][:, :, 0, 1:].reshape(2, 2, 4, 4)
  for k in range(3):  # class-agnostic
    np.testing.assert_allclose(mean[:, k], want.mean(1), rtol=1e-5)
    np.testing.assert_allclose(head1[:, k], want[:, 1], rtol=1e-5)
  with pytest.raises(UserError, match="head=5 is out of range"):
    R.relevance("attention", model.apply, variables, x, head=5)


def test_rollout_is_the_product_of_identity_augmented_attention(vit):
  model, variables, x, attn = vit
  got = R.relevance("rollout", model.apply, variables, x, **RAW)
  for b in range(2):
    result = np.eye(17)
    for a in attn:
      a = a[b].mean(0) + np.eye(17)
      result = (a / a.sum(-1, keepdims=True)) @ result
    np.testing.assert_allclose(got[b, 0], result[0, 1:].reshape(4, 4), rtol=1e-5)


def test_chefer_relevance_matches_numpy_with_per_class_gradients(vit):
  model, variables, x, attn = vit
  got = R.relevance("chefer", model.apply, variables, x, **RAW)
  layers = R.find_layers(model.apply, variables, x)
  names = layers.attention_layers()
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), layers.perturbations)
  for k in range(3):
    def logit(p):  # explicit attention weights (and their taps) need `intermediates` mutable
      return model.apply({**variables, "perturbations": p}, x, mutable=["intermediates"])[0][
          :, k].sum()
    grads = jax.grad(logit)(zeros)
    per_layer = []
    for name in names:
      g = grads
      for key in layers.paths[name]:
        g = g[key]
      per_layer.append(np.asarray(g, np.float64))
    for b in range(2):
      rel = np.eye(17)
      for a, g in zip(attn, per_layer):
        rel = rel + np.maximum(g[b] * a[b], 0).mean(0) @ rel
      np.testing.assert_allclose(got[b, k], rel[0, 1:].reshape(4, 4), rtol=1e-4, atol=1e-7)


def test_gradcam_on_vit_tokens_uses_the_patch_grid(vit):
  model, variables, x, _ = vit
  got = R.relevance("gradcam", model.apply, variables, x, **RAW)  # default: last block's norm1
  assert got.shape == (2, 3, 4, 4)
  layers = R.find_layers(model.apply, variables, x)
  assert layers.default() == "encoder/blocks_1/norm1"
  assert np.abs(np.asarray(got)).sum() > 0  # the class token reads these tokens


# --- Patterns -------------------------------------------------------------------------------------
class Linear(GapLinear):
  pass


def test_linear_pattern_recovers_the_signal_direction():
  """x = a s + d with w^T a = 1 and w^T d = 0 (the distractor), y = w^T x = s: the pattern
  cov(x, y) / (w^T cov(x, y)) is exactly a; PatternNet returns a, PatternAttribution w * a."""
  import flax.linen as nn

  class OneLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
      from wsss_jax.models.layers import named_feature
      x = named_feature(self, "x", x)
      return nn.Dense(1, use_bias=False, name="fc")(x.reshape(x.shape[0], -1))

  rng = np.random.default_rng(0)
  a = np.array([1.0, 2.0, 0.5])
  dvec = np.array([2.0, -1.0, 0.0])  # distractor direction
  w = np.cross(dvec, [0.0, 0.0, 1.0])
  w = w / (w @ a)  # w^T a = 1, w^T d = 0
  s = rng.standard_normal(4000)
  eps = rng.standard_normal(4000)
  eps -= (eps @ (s - s.mean())) / ((s - s.mean()) @ (s - s.mean())) * (s - s.mean())  # cov 0
  x = (np.outer(s, a) + np.outer(eps, dvec)).astype(np.float32).reshape(4000, 1, 1, 3)
  model = OneLayer()
  variables = {"params": {"fc": {"kernel": jnp.asarray(w[:, None], jnp.float32)}}}
  patterns = R.fit_patterns(model.apply, variables, [x[:2000], x[2000:]], estimator="linear")
  np.testing.assert_allclose(np.asarray(patterns["fc"])[:, 0], a, rtol=1e-3, atol=1e-4)
  probe = jnp.asarray(x[:2])
  net = R.relevance("patternnet", model.apply, variables, probe, patterns=patterns,
                    layers="x", **RAW)
  np.testing.assert_allclose(net[:, 0, 0, 0], [a.sum()] * 2, rtol=1e-3)
  attribution = R.relevance("patternattribution", model.apply, variables, probe,
                            patterns=patterns, layers="x", **RAW)
  np.testing.assert_allclose(attribution[:, 0, 0, 0], [(w * a).sum()] * 2, rtol=1e-3, atol=1e-5)


def np_patches(x):
  b, h, w, c = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return np.stack([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3).reshape(
      -1, 9 * c)


def np_pattern(x, w, b, relu):
  """cov(x, y) / (w^T cov(x, y)) per output unit, over samples with y > 0 for 'relu'."""
  y = x @ w + b
  out = np.zeros_like(w)
  for j in range(w.shape[1]):
    keep = y[:, j] > 0 if relu else np.ones(len(y), bool)
    xs, ys = x[keep], y[keep, j]
    cov = (xs * ys[:, None]).mean(0) - xs.mean(0) * ys.mean()
    out[:, j] = cov / (w[:, j] @ cov)
  return out


@pytest.mark.parametrize("estimator", ["relu", "linear"])
def test_patterns_of_every_layer_match_numpy_statistics(estimator):
  model = GapLinear(channels=4, classes=2)
  batches = [np.asarray(jax.random.normal(jax.random.PRNGKey(i), (3, 5, 5, 3))) for i in range(2)]
  variables = model.init(jax.random.PRNGKey(9), batches[0])
  patterns = R.fit_patterns(model.apply, variables, batches, estimator=estimator)
  p = variables["params"]
  wc = np.asarray(p["conv"]["kernel"], np.float64).reshape(-1, 4)
  bc = np.asarray(p["conv"]["bias"], np.float64)
  x = np.concatenate([np_patches(np.asarray(b, np.float64)) for b in batches])
  np.testing.assert_allclose(np.asarray(patterns["conv"]).reshape(-1, 4),
                             np_pattern(x, wc, bc, estimator == "relu"), rtol=2e-3, atol=1e-5)
  pooled = np.concatenate([np.maximum(np_patches(np.asarray(b, np.float64)) @ wc + bc, 0)
                           .reshape(3, 25, 4).mean(1) for b in batches])
  wf, bf = np.asarray(p["fc"]["kernel"], np.float64), np.asarray(p["fc"]["bias"], np.float64)
  np.testing.assert_allclose(patterns["fc"], np_pattern(pooled, wf, bf, estimator == "relu"),
                             rtol=2e-3, atol=1e-5)


def test_patterns_save_load_and_explain(tmp_path):
  model = SmallCNN()
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(4), x)
  patterns = R.fit_patterns(model.apply, variables, [x])
  meta = {"estimator": "relu", "step": 7}
  R.save_patterns(str(tmp_path / "p"), patterns, meta)
  loaded = R.load_patterns(str(tmp_path / "p"), meta)
  assert R.load_patterns(str(tmp_path / "p"), meta | {"step": 8}) is None
  assert set(loaded) == set(patterns)
  for k in patterns:
    np.testing.assert_array_equal(loaded[k], patterns[k])
  for method in ("patternnet", "patternattribution"):
    maps = R.relevance(method, model.apply, variables, x, patterns=loaded, **RAW)
    assert maps.shape == (4, 3, 8, 8) and np.abs(np.asarray(maps)).sum() > 0
  with pytest.raises(UserError, match="needs patterns"):
    R.relevance("patternnet", model.apply, variables, x)
  with pytest.raises(UserError, match="do not fit this model"):
    R.relevance("patternnet", model.apply, variables, x, patterns={"conv1": patterns["conv1"]})
