"""The README's and the docs' content: every "mean ± std" figure written in prose is one of
the figures in that page's own result tables (README sections included by the docs pages'
``--8<--`` snippets count as part of the page), and the docs theme shows wide tables."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FIGURE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)(?![\d.])")
SNIPPET = re.compile(r'^--8<-- "([^":]+)(?::([\w-]+))?"\s*$', re.M)


def _expand(text: str) -> str:
  """The page with its ``--8<-- "FILE:section"`` includes replaced by their text."""
  def include(m):
    body = (ROOT / m.group(1)).read_text()
    if m.group(2):
      start, end = f"<!-- --8<-- [start:{m.group(2)}] -->", f"<!-- --8<-- [end:{m.group(2)}] -->"
      body = body[body.index(start) + len(start):body.index(end)]
    return body
  return SNIPPET.sub(include, text)


def figures(text: str) -> tuple[set[tuple[str, str]], list[tuple[int, str, str]]]:
  """``(figures in tables, [(line, mean, std) in prose]``) of a Markdown text; code
  blocks are neither."""
  table, prose, code = set(), [], False
  for i, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith("```"):
      code = not code
      continue
    if code:
      continue
    found = FIGURE.findall(line)
    if line.lstrip().startswith("|"):
      table.update(found)
    else:
      prose += [(i, mean, std) for mean, std in found]
  return table, prose


def test_the_parser_finds_figures_in_prose_and_tables():
  table, prose = figures("a | b |\n|---|\n| x | 97.13 ± 0.80 |\nit ends at 97.22 ± 0.73% here\n")
  assert table == {("97.13", "0.80")} and prose == [(4, "97.22", "0.73")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_prose_figures_are_in_the_pages_tables(page):
  table, prose = figures(_expand(page.read_text()))
  wrong = [f"{mean} ± {std}" for _, mean, std in prose if (mean, std) not in table]
  assert not wrong, (f"{page.name}: figures in prose that no table of the page holds "
                     f"(a stale or mistyped number?): {wrong}")


def test_the_docs_theme_scrolls_wide_tables_and_code_blocks():
  """mkdocs.yml loads docs/css/extra.css, which lets the 10-column result tables and
  wide code blocks scroll inside themselves (the theme alone cut them off)."""
  config = (ROOT / "mkdocs.yml").read_text()
  css_files = re.findall(r"^extra_css:.*\n((?:\s+- .*\n)+)", config, re.M)
  assert css_files and "css/extra.css" in css_files[0]
  css = re.sub(r"/\*.*?\*/", "", (ROOT / "docs" / "css" / "extra.css").read_text(), flags=re.S)
  rules = dict((sel.strip(), body) for sel, body in re.findall(r"([^{}]+)\{([^}]*)\}", css))
  table = next(body for sel, body in rules.items() if ".rst-content table" in sel)
  code = next(body for sel, body in rules.items() if ".rst-content pre" in sel.split(",")[0])
  assert "overflow-x: auto" in table and "display: block" in table
  assert "overflow-x: auto" in code
