"""The docs site (mkdocs.yml, docs/) builds in strict mode: a broken page, nav entry or
API reference (a docstring mkdocstrings cannot parse) fails."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
  pytest.importorskip("mkdocs", reason="mkdocs (tests/requirements.txt) is not installed")
  pytest.importorskip("mkdocstrings")
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                         "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "site" / "reference" / "index.html").is_file()
  assert "inhernet_jax.decomposition.svd" in (tmp_path / "site" / "reference" / "index.html").read_text()
  # Pages that include README sections (pymdownx.snippets) got their text.
  site = tmp_path / "site"
  assert "inhernet_jax/svd.py" in (site / "layout" / "index.html").read_text()
  assert "bash launch/quickstart.sh" in (site / "index.html").read_text()
  assert "dataset-fashion-mnist" in (site / "results" / "index.html").read_text()
  assert "--8&lt;--" not in (site / "index.html").read_text()


def _layout() -> str:
  """The README's Layout section (between its snippet markers; docs/layout.md includes it)."""
  text = (ROOT / "README.md").read_text()
  start, end = "<!-- --8<-- [start:layout] -->", "<!-- --8<-- [end:layout] -->"
  assert start in text and end in text, "README.md lost its layout snippet markers"
  return text[text.index(start):text.index(end)]


def test_readme_layout_names_every_module():
  layout = _layout()
  missing = [f"inhernet_jax/{p.name}" for p in sorted((ROOT / "inhernet_jax").glob("*.py"))
             if f"inhernet_jax/{p.name}" not in layout]
  zoo = next(line for line in layout.splitlines() if line.startswith("inhernet_jax/models/"))
  missing += [f"inhernet_jax/models/{p.name}" for p in sorted((ROOT / "inhernet_jax/models").glob("*.py"))
              if p.stem != "__init__" and not re.search(rf"\b{p.stem}\b", zoo)]
  for folder in ("launch", "benchmarks"):
    missing += [f"{folder}/{p.name}" for p in sorted((ROOT / folder).glob("*.py"))
                if p.stem != "__init__" and not re.search(rf"\b{p.stem}\b", layout)]
  assert not missing, f"README.md's Layout section does not name: {', '.join(missing)}"


def test_docs_layout_page_includes_the_readme_section():
  assert '--8<-- "README.md:layout"' in (ROOT / "docs" / "layout.md").read_text()
