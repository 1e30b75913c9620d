"""Files that are either whole or absent: every artefact a run writes (configs, summaries, masks,
figures, arrays) goes to a temporary name beside its target and is renamed over it only once it
is complete, so a killed run or a full disk never leaves half a file under the real name."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os


@contextlib.contextmanager
def replacing(path: str):
  """Yields a temporary path beside `path` (same extension, so writers that pick a format by it
  still do); renames it to `path` when the block ends normally, removes it when it raises."""
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{ext}"
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def write_json(path: str, value, indent: int | None = 2) -> None:
  # json.dumps runs the C encoder; json.dump streams through the pure-Python one
  write_text(path, json.dumps(value, indent=indent))


class BackgroundWrites:
  """A thread pool for file writes that holds at most 2 x threads writes in flight, so the
  host memory of pending masks stays bounded; leaving the block waits for every write."""

  def __init__(self, threads: int):
    self.threads = threads
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
    self.pending = []

  def submit(self, fn, *args) -> None:
    while len(self.pending) > 2 * self.threads:
      self.pending.pop(0).result()
    self.pending.append(self.pool.submit(fn, *args))

  def wait(self) -> None:
    """Every write submitted so far is on disk (the first failure raised)."""
    while self.pending:
      self.pending.pop(0).result()

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    try:
      if exc[0] is None:
        self.wait()
    finally:
      self.pool.shutdown(wait=True)
