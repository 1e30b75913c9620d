"""The classify phase: PDA's mu schedule across resume, sharding, learning, initialisation from
MAE, bad input, and the optimiser groups."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from wsss_jax import metrics, runner
from wsss_jax.data import pipeline
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.phases import classify, pretrain
from wsss_jax.tasks import classify as classify_task
from wsss_jax.train import earlier_runs, optim


def _config(arg="", **fields):
  config = load_config("classify", "width=0.0625,image_size=32,batch=8,epochs=2,num_train=32" +
                       ("," + arg if arg else ""))
  config.data.tile_size, config.data.num_val, config.data.num_threads = 48, 16, 1
  config.log_every, config.checkpoint_every, config.async_checkpointing = 1, 5, False
  for key, value in fields.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


# --- PDA's mu ------------------------------------------------------------------------------------
def _mu_closed_form(epoch, sigma, bound, warmup, check=False, decay_in_warmup=False):
  """mu during `epoch`: the number of decays so far, then the bound rule."""
  n = epoch if decay_in_warmup else max(0, epoch - warmup + 1)
  if not check:
    return max(bound, sigma**n)
  k = 0  # 'check': multiply while mu > bound
  while k < n and sigma**k > bound:
    k += 1
  return sigma**k


@pytest.mark.parametrize("preset", ["paper", "released"])
def test_mu_schedule_closed_form(preset):
  from wsss_jax import config_lib
  p = config_lib.pda(preset)
  mu = jnp.float32(1.0)
  for epoch in range(40):
    want = _mu_closed_form(epoch, p.sigma, p.lower_bound, p.warmup_epochs, p.bound == "check",
                           p.decay_in_warmup)
    assert float(mu) == pytest.approx(want, rel=1e-5), epoch
    mu = classify_task.mu_after_epoch(mu, epoch, p)
  floor = 0.65 if preset == "paper" else 0.98**22  # released: the first value <= 0.65, 0.6412
  assert float(mu) == pytest.approx(floor, rel=1e-5)
  assert bool(classify_task.pda_active(p.warmup_epochs - 1, p)) is False
  assert bool(classify_task.pda_active(p.warmup_epochs, p)) is True


def test_mu_is_checkpointed_and_resumes_exactly(tmp_path):
  """4 steps per epoch, 4 epochs, sigma 0.5: a run killed after step 7 and resumed from step 5
  ends in the same state as an uninterrupted one, and mu follows the schedule at every step."""
  def config():
    c = _config("epochs=4")
    c.pda.sigma, c.pda.lower_bound, c.pda.warmup_epochs = 0.5, 0.2, 1
    return c

  full = classify.run(config(), str(tmp_path / "full"))

  def die_after_step_7(step, state):
    if step == 7:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    classify.run(config(), str(tmp_path / "resumed"), step_callback=die_after_step_7)
  resumed = classify.run(config(), str(tmp_path / "resumed"))
  assert resumed["resumed_from"] == 5
  assert full["final_mu"] == resumed["final_mu"] == pytest.approx(0.2)
  for name in ("full", "resumed"):
    rows = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 17))
    for r in rows:
      epoch = (r["step"] - 1) // 4
      assert r["epoch"] == epoch
      assert r["mu"] == pytest.approx(_mu_closed_form(epoch, 0.5, 0.2, 1), rel=1e-6)
  assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-4)
  assert resumed["val/mAP"] == pytest.approx(full["val/mAP"], rel=1e-4)


# --- Sharding ------------------------------------------------------------------------------------
def test_sharded_step_equals_single_device_step():
  """One step with PDA and dropout on: loss, updated parameters and BatchNorm statistics (over
  the global batch) agree. BatchNorm biases that feed another BatchNorm have gradients that
  cancel to ~0 by construction, so their summation-order noise is large relative to themselves:
  those are compared with an absolute tolerance (5e-5 after an lr-0.01 step)."""
  assert jax.device_count() == 8
  config = _config(**{"pda.warmup_epochs": 0})  # PDA active from the first step
  batch = next(iter(pipeline.train_dataset(config.data, seed=0, local_batch=8,
                                           keys=("image", "labels"))))
  out = {}
  for n in (1, 8):
    mesh = parallel.make_mesh(n)
    t = classify.build_training(config, mesh)
    state = jax.jit(t.init_state, out_shardings=t.state_sharding)()
    state, m = t.train_step(state, parallel.global_batch(batch, mesh))
    out[n] = jax.device_get((state.params, state.batch_stats, m["loss"]))
  np.testing.assert_allclose(out[1][2], out[8][2], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5),
               out[1][:2], out[8][:2])


# --- Learning ------------------------------------------------------------------------------------
def test_classifier_learns_the_embedded_dataset(tmp_path):
  config = _config("image_size=48,batch=16,epochs=10,num_train=256,pda=off",
                   **{"data.tile_size": 64, "data.num_val": 64, "data.normalize": True,
                      "model.head_dropout": 0.0, "optim.base_lr": 0.02,
                      "optim.head_lr_mult": 1.0, "log_every": 40, "checkpoint_every": 1000})
  summary = classify.run(config, str(tmp_path))
  labels = np.stack([pipeline.build_source(config.data, "val")[i]["labels"] for i in range(64)])
  chance = labels.mean()  # the AP of random scores is the positive rate
  assert summary["val/mAP"] > chance + 0.1, (summary["val/mAP"], chance)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert "val/AP/TE" in rows[-1] and "val/f1/TAS" in rows[-1]


# --- Initialisation from MAE ---------------------------------------------------------------------
def test_vit_starts_from_the_mae_encoder(tiny_pretrain_config, tmp_path):
  mae_dir = str(tmp_path / "mae")
  tiny_pretrain_config.total_steps = 3
  pretrain.run(tiny_pretrain_config, mae_dir, dispatch=runner.DISPATCH)
  mae = pretrain.build_training(tiny_pretrain_config, parallel.make_mesh(1))
  from wsss_jax.train.checkpoint import Checkpointer
  ck = Checkpointer(os.path.join(mae_dir, "checkpoints"))
  mae_state, _ = ck.restore(3, mae.abstract_state, mae.state_sharding,
                            pretrain.checkpoint_meta(tiny_pretrain_config))
  ck.close()

  config = _config("backbone=vit,variant=mu/8", **{"model.init_from": mae_dir})
  mesh = parallel.make_mesh(1)
  t = classify.build_training(config, mesh)
  state = earlier_runs.load_pretrained(jax.jit(t.init_state)(), mae_dir, t.model, mesh, "vit")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["encoder"]),
               {k: v for k, v in jax.device_get(mae_state.params["encoder"]).items()
                if k in state.params["encoder"]})
  summary = classify.run(config, str(tmp_path / "vit"))
  assert np.isfinite(summary["final_loss"])

  wrong = _config("backbone=vit,variant=mu/16", **{"model.init_from": mae_dir})
  t = classify.build_training(wrong, mesh)
  with pytest.raises(UserError, match="patch_embed/kernel has shape"):
    earlier_runs.load_pretrained(jax.eval_shape(t.init_state), mae_dir, t.model, mesh, "vit")
  cnn = _config(**{"model.init_from": mae_dir})
  t = classify.build_training(cnn, mesh)
  with pytest.raises(UserError, match="initialises model.backbone='vit' only"):
    earlier_runs.load_pretrained(jax.eval_shape(t.init_state), mae_dir, t.model, mesh, "resnet38")


def test_linear_probe_trains_only_the_head():
  config = _config("backbone=vit,variant=mu/8,probe=True")
  mesh = parallel.make_mesh(1)
  t = classify.build_training(config, mesh)
  state = jax.jit(t.init_state)()
  before = jax.device_get(state.params)
  batch = next(iter(pipeline.train_dataset(config.data, seed=0, local_batch=8,
                                           keys=("image", "labels"))))
  state, _ = t.train_step(state, parallel.global_batch(batch, mesh))
  after = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, before["encoder"], after["encoder"])
  assert not np.allclose(before["head"]["head"]["kernel"], after["head"]["head"]["kernel"])
  assert set(state.batch_stats["head"]["head_norm"]) == {"mean", "var"}


# --- Bad input -----------------------------------------------------------------------------------
def test_label_vector_of_wrong_length_is_refused_with_the_tile_name(tmp_path):
  config = _config(**{"data.num_classes": 3, "data.class_names": ("a", "b", "c")})
  with pytest.raises(UserError, match=r"synthetic/train/\d+ \(split train\) has 4 labels but "
                                      r"data.num_classes=3"):
    classify.run(config, str(tmp_path))


def test_image_smaller_than_the_input_size_is_refused(tmp_path):
  config = _config(**{"data.image_size": 64})
  with pytest.raises(UserError, match=r"is 48x48 pixels, smaller than data.image_size=64"):
    classify.run(config, str(tmp_path))


def test_all_zero_label_vectors_are_background_only_tiles():
  data_cfg = _config().data
  check = pipeline.CheckExample(data_cfg, "train", True)
  example = {"image": np.zeros((48, 48, 3), np.uint8), "labels": np.zeros(4, np.float32)}
  assert check(example) is example
  loss = classify_task.multilabel_soft_margin(jnp.full((1, 4), -3.0), jnp.zeros((1, 4)))
  assert float(loss) == pytest.approx(np.log1p(np.exp(-3.0)), rel=1e-6)  # every class negative
  out = metrics.multilabel_metrics(np.array([[0.1, 0.2], [0.9, 0.1]]),
                                   np.array([[0, 0], [1, 0]]), ("a", "b"))
  assert out["exact_match"] == 1.0 and out["AP/a"] == 1.0 and np.isnan(out["AP/b"])
  assert out["mAP"] == 1.0  # a class without positives is left out of the mean


# --- Optimiser -----------------------------------------------------------------------------------
def test_sgd_groups_match_pytorch_sgd_by_hand():
  """PyTorch SGD: d = g + wd p; buf = m buf + d; p -= lr_group buf; head lr x10; frozen fixed."""
  from wsss_jax import config_lib
  cfg = config_lib.classify_optim("resnet38")
  params = {"backbone": {"conv": {"kernel": jnp.ones((2, 2))}, "stem": {"kernel": jnp.ones(2)}},
            "head": {"fc8": {"kernel": jnp.ones((2, 2))}}}
  labels = {"backbone": {"conv": {"kernel": "backbone"}, "stem": {"kernel": "frozen"}},
            "head": {"fc8": {"kernel": "head"}}}
  tx, schedule = optim.classifier_optimizer(cfg, labels, {"backbone": 1.0, "head": 10.0,
                                                          "frozen": 0.0}, 20, 100)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  p, buf = np.ones((2, 2)), np.zeros((2, 2))
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    lr = 0.01 * (1 - step / 100) ** 0.9
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6)
    buf = 0.9 * buf + (0.5 + 5e-4 * p)
    p = p - lr * buf
    np.testing.assert_allclose(params["backbone"]["conv"]["kernel"], p, rtol=1e-6)
  np.testing.assert_array_equal(params["backbone"]["stem"]["kernel"], np.ones(2))
  head_delta = 1 - np.asarray(params["head"]["fc8"]["kernel"])
  assert head_delta[0, 0] == pytest.approx(10 * (1 - p[0, 0]), rel=1e-4)


def test_vit_layer_decay_multipliers():
  from wsss_jax import config_lib
  from wsss_jax.models.classifier import build_classifier, lr_multipliers
  config = _config("backbone=vit,variant=mu/8")
  model = build_classifier(config.model, 32, 4)
  mults = lr_multipliers(model, config.model, config_lib.classify_optim("vit"))
  depth = 2
  assert mults["layer_3"] == 1.0 and mults["layer_0"] == pytest.approx(0.75**3)
  assert mults["layer_1"] == pytest.approx(0.75 ** (depth + 1 - 1)) and mults["frozen"] == 0
