"""Entry point: `python -m wsss_jax.main --config=configs/mae.py --workdir=runs/mae`.

`--config` is an ml_collections config file, optionally with a big_vision-style argument
(`configs/mae.py:variant=B/16`); every field can be overridden as `--config.x.y=value`. The
config's `phase` field picks the runner. User mistakes end in one `error: ...` line and exit 2;
a run stopped by SIGTERM / SIGINT writes its checkpoint, prints one line and exits 75.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading

# XLA's C++ logs: errors only (set before jaxlib loads): JAX's preemption notifier logs each SIGTERM
# as one, and a run's stderr is its own lines (TF_CPP_MIN_LOG_LEVEL=0 shows them all)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from wsss_jax.device import parallel
from wsss_jax.errors import Preempted, UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and figures.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv) -> None:
  if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
    # orbax and jax log every save at INFO, and orbax a preemption's save as a WARNING
    absl_logging.set_verbosity(absl_logging.ERROR)
    # orbax's background threads log a failed write at ERROR, with a traceback per thread;
    # the run reports it as one error line naming the checkpoint and the cause
    absl_logging.get_absl_handler().addFilter(_NotOrbax())
    sys.stderr = _WithoutClosedLoopTracebacks(sys.stderr)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    parallel.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                          _PROCESS_ID.value)
    _stop_between_steps()
    # imported here, not at the top: the phases build device constants when imported, and
    # jax.distributed.initialize must come before anything touches the backend
    from wsss_jax.runner import run_phase
    if _CONFIG.value is None:
      raise UserError("--config is required, e.g. --config=configs/mae.py")
    summary = run_phase(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(summary, default=str))
  except UserError as e:
    # after a failed checkpoint write orbax's threads wait minutes for a directory that never
    # comes: end the process at once (stdout and stderr flushed) instead of waiting for them
    checkpoint = sys.modules.get("wsss_jax.train.checkpoint")
    _fail(str(e), now=bool(checkpoint and checkpoint.stranded_saves()))
  except Preempted as e:  # the checkpoint is written: a scheduler may re-run the same command
    _fail(str(e), Preempted.EXIT_STATUS, prefix="")


def _config_override(argv, key: str) -> str:
  """The `--config.a.b=v` argument that names `key`, for error messages."""
  for arg in argv:
    name = arg.split("=", 1)[0]
    if name.startswith("--config.") and key in name[len("--config."):].split("."):
      return arg
  return f"--config ... {key}"


def _flags_parser(argv):
  """absl flag parsing with config errors reported as one line instead of a traceback."""
  for arg in argv:
    if arg.startswith("--config="):
      path = arg[len("--config="):].split(":", 1)[0]
      if not os.path.isfile(path):
        _fail(f"--config={path}: no such config file")
  try:
    return flags.FLAGS(argv)
  except (flags.Error, UserError) as e:  # UserError: raised by a config file's get_config(arg)
    _fail(str(e))
  except (AttributeError, KeyError) as e:  # an override of a field the config does not have
    key = str(e).strip("'\"")
    _fail(f"{_config_override(argv, key)}: {key!r} is not a field of this config")
  except OSError as e:
    _fail(f"cannot load the config: {str(e).splitlines()[0]}")


def _stop_between_steps() -> None:
  """SIGTERM / SIGINT where no loop watches for them (loading, a validation sweep, between
  phases): stop there, as a preemption, with one line and exit 75; every file the run writes is
  written whole, so the re-run resumes from the last checkpoint or finished phase. The loops
  (training steps, predict's tiles, the pseudo masks' batches) install their own handlers,
  which finish the step first. Several processes: JAX's preemption service owns SIGTERM."""
  def stop(signum, frame):
    raise Preempted(f"preempted ({signal.Signals(signum).name}) between steps: every finished "
                    f"step and phase is kept; run the same command again to resume")
  for signum in (signal.SIGINT,) + ((signal.SIGTERM,) if jax.process_count() == 1 else ()):
    if signal.getsignal(signum) != signal.SIG_IGN:  # ignored by our parent: left so
      signal.signal(signum, stop)


class _NotOrbax(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


class _WithoutClosedLoopTracebacks:
  """sys.stderr without the 'Event loop is closed' tracebacks that tensorstore prints, one per
  pending write, when the writes of a failed checkpoint save complete after orbax closed that
  save's event loop (the failure itself is reported as one error line). Several threads print
  them at once, their lines interleaved: a block of tracebacks is dropped when every one of them
  ends in that line. Every other line, and every other traceback, passes through whole."""
  DROPPED = "RuntimeError: Event loop is closed"
  HEADER = "Traceback (most recent call last):"

  def __init__(self, stream):
    self.stream, self.pending, self.held, self.silenced = stream, "", [], False
    self.open = 0  # tracebacks begun in the held block and not yet ended
    self.lock = threading.Lock()  # library threads write at once

  def silence(self) -> None:
    """Drops what other threads print from now on, and a traceback they were printing: the
    process is about to end at once (os._exit), cutting them short."""
    with self.lock:
      self.silenced, self.held, self.pending, self.open = True, [], "", 0

  def write(self, text: str) -> int:
    with self.lock:
      if self.silenced:
        return len(text)
      *lines, self.pending = (self.pending + text).split("\n")
      for line in lines:
        self._line(line)
    return len(text)

  def _line(self, line: str) -> None:
    if line.startswith(self.HEADER):
      self.held.append(line)
      self.open += 1
    elif self.held and line.startswith(" "):
      self.held.append(line)
    elif self.held and line == self.DROPPED:
      self.held.append(line)
      self.open -= 1
      if self.open == 0:  # every traceback of the block was a closed loop's
        self.held = []
    elif self.held:  # another exception's own line (or output) amid them: all of it shown
      self.stream.write("\n".join(self.held + [line]) + "\n")
      self.held, self.open = [], 0
    else:
      self.stream.write(line + "\n")

  def flush(self) -> None:
    with self.lock:
      if self.pending and not self.held:
        self.stream.write(self.pending)
        self.pending = ""
    self.stream.flush()

  def __getattr__(self, name):  # fileno, isatty, encoding, ... of the real stream
    return getattr(self.stream, name)


def _fail(message: str, status: int = 2, prefix: str = "error: ", now: bool = False) -> None:
  stream = sys.stderr
  if now and isinstance(stream, _WithoutClosedLoopTracebacks):
    stream.silence()  # background threads' half-printed tracebacks are not the error
    stream = stream.stream
  print(f"{prefix}{message}", file=stream)
  if now:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_flags_parser)
