"""The (data, fsdp) mesh and the FSDP sharding of the train state."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from wsss_jax import runner
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.phases import pretrain


def test_fsdp_spec_shards_the_largest_divisible_dimension():
  assert parallel.fsdp_spec((768, 3072), 4, 0) == P(None, "fsdp")
  assert parallel.fsdp_spec((3072, 768), 4, 0) == P("fsdp", None)
  assert parallel.fsdp_spec((6, 8, 10), 4, 0) == P(None, "fsdp", None)  # 10 and 6 do not divide
  assert parallel.fsdp_spec((16, 16), 4, 0) == P(None, "fsdp")  # ties: the last dimension
  assert parallel.fsdp_spec((7, 9), 4, 0) == P()  # nothing divides: replicated
  assert parallel.fsdp_spec((768, 3072), 4, 768 * 3072 + 1) == P()  # under the size threshold
  assert parallel.fsdp_spec((768, 3072), 1, 0) == P()  # no fsdp axis


@pytest.mark.parametrize("data,fsdp,shape", [(-1, 1, (8, 1)), (2, 4, (2, 4)), (-1, 4, (2, 4)),
                                             (1, -1, (1, 8))])
def test_mesh_axes(data, fsdp, shape):
  mesh = parallel.make_mesh(-1, data, fsdp)
  assert mesh.axis_names == ("data", "fsdp")
  assert (mesh.shape["data"], mesh.shape["fsdp"]) == shape


@pytest.mark.parametrize("data,fsdp,message", [
    (2, 2, r"parallel.data=2 x parallel.fsdp=2 = 4 devices, but this run has 8"),
    (-1, 3, r"parallel.fsdp=3 does not divide the 8 devices"),
    (-1, -1, r"cannot both be -1"),
    (0, 1, r"parallel.data=0 must be a positive integer"),
])
def test_mesh_that_does_not_fit_the_devices_is_refused(data, fsdp, message):
  with pytest.raises(UserError, match=message):
    parallel.make_mesh(-1, data, fsdp)


def _abstract_state(config):
  return pretrain.build_training(config, parallel.make_mesh(1)).abstract_state


def test_rules_override_and_unmatched_rules_are_refused(tiny_pretrain_config):
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.num_devices = -1  # all 8
  config.parallel.fsdp, config.parallel.fsdp_min_size = 8, 0
  mesh = parallel.mesh_from_config(config)
  abstract = _abstract_state(config)
  config.parallel.rules = ((r"decoder_blocks_\d+/mlp/fc1/kernel$", "replicate"),)
  shardings = parallel.state_shardings(abstract, mesh, config.parallel)
  fc1 = shardings.params["decoder_blocks_0"]["mlp"]["fc1"]["kernel"]
  fc2 = shardings.params["decoder_blocks_0"]["mlp"]["fc2"]["kernel"]
  assert fc1.spec == P() and fc2.spec == P("fsdp", None)  # (128, 32) rows split 8 ways
  # the rule applies to Adam's moments of that parameter too (same path under opt_state)
  mu = [s for path, s in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]
        if "mu" in parallel.leaf_path(path) and "decoder_blocks_0/mlp/fc1/kernel"
        in parallel.leaf_path(path)]
  assert mu and all(s.spec == P() for s in mu)
  config.parallel.rules = ((r"no_such_layer", "fsdp"),)
  with pytest.raises(UserError, match="parallel.rules: 'no_such_layer' matches no parameter"):
    parallel.state_shardings(abstract, mesh, config.parallel)
  config.parallel.rules = ((r"kernel", "shard_everything"),)
  with pytest.raises(UserError, match="must be \\(regex, one of \\('fsdp', 'replicate'\\)\\)"):
    parallel.state_shardings(abstract, mesh, config.parallel)


def _state_bytes_on_device0(state) -> int:
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards
             if s.device == device)


def test_fsdp_training_equals_data_parallel_training(tiny_pretrain_config, tmp_path):
  """Same losses and parameters as plain data parallelism on 4 devices, with a quarter of the
  state per device."""
  runs = {}
  for name, (data, fsdp) in {"dp": (-1, 1), "fsdp": (1, 4)}.items():
    config = tiny_pretrain_config.copy_and_resolve_references()
    config.total_steps, config.checkpoint_every, config.num_devices = 3, 3, 4
    config.parallel.data, config.parallel.fsdp, config.parallel.fsdp_min_size = data, fsdp, 1024
    states = []
    pretrain.run(config, str(tmp_path / name), step_callback=lambda step, s: states.append(s), dispatch=runner.DISPATCH)
    runs[name] = (config, states[-1], [l["loss"] for l in map(
        __import__("json").loads, open(tmp_path / name / "metrics.jsonl"))])
  (_, dp_state, dp_losses), (config, fsdp_state, fsdp_losses) = runs["dp"], runs["fsdp"]
  np.testing.assert_allclose(dp_losses, fsdp_losses, rtol=1e-5)
  peak_lr = config.optim.base_lr * config.batch_size / 256
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=0.05 * peak_lr),
               parallel.to_host(dp_state.params), parallel.to_host(fsdp_state.params))
  kernel = fsdp_state.params["decoder_blocks_0"]["mlp"]["fc1"]["kernel"]  # (32, 128)
  assert kernel.sharding.spec == P(None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (32, 32)
  abstract = _abstract_state(config)
  fraction = parallel.sharded_fraction(
      parallel.state_shardings(abstract, parallel.mesh_from_config(config), config.parallel),
      abstract)
  expected = _state_bytes_on_device0(dp_state) * (1 - fraction * 3 / 4)
  assert fraction > 0.5
  assert _state_bytes_on_device0(fsdp_state) == pytest.approx(expected, rel=0.01)


# --- Rematerialisation and scanned blocks -------------------------------------------------------
def _mae(config, **model):
  from wsss_jax.models.mae import build_mae
  cfg = config.model.copy_and_resolve_references()
  cfg.update(model)
  return build_mae(cfg, config.data.image_size)


def _loss_and_grads(model, params, images):
  import jax.numpy as jnp

  from wsss_jax.models.mae import random_masking
  masking = random_masking(jax.random.PRNGKey(3), images.shape[0],
                           model.encoder.grid_size**2, model.mask_ratio)
  loss = lambda p: model.apply({"params": p}, jnp.asarray(images), masking).loss  # noqa: E731
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_computes_the_same_loss_and_gradients(tiny_pretrain_config, remat):
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  plain = _mae(tiny_pretrain_config)
  params = plain.init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)},
                      images)["params"]
  ref_loss, ref_grads = _loss_and_grads(plain, params, images)
  loss, grads = _loss_and_grads(_mae(tiny_pretrain_config, remat=remat), params, images)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads, ref_grads)


def test_scanned_blocks_equal_the_block_loop(tiny_pretrain_config):
  """Stacked parameters, unstacked into blocks_i, give the loop's loss and gradients."""
  from wsss_jax.models.vit import unstack_blocks
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  scanned = _mae(tiny_pretrain_config, scan_blocks=True, remat="block")
  stacked = scanned.init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)},
                         images)["params"]
  assert stacked["encoder"]["blocks"]["block"]["attn"]["qkv"]["kernel"].shape == (2, 64, 192)
  assert "decoder_blocks_0" not in stacked and "decoder_blocks" in stacked
  params = unstack_blocks(stacked)
  np.testing.assert_array_equal(params["encoder"]["blocks_1"]["mlp"]["fc1"]["kernel"],
                                stacked["encoder"]["blocks"]["block"]["mlp"]["fc1"]["kernel"][1])
  loss, grads = _loss_and_grads(scanned, stacked, images)
  ref_loss, ref_grads = _loss_and_grads(_mae(tiny_pretrain_config), params, images)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               unstack_blocks(grads), ref_grads)


def test_bad_remat_and_scan_settings_are_refused(tiny_pretrain_config):
  from wsss_jax.models.vit import VisionTransformer
  with pytest.raises(UserError, match="model.remat='everything' is not one of"):
    _mae(tiny_pretrain_config, remat="everything").init(
        {"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)},
        np.zeros((1, 32, 32, 3), np.float32))
  vit = VisionTransformer.from_variant("mu/8", 32, drop_path=0.1, scan_blocks=True)
  with pytest.raises(UserError, match="scan_blocks=True needs model.drop_path=0"):
    vit.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))


def test_chained_pretraining_copies_the_encoder_across_layouts(tiny_pretrain_config, tmp_path):
  """Run A (loop blocks) -> run B (scanned blocks, another decoder width): B starts with A's
  encoder, stacked, and a fresh decoder; a run of another variant is refused."""
  from wsss_jax.models.vit import stack_blocks, unstack_blocks
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.total_steps = 3
  pretrain.run(config, str(tmp_path / "a"), dispatch=runner.DISPATCH)
  a = jax.device_get(_restored_params(config, str(tmp_path / "a")))
  chained = config.copy_and_resolve_references()
  chained.model.scan_blocks, chained.model.decoder_width = True, 64
  chained.model.init_from = str(tmp_path / "a")
  mesh = parallel.make_mesh(1)
  t = pretrain.build_training(chained, mesh)
  fresh = jax.jit(t.init_state)()
  state = pretrain.load_chained(fresh, chained.model.init_from, True, mesh)
  got = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, unstack_blocks(got)["encoder"], a["encoder"])
  jax.tree.map(np.testing.assert_array_equal, got["decoder_blocks"],
               jax.device_get(fresh.params)["decoder_blocks"])
  assert stack_blocks(unstack_blocks(got))["encoder"]["blocks"]["block"]["mlp"]["fc1"][
      "kernel"].shape == (2, 64, 256)
  other = config.copy_and_resolve_references()
  other.model.variant = "Ti/8"
  t2 = pretrain.build_training(other, mesh)
  with pytest.raises(UserError, match=r"model.init_from=.*encoder/.* another model.variant"):
    pretrain.load_chained(jax.jit(t2.init_state)(), str(tmp_path / "a"), False, mesh)


def _restored_params(config, workdir):
  import os

  from wsss_jax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  fields, _ = ckpt.restore_fields(ckpt.latest_step(), parallel.replicated(parallel.make_mesh(1)),
                                  ("params",))
  ckpt.close()
  return fields["params"]
