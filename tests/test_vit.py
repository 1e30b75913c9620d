import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.errors import UserError
from wsss_jax.models import vit


def test_sincos_posemb_matches_closed_form():
  dim, grid = 16, 5
  emb = vit.sincos_2d_posemb(dim, grid)
  assert emb.shape == (grid * grid + 1, dim)
  np.testing.assert_array_equal(emb[0], 0.0)  # class token row
  quarter = dim // 4
  for row in range(grid):
    for col in range(grid):
      got = emb[1 + row * grid + col]
      for i in range(quarter):
        omega = 1.0 / 10000 ** (i / quarter)
        # channels: [sin(col w), cos(col w), sin(row w), cos(row w)], a quarter each
        assert got[i] == pytest.approx(math.sin(col * omega), abs=1e-6)
        assert got[quarter + i] == pytest.approx(math.cos(col * omega), abs=1e-6)
        assert got[2 * quarter + i] == pytest.approx(math.sin(row * omega), abs=1e-6)
        assert got[3 * quarter + i] == pytest.approx(math.cos(row * omega), abs=1e-6)


def test_posemb_rejects_width_not_divisible_by_four():
  with pytest.raises(UserError, match="divisible by 4"):
    vit.sincos_2d_posemb(18, 4)


@pytest.mark.parametrize("variant,expected", [
    ("B/16", (768, 12, 3072, 12, 16)), ("S/8", (384, 12, 1536, 6, 8)),
    ("L/16", (1024, 24, 4096, 16, 16)), ("H/14", (1280, 32, 5120, 16, 14)),
    ("Ti/16", (192, 12, 768, 3, 16))])
def test_parse_variant(variant, expected):
  s = vit.parse_variant(variant)
  assert (s.width, s.depth, s.mlp_dim, s.num_heads, s.patch_size) == expected


@pytest.mark.parametrize("bad", ["X/16", "B", "B/", "B/x", "B/0"])
def test_parse_variant_rejects(bad):
  with pytest.raises(UserError, match="model.variant"):
    vit.parse_variant(bad)


def test_image_size_must_divide_patch():
  with pytest.raises(UserError, match="image_size=30"):
    vit.VisionTransformer.from_variant("mu/8", 30)


def test_vit_base_parameter_count():
  """ViT-B/16 at 224 has 85.8M parameters without a head (timm: 85,798,656 incl. pos_embed)."""
  model = vit.VisionTransformer.from_variant("B/16", 224)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
  assert n == 85_798_656 - 197 * 768  # our position embedding is a fixed constant, not a param


def test_vit_intermediates_attention_and_tokens():
  model = vit.VisionTransformer.from_variant("mu/8", 32)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  out, state = model.apply(variables, x, mutable=["intermediates"])
  assert out.shape == (2, 17, 64)
  inter = state["intermediates"]
  for i in range(2):
    attn = inter[f"blocks_{i}"]["attn"]["attention_features"][0]
    assert attn.shape == (2, 2, 17, 17)
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)
    assert inter[f"blocks_{i}"]["tokens_features"][0].shape == (2, 17, 64)
  # The last block's tokens, layer-normed, are the output.
  last = inter["blocks_1"]["tokens_features"][0]
  mu, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
  scale = variables["params"]["norm"]["scale"]
  bias = variables["params"]["norm"]["bias"]
  np.testing.assert_allclose(out, (last - mu) / np.sqrt(var + 1e-6) * scale + bias, atol=1e-4)


@pytest.mark.parametrize("implementation", ["xla", "jax"])
def test_attention_matches_numpy(implementation):
  model = vit.Attention(num_heads=2, implementation=implementation)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 8))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  got = model.apply({"params": params}, x)
  weights = model.apply({"params": params}, x, mutable=["intermediates"])[1]
  xn = np.asarray(x[0], np.float64)
  qkv = xn @ np.asarray(params["qkv"]["kernel"]) + np.asarray(params["qkv"]["bias"])
  q, k, v = np.split(qkv, 3, axis=-1)
  heads = []
  for h in range(2):
    sl = slice(4 * h, 4 * h + 4)
    logits = q[:, sl] @ k[:, sl].T / 2.0
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights["intermediates"]["attention_features"][0][0, h], w, atol=1e-6)
    heads.append(w @ v[:, sl])
  want = np.concatenate(heads, -1) @ np.asarray(params["proj"]["kernel"]) + np.asarray(
      params["proj"]["bias"])
  np.testing.assert_allclose(got[0], want, atol=1e-5)


def test_attention_fast_path_equals_explicit_softmax_path():
  """Output and gradient agree whether or not the attention weights are being captured."""
  model = vit.Attention(num_heads=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16)) * 3
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  fast = lambda p, x: model.apply({"params": p}, x)
  explicit = lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"])[0]
  np.testing.assert_allclose(fast(params, x), explicit(params, x), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
  g_fast = jax.grad(loss(fast), argnums=(0, 1))(params, x)
  g_expl = jax.grad(loss(explicit), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_fast,
               g_expl)


def test_drop_path_identity_when_deterministic_and_scaled_when_training():
  layer = vit.DropPath(0.5)
  x = jnp.ones((1000, 3))
  np.testing.assert_array_equal(layer.apply({}, x, True), x)
  y = layer.apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)})
  kept = np.asarray(y[:, 0] != 0)
  assert 0.4 < kept.mean() < 0.6
  np.testing.assert_allclose(np.asarray(y)[kept], 2.0)  # survivors scaled by 1 / keep


def test_unknown_attention_implementation_is_refused():
  with pytest.raises(UserError, match="model.attention='flash'.*'cudnn'"):
    vit.VisionTransformer.from_variant("Ti/16", 32, attention="flash")


def test_tanh_gelu_is_the_closed_form_and_within_5e4_of_the_exact_one():
  from scipy.special import erf
  x = np.linspace(-8, 8, 4001)
  exact = 0.5 * x * (1 + erf(x / np.sqrt(2)))
  tanh = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  for gelu, want in (("exact", exact), ("tanh", tanh)):
    mlp = vit.Mlp(4, gelu=gelu)
    got = mlp.apply({}, jnp.asarray(x, jnp.float32), method=vit.Mlp.activation)
    np.testing.assert_allclose(got, want, atol=2e-6)
  assert 4e-4 < np.abs(exact - tanh).max() < 5e-4  # the bound docs/benchmark.md states (4.7e-4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  exact_model = vit.VisionTransformer.from_variant("mu/8", 32)
  params = exact_model.init(jax.random.PRNGKey(1), x)
  tanh_model = vit.VisionTransformer.from_variant("mu/8", 32, gelu="tanh")
  shift = np.abs(tanh_model.apply(params, x) - exact_model.apply(params, x)).max()
  assert 0 < shift < 1e-2  # every block's MLP takes the setting
  with pytest.raises(UserError, match="model.gelu='fast'"):
    vit.VisionTransformer.from_variant("mu/8", 32, gelu="fast")


def _reference_layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def test_layer_norm_gradient_equals_autodiff_of_the_formula():
  from wsss_jax.models.layers import layer_norm
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16)) * 2 + 1
  scale, bias = (jax.random.normal(jax.random.PRNGKey(k), (16,)) for k in (1, 2))
  ours = lambda *a: jnp.sum(jnp.sin(layer_norm(*a, 1e-6)))  # noqa: E731
  reference = lambda *a: jnp.sum(jnp.sin(_reference_layer_norm(*a)))  # noqa: E731
  np.testing.assert_allclose(layer_norm(x, scale, bias, 1e-6),
                             _reference_layer_norm(x, scale, bias), atol=1e-5)
  for a, b in zip(jax.grad(ours, (0, 1, 2))(x, scale, bias),
                  jax.grad(reference, (0, 1, 2))(x, scale, bias)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bf16_layer_norm_saves_no_float32_activations_for_the_backward_pass(capsys):
  """flax's LayerNorm in bf16 keeps three float32 copies of the activations for its gradient
  (six times a bf16 activation); ours keeps the bf16 input and two numbers per token."""
  import flax.linen as nn
  from jax.ad_checkpoint import print_saved_residuals
  from wsss_jax.models.layers import LayerNorm
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 17, 64)).astype(jnp.bfloat16)
  saved = {}
  for name, cls in (("flax", nn.LayerNorm), ("ours", LayerNorm)):
    module = cls(epsilon=1e-6, dtype=jnp.bfloat16)
    variables = module.init(jax.random.PRNGKey(1), x)
    print_saved_residuals(lambda v, x: module.apply(v, x), variables, x)
    saved[name] = capsys.readouterr().out
  assert saved["flax"].count("f32[4,17,64]") == 3  # what ours is measured against
  assert "f32[4,17,64]" not in saved["ours"] and "bf16[4,17,64]" in saved["ours"]
  module = LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16)
  variables = module.init(jax.random.PRNGKey(1), x)
  want = _reference_layer_norm(x.astype(jnp.float32), variables["params"]["scale"],
                               variables["params"]["bias"])
  got = module.apply(variables, x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2)  # a bf16 rounding


@pytest.mark.parametrize("approximate", [False, True])
def test_16bit_gelu_keeps_only_its_input_and_has_the_closed_form_gradient(approximate, capsys):
  from jax.ad_checkpoint import print_saved_residuals
  x = jnp.linspace(-6, 6, 1001)
  # the value and slope in float32 against jax.nn.gelu's autodiff
  got = jax.vmap(jax.grad(lambda v: vit.gelu_16bit(v, approximate)))(x)
  want = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=approximate)))(x)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(vit.gelu_16bit(x, approximate),
                             jax.nn.gelu(x, approximate=approximate), atol=1e-6)
  h = jax.random.normal(jax.random.PRNGKey(0), (4, 17, 256)).astype(jnp.bfloat16)
  mlp = vit.Mlp(256, dtype=jnp.bfloat16, gelu="tanh" if approximate else "exact")
  print_saved_residuals(lambda v: mlp.activation(v), h)
  saved = capsys.readouterr().out
  assert saved.count("[4,17,256]") == 1 and "from the argument" in saved  # x, nothing else
