"""The fused attention kernels against the written-out attention, forward and gradients: cuDNN's
padded-token path (run through XLA on the CPU: the padding and the key mask are what is ours) and
the Pallas TPU flash-attention kernel in interpret mode, each alone and inside the ViT and the
MAE encoder/decoder."""
import jax
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from wsss_jax.models import mae, vit


def _written_out(q, k, v):
  """softmax(q k^T / sqrt(d)) v per head, (batch, tokens, heads, head_dim)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


def _qkv(n, seed=0, b=2, h=3, d=16):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(3))


def _assert_same_values_and_gradients(f, g, args, atol=1e-5):
  # jitted whole: the Pallas interpreter's callbacks run JAX ops of their own, which can wait
  # forever on op-by-op dispatch from the main thread
  np.testing.assert_allclose(jax.jit(f)(*args), g(*args), atol=atol)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
  for a, b in zip(jax.jit(jax.grad(loss(f), tuple(range(len(args)))))(*args),
                  jax.grad(loss(g), tuple(range(len(args))))(*args)):
    np.testing.assert_allclose(a, b, atol=atol)


@pytest.mark.parametrize("n", [197, 50, 64])  # ViT-B/16 and the MAE encoder's counts; no padding
def test_padded_tokens_with_a_key_mask_equal_attention_over_the_real_tokens(n):
  padded = lambda q, k, v: vit.padded_attention(q, k, v, 64, "xla")  # noqa: E731
  _assert_same_values_and_gradients(padded, _written_out, _qkv(n))


def test_the_pallas_kernel_equals_attention_over_the_real_tokens():
  with pltpu.force_tpu_interpret_mode():
    _assert_same_values_and_gradients(vit.pallas_attention, _written_out, _qkv(50, b=1, h=2))


def _vit_loss(attention):
  model = vit.VisionTransformer.from_variant("mu/8", 32, attention=attention)
  return model, lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x)))


def _mae_loss(attention):
  cfg = ml_collections.ConfigDict(dict(variant="mu/8", mask_ratio=0.75, norm_pix_loss=True,
                                       gather="take", decoder_width=32, decoder_depth=1,
                                       decoder_heads=2, attention=attention))
  model = mae.build_mae(cfg, 32)
  rngs = {"mask": jax.random.PRNGKey(3)}
  return model, lambda p, x: model.apply({"params": p}, x, rngs=rngs).loss


@pytest.mark.parametrize("which", ["vit", "mae"])
@pytest.mark.parametrize("kernel", ["cudnn", "pallas"])
def test_the_models_learn_the_same_through_either_kernel(which, kernel, monkeypatch):
  """Loss and every parameter's gradient equal the written-out attention's: the ViT (17
  tokens, padded to 64 or 128) and the MAE (5 visible tokens in the encoder, 17 in the
  decoder)."""
  monkeypatch.setattr(vit, "CUDNN_KERNEL", "xla")  # cuDNN itself needs a GPU
  build = _vit_loss if which == "vit" else _mae_loss
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  reference, reference_loss = build("xla")
  params = reference.init({"params": jax.random.PRNGKey(1), "mask": jax.random.PRNGKey(2)},
                          x)["params"]
  _, fused_loss = build(kernel)
  want, want_grads = jax.value_and_grad(reference_loss)(params, x)
  if kernel == "pallas":
    with pltpu.force_tpu_interpret_mode():
      traced = str(jax.make_jaxpr(fused_loss)(params, x))
      got, got_grads = jax.block_until_ready(jax.jit(jax.value_and_grad(fused_loss))(params, x))
    assert "pallas_call" in traced  # the kernel is what ran
  else:
    traced = str(jax.make_jaxpr(fused_loss)(params, x))
    got, got_grads = jax.value_and_grad(fused_loss)(params, x)
    assert "[2,64,2,32]" in traced or "[2,64,2,16]" in traced  # tokens padded to 64
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got_grads,
               want_grads)
