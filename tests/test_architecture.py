"""The shape of the code: generic modules import no model family; one installed package."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAMILY_MODULES = {"llama", "llava", "llava_next", "qwen2", "qwen2_vl", "qwen2_vl_vision", "clip",
                  "bert"}
GENERIC = ["jaxmm/models/segments.py", "jaxmm/models/core.py", "jaxmm/models/decoder.py",
           "jaxmm/models/family.py", "jaxmm/generation.py",
           *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "jaxmm/pruning").glob("*.py"))]


def _imported(path: Path) -> set[str]:
  """Every module a file imports (`import a.b`, `from a import b` gives a.b and a)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return out


@pytest.mark.parametrize("rel", GENERIC)
def test_generic_modules_import_no_model_family(rel):
  bad = {m for m in _imported(ROOT / rel)
         if m.startswith("jaxmm.models.") and m.split(".")[2] in FAMILY_MODULES}
  assert not bad, f"{rel} imports model families {sorted(bad)}"


@pytest.mark.parametrize("name", ["eval", "train", "converters"])
def test_top_level_folders_are_not_installed_under_generic_names(name, tmp_path):
  """Installed, the folders are jaxmm.eval / jaxmm.train / jaxmm.converters; a user's `import
  eval` (run outside the repository) does not find ours."""
  code = f"import importlib.util as u; print(u.find_spec({name!r}) is None, " \
         f"u.find_spec('jaxmm.{name}') is not None)"
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, check=True).stdout.split()
  assert out == ["True", "True"]
