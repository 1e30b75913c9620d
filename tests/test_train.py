"""Training-loop behaviour: sharding, resume, restore on other meshes, checkpoint checks."""
import json
import logging
import os

import jax
import numpy as np
import pytest

from wsss_jax import runner
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.phases import pretrain
from wsss_jax.tasks import pretrain as pretrain_task
from wsss_jax.train.checkpoint import Checkpointer


def _params(workdir, step, config):
  """Restores the params of `step` from a finished run onto one device."""
  config = config.copy_and_resolve_references()
  t = pretrain.build_training(config, parallel.make_mesh(1))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  state, _ = ckpt.restore(step, t.abstract_state, t.state_sharding,
                          pretrain.checkpoint_meta(config))
  ckpt.close()
  return jax.device_get(state.params)


def _assert_trees_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def test_sharded_gradients_equal_single_device_gradients(tiny_pretrain_config):
  """The loss and gradient of one global batch do not depend on how the batch is split."""
  from wsss_jax.data import pipeline
  from wsss_jax.models.mae import build_mae
  from wsss_jax.train import optim
  config = tiny_pretrain_config
  model = build_mae(config.model, 32)
  tx, _ = optim.adamw(config.optim, config.batch_size, config.total_steps)
  state = pretrain_task.make_init_fn(model, tx, 32, 0)()
  batch = next(iter(pipeline.train_dataset(config.data, seed=0, local_batch=8)))
  grad_fn = jax.value_and_grad(pretrain_task.make_loss_fn(model, config.data.mean,
                                                          config.data.std, np.float32))
  results = []
  for n in (1, 8):
    mesh = parallel.make_mesh(n)
    fn = jax.jit(grad_fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh),
                                        parallel.replicated(mesh)))
    results.append(jax.device_get(fn(state.params, parallel.global_batch(batch, mesh),
                                     state.rng)))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
  _assert_trees_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


def test_sharded_training_equals_single_device_training(tiny_pretrain_config, tmp_path):
  assert jax.device_count() == 8
  results, losses = {}, {}
  for n in (1, 8):
    config = tiny_pretrain_config.copy_and_resolve_references()
    config.num_devices = n
    config.total_steps = 3
    config.checkpoint_every = 3
    summary = pretrain.run(config, str(tmp_path / f"d{n}"), dispatch=runner.DISPATCH)
    assert summary["num_devices"] == n
    results[n] = _params(str(tmp_path / f"d{n}"), 3, config)
    losses[n] = [json.loads(l)["loss"] for l in open(tmp_path / f"d{n}" / "metrics.jsonl")]
  np.testing.assert_allclose(losses[1], losses[8], rtol=1e-5)
  # Adam divides by sqrt(v): on parameters whose gradient is ~0, float reduction-order noise
  # becomes an O(lr) step, so parameters agree to a small fraction of the peak lr.
  peak_lr = config.optim.base_lr * config.batch_size / 256
  _assert_trees_close(results[1], results[8], rtol=1e-4, atol=0.05 * peak_lr)


class _Killed(Exception):
  pass


def test_kill_and_resume_matches_uninterrupted_run(tiny_pretrain_config, tmp_path):
  config = tiny_pretrain_config
  pretrain.run(config, str(tmp_path / "straight"), dispatch=runner.DISPATCH)

  def die_after_step_4(step, state):
    if step == 4:  # checkpoint 3 is on disk, step 4 is lost
      raise _Killed()

  with pytest.raises(_Killed):
    pretrain.run(config, str(tmp_path / "resumed"), step_callback=die_after_step_4, dispatch=runner.DISPATCH)
  assert Checkpointer(str(tmp_path / "resumed" / "checkpoints")).all_steps() == [3]
  summary = pretrain.run(config, str(tmp_path / "resumed"), dispatch=runner.DISPATCH)
  assert summary["resumed_from"] == 3
  _assert_trees_close(_params(str(tmp_path / "straight"), 6, config),
                      _params(str(tmp_path / "resumed"), 6, config), rtol=1e-5, atol=1e-7)
  rows = [json.loads(l) for l in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4, 6]


@pytest.mark.parametrize("restore_devices", [1, 2])
def test_restore_on_a_different_device_count(tiny_pretrain_config, tmp_path, restore_devices):
  """Saved on 8 devices with the state FSDP-split 4 ways (2 replicas), resumed on 1 or 2."""
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.num_devices = 8
  config.parallel.data, config.parallel.fsdp, config.parallel.fsdp_min_size = 2, 4, 0
  config.total_steps = 3
  pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)
  saved = _params(str(tmp_path), 3, config)
  # continue the same run on fewer devices, the state split over all of them
  config.num_devices = restore_devices
  config.parallel.data, config.parallel.fsdp = 1, -1
  config.total_steps = 6
  summary = pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)
  assert summary["resumed_from"] == 3 and summary["num_devices"] == restore_devices
  resumed = _params(str(tmp_path), 6, config)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), saved, resumed))
  assert any(changed)


def test_checkpoint_of_another_model_is_refused(tiny_pretrain_config, tmp_path):
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.total_steps = 3
  pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)
  record = (tmp_path / "config.json").read_text()
  config.model.decoder_depth = 2
  with pytest.raises(UserError, match=r"pretrain phase.*model.decoder_depth 1 -> 2.*--workdir"
                     ) as refused:
    pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)
  assert len(str(refused.value)) < 300 and "\n" not in str(refused.value)
  assert (tmp_path / "config.json").read_text() == record  # the refused run changed nothing


def test_outputs_in_workdir(tiny_pretrain_config, tmp_path):
  """Metrics, figures, checkpoints, and the end-of-run linear probe and fine-tune."""
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.evaluation.runs = "both"
  for cls in (config.evaluation.linear_probe, config.evaluation.finetune):
    cls.num_epochs, cls.batch_size, cls.log_every, cls.async_checkpointing = 1, 8, 2, False
    cls.data.update(num_train=32, num_val=8, tile_size=48, num_threads=1)
  summary = pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert {"step", "loss", "lr", "images_per_sec", "step_time"} <= set(rows[-1])
  assert json.load(open(tmp_path / "summary.json"))["steps"] == 6 == summary["steps"]
  assert os.listdir(tmp_path / "tensorboard")
  from PIL import Image
  grid = Image.open(tmp_path / "figures" / "recon_0000006.png")
  assert grid.size == (3 * 32, 2 * 32)  # original / masked / reconstruction, 2 images
  # both saves are on disk, each complete (keep_checkpoints: the test below)
  steps = Checkpointer(str(tmp_path / "checkpoints")).all_steps()
  assert steps == [3, 6]
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if "tmp" in d]
  # the probe keeps the pretrained encoder frozen, the fine-tune moves it; both were scored
  from wsss_jax.train.checkpoint import restore_latest
  rep = parallel.replicated(parallel.make_mesh(1))
  params = {name: restore_latest(str(tmp_path / sub), rep, ("params",), flag="t")[0]["params"]
            for name, sub in (("pre", "."), ("probe", "eval/linear_probe"),
                              ("ft", "eval/finetune"))}
  qkv = {k: np.asarray(p["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]) for k, p in params.items()}
  np.testing.assert_array_equal(qkv["probe"], qkv["pre"])
  assert not np.allclose(qkv["ft"], qkv["pre"])
  saved = json.load(open(tmp_path / "summary.json"))["evaluation"]
  for name in ("linear_probe", "finetune"):
    assert saved[name]["steps"] == 4 and 0 <= saved[name]["mAP"] <= 1
    assert saved[name] == pytest.approx(summary["evaluation"][name])
    assert json.load(open(tmp_path / "eval" / name / "config.json"))["model"]["init_from"] == \
        str(tmp_path)


def test_bad_batch_size_is_reported(tiny_pretrain_config, tmp_path):
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.batch_size, config.num_devices = 12, -1  # all 8
  with pytest.raises(UserError, match="batch_size=12 must be a positive multiple of .* 8"):
    pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)


def test_mixed_precision_keeps_fp32_params_and_a_close_loss(tiny_pretrain_config):
  import jax.numpy as jnp

  from wsss_jax.data import pipeline
  from wsss_jax.models.mae import build_mae
  from wsss_jax.train import optim
  config = tiny_pretrain_config
  batch = next(iter(pipeline.train_dataset(config.data, seed=0, local_batch=8)))
  losses, states = {}, {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = build_mae(config.model, 32, dtype)
    tx, schedule = optim.adamw(config.optim, config.batch_size, config.total_steps)
    state = pretrain_task.make_init_fn(model, tx, 32, 0)()
    step = jax.jit(pretrain_task.make_train_step(model, tx, schedule, config.data.mean,
                                                 config.data.std, dtype))
    states[dtype], metrics = step(state, batch)
    losses[dtype] = float(metrics["loss"])
  assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=2e-2)
  assert {x.dtype for x in jax.tree.leaves(states[jnp.bfloat16].params)} == {jnp.dtype("float32")}


def test_keep_checkpoints_bounds_the_steps_on_disk(tiny_pretrain_config, tmp_path):
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.total_steps, config.checkpoint_every, config.log_every = 12, 2, 4
  config.keep_checkpoints = 3
  pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)  # six saves: 2, 4, ..., 12
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [8, 10, 12]
  assert sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [
      "10", "12", "8"]


def test_checkpointer_registers_its_array_handler_once_and_quietly(tmp_path, caplog):
  import orbax.checkpoint as ocp

  from wsss_jax.train import checkpoint
  checkpoint._array_handler_processes = None  # as in a fresh process
  with caplog.at_level(logging.WARNING):
    checkpoint.Checkpointer(str(tmp_path / "a"))
    first = ocp.type_handlers.get_type_handler(jax.Array)
    checkpoint.Checkpointer(str(tmp_path / "b"))
  assert not [r for r in caplog.records if "overriding" in r.getMessage()]
  assert ocp.type_handlers.get_type_handler(jax.Array) is first  # registered once
  assert isinstance(first, ocp.type_handlers.ArrayHandler)


def test_how_a_step_computes_is_free_and_gelu_matches_checkpoints_from_before_it():
  import ml_collections

  from wsss_jax.train.checkpoint import check_meta, model_meta
  model = ml_collections.ConfigDict({"variant": "mu/8", "attention": "xla", "gelu": "exact"})
  before = {"phase": "pretrain", "model": {"variant": "mu/8"}}  # written before `gelu` existed
  meta = lambda: {"phase": "pretrain", "model": model_meta(model)}  # noqa: E731
  check_meta(before, meta(), "w")                     # the default GELU is what it used
  model.attention = "pallas"
  check_meta(before, meta(), "w")                     # a kernel choice: resumes
  model.gelu = "tanh"
  with pytest.raises(UserError, match="model.gelu"):  # another function: refused
    check_meta(before, meta(), "w")
