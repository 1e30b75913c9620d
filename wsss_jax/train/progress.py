"""A progress line for long phases: done / total, items per second, time left."""
from __future__ import annotations

import sys
import time


class Progress:
  """Prints `<what>: done/total (pct) | rate/s | eta` at most every `every_s` seconds and once
  at the end. The rate counts from the first update, so start-up and compilation before it do
  not make the eta optimistic or the rate nan."""

  def __init__(self, what: str, total: int | None, every_s: float = 10.0, stream=None,
               clock=time.perf_counter):
    self.what, self.total, self.every_s = what, total, every_s
    self.stream, self.clock = stream or sys.stdout, clock
    self.start = self.last = None
    self.first_done = 0

  def line(self, done: int) -> str:
    now = self.clock()
    elapsed = now - self.start if self.start is not None else 0.0
    rate = (done - self.first_done) / elapsed if elapsed > 0 else 0.0
    total = f"/{self.total} ({100 * done / self.total:.0f}%)" if self.total else ""
    eta = (f" | eta {format_seconds((self.total - done) / rate)}"
           if self.total and rate > 0 and done < self.total else "")
    return f"{self.what}: {done}{total} | {rate:.1f}/s{eta}"

  def update(self, done: int, final: bool = False) -> None:
    now = self.clock()
    if self.start is None:
      self.start, self.last, self.first_done = now, now, done
      return
    if final or now - self.last >= self.every_s or (self.total and done >= self.total):
      self.last = now
      print(self.line(done), file=self.stream, flush=True)


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
