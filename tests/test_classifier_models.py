"""Classification networks: shapes, named features, parameter counts, PDA, heads, mixing."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.data import mixing
from wsss_jax.device import hlo_report, kernels
from wsss_jax.models import layers
from wsss_jax.models.classifier import ViTClassifier, vit_layer_id
from wsss_jax.models.heads import MultiLabelHead, progressive_dropout_attention
from wsss_jax.models.layers import feature_key
from wsss_jax.models.resnet import ResNet
from wsss_jax.models.resnet38 import ResNet38
from wsss_jax.models.vit import VisionTransformer
from wsss_jax.tasks import classify as classify_task


def _shapes(model, size, batch=2):
  """Output and sown-feature shapes without computing anything (eval_shape)."""
  def run():
    x = jnp.zeros((batch, size, size, 3))
    variables = model.init({"params": jax.random.PRNGKey(0)}, x)
    return model.apply(variables, x, mutable=["intermediates"]), variables
  (out, inter), variables = jax.eval_shape(run)
  feats = {k: v.shape for k, v in _flat(inter["intermediates"]).items()}
  return out.shape, feats, variables


def _flat(tree):
  return {k: v[0] for k, v in tree.items()}


def test_resnet38_output_stride_8_and_named_features():
  out, feats, variables = _shapes(ResNet38(), 224)
  assert out == (2, 28, 28, 4096)
  assert feats == {feature_key("b4_5"): (2, 28, 28, 512), feature_key("b5_2"): (2, 28, 28, 1024),
                   feature_key("bn7"): (2, 28, 28, 4096)}
  params = variables["params"]
  # pre-activation block layout of the release: conv1a, b2..b7, bn7; b6/b7 bottlenecks
  assert params["conv1a"]["kernel"].shape == (3, 3, 3, 64)
  assert params["b5"]["conv_branch2a"]["kernel"].shape == (3, 3, 512, 512)
  assert params["b5"]["conv_branch2b1"]["kernel"].shape == (3, 3, 512, 1024)
  assert params["b6"]["conv_branch2a"]["kernel"].shape == (1, 1, 1024, 512)
  assert params["b6"]["conv_branch2b1"]["kernel"].shape == (3, 3, 512, 1024)
  assert params["b7"]["conv_branch2b2"]["kernel"].shape == (1, 1, 2048, 4096)
  assert "conv_branch1" not in params["b4_5"] and "conv_branch1" in params["b5"]
  assert params["bn7"]["scale"].shape == (4096,)


def test_resnet38_dilated_stages_keep_the_resolution_of_b4():
  """b5..b7 use dilation instead of stride: b4_5 and bn7 are both 1/8 of the input."""
  model = ResNet38(width=1 / 16)
  x = jnp.zeros((1, 64, 64, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  _, feats = model.apply(variables, x, mutable=["intermediates"])
  f = feats["intermediates"]
  assert f[feature_key("b4_5")][0].shape[1:3] == f[feature_key("bn7")][0].shape[1:3] == (8, 8)


@pytest.mark.parametrize("os_, hw", [(32, 7), (16, 14), (8, 28)])
def test_resnet50_output_strides(os_, hw):
  out, feats, _ = _shapes(ResNet(50, output_stride=os_), 224)
  assert out == (2, hw, hw, 2048)
  assert feats[feature_key("stem")] == (2, 112, 112, 64)
  assert feats[feature_key("layer1")] == (2, 56, 56, 256)
  assert feats[feature_key("layer3")][1] == {32: 14, 16: 14, 8: 28}[os_]


def test_resnet50_has_torchvisions_parameter_count():
  """torchvision's resnet50 has 25,557,032 parameters; without its fc (2048 x 1000 + 1000):
  23,508,032. BatchNorm running statistics are not parameters."""
  _, _, variables = _shapes(ResNet(50), 224)
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 23_508_032


def test_resnet50_dilated_stage_matches_torchvision_dilations():
  """Output stride 8: layer3's first block keeps dilation 1, its others use 2; layer4's first
  uses 2, its others 4 (torchvision's replace_stride_with_dilation)."""
  model = ResNet(50, output_stride=8, width=1 / 16)
  x = jnp.zeros((1, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  convs = {}
  def spy(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.name == "conv2":
      convs[context.module.scope.path[-2]] = context.module.kernel_dilation
    return next_fun(*args, **kwargs)
  import flax.linen as nn
  with nn.intercept_methods(spy):
    model.apply(variables, x)
  assert convs["layer3_0"] == (1, 1) and convs["layer3_1"] == (2, 2)
  assert convs["layer4_0"] == (2, 2) and convs["layer4_2"] == (4, 4)


def _pda_numpy(features, kernel, mu):
  """Direct transcription of the PDA formula, one class at a time."""
  b, h, w, c = features.shape
  k = kernel.shape[1]
  acc = np.zeros((b, h, w))
  for j in range(k):
    m = np.maximum(np.einsum("bhwc,c->bhw", features, kernel[:, j]), 0)   # M_k
    beta = mu * m.reshape(b, -1).max(1)[:, None, None]                   # mu * max_hw M_k
    acc += np.where(m > beta, 0.0, m)                                     # drop above beta
  return features * (acc / k)[..., None]                                  # feature * A


@pytest.mark.parametrize("stride,size", [(1, 9), (2, 9), (2, 8), (3, 7)])
def test_pointwise_convolution_as_a_dot_matches_the_convolution_and_its_gradients(stride, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 8))
  w = jax.random.normal(jax.random.key(1), (1, 1, 8, 16))
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

  def ref(x, w):  # XLA's convolution, as nn.Conv calls it with layers.conv's padding
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((0, 0), (0, 0)),
                                        dimension_numbers=dn)

  def ours(x, w):
    return kernels.conv_general_dilated(x, w, (stride, stride), ((0, 0), (0, 0)),
                                        lhs_dilation=(1, 1), rhs_dilation=(1, 1),
                                        dimension_numbers=dn)
  assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, w))  # a dot on the CPU
  with kernels.selected_kernels("xla"):  # the config field `kernels`: XLA's own convolution
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x, w: ours(x, w))(x, w))
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(jax.random.key(2), ref(x, w).shape)
  for a, b in zip(jax.vjp(ours, x, w)[1](ct), jax.vjp(ref, x, w)[1](ct)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  m = layers.conv(16, 3, stride)  # other kernels stay convolutions
  v = m.init(jax.random.key(3), x)
  assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x: m.apply(v, x))(x))


@pytest.mark.parametrize("kernel,dilation,pad", [(3, 1, ((1, 1), (1, 1))), (3, 4, ((4, 4), (4, 4))),
                                                 (3, 2, ((1, 3), (2, 0))), (5, 2, ((4, 4), (4, 4)))])
def test_kernel_gradient_as_a_matmul_matches_the_convolution_and_its_gradients(
    monkeypatch, kernel, dilation, pad):
  monkeypatch.setattr(kernels, "KERNEL_GRAD_MIN_CHANNELS", 4)
  monkeypatch.setattr(kernels, "KERNEL_GRAD_MIN_PIXELS", 60)
  x = jax.random.normal(jax.random.key(0), (2, 9, 10, 4))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 4, 5))
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  ref = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), pad, rhs_dilation=(dilation, dilation), dimension_numbers=dn)
  ours = lambda x, w: kernels.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), pad, lhs_dilation=(1, 1), rhs_dilation=(dilation, dilation),
      dimension_numbers=dn)
  assert "custom_jvp_call" in str(jax.make_jaxpr(ours)(x, w))
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  tangents = (jax.random.normal(jax.random.key(3), x.shape),
              jax.random.normal(jax.random.key(4), w.shape))
  np.testing.assert_allclose(jax.jvp(ours, (x, w), tangents)[1], jax.jvp(ref, (x, w), tangents)[1],
                             rtol=1e-4, atol=1e-4)  # forward mode, as jacfwd and HVPs use it
  loss = lambda f: lambda x, w: (f(x, w) ** 2).sum()  # noqa: E731
  grad_jaxpr = jax.make_jaxpr(jax.grad(loss(ours), argnums=(0, 1)))(x, w)
  assert "dot_general" in str(grad_jaxpr)  # the kernel gradient is the matmul ...
  assert hlo_report.jaxpr_flops(grad_jaxpr) == hlo_report.jaxpr_flops(  # ... counted once
      jax.make_jaxpr(jax.grad(loss(ref), argnums=(0, 1)))(x, w))
  cts = jax.random.normal(jax.random.key(2), (3,) + ref(x, w).shape)  # vmapped, as LRP does
  got = jax.vmap(lambda ct: jax.vjp(ours, x, w)[1](ct))(cts)
  want = jax.vmap(lambda ct: jax.vjp(ref, x, w)[1](ct))(cts)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  monkeypatch.setattr(kernels, "KERNEL_GRAD_MIN_PIXELS", 91)  # a 9x10 map is too small
  small = lambda x, w: kernels.conv_general_dilated(  # noqa: E731  (a new trace)
      x, w, (1, 1), pad, rhs_dilation=(dilation, dilation), dimension_numbers=dn)
  assert "custom_jvp_call" not in str(jax.make_jaxpr(small)(x, w))


@pytest.mark.parametrize("kernel,stride,pad,size", [(7, 2, (3, 3), 16), (3, 2, (1, 1), 9),
                                                    (5, 3, (1, 2), 11), (4, 2, (0, 0), 10)])
def test_space_to_depth_input_gradient_matches_the_strided_convolutions(kernel, stride, pad, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 3))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 5))
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), (pad, pad),  # noqa: E731
                                                  dimension_numbers=dn)
  ours = lambda x, w: kernels.conv_blocked_input_grad(  # noqa: E731
      x, w, (stride, stride), (pad, pad), (1, 1), (1, 1), dn)
  blocks = lambda x, w: kernels.space_to_depth_conv(x, w, (stride, stride), (pad, pad))  # noqa: E731
  ct = jax.random.normal(jax.random.key(2), ref(x, w).shape)
  for fn in (ours, blocks):
    np.testing.assert_allclose(fn(x, w), ref(x, w), rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.vjp(fn, x, w)[1](ct), jax.vjp(ref, x, w)[1](ct)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  backward = str(jax.make_jaxpr(lambda x: jax.vjp(lambda v: ours(v, w), x)[1](ct))(x))
  assert "lhs_dilation=(2, 2)" not in backward and "lhs_dilation=(3, 3)" not in backward


@pytest.mark.parametrize("mu", [1.0, 0.8, 0.65])
def test_pda_matches_numpy_formula(mu):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
  kernel = rng.normal(size=(7, 3)).astype(np.float32)
  cams = jnp.einsum("bhwc,ck->bhwk", features, kernel)
  got = progressive_dropout_attention(jnp.asarray(features), cams, mu)
  np.testing.assert_allclose(got, _pda_numpy(features, kernel, mu), rtol=1e-5, atol=1e-6)


def test_head_logits_are_the_mean_of_the_cam_and_pda_uses_its_kernel():
  rng = np.random.default_rng(1)
  features = jnp.asarray(rng.normal(size=(2, 4, 4, 6)).astype(np.float32))
  head = MultiLabelHead(3)
  variables = head.init(jax.random.PRNGKey(0), features)
  kernel = np.asarray(variables["params"]["fc8"]["kernel"]).reshape(6, 3)
  logits = head.apply(variables, features)
  np.testing.assert_allclose(logits, np.einsum("bhwc,ck->bk", features, kernel) / 16,
                             rtol=1e-5, atol=1e-6)
  # train mode with dropout 0 and PDA active: logits of the PDA-weighted features
  head0 = MultiLabelHead(3, dropout=0.0)
  with_pda = head0.apply(variables, features, train=True, mu=0.9, pda_active=True)
  want = _pda_numpy(np.asarray(features), kernel, 0.9).mean((1, 2)) @ kernel
  np.testing.assert_allclose(with_pda, want, rtol=1e-5, atol=1e-6)
  off = head0.apply(variables, features, train=True, mu=0.9, pda_active=False)
  np.testing.assert_allclose(off, logits, rtol=1e-5, atol=1e-6)


def test_vit_classifier_pools_and_layer_ids():
  enc = VisionTransformer(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8,
                          image_size=32)
  for pool in ("gap", "cls"):
    model = ViTClassifier(enc, 4, pool)
    x = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    assert model.apply(variables, x).shape == (2, 4)
    assert ("fc_norm" in variables["params"]["head"]) == (pool == "gap")
    assert ("norm" in variables["params"]["encoder"]) == (pool == "cls")
  assert vit_layer_id(("encoder", "patch_embed", "kernel"), 2) == 0
  assert vit_layer_id(("encoder", "cls_token"), 2) == 0
  assert vit_layer_id(("encoder", "blocks_1", "mlp", "fc1", "kernel"), 2) == 2
  assert vit_layer_id(("head", "head", "kernel"), 2) == 3


def test_mixup_and_cutmix_mix_labels_by_pixel_share():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, 16, 16, 3)).astype(np.float32))
  labels = jnp.asarray(np.eye(4, dtype=np.float32))
  for seed in range(5):
    key = jax.random.PRNGKey(seed)
    out, mixed = mixing.mix_batch(key, images, labels, 0.0, 1.0)  # cutmix only
    from_partner = np.mean(np.all(np.isclose(out, images[::-1]), axis=-1)
                           & ~np.all(np.isclose(images, images[::-1]), axis=-1), axis=(1, 2))
    lam = 1 - from_partner
    np.testing.assert_allclose(mixed, lam[:, None] * labels + (1 - lam[:, None]) * labels[::-1],
                               atol=1e-6)
    out, mixed = mixing.mix_batch(key, images, labels, 0.8, 0.0)  # mixup only
    lam = float(mixed[0, 0])
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5,
                               atol=1e-6)
    assert 0 <= lam <= 1 and float(mixed[0, 3]) == pytest.approx(1 - lam, abs=1e-6)


def test_hide_and_seek_hides_whole_grid_cells_with_the_mean():
  """A numpy re-implementation: 6 x 6 cells over 30 x 24 pixels (cells of 5 x 4), each hidden
  with probability 0.5 and filled with the mean; the rest untouched."""
  import jax
  import numpy as np

  from wsss_jax.data import mixing
  rng = np.random.default_rng(0)
  images = rng.random((64, 30, 24, 3)).astype(np.float32)
  fill = np.array([0.7, 0.5, 0.6], np.float32)
  out = np.asarray(mixing.hide_patches(jax.random.PRNGKey(0), images, 6, 0.5, fill))
  cells = np.zeros((64, 6, 6), bool)
  for i in range(6):
    for j in range(6):
      block = out[:, 5 * i:5 * i + 5, 4 * j:4 * j + 4]
      hidden = np.all(block == fill, axis=(1, 2, 3))
      kept = np.all(block == images[:, 5 * i:5 * i + 5, 4 * j:4 * j + 4], axis=(1, 2, 3))
      assert np.all(hidden ^ kept)  # every cell is either wholly hidden or wholly kept
      cells[:, i, j] = hidden
  assert abs(cells.mean() - 0.5) < 0.05
  assert len({c.tobytes() for c in cells}) == 64  # a new pattern per image


def test_seam_equivariance_loss_vanishes_on_equivariant_maps_and_matches_numpy():
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  cams = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  # maps of the flipped image that are the flipped maps: no loss (scale 1: A is the flip)
  assert float(classify_task.equivariance_loss(cams, cams[:, :, ::-1], 1.0)) == pytest.approx(0, abs=1e-7)
  assert float(classify_task.equivariance_loss(cams, cams, 1.0)) > 0.1
  # A downscales first: the target is resized to the transformed maps' size
  assert classify_task.equivariant_transform(jnp.asarray(cams), 0.5).shape == (2, 4, 4, 3)
  assert np.isfinite(float(classify_task.equivariance_loss(cams, cams[:, :4, :4], 0.5)))
  # scale 1: the formula written out in numpy
  other = rng.normal(size=cams.shape).astype(np.float32)
  norm = lambda c: np.maximum(c, 0) / (np.maximum(c, 0).max(axis=(1, 2), keepdims=True) + 1e-5)  # noqa: E731
  want = np.mean(np.abs(norm(cams)[:, :, ::-1] - norm(other)))
  assert float(classify_task.equivariance_loss(cams, other, 1.0)) == pytest.approx(want, rel=1e-5)


def test_sown_class_maps_are_the_classifiers_cams():
  """Pooling and the 1x1 head commute: in inference mode the logits are the CAMs' spatial mean."""
  import jax
  import numpy as np
  from conftest import load_config

  from wsss_jax.models.classifier import build_classifier
  config = load_config("classify", "width=0.0625,image_size=32")
  model = build_classifier(config.model, 32, 4)
  x = np.random.default_rng(1).random((2, 32, 32, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  logits, state = model.apply(variables, x, mutable=["intermediates"])
  cam = state["intermediates"]["head"]["cam"][0]
  assert cam.shape == (2, 4, 4, 4)  # output stride 8
  np.testing.assert_allclose(np.asarray(cam).mean((1, 2)), np.asarray(logits), rtol=1e-4,
                             atol=1e-5)


def test_max_pool_derivative_from_window_winners_matches_xlas_with_ties_and_under_vmap():
  x = jnp.round(jax.random.normal(jax.random.key(0), (2, 9, 10, 3)) * 2) / 2  # many ties
  ref = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # noqa: E731
  ours = lambda x: layers.max_pool(x, 3, 2, 1)  # noqa: E731
  np.testing.assert_array_equal(ours(x), ref(x))
  cts = jax.random.normal(jax.random.key(1), (4,) + ref(x).shape)  # one cotangent per class
  pull = lambda f: jax.vmap(lambda c: jax.vjp(f, x)[1](c)[0])  # noqa: E731
  np.testing.assert_array_equal(pull(ours)(cts), pull(ref)(cts))
  assert "iota" not in str(jax.make_jaxpr(pull(ours))(cts))  # no argmax per cotangent
