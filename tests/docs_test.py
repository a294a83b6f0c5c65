"""The docs site (mkdocs.yml, docs/) builds in strict mode with no warning at all: a broken
page, nav entry, link or API reference (a docstring mkdocstrings cannot parse) fails. The
reference renders `inherit` and every public name, docstring examples render as code, and
the README's Layout section names every subpackage and module."""

import ast
import html
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import inhernet_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBPACKAGES = sorted(m.name for m in pkgutil.iter_modules(inhernet_jax.__path__) if m.ispkg)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  """The site built once, strict and without ``-q`` (which hides the warnings)."""
  pytest.importorskip("mkdocs", reason="mkdocs (tests/requirements.txt) is not installed")
  pytest.importorskip("mkdocstrings")
  out = tmp_path_factory.mktemp("docs") / "site"
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                         "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  log = proc.stdout + proc.stderr
  warnings = [line for line in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
  assert proc.returncode == 0 and not warnings, (
      f"mkdocs build --strict: exit {proc.returncode}, warnings:\n" + "\n".join(warnings)
      + "\n" + log[-3000:])
  return out


def _text(fragment: str) -> str:
  """HTML to plain text (tags dropped, entities decoded, spaces collapsed)."""
  return " ".join(html.unescape(re.sub(r"<[^>]+>", "", fragment)).split())


@pytest.mark.slow
def test_docs_build_strict(site):
  assert (site / "reference" / "index.html").is_file()
  assert (site / "design" / "index.html").is_file()
  # Pages that include README sections (pymdownx.snippets) got their text.
  assert "inhernet_jax/decomposition/" in (site / "layout" / "index.html").read_text()
  assert "bash launch/quickstart.sh" in (site / "index.html").read_text()
  assert "dataset-fashion-mnist" in (site / "results" / "index.html").read_text()
  assert "--8&lt;--" not in (site / "index.html").read_text()


@pytest.mark.slow
def test_reference_renders_inherit_itself(site):
  page = (site / "reference" / "index.html").read_text()
  match = re.search(r'<h\d id="inhernet_jax\.inherit"[^>]*>(.*?)</h\d>', page, re.S)
  assert match, "the reference has no heading for inhernet_jax.inherit"
  heading = _text(match.group(1))
  names = list(inspect.signature(inhernet_jax.inherit).parameters)
  assert heading.startswith("inherit(") and re.search(r"\b" + r"\b.*\b".join(names) + r"\b", heading), (
      f"inherit's heading {heading!r} is not its signature {names}")
  body = _text(page[match.end():match.end() + 20_000])
  summary = inspect.getdoc(inhernet_jax.inherit).splitlines()[0]
  assert body.startswith(summary), f"inherit's docstring does not follow its heading: {body[:200]!r}"


@pytest.mark.slow
def test_reference_renders_every_public_name_and_subpackage(site):
  page = (site / "reference" / "index.html").read_text()
  anchors = set(re.findall(r'id="([^"]+)"', page))
  missing = []
  for name in inhernet_jax.__all__:
    obj = getattr(inhernet_jax, name)
    anchor = obj.__name__ if inspect.ismodule(obj) else f"inhernet_jax.{name}"
    if anchor not in anchors:
      missing.append(f"{name} (#{anchor})")
  for sub in SUBPACKAGES:
    if f"inhernet_jax.{sub}" not in anchors:
      missing.append(f"subpackage {sub}")
    if not any(a.startswith(f"inhernet_jax.{sub}.") for a in anchors):
      missing.append(f"a module of {sub}")
  assert not missing, f"docs/reference.md does not render: {', '.join(missing)}"


@pytest.mark.slow
def test_docstring_examples_render_as_code(site):
  page = (site / "reference" / "index.html").read_text()
  blocks = [_text(b) for b in re.findall(r"<pre\b.*?</pre>", page, re.S)]
  fenced = re.search(r"```python\n(.*?)```", inhernet_jax.__doc__, re.S)
  assert fenced, "inhernet_jax's docstring lost its fenced example"
  first = fenced.group(1).strip().splitlines()[0].strip()
  assert any(first in b for b in blocks), f"the package example {first!r} is not in a code block"
  # No fence or RST literal block left as prose anywhere.
  for html_file in site.rglob("*.html"):
    text = html_file.read_text()
    assert "```" not in text, f"{html_file.relative_to(site)}: an unrendered fence"
    assert not re.search(r"\b(Example|Examples|Usage|Run)::", text), (
        f"{html_file.relative_to(site)}: an RST literal block rendered as prose")


def _docstrings(path: pathlib.Path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=False)
      if doc:
        yield getattr(node, "name", "module"), doc


def test_docstrings_have_no_rst_literal_blocks():
  """Examples are a Google ``Example:`` section holding a fenced block, not ``Example::``
  (mkdocstrings renders an RST literal block as run-on prose)."""
  found = []
  for folder in ("inhernet_jax", "launch", "benchmarks"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      for name, doc in _docstrings(path):
        lines, fence = doc.splitlines(), False
        for i, line in enumerate(lines):
          fence ^= line.strip().startswith("```")
          if (not fence and line.rstrip().endswith("::") and i + 2 < len(lines)
              and not lines[i + 1].strip() and lines[i + 2].strip()
              and len(lines[i + 2]) - len(lines[i + 2].lstrip()) > len(line) - len(line.lstrip())):
            found.append(f"{path.relative_to(ROOT)} ({name}): {line.strip()}")
  assert not found, ("RST literal blocks in docstrings (write an `Example:` section with a "
                     "```python fenced block):\n" + "\n".join(found))


def _layout() -> str:
  """The README's Layout section (between its snippet markers; docs/layout.md includes it)."""
  text = (ROOT / "README.md").read_text()
  start, end = "<!-- --8<-- [start:layout] -->", "<!-- --8<-- [end:layout] -->"
  assert start in text and end in text, "README.md lost its layout snippet markers"
  return text[text.index(start):text.index(end)]


def _row(layout: str, folder: str) -> str | None:
  """The table row whose first cell is ``folder`` (e.g. `inhernet_jax/data/`)."""
  return next((line for line in layout.splitlines() if line.startswith(f"| `{folder}` |")), None)


def test_readme_layout_names_every_module():
  layout = _layout()
  missing = []
  folders = [(f"inhernet_jax/{sub}/", ROOT / "inhernet_jax" / sub) for sub in SUBPACKAGES]
  folders += [("launch/", ROOT / "launch"), ("benchmarks/", ROOT / "benchmarks")]
  for folder, path in folders:
    row = _row(layout, folder)
    if row is None:
      missing.append(f"{folder} (no table row)")
      continue
    missing += [f"{folder}{p.name}" for p in sorted(path.glob("*.py"))
                if p.stem != "__init__" and f"`{p.stem}`" not in row]
  missing += [f"inhernet_jax/{name}" for name in ("__init__.py", "_entry.py")
              if f"inhernet_jax/{name}" not in layout and f"`{name}`" not in layout]
  for folder in ("configs/", "tests/"):
    if _row(layout, folder) is None:
      missing.append(f"{folder} (no table row)")
  assert not missing, f"README.md's Layout section does not name: {', '.join(missing)}"


def test_docs_layout_page_includes_the_readme_section():
  assert '--8<-- "README.md:layout"' in (ROOT / "docs" / "layout.md").read_text()
