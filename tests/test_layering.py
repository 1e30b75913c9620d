"""The package's import layering, read from the source (every import, also inside functions):
phases are leaves that compose through the runner; nothing below them imports a phase."""
import ast
import glob
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "wsss_jax")


def imported_modules(path: str) -> set:
  """Every module an import statement in `path` names (`from a import b` gives a and a.b)."""
  names = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names |= {f"{node.module}.{alias.name}" for alias in node.names}
  return names


def _files(package: str) -> list:
  return sorted(glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True))


def test_imported_modules_sees_imports_inside_functions(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("import os\ndef f():\n  from wsss_jax.phases import classify\n")
  assert {"os", "wsss_jax.phases", "wsss_jax.phases.classify"} <= imported_modules(str(path))


@pytest.mark.parametrize("path", _files("phases"), ids=os.path.basename)
def test_no_phase_imports_another_phase(path):
  own = "wsss_jax.phases." + os.path.splitext(os.path.basename(path))[0]
  phases = {m for m in imported_modules(path) if m.startswith("wsss_jax.phases.") and m != own}
  assert not phases, f"{os.path.basename(path)} imports {sorted(phases)}"


def test_nothing_below_the_phases_imports_one():
  """models/, data/, relevance/, tasks/ and the shared modules (runs.py, loop.py, ...): only
  the runner and the command lines (main, convert) use the runner."""
  files = [p for p in _files("") if os.sep + "phases" + os.sep not in p
           and os.path.basename(p) not in ("runner.py", "main.py", "convert.py")]  # entry points
  assert any(os.sep + "tasks" + os.sep in p for p in files)
  for path in files:
    bad = {m for m in imported_modules(path) if m.startswith("wsss_jax.phases")
           or m == "wsss_jax.runner"}
    assert not bad, f"{os.path.relpath(path, ROOT)} imports {sorted(bad)}"
