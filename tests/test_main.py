"""The command line as a user types it: README's main command, resume, and user errors."""
import json
import os
import re
import shlex
import subprocess
import sys
import threading

import pytest
from conftest import compile_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.variant=mu/8", "--config.data.image_size=32", "--config.batch_size=8",
        "--config.total_steps=4", "--config.checkpoint_every=2", "--config.log_every=2",
        "--config.data.num_train=32", "--config.data.tile_size=48", "--config.num_figure_images=2",
        "--config.model.decoder_depth=1", "--config.model.decoder_width=32",
        "--config.model.decoder_heads=2", "--config.optim.warmup_steps=1",
        "--config.evaluation.runs=none"]
PHASE_DEVICES = ["--config.num_devices=2"]  # as conftest.load_config does (not multi-process)


def _readme_main_command():
  """The `python -m wsss_jax.main ...` part of README's set-up command."""
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  match = re.search(r"python -m wsss_jax\.main [^\n`&;]*", text)
  assert match, "README.md must show the main command"
  return shlex.split(match.group(0))


def _run(args, **kw):
  env = dict(os.environ)
  return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=600, **kw)


def test_readme_main_command_end_to_end_and_resume(tmp_path):
  cmd = _readme_main_command()[1:]  # drop "python"
  cmd = ([a for a in cmd if not a.startswith("--workdir")] + [f"--workdir={tmp_path}"] + TINY
         + PHASE_DEVICES)
  proc = _run(cmd)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "step 4/4" in proc.stdout
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["steps"] == 4 and summary["resumed_from"] == 0
  assert (tmp_path / "figures" / "recon_0000004.png").exists()
  assert json.load(open(tmp_path / "config.json"))["model"]["variant"] == "mu/8"
  # a second call with more steps continues from the last checkpoint
  proc = _run([a if not a.startswith("--config.total_steps") else "--config.total_steps=6"
               for a in cmd])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resumed from" in proc.stdout and "step 6/6" in proc.stdout
  assert json.load(open(tmp_path / "summary.json"))["resumed_from"] == 4
  # the same workdir with another model is refused with one line
  proc = _run(cmd + ["--config.model.decoder_depth=2"])
  assert proc.returncode == 2
  assert "decoder_depth" in proc.stderr and "Traceback" not in proc.stderr


def _error_line(proc):
  assert proc.returncode == 2, (proc.stdout[-500:], proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr
  return lines[0]


@pytest.mark.parametrize("extra,expected", [
    (["--config=configs/mae.py", "--config.foo=1"], "--config.foo=1"),
    (["--config=configs/mae.py", "--config.model.colour=red"], "'colour' is not a field"),
    (["--config=configs/mae.py", "--config.batch_size=big"], "--config.batch_size=big"),
    (["--config=configs/mae.py:varient=B/16"], "'varient' is unknown"),
    (["--config=configs/nope.py"], "configs/nope.py: no such config file"),
    (["--config=configs/mae.py", "--config.batch_size=12"], "batch_size=12"),
    (["--config=configs/mae.py", "--config.model.variant=Q/16"], "model.variant='Q/16'"),
    (["--config=configs/mae.py", "--config.model.mask_ratio=1.5"], "mask_ratio=1.5"),
    (["--config=configs/mae.py", "--config.kernels=fast"], "kernels='fast' is not one of"),
    (["--config=configs/mae.py", "--config.data.name=imagenet"], "data.name='imagenet'"),
])
def test_user_errors_are_one_line(tmp_path, extra, expected):
  proc = _run(["-m", "wsss_jax.main", f"--workdir={tmp_path}"] + extra)
  assert expected in _error_line(proc)
  assert not os.path.exists(tmp_path / "checkpoints" / "0")


def test_bad_workdirs(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  for workdir, expected in [(blocker, "is not a directory"), (blocker / "sub", "cannot be created")]:
    proc = _run(["-m", "wsss_jax.main", "--config=configs/mae.py", f"--workdir={workdir}"])
    assert expected in _error_line(proc)
  proc = _run(["-m", "wsss_jax.main", "--config=configs/mae.py"])
  assert "--workdir is required" in _error_line(proc)


def test_two_processes_on_localhost_then_resume_on_one(tmp_path):
  """launch/local_multiprocess.sh: 2 JAX processes (CPU collectives) train one model together,
  replicated (fsdp=1) for 4 steps, then resume with every parameter split across the two
  (fsdp=2) for 2 more; a single process then continues that checkpoint."""
  args = [a for a in TINY if not a.startswith("--config.total_steps")]
  args += ["--config.parallel.fsdp_min_size=0"]

  def two_processes(steps, fsdp):
    proc = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", "--config=configs/mae.py",
         f"--workdir={tmp_path}", f"--config.total_steps={steps}", "--config.data.log_seen=True",
         f"--config.parallel.fsdp={fsdp}"] + args,
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        # 1 device each, as conftest compiles; this interpreter, whatever PATH says
        env={**os.environ, "XLA_FLAGS": compile_flags(), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:]
    summaries = [json.loads(l.split("] ", 1)[1]) for l in proc.stdout.splitlines()
                 if l.startswith("[p") and '"phase"' in l]
    assert len(summaries) == 2
    assert all(s["num_processes"] == 2 and s["num_devices"] == 2 for s in summaries)
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]  # one model, one loss
    # both processes hold bit-identical parameters
    assert summaries[0]["params_checksum"] == summaries[1]["params_checksum"]
    return summaries[0]

  assert two_processes(4, fsdp=1)["resumed_from"] == 0
  assert two_processes(6, fsdp=2)["resumed_from"] == 4
  # each process fed its own half of the data, before and after the resume
  seen = [[json.loads(l) for l in open(tmp_path / f"seen_process_{i}.jsonl")] for i in (0, 1)]
  assert all([r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] for rows in seen)
  names = [{n for r in rows for n in r["names"]} for rows in seen]
  assert all(len(r["names"]) == 4 for rows in seen for r in rows)  # global batch 8, 2 processes
  assert names[0] and names[1] and not names[0] & names[1]
  # the 2-process checkpoint continues in a single process
  proc = _run(["-m", "wsss_jax.main", "--config=configs/mae.py", f"--workdir={tmp_path}",
               "--config.total_steps=8"] + args + PHASE_DEVICES)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.load(open(tmp_path / "summary.json"))["resumed_from"] == 6


def test_sigkill_during_training_leaves_a_resumable_workdir(tmp_path):
  """Killed at an arbitrary moment (saves are async), the run resumes from a complete step."""
  import signal
  import time
  args = [a for a in TINY if not a.startswith(("--config.total_steps", "--config.checkpoint"))]
  args += PHASE_DEVICES
  cmd = [sys.executable, "-m", "wsss_jax.main", "--config=configs/mae.py",
         f"--workdir={tmp_path}", "--config.checkpoint_every=1"] + args
  proc = subprocess.Popen(cmd + ["--config.total_steps=1000"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = tmp_path / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (
      ckpt_dir.exists() and len([d for d in os.listdir(ckpt_dir) if d.isdigit()]) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  latest = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())  # finalized steps only
  resumed = _run(cmd[1:] + [f"--config.total_steps={latest + 2}"])
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["resumed_from"] == latest >= 3 and summary["steps"] == latest + 2


def test_tpu_launch_script_runs_one_command_on_every_worker():
  """launch/tpu_vm.sh (DRY_RUN=1 prints the gcloud commands): the same quoted command on all
  workers, with JAX's multi-host auto-detection."""
  env = {**os.environ, "DRY_RUN": "1", "TPU_NAME": "t1", "ZONE": "z1"}
  run = subprocess.run(["bash", "launch/tpu_vm.sh", "run", "--config=configs/mae.py:variant=L/16",
                        "--workdir=/mnt/wsss/runs/a b"], cwd=ROOT, capture_output=True,
                       text=True, env=env, check=True).stdout
  assert run.startswith("gcloud compute tpus tpu-vm ssh t1 --zone=z1 --worker=all --command=")
  assert "WSSS_JAX_DISTRIBUTED=auto" in run and "wsss_jax.main" in run
  assert r"--workdir=/mnt/wsss/runs/a\\\ b" in run  # quoted twice: local shell, then remote
  bad = subprocess.run(["bash", "launch/tpu_vm.sh", "launch"], cwd=ROOT, capture_output=True,
                       text=True, env=env)
  assert bad.returncode == 2 and "unknown command launch" in bad.stderr


def test_stderr_filter_drops_only_closed_event_loop_tracebacks():
  """What tensorstore prints per pending write of a failed save goes; every other line and
  traceback reaches stderr whole, whatever the chunks it is written in."""
  import io

  from wsss_jax.main import _WithoutClosedLoopTracebacks
  dropped = ('Traceback (most recent call last):\n  File "base_events.py", line 806\n'
             '    self._check_closed()\nRuntimeError: Event loop is closed\n')
  kept = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad\n'
  text = "first line\n" + dropped * 3 + kept + dropped + "error: the one line\n"
  for chunk in (1, 7, len(text)):
    out = io.StringIO()
    stream = _WithoutClosedLoopTracebacks(out)
    for i in range(0, len(text), chunk):
      stream.write(text[i:i + chunk])
    stream.flush()
    assert out.getvalue() == "first line\n" + kept + "error: the one line\n"
  # several threads printing theirs at once, line by line: the lines interleave
  blocks = [dropped.splitlines()] * 4
  interleaved = [line for group in zip(*blocks) for line in group]
  out = io.StringIO()
  stream = _WithoutClosedLoopTracebacks(out)
  stream.write("\n".join(interleaved + ["error: the one line"]) + "\n")
  assert out.getvalue() == "error: the one line\n"
  out = io.StringIO()
  stream = _WithoutClosedLoopTracebacks(out)
  barrier = threading.Barrier(8)

  def print_one():
    barrier.wait()
    for line in dropped.splitlines(keepends=True):
      stream.write(line)
  threads = [threading.Thread(target=print_one) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  stream.write("error: the one line\n")
  assert out.getvalue() == "error: the one line\n"
  # a real exception amid them is shown, with what was held
  mixed = interleaved[:5] + kept.splitlines() + interleaved[5:]
  out = io.StringIO()
  _WithoutClosedLoopTracebacks(out).write("\n".join(mixed) + "\n")
  assert "ValueError: bad" in out.getvalue()
  # a background thread's traceback cut short by the immediate exit of a failed save: silenced
  out = io.StringIO()
  stream = _WithoutClosedLoopTracebacks(out)
  stream.write(dropped[:60])
  stream.silence()
  out.write("error: checkpoint 9 could not be written\n")  # _fail's line, to the real stream
  stream.write(dropped[60:] + kept)
  stream.flush()
  assert out.getvalue() == "error: checkpoint 9 could not be written\n"


def test_tpu_keep_running_recreates_a_preempted_slice_and_runs_again(tmp_path):
  """keep-running with a stand-in gcloud on PATH (no cloud here): the first run ends 75 and the
  slice reports PREEMPTED, so it is deleted, created, installed and the run started again; a
  run ending 0 ends the loop."""
  log = tmp_path / "calls.log"
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
case "$*" in
  *"tpu-vm ssh"*wsss_jax.main*)
    n=$(grep -c "wsss_jax.main" {log}); [[ $n == 1 ]] && exit 75; exit 0 ;;
  *describe*) echo PREEMPTED ;;
esac
exit 0
""")
  fake.chmod(0o755)
  env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TPU_NAME": "t1",
         "ZONE": "z1"}
  proc = subprocess.run(["bash", "launch/tpu_vm.sh", "keep-running", "--config=configs/mae.py",
                         "--workdir=/mnt/wsss/runs/x"], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=60)
  assert proc.returncode == 0, proc.stderr
  calls = [l.split()[3] if l.startswith("compute tpus tpu-vm") else l
           for l in log.read_text().splitlines()]
  assert calls == ["ssh", "describe", "delete", "create", "scp", "ssh", "ssh"], calls
  assert "status 75 (75: preempted); running again" in proc.stderr


def test_a_signal_outside_the_loops_is_a_preemption_in_one_line():
  """Where no loop watches (loading, a validation sweep, between phases) SIGTERM and SIGINT
  raise Preempted (one line, exit 75 in main) instead of killing the process or printing a
  KeyboardInterrupt traceback."""
  import signal
  import time

  from wsss_jax import main
  from wsss_jax.errors import Preempted
  saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    main._stop_between_steps()
    for signum in (signal.SIGTERM, signal.SIGINT):
      with pytest.raises(Preempted, match=f"preempted \\({signum.name}\\) between steps"):
        os.kill(os.getpid(), signum)
        for _ in range(5000):  # the handler runs in this thread once it notices the signal
          time.sleep(0.001)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job: left ignored
    main._stop_between_steps()
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
  finally:
    for s, handler in saved.items():
      signal.signal(s, handler)
