"""The code's shape, read from the source: no function longer than 60 lines in wsss_jax/ or
configs/ (a longer one is a pipeline of steps that wants names)."""
import ast
import glob
import os

ROOT = os.path.join(os.path.dirname(__file__), "..")
MAX_LINES = 60


def long_functions(path: str, limit: int = MAX_LINES) -> list:
  """(name, first line, length) of every function or method in `path` longer than `limit`."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  return [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > limit]


def test_long_functions_finds_a_long_one_and_not_a_short_one(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("def short():\n  return 1\n\n\ndef long():\n" + "  x = 1\n" * 61)
  assert long_functions(str(path)) == [("long", 5, 62)]


def test_no_function_is_longer_than_60_lines():
  files = sorted(glob.glob(os.path.join(ROOT, "wsss_jax", "**", "*.py"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "configs", "*.py")))
  assert len(files) > 50
  found = [f"{os.path.relpath(p, ROOT)}:{line} {name} ({n} lines)" for p in files
           for name, line, n in long_functions(p)]
  assert not found, "functions over 60 lines:\n" + "\n".join(found)
