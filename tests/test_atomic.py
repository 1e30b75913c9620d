"""atomic: a file is whole under its name or absent; a failed write leaves no temporary."""
import json
import os

import pytest

from wsss_jax import atomic


def test_a_write_appears_whole_and_a_failed_one_leaves_nothing(tmp_path):
  path = str(tmp_path / "summary.json")
  atomic.write_json(path, {"a": 1})
  assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["summary.json"]
  with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
    assert tmp.endswith(".tmp.json")  # the extension kept: PIL and numpy pick formats by it
    open(tmp, "w").write("half")
    raise RuntimeError("killed mid-write")
  assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["summary.json"]


def test_background_writes_surface_a_failure_and_wait_for_every_write(tmp_path):
  with atomic.BackgroundWrites(2) as files:
    for i in range(20):
      files.submit(atomic.write_text, str(tmp_path / f"{i}.txt"), str(i))
      assert len(files.pending) <= 2 * 2 + 1  # bounded: what is in flight stays small
  assert sorted(os.listdir(tmp_path)) == sorted(f"{i}.txt" for i in range(20))
  with pytest.raises(FileNotFoundError), atomic.BackgroundWrites(1) as files:
    files.submit(atomic.write_text, str(tmp_path / "no" / "such" / "dir.txt"), "x")
