"""The docs site (mkdocs.yml, docs/) builds in strict mode: a broken page, nav entry or
API reference (a docstring mkdocstrings cannot parse) fails."""

import pathlib
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
  assert "inhernet_jax.svd" in (tmp_path / "site" / "reference" / "index.html").read_text()
