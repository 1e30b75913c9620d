"""CAM family against numpy re-implementations of each formula on the same activations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tiny_models import GapLinear, SmallCNN
from wsss_jax import relevance as R
from wsss_jax.errors import UserError
from wsss_jax.models.classifier import CNNClassifier
from wsss_jax.models.resnet38 import ResNet38

RAW = dict(upsample=False, normalize="none", relu=False)


@pytest.fixture(scope="module")
def gap_linear():
  model = GapLinear()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  _, state = model.apply(variables, x, mutable=["intermediates"])
  acts = np.asarray(state["intermediates"]["feat_features"][0], np.float64)  # (B, h, w, C)
  w = np.asarray(variables["params"]["fc"]["kernel"], np.float64)  # (C, K)
  h, wd = acts.shape[1:3]
  grads = np.broadcast_to(w.T[:, None, None, None, :] / (h * wd),
                          (w.shape[1],) + acts.shape)  # closed form dlogit_k / dA
  return model, variables, x, acts, grads, w


def np_weighted(weights, acts):  # (K, B, C), (B, h, w, C) -> (B, K, h, w)
  return np.einsum("kbc,bhwc->bkhw", weights, acts)


def np_gradcam(a, g):
  return np_weighted(g.mean(axis=(2, 3)), a)


def np_gradcampp(a, g):
  g2, g3 = g**2, g**3
  denom = 2 * g2 + a.sum(axis=(1, 2))[None, :, None, None, :] * g3
  alpha = np.where(g != 0, g2 / np.where(denom != 0, denom, 1), 0)
  return np_weighted((np.maximum(g, 0) * alpha).sum(axis=(2, 3)), a)


def np_xgradcam(a, g):
  return np_weighted((g * a[None]).sum(axis=(2, 3)) / (a.sum(axis=(1, 2))[None] + 1e-7), a)


def np_layercam(a, g):
  return np.einsum("kbhwc,bhwc->bkhw", np.maximum(g, 0), a)


def np_hirescam(a, g):
  return np.einsum("kbhwc,bhwc->bkhw", g, a)


@pytest.mark.parametrize("method,reference", [
    ("gradcam", np_gradcam), ("gradcampp", np_gradcampp), ("xgradcam", np_xgradcam),
    ("layercam", np_layercam), ("hirescam", np_hirescam)])
def test_gradient_cams_match_numpy(gap_linear, method, reference):
  model, variables, x, acts, grads, _ = gap_linear
  got = R.relevance(method, model.apply, variables, x, layers="feat", **RAW)
  np.testing.assert_allclose(got, reference(acts, grads), rtol=2e-4, atol=1e-6)


def test_cam_uses_head_weights_and_equals_scaled_hirescam(gap_linear):
  model, variables, x, acts, grads, w = gap_linear
  got = R.relevance("cam", model.apply, variables, x, layers="feat", cam_head="fc", **RAW)
  np.testing.assert_allclose(got, np.einsum("ck,bhwc->bkhw", w, acts), rtol=1e-5, atol=1e-6)
  hires = R.relevance("hirescam", model.apply, variables, x, layers="feat", **RAW)
  np.testing.assert_allclose(got, hires * 36, rtol=1e-4, atol=1e-5)  # GAP: g = w / hw


def test_class_subset_and_targets(gap_linear):
  model, variables, x, acts, grads, w = gap_linear
  got = R.relevance("gradcam", model.apply, variables, x, layers="feat", classes=[2, 0], **RAW)
  np.testing.assert_allclose(got, np_gradcam(acts, grads)[:, [2, 0]], rtol=2e-4, atol=1e-6)
  # sigmoid target: the chain rule scales class k's gradient by s_k (1 - s_k)
  logits = np.asarray(model.apply(variables, x), np.float64)
  s = 1 / (1 + np.exp(-logits))
  got = R.relevance("gradcam", model.apply, variables, x, layers="feat", target="sigmoid", **RAW)
  want = np_gradcam(acts, grads) * (s * (1 - s))[:, :, None, None]
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_all_classes_in_one_call_equal_a_loop_of_backward_passes():
  """vmap over the classes' cotangents of one vjp == one jax.grad per class."""
  model = CNNClassifier(ResNet38(1 / 16), 3)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 24, 24, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  got = R.relevance("gradcam", model.apply, variables, x, layers=["b5_2", "bn7"], **RAW)
  layers = R.find_layers(model.apply, variables, x)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), layers.perturbations)
  for name in ("b5_2", "bn7"):
    full = layers.resolve(name)
    path = layers.paths[full]
    for k in range(3):
      def logit(p):
        return model.apply({**variables, "perturbations": p}, x)[:, k].sum()
      g = jax.grad(logit)(zeros)
      for key in path:
        g = g[key]
      _, state = model.apply(variables, x, mutable=["intermediates"])
      a = state["intermediates"]
      for key in path:
        a = a[key]
      want = np.einsum("bc,bhwc->bhw", np.asarray(g).mean(axis=(1, 2)), np.asarray(a[0]))
      np.testing.assert_allclose(got[full][:, k], want, rtol=1e-3, atol=1e-5)


def test_backward_stops_at_the_requested_layer():
  """Only as many convolutions as the layer needs: a map at bn7 differentiates through far
  fewer convolutions than one at b4_5."""
  model = CNNClassifier(ResNet38(1 / 16), 3)
  x = jnp.zeros((1, 24, 24, 3))
  variables = model.init(jax.random.PRNGKey(1), x)

  def convs(layer):
    fn = R.relevance_fn("gradcam", model.apply, layers=layer)
    layers, names, classes = fn.resolve(variables, x)
    from wsss_jax.relevance import cam, core
    def run(v, images):
      ctx = core.Context(model.apply, v, images, layers, names, classes, "logit")
      return cam.gradient_method(cam.gradcam_map)(ctx)
    return str(jax.make_jaxpr(run)(variables, x)).count("conv_general_dilated")
  forward = str(jax.make_jaxpr(model.apply)(variables, x)).count("conv_general_dilated")
  assert convs("bn7") < convs("b4_5")
  assert convs("bn7") <= forward + 2 * 8  # b7 and b6 only: a few convs each (fwd + transpose)


def test_scorecam_matches_a_loop_of_masked_forward_passes(gap_linear):
  model, variables, x, acts, _, _ = gap_linear
  got = R.relevance("scorecam", model.apply, variables, x, layers="feat", score_batch=2, **RAW)
  b, h, w, c = acts.shape
  for i in range(b):
    scores = []
    for ch in range(c):
      m = np.asarray(Image.fromarray(acts[i, :, :, ch].astype(np.float32), "F").resize(
          (x.shape[2], x.shape[1]), Image.BILINEAR), np.float64)
      m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)
      scores.append(np.asarray(model.apply(variables, x[i:i + 1] * m[None, :, :, None]))[0])
    scores = np.stack(scores)  # (C, K)
    weights = np.exp(scores - scores.max(0)) / np.exp(scores - scores.max(0)).sum(0)
    want = np.einsum("ck,hwc->khw", weights, acts[i])
    np.testing.assert_allclose(got[i], want, rtol=2e-3, atol=1e-4)


def test_eigencam_is_the_first_principal_component(gap_linear):
  model, variables, x, acts, _, _ = gap_linear
  got = R.relevance("eigencam", model.apply, variables, x, layers="feat", **RAW)
  for i in range(acts.shape[0]):
    a = acts[i].reshape(-1, acts.shape[-1])
    centred = a - a.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[0]
    proj *= np.sign(proj @ a.mean(-1)) or 1
    for k in range(3):  # class-agnostic
      np.testing.assert_allclose(got[i, k].ravel(), proj, rtol=1e-3, atol=1e-4)


def test_upsampling_relu_and_normalisation():
  model = SmallCNN()
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(3), x)
  raw = np.asarray(R.relevance("hirescam", model.apply, variables, x, layers="feat", **RAW))
  up = R.relevance("hirescam", model.apply, variables, x, layers="feat", upsample=True,
                   normalize="none", relu=True)
  assert raw.shape == (2, 3, 4, 4) and up.shape == (2, 3, 8, 8)
  for i in range(2):
    for k in range(3):
      want = np.asarray(Image.fromarray(np.maximum(raw[i, k], 0).astype(np.float32), "F").resize(
          (8, 8), Image.BILINEAR))
      np.testing.assert_allclose(up[i, k], want, atol=1e-5)
  maps = jnp.asarray([[[[0.0, 2.0]], [[1.0, 5.0]]]])  # (1, 2, 1, 2)
  np.testing.assert_allclose(R.normalize_maps(maps, "class"), [[[[0, 1]], [[0, 1]]]])
  np.testing.assert_allclose(R.normalize_maps(maps, "joint"), [[[[0, .4]], [[.2, 1]]]])
  np.testing.assert_allclose(R.normalize_maps(-maps, "maxabs"), [[[[0, -1]], [[-.2, -1]]]])  # per class
  np.testing.assert_allclose(R.normalize_maps(jnp.ones((1, 1, 2, 2)), "class"), 0.0)


def test_only_present_classes_are_kept_and_normalised_jointly():
  model = SmallCNN()
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(3), x)
  labels = jnp.asarray([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
  raw = np.asarray(R.relevance("hirescam", model.apply, variables, x, layers="feat",
                               upsample=False, normalize="none", relu=True))
  got = np.asarray(R.relevance("hirescam", model.apply, variables, x, layers="feat",
                               upsample=False, normalize="joint", labels=labels,
                               only_present=True))
  for i in range(2):
    present = labels[i] > 0
    sub = raw[i, np.asarray(present)]
    want = (sub - sub.min()) / (sub.max() - sub.min())
    np.testing.assert_allclose(got[i, np.asarray(present)], want, atol=1e-5)
    assert np.all(got[i, ~np.asarray(present)] == 0)


@pytest.mark.parametrize("call,needle", [
    (dict(method="gradcan"), "unknown relevance method 'gradcan'; methods are"),
    (dict(method="gradcam", layers="b9"), "has no layer 'b9'; its named layers are"),
    (dict(method="gradcam", classes=[3]), "[0, 3)"),
    (dict(method="gradcam", layers="input"), "'input' is for the pixel-level methods"),
    (dict(method="rollout"), "needs a transformer"),
    (dict(method="chefer"), "needs a transformer"),
    (dict(method="cam", cam_head="head/fc9"), "params path 'head/fc9'"),
    (dict(method="gradcam", target="prob"), "target='prob' is not one of"),
    (dict(method="gradcam", bogus=1), "does not take the options ['bogus']"),
])
def test_bad_requests_name_what_exists(call, needle):
  model = SmallCNN()
  x = jnp.zeros((1, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  call = dict(call)
  method = call.pop("method")
  with pytest.raises(UserError) as e:
    R.relevance(method, model.apply, variables, x, **call)
  assert needle in str(e.value)
