"""LRP against textbook numpy LRP (layer by layer, explicit formulas), conservation, signs,
canonisation and AttnLRP."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_models import MLP, ConvBN, GapLinear, SmallCNN
from wsss_jax import relevance as R
from wsss_jax.errors import UserError
from wsss_jax.models.classifier import CNNClassifier, ViTClassifier
from wsss_jax.models.resnet import ResNet
from wsss_jax.models.vit import VisionTransformer
from wsss_jax.relevance import core, lrp

RAW = dict(upsample=False, normalize="none", relu=False)
EPS = 1e-6
LOW, HIGH = -1.5, 2.0


def stab(z):
  return z + EPS * np.where(z >= 0, 1.0, -1.0)


def pos(a):
  return np.maximum(a, 0)


def neg(a):
  return np.minimum(a, 0)


def np_rule(rule, a, w, b, r_out, support=None):
  """Textbook LRP of one dense layer z = a w + b: relevance of the inputs a (B, I). `support`
  marks real inputs (0 for a convolution's zero padding), which flat and w-square count."""
  if rule == "epsilon":
    return a * ((r_out / stab(a @ w + b)) @ w.T)
  if rule == "gamma":
    wg, bg = w + 0.25 * pos(w), b + 0.25 * pos(b)
    return a * ((r_out / stab(a @ wg + bg)) @ wg.T)
  if rule in ("zplus", "zplus_bias"):
    bias = pos(b) if rule == "zplus_bias" else 0
    return pos(a) * ((r_out / stab(pos(a) @ pos(w) + bias)) @ pos(w).T)
  if rule.startswith("alpha"):
    alpha, beta = (1.0, 0.0) if rule.startswith("alpha1") else (2.0, 1.0)
    bias = rule.endswith("_bias")
    zp = pos(a) @ pos(w) + neg(a) @ neg(w) + (pos(b) if bias else 0)
    zn = pos(a) @ neg(w) + neg(a) @ pos(w) + (neg(b) if bias else 0)
    rp, rn = r_out / stab(zp), r_out / stab(zn)
    out = alpha * (pos(a) * (rp @ pos(w).T) + neg(a) * (rp @ neg(w).T))
    return out - beta * (pos(a) * (rn @ neg(w).T) + neg(a) * (rn @ pos(w).T))
  if rule in ("flat", "wsquare"):
    wm = np.ones_like(w) if rule == "flat" else w * w
    support = np.ones_like(a) if support is None else support
    return (r_out / stab(support @ wm)) @ wm.T
  if rule == "zbox":
    support = np.ones_like(a) if support is None else support
    low, high = LOW * support, HIGH * support  # zero padding is neither low nor high
    r = r_out / stab(a @ w - low @ pos(w) - high @ neg(w))
    return a * (r @ w.T) - low * (r @ pos(w).T) - high * (r @ neg(w).T)
  raise AssertionError(rule)


def np_mlp_lrp(params, x, k, rule, first_rule):
  """Forward the MLP in numpy, then LRP from logit k back to the input."""
  names = ["fc0", "fc1", "out"]
  acts, a = [], x.reshape(x.shape[0], -1).astype(np.float64)
  for name in names:
    acts.append(a)
    p = params[name]
    z = a @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
    a = pos(z) if name != "out" else z
  r = np.zeros_like(a)
  r[:, k] = a[:, k]  # R = the explained logit
  hidden = None
  for i in reversed(range(3)):
    p = params[names[i]]
    w, b = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
    r = np_rule(first_rule if i == 0 and first_rule else rule, acts[i], w, b, r)
    if i == 2:
      hidden = r  # relevance of the named 'hidden' features (ReLU passes it unchanged)
  return r.reshape(x.shape), hidden


@pytest.fixture(scope="module")
def mlp():
  model = MLP()
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 2, 2, 2), minval=LOW, maxval=HIGH)
  variables = model.init(jax.random.PRNGKey(1), x)
  # non-zero biases, both signs, so the bias variants differ
  variables = jax.tree.map(lambda v: v, variables)
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 8))
  params = {n: dict(p) | {"bias": 0.3 * jax.random.normal(next(keys), p["bias"].shape)}
            for n, p in variables["params"].items()}
  return model, {"params": params}, x


@pytest.mark.parametrize("rule,first", [
    ("epsilon", None), ("gamma", None), ("zplus", None), ("zplus_bias", None),
    ("alpha1beta0", None),
    ("alpha2beta1", None), ("alpha1beta0_bias", None), ("alpha2beta1_bias", None),
    ("epsilon", "flat"), ("epsilon", "wsquare"), ("epsilon", "zbox")])
def test_rules_match_textbook_numpy_lrp(mlp, rule, first):
  model, variables, x = mlp
  got = R.relevance("lrp", model.apply, variables, x, layers=["input", "hidden"], rule=rule,
                    rules={"^fc0$": first} if first else None, low=LOW, high=HIGH, **RAW)
  for k in range(3):
    want_in, want_hidden = np_mlp_lrp(variables["params"], np.asarray(x), k, rule, first)
    np.testing.assert_allclose(got["input"][:, k], want_in.sum(-1), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got["hidden"][:, k, 0, 0], want_hidden.sum(-1), rtol=1e-3,
                               atol=1e-5)


def np_conv_patches(x):
  """3x3 'same' patches with zero padding: (B, H, W, C) -> (B, H, W, 9 C) in flax's kernel
  order (kh, kw, c)."""
  b, h, w, c = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return np.stack([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3).reshape(
      b, h, w, 9 * c)


def np_fold_patches(r, shape):
  """The adjoint of np_conv_patches: sums patch relevance back onto the pixels."""
  b, h, w, c = shape
  r = r.reshape(b, h, w, 3, 3, c)
  out = np.zeros((b, h + 2, w + 2, c))
  for i in range(3):
    for j in range(3):
      out[:, i:i + h, j:j + w] += r[:, :, :, i, j]
  return out[:, 1:-1, 1:-1]


@pytest.mark.parametrize("first", ["zplus", "flat", "wsquare", "zbox", "epsilon"])
def test_first_conv_rules_match_numpy_including_the_border(first):
  """conv (padding 1) -> ReLU -> GAP -> Dense, explained with epsilon above the first layer:
  GAP splits relevance in proportion to each position."""
  model = GapLinear(channels=4, classes=2)
  x = jax.random.uniform(jax.random.PRNGKey(3), (2, 5, 5, 3), minval=LOW, maxval=HIGH)
  variables = model.init(jax.random.PRNGKey(4), x)
  got = R.relevance("lrp", model.apply, variables, x, rule="epsilon", rules={"^conv$": first},
                    low=LOW, high=HIGH, **RAW)
  p = variables["params"]
  wc = np.asarray(p["conv"]["kernel"], np.float64).reshape(-1, 4)
  bc = np.asarray(p["conv"]["bias"], np.float64)
  wf, bf = np.asarray(p["fc"]["kernel"], np.float64), np.asarray(p["fc"]["bias"], np.float64)
  xn = np.asarray(x, np.float64)
  patches = np_conv_patches(xn)
  z = patches @ wc + bc
  a = pos(z)
  pooled = a.mean(axis=(1, 2))
  logits = pooled @ wf + bf
  for k in range(2):
    r = np.zeros_like(logits)
    r[:, k] = logits[:, k]
    r_pooled = np_rule("epsilon", pooled, wf, bf, r)  # (B, C)
    r_a = a / np.where(a.sum(axis=(1, 2)) > 0, a.sum(axis=(1, 2)), 1)[:, None, None] * \
        r_pooled[:, None, None]  # mean pooling: in proportion to each position
    flat_patches = patches.reshape(-1, patches.shape[-1])
    support = np_conv_patches(np.ones_like(xn)).reshape(flat_patches.shape)
    r_p = np_rule(first, flat_patches, wc, bc, r_a.reshape(-1, 4), support)
    want = np_fold_patches(r_p, xn.shape).sum(-1)
    np.testing.assert_allclose(got[:, k], want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("composite", ["epsilon", "EpsilonPlusFlat"])
def test_bias_free_relevance_is_conserved(composite):
  """Without biases, epsilon -> 0 and z-plus on ReLU inputs conserve: sum R_input = logit,
  through max-pooling, mean pooling and a 1x1-conv head."""
  model = SmallCNN()
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(6), x)
  kw = dict(rule="epsilon", epsilon=1e-9) if composite == "epsilon" else dict(composite=composite)
  got = R.relevance("lrp", model.apply, variables, x, layers=["input", "pool", "feat"], **kw,
                    **RAW)
  logits = np.asarray(model.apply(variables, x))
  for layer in ("input", "pool", "feat"):
    np.testing.assert_allclose(np.asarray(got[layer]).sum(axis=(2, 3)), logits, rtol=2e-3,
                               atol=1e-5)


def test_relevance_is_conserved_through_resnet50_residual_blocks():
  """A fresh ResNet-50 (1/16 width) has no biases (BatchNorm shift and mean 0): epsilon-rule
  relevance at the pixels and at two stages' outputs sums to the logit, through the residual
  sums, the max pool and the block outputs that `core.computed_once` marks."""
  model = CNNClassifier(ResNet(50, width=1 / 16), 3)
  x = jax.random.uniform(jax.random.PRNGKey(16), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(17), x)
  got = R.relevance("lrp", model.apply, variables, x, layers=["input", "layer1", "layer3"],
                    rule="epsilon", epsilon=1e-9, **RAW)
  logits = np.asarray(model.apply(variables, x))
  assert np.abs(logits).min() > 1e-3
  assert sorted(got) == ["backbone/layer1", "backbone/layer3", "input"]
  for maps in got.values():
    np.testing.assert_allclose(np.asarray(maps).sum(axis=(2, 3)), logits, rtol=1e-4, atol=1e-6)


def test_computed_once_is_the_identity_in_value_and_derivative():
  x = jnp.array([[[np.nan, np.inf], [-2.5, 0.0]], [[1e-30, -np.inf], [3.0, 7.0]]])
  np.testing.assert_array_equal(core.computed_once(x), x)
  y = x.at[0, 0, 0].set(1.0)  # finite corner: the derivative of sum(w * f(y)) is w
  w = jnp.arange(8.0).reshape(x.shape)
  grads = jax.vmap(lambda w: jax.grad(lambda v: jnp.sum(w * core.computed_once(v)))(y))(
      jnp.stack([w, -w]))
  np.testing.assert_array_equal(grads, jnp.stack([w, -w]))


def test_alpha1beta0_relevance_is_non_negative_and_alpha2beta1_splits_two_to_one():
  model = SmallCNN()
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(8), x)
  logits = np.asarray(model.apply(variables, x))
  got = np.asarray(R.relevance("lrp", model.apply, variables, x, rule="alpha1beta0",
                               reduce="sum", **RAW))
  positive = logits > 0
  assert positive.any()
  assert (got[positive] >= -1e-6).all()
  # one layer: alpha2beta1 positive part = 2 R, negative part = -R
  dense = GapLinear(channels=3, classes=2, use_bias=False)
  variables = dense.init(jax.random.PRNGKey(9), x)
  total = R.relevance("lrp", dense.apply, variables, x, layers="feat", rule="alpha2beta1", **RAW)
  logits = np.asarray(dense.apply(variables, x))
  np.testing.assert_allclose(np.asarray(total).sum(axis=(2, 3)), logits, rtol=1e-3, atol=1e-5)


def test_batch_norm_is_folded_into_the_preceding_convolution():
  bn_model = ConvBN()
  x = jax.random.normal(jax.random.PRNGKey(10), (2, 6, 6, 3))
  variables = bn_model.init(jax.random.PRNGKey(11), x)
  k = iter(jax.random.split(jax.random.PRNGKey(12), 4))
  variables = {"params": {**variables["params"], "bn": {
      "scale": 1 + 0.5 * jax.random.normal(next(k), (4,)),
      "bias": 0.3 * jax.random.normal(next(k), (4,))}},
      "batch_stats": {"bn": {"mean": 0.2 * jax.random.normal(next(k), (4,)),
                             "var": 0.5 + jax.random.uniform(next(k), (4,))}}}
  p, s = variables["params"], variables["batch_stats"]
  inv = np.asarray(p["bn"]["scale"]) / np.sqrt(np.asarray(s["bn"]["var"]) + 1e-5)
  folded = {"conv": {"kernel": np.asarray(p["conv"]["kernel"]) * inv,
                     "bias": np.asarray(p["bn"]["bias"]) - np.asarray(s["bn"]["mean"]) * inv},
            "fc": p["fc"]}
  plain = GapLinear(channels=4, classes=3)
  np.testing.assert_allclose(plain.apply({"params": folded}, x), bn_model.apply(variables, x),
                             rtol=1e-4, atol=1e-5)
  for composite in ("EpsilonPlus", "EpsilonGammaBox", "EpsilonAlpha2Beta1"):
    got = R.relevance("lrp", bn_model.apply, variables, x, composite=composite, **RAW)
    want = R.relevance("lrp", plain.apply, {"params": folded}, x, composite=composite, **RAW)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
  plan = lrp.make_plan(bn_model.apply, variables, x)
  assert plan.folded == {"conv": ("bn", 1e-5)} and plan.linear == {"conv": "conv", "fc": "dense"}
  unfolded = lrp.make_plan(bn_model.apply, variables, x, canonize=False)
  assert unfolded.folded == {} and "bn" in unfolded.standalone_bn


def test_attnlrp_conserves_relevance_through_a_bias_free_vit():
  """A fresh ViT has zero biases; with q/k and the LayerNorm scale frozen and the identity rule
  on GELU every step is linear in the relevance, so the block-0 output tokens carry the logit
  (without those rewrites they do not)."""
  model = ViTClassifier(VisionTransformer.from_variant("mu/8", 16), 3)
  x = jax.random.normal(jax.random.PRNGKey(13), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(14), x)
  head = variables["params"]["head"]["head"]
  kernel = jax.random.normal(jax.random.PRNGKey(15), head["kernel"].shape)  # logits of O(1)
  variables = {"params": {**variables["params"], "head": {
      **variables["params"]["head"], "head": {**head, "kernel": kernel}}}}
  layers = core.find_layers(model.apply, variables, x)
  name = layers.resolve("blocks_0/tokens")
  plan = lrp.make_plan(model.apply, variables, x)
  logits = np.asarray(model.apply(variables, x))

  def token_sums(vit):
    rules = lrp.assign_rules(plan, None, "epsilon", None, epsilon=1e-9)
    interceptor = lrp.RuleInterceptor(plan, variables, rules, vit=vit)
    extra = {lrp.FIRST: jnp.zeros(plan.first_out.shape)}
    _, feats, _, grads = core.class_gradients(model.apply, variables, x, layers, [name],
                                              (0, 1, 2), "logit", interceptor, extra)
    return np.asarray((feats[name][None] * grads[name]).sum(axis=(2, 3))).T  # (B, K)
  assert np.abs(logits).min() > 0.05
  np.testing.assert_allclose(token_sums(True), logits, rtol=1e-3, atol=1e-4)
  assert not np.allclose(token_sums(False), logits, rtol=1e-2, atol=1e-2)
  maps = R.relevance("lrp", model.apply, variables, x, composite="AttnLRP")
  assert maps.shape == (2, 3, 16, 16) and np.isfinite(np.asarray(maps)).all()


@pytest.mark.parametrize("kw,needle", [
    (dict(rule="epsilonn"), "unknown LRP rule 'epsilonn'; rules are"),
    (dict(composite="EpsPlus"), "unknown LRP composite 'EpsPlus'; composites are"),
    (dict(composite="AttnLRP"), "applies to transformers"),
    (dict(rule="flat"), "applies only to the first layer"),
    (dict(rules={"nope": "epsilon"}), "matches no linear layer"),
    (dict(layers="bn7"), "has no layer 'bn7'"),
    (dict(reduce="max"), "reduce='max' is not one of"),
])
def test_bad_lrp_requests(kw, needle):
  model = SmallCNN()
  x = jnp.zeros((1, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  with pytest.raises(UserError) as e:
    R.relevance("lrp", model.apply, variables, x, **kw)
  assert needle in str(e.value)
