"""Preemption and non-finite steps: a SIGTERM / SIGINT at a random step of a real training run
stops it after that step with a checkpoint, one line and exit status 75, and the re-run ends
bit-identical to an uninterrupted run (one process, and two processes on localhost agreeing on the
step); nan_policy=skip_step drops the update of a non-finite step."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_flags, load_config

from wsss_jax import runner
from wsss_jax.device import parallel
from wsss_jax.errors import Preempted, UserError
from wsss_jax.phases import pretrain
from wsss_jax.tasks import classify
from wsss_jax.tasks.common import skip_non_finite
from wsss_jax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(workdir, step, config):
  t = pretrain.build_training(config, parallel.make_mesh(1))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    state, _ = ckpt.restore(step, t.abstract_state, t.state_sharding,
                            pretrain.checkpoint_meta(config))
  finally:
    ckpt.close()
  return jax.device_get(state.params)


def _losses(workdir):
  return [json.loads(l)["loss"] for l in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_at_a_random_step_then_resume_is_bit_identical(tiny_pretrain_config, tmp_path,
                                                                signum):
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.total_steps, config.checkpoint_every, config.log_every = 8, 100, 1
  config.async_checkpointing = True
  pretrain.run(config, str(tmp_path / "straight"), dispatch=runner.DISPATCH)
  at = int(np.random.default_rng().integers(1, 6))

  def notice(step, state):
    if step == at:
      os.kill(os.getpid(), signum)

  # as in a terminal (a background job, as CI runs the tests, starts with SIGINT ignored, and
  # the run leaves an ignored signal ignored)
  before = signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                         else signal.SIG_DFL)
  try:
    with pytest.raises(Preempted) as stopped:
      pretrain.run(config, str(tmp_path / "resumed"), step_callback=notice,
                   dispatch=runner.DISPATCH)
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # restored
  finally:
    signal.signal(signum, before)
  line = str(stopped.value)
  stop = int(line.split("after step ")[1].split(" ")[0])
  # sent in step `at`'s callback, noticed before the next step ends (or, late, the one after)
  assert "\n" not in line and at < stop <= at + 2 and " of 8," in line, line
  assert f"checkpoints/{stop} written" in line
  assert Checkpointer(str(tmp_path / "resumed" / "checkpoints")).all_steps() == [stop]
  summary = pretrain.run(config, str(tmp_path / "resumed"), dispatch=runner.DISPATCH)
  assert summary["resumed_from"] == stop
  jax.tree.map(np.testing.assert_array_equal, _params(str(tmp_path / "straight"), 8, config),
               _params(str(tmp_path / "resumed"), 8, config))
  assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


def _command(workdir, steps, extra=()):
  return ["-m", "wsss_jax.main", "--config=configs/mae.py", f"--workdir={workdir}",
          "--config.model.variant=mu/8", "--config.data.image_size=32",
          "--config.batch_size=8", f"--config.total_steps={steps}",
          "--config.checkpoint_every=1000", "--config.log_every=1000",
          "--config.data.num_train=64", "--config.data.tile_size=48",
          "--config.num_figure_images=2", "--config.model.decoder_depth=1",
          "--config.model.decoder_width=32", "--config.model.decoder_heads=2",
          "--config.optim.warmup_steps=1", "--config.evaluation.runs=none",
          "--config.data.log_seen=True"] + list(extra)


def _steps_seen(workdir, process) -> int:
  path = os.path.join(workdir, f"seen_process_{process}.jsonl")
  return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def _start(workdir, steps, processes, port):
  """`processes` JAX processes of one run, as launch/local_multiprocess.sh starts them."""
  env = {**os.environ, "XLA_FLAGS": compile_flags(), "JAX_PLATFORMS": "cpu"}
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a shell has it (importing jax here set it)
  distributed = lambda i: ([f"--coordinator_address=localhost:{port}",
                            f"--num_processes={processes}", f"--process_id={i}"]
                           if processes > 1 else ["--config.num_devices=1"])
  return [subprocess.Popen([sys.executable] + _command(workdir, steps) + distributed(i),
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in range(processes)]


def _finish(procs):
  out = [p.communicate(timeout=600) for p in procs]
  return [(p.returncode, o, e) for p, (o, e) in zip(procs, out)]


def test_sigterm_from_outside_stops_every_process_at_one_step(tmp_path):
  """A SIGTERM to one of two processes of a real `python -m wsss_jax.main` run on localhost:
  both stop at the same step with a checkpoint, each stderr is one line, the status 75; the
  re-run's parameters equal an uninterrupted run's on both. (One process through main: the
  predict test; bit-identical in one process: the test above.)"""
  processes, steps = 2, 60
  port = 21000 + int(np.random.default_rng().integers(0, 20000))
  straight = _finish(_start(tmp_path / "straight", steps, processes, port))
  assert all(rc == 0 for rc, _, _ in straight), straight[0][2][-2000:]
  want = [json.loads(o.strip().splitlines()[-1])["params_checksum"] for _, o, _ in straight]
  procs = _start(tmp_path / "run", steps, processes, port + 1)
  deadline = time.time() + 300
  while _steps_seen(tmp_path / "run", processes - 1) < 3 and time.time() < deadline:
    time.sleep(0.05)
  procs[-1].send_signal(signal.SIGTERM)
  stopped = _finish(procs)
  lines = [e.strip().splitlines() for _, _, e in stopped]
  assert [rc for rc, _, _ in stopped] == [75] * processes, lines
  assert all(len(l) == 1 and l[0].startswith("preempted") for l in lines), lines
  at = {int(l[0].split("after step ")[1].split(" ")[0]) for l in lines}
  assert len(at) == 1 and 3 <= at.pop() < steps
  resumed = _finish(_start(tmp_path / "run", steps, processes, port + 2))
  assert all(rc == 0 for rc, _, _ in resumed), resumed[0][2][-2000:]
  got = [json.loads(o.strip().splitlines()[-1]) for _, o, _ in resumed]
  assert [g["params_checksum"] for g in got] == want
  assert all(3 <= g["resumed_from"] < steps for g in got)


# --- nan_policy=skip_step ------------------------------------------------------------------------
def _classifier(**fields):
  config = load_config("classify", "width=0.0625,image_size=32,batch=8,epochs=2,num_train=32")
  config.data.tile_size, config.data.num_threads = 48, 1
  for key, value in fields.items():
    config[key] = value
  return config


def test_skip_step_keeps_the_state_of_a_non_finite_batch():
  config = _classifier(nan_policy="skip_step")
  mesh = parallel.make_mesh(1)
  t = classify.build_training(config, mesh)
  state = jax.jit(t.init_state)()
  batch = dict(next(iter(classify.pipeline.train_dataset(
      config.data, seed=0, local_batch=8, keys=("image", "labels")))))
  before = jax.device_get(state)
  poisoned = dict(batch, labels=np.full_like(batch["labels"], np.nan))  # an injected bad batch
  state, metrics = t.train_step(state, parallel.global_batch(poisoned, mesh))
  assert not np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) + 1  # the schedule moves on
  for name in ("params", "batch_stats", "opt_state", "mu"):  # BatchNorm statistics included
    jax.tree.map(np.testing.assert_array_equal, getattr(before, name), getattr(after, name))
  state, metrics = t.train_step(state, parallel.global_batch(batch, mesh))  # a good one learns
  assert np.isfinite(float(metrics["loss"]))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), after.params,
                                       jax.device_get(state.params)))
  assert any(moved)


def test_skip_non_finite_against_a_hand_made_step():
  """The wrapper alone: a step that sets every field and reports a loss; finite loss -> the new
  state, non-finite -> the old one with the new step counter."""
  from wsss_jax.train.train_state import TrainState
  old = TrainState(step=jnp.int32(3), params={"w": jnp.ones(2)}, opt_state=(), rng=jnp.zeros(2))
  step = lambda s, loss: (s.replace(step=s.step + 1, params={"w": s.params["w"] * 2}),
                          {"loss": loss})
  new, _ = skip_non_finite(step)(old, jnp.float32(1.0))
  np.testing.assert_array_equal(new.params["w"], [2.0, 2.0])
  kept, _ = skip_non_finite(step)(old, jnp.float32(np.inf))
  np.testing.assert_array_equal(kept.params["w"], [1.0, 1.0])
  assert int(kept.step) == 4


def test_skip_step_stops_after_n_in_a_row_with_the_last_good_checkpoint(tmp_path):
  config = _classifier(nan_policy="skip_step", nan_max_in_a_row=3, log_every=1,
                       checkpoint_every=1, async_checkpointing=False)
  config.optim.base_lr = 1e12  # diverges within a few steps, and stays so
  with pytest.raises(UserError, match="3 steps in a row up to step") as error:
    runner.run_phase(config, str(tmp_path))
  line = str(error.value)
  assert "\n" not in line and "nan_policy=skip_step" in line
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["skipped_steps"] >= 2  # logged as they happen
  reached = int(line.split("up to step ")[1].split(" ")[0])
  steps = Checkpointer(str(tmp_path / "checkpoints")).all_steps()
  assert steps and max(steps) < reached


def test_a_wrong_nan_policy_is_one_line(tmp_path):
  with pytest.raises(UserError, match="nan_policy='skip' is not one of"):
    runner.run_phase(_classifier(nan_policy="skip"), str(tmp_path))
  assert not os.listdir(tmp_path)
