"""Fault injection: what a run does when training diverges, a checkpoint is damaged, the disk
refuses writes, a tile is bad, or the workdir belongs to another run. Each case is a real run
(tiny MAE or classifier) on real orbax checkpoints and real files; nothing is mocked."""
import contextlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from wsss_jax.errors import UserError
from wsss_jax.phases import pretrain
from wsss_jax.runner import run_phase
from wsss_jax.train.checkpoint import CORRUPT_DIR, Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line(error) -> str:
  text = str(error.value)
  assert "\n" not in text and len(text) < 400, text
  return text


def _config(base, steps, every=3):
  config = base.copy_and_resolve_references()
  config.total_steps, config.checkpoint_every, config.log_every = steps, every, every
  return config


def _steps(workdir) -> list:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _state_files(workdir, step) -> list:
  """The array data files of a step, largest first."""
  root = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  files = [f for f in files if "/d/" in f or os.path.basename(os.path.dirname(f)) == "d"]
  return sorted(files, key=os.path.getsize, reverse=True)


def _finite_params(workdir, step, config) -> bool:
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    fields, _ = ckpt.restore_fields(step, jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                    ("params",))
  finally:
    ckpt.close()
  return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(fields))


# --- Divergence ----------------------------------------------------------------------------------
def test_a_non_finite_step_between_checkpoints_is_never_saved(tiny_pretrain_config, tmp_path):
  """Checkpoints every 2 steps, log lines every 10: the divergence must be caught before the
  save that follows it, with the last good checkpoint named, and that checkpoint finite."""
  config = _config(tiny_pretrain_config, 10, every=2)
  config.log_every = 10
  config.optim.base_lr, config.optim.warmup_steps = 1e9, 1
  with pytest.raises(UserError, match="non-finite at step") as error:
    pretrain.run(config, str(tmp_path))
  line = _one_line(error)
  bad = int(line.split("non-finite at step ")[1].split(":")[0])
  saved = _steps(tmp_path)
  assert all(s < bad for s in saved)  # nothing at or after the bad step
  if saved:
    assert f"checkpoints/{saved[-1]}" in line
    assert _finite_params(str(tmp_path), saved[-1], config)


# --- Damaged checkpoints ---------------------------------------------------------------------------
@pytest.fixture()
def two_steps(tiny_pretrain_config, tmp_path):
  """A run with checkpoints at steps 3 and 6; returns (config, workdir)."""
  config = _config(tiny_pretrain_config, 6)
  pretrain.run(config, str(tmp_path))
  assert _steps(tmp_path) == [3, 6]
  return config, str(tmp_path)


def _resume_after(config, workdir, capsys):
  config = config.copy_and_resolve_references()
  config.total_steps = 9
  summary = pretrain.run(config, workdir)
  return summary, capsys.readouterr().out


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip(path):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    for i in range(middle, middle + 16):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped", "deleted"])
def test_a_damaged_latest_step_is_moved_aside_and_the_one_before_resumes(two_steps, capsys,
                                                                         damage):
  config, workdir = two_steps
  target = _state_files(workdir, 6)[0]
  {"truncated": _truncate, "flipped": _flip, "deleted": os.remove}[damage](target)
  summary, out = _resume_after(config, workdir, capsys)
  assert summary["resumed_from"] == 3  # with the data position of step 3
  warnings = [l for l in out.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoints/6" in warnings[0], out
  assert os.path.isdir(os.path.join(workdir, CORRUPT_DIR, "6"))  # kept, not deleted
  assert _steps(workdir) == [3, 6, 9]  # 6 written again by the resumed run


def test_an_empty_step_directory_is_moved_aside(two_steps, capsys):
  config, workdir = two_steps
  os.makedirs(os.path.join(workdir, "checkpoints", "8"))
  summary, out = _resume_after(config, workdir, capsys)
  assert summary["resumed_from"] == 6
  assert "checkpoints/8 is incomplete" in out
  assert os.path.isdir(os.path.join(workdir, CORRUPT_DIR, "8"))


def test_no_usable_step_is_one_line(two_steps):
  config, workdir = two_steps
  for step in (3, 6):
    _truncate(_state_files(workdir, step)[0])
  with pytest.raises(UserError, match="no usable checkpoint") as error:
    pretrain.run(config, workdir)
  _one_line(error)
  assert sorted(os.listdir(os.path.join(workdir, CORRUPT_DIR))) == ["3", "6"]


def test_a_later_phase_skips_a_damaged_step_without_touching_the_run(two_steps):
  from wsss_jax.train.checkpoint import restore_latest
  _, workdir = two_steps
  for path in _state_files(workdir, 6):  # parameters among them, wherever orbax put them
    _flip(path)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, _, step = restore_latest(workdir, sharding, ("params",), flag="model.init_from")
  assert step == 3 and _steps(workdir) == [3, 6]  # another run's files are left alone


# --- Disks that refuse writes ------------------------------------------------------------------------
@contextlib.contextmanager
def _mounted(path, options):
  """A tmpfs or a read-only bind mount at `path` where the platform allows mounts."""
  if os.geteuid() != 0:
    pytest.skip("mounting a test filesystem needs root")
  proc = subprocess.run(["mount"] + options + [path], capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
  try:
    yield
  finally:
    subprocess.run(["umount", "-l", path], check=False)


MAIN_TINY = ["--config=configs/mae.py", "--config.model.variant=mu/8",
             "--config.data.image_size=32", "--config.batch_size=8", "--config.log_every=3",
             "--config.checkpoint_every=3", "--config.data.num_train=64",
             "--config.data.tile_size=48", "--config.num_figure_images=2",
             "--config.model.decoder_depth=1", "--config.model.decoder_width=32",
             "--config.model.decoder_heads=2", "--config.optim.warmup_steps=1",
             "--config.evaluation.runs=none", "--config.num_devices=1"]


def _main(workdir, steps):
  """`python -m wsss_jax.main` of the tiny MAE run, as a user runs it; (status, stdout, stderr).
  Past the time limit it has hung on orbax's threads (they wait 5 minutes)."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  proc = subprocess.run([sys.executable, "-m", "wsss_jax.main", f"--workdir={workdir}"]
                        + MAIN_TINY + [f"--config.total_steps={steps}"], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=120)
  return proc.returncode, proc.stdout, proc.stderr


def _only_line(stderr: str) -> str:
  """stderr must be exactly one error line (library threads' tracebacks included)."""
  lines = stderr.strip("\n").split("\n")
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  return lines[0]


def test_a_read_only_checkpoint_directory_is_refused_before_the_first_step(two_steps):
  config, workdir = two_steps
  checkpoints = os.path.join(workdir, "checkpoints")
  with _mounted(checkpoints, ["--bind", "-o", "ro", checkpoints]):
    if not _read_only(checkpoints):
      pytest.skip("the bind mount is writable here")
    status, _, stderr = _main(workdir, 9)
  line = _only_line(stderr)
  assert status == 2 and "refuses writes: Read-only file system" in line, line
  assert checkpoints in line
  assert _steps(workdir) == [3, 6]


def test_a_checkpoint_directory_without_write_permission_is_one_line(two_steps):
  config, workdir = two_steps
  checkpoints = os.path.join(workdir, "checkpoints")
  os.chmod(checkpoints, 0o555)
  try:
    if not _read_only(checkpoints):
      pytest.skip("this user writes anywhere (root)")
    status, _, stderr = _main(workdir, 9)
  finally:
    os.chmod(checkpoints, 0o755)
  line = _only_line(stderr)
  assert status == 2 and "refuses writes: Permission denied" in line, line


def _read_only(path) -> bool:
  try:
    with open(os.path.join(path, ".probe"), "w"):
      pass
  except OSError:
    return True
  os.remove(os.path.join(path, ".probe"))
  return False


def _disk_usage(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_a_full_disk_is_one_line_and_the_last_good_step_survives(tiny_pretrain_config, tmp_path):
  """A filesystem that holds what a 6-step run writes (two checkpoints), and a 30-step run on
  it through the command line: the third save fails on the full disk, in the background."""
  config = _config(tiny_pretrain_config, 6, every=3)
  pretrain.run(config, str(tmp_path / "measure"))
  room_kib = (_disk_usage(tmp_path / "measure") * 5 // 4) // 1024 + 64
  workdir = tmp_path / "small"
  workdir.mkdir()
  with _mounted(str(workdir), ["-t", "tmpfs", "-o", f"size={room_kib}k", "tmpfs"]):
    status, _, stderr = _main(str(workdir), 30)
    line = _only_line(stderr)
    assert status == 2 and "could not be written: No space left on device" in line, line
    steps = _steps(workdir)
    assert len(steps) >= 1 and f"checkpoints/{steps[-1] + 3}" in line, (steps, line)
    assert _finite_params(str(workdir), steps[-1], config)  # the latest step is whole


# --- Bad tiles ------------------------------------------------------------------------------------------
def _release(root, small_at=None, small_split="train"):
  """A BCSS-style folder: 24 training tiles (48 px), 4 val tiles with masks; one tile 16 px."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 24), ("val", 4)):
    image_dir = os.path.join(root, "training" if split == "train" else "val", "img")
    os.makedirs(image_dir, exist_ok=True)
    if split == "val":
      os.makedirs(os.path.join(root, "val", "mask"), exist_ok=True)
    for i in range(n):
      size = 16 if (split == small_split and i == small_at) else 48
      name = f"tile{i:03d}" + ("+0[1010]" if split == "train" else "")
      Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(
          os.path.join(image_dir, name + ".png"))
      if split == "val":
        Image.fromarray(rng.integers(0, 5, (size, size), np.uint8)).save(
            os.path.join(root, "val", "mask", name + ".png"))


def _folder_classify(root, bad_files):
  config = load_config("classify", f"dataset=bcss_wsss,root={root},width=0.0625,image_size=32,"
                       "batch=8,epochs=2,num_train=24")
  config.data.bad_files, config.data.num_threads = bad_files, 1
  config.log_every, config.checkpoint_every, config.async_checkpointing = 3, 100, False
  return config


def test_a_late_small_tile_is_skipped_and_listed_before_training(tmp_path):
  root = str(tmp_path / "release")
  _release(root, small_at=23)  # the last tile in name order
  config = _folder_classify(root, "skip")
  workdir = tmp_path / "run"
  summary = run_phase(config, str(workdir))
  assert summary["steps"] == 4
  listed = (workdir / "skipped_files_train.txt").read_text()
  assert "tile023" in listed and "smaller than data.image_size=32" in listed


@pytest.mark.parametrize("split", ["train", "val"])
def test_strict_mode_names_a_small_tile_of_any_split_before_the_first_step(tmp_path, split):
  root = str(tmp_path / "release")
  _release(root, small_at=3, small_split=split)
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match="tile003.*smaller than data.image_size=32"):
    run_phase(_folder_classify(root, "strict"), str(workdir))
  # found by the scan, before any state or checkpoint exists (not at the first validation)
  assert not os.path.exists(workdir / "checkpoints")
  assert not os.path.exists(workdir / "metrics.jsonl")


# --- Another run's workdir ------------------------------------------------------------------------------
def test_a_refused_run_leaves_the_other_runs_record_unchanged(two_steps):
  _, workdir = two_steps
  before = open(os.path.join(workdir, "config.json")).read()
  config = load_config("classify", "width=0.0625,image_size=32,batch=8,epochs=1,num_train=16")
  with pytest.raises(UserError, match="holds a pretrain run.*classify run") as error:
    run_phase(config, workdir)
  _one_line(error)
  assert open(os.path.join(workdir, "config.json")).read() == before
  assert json.loads(before)["phase"] == "pretrain"
