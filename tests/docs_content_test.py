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


# "1.35x the student's FLOPs (6.07M vs 4.49M)": a ratio, then the two figures it divides.
RATIO = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)x\b[^()]{0,80}?\((?:[^()]*?, )?"
                   r"(\d[\d,.]*(?: ?[KMG]\b| s\b| min\b)?) vs (\d[\d,.]*(?: ?[KMG]\b| s\b| min\b)?)\)")
_SCALE = {"K": 1e3, "M": 1e6, "G": 1e9, "s": 1.0, "min": 60.0}


def _value(figure: str) -> float:
  number, unit = re.match(r"([\d,.]+) ?(\w*)", figure).groups()
  return float(number.replace(",", "")) * _SCALE.get(unit, 1.0)


def _prose(text: str) -> str:
  """The page's prose (no tables, no code) as one line."""
  out, code = [], False
  for line in text.splitlines():
    if line.lstrip().startswith("```"):
      code = not code
    elif not code and not line.lstrip().startswith("|"):
      out.append(line.strip())
  return " ".join(out)


def _cells(text: str) -> set[str]:
  return {c.strip() for line in text.splitlines() if line.lstrip().startswith("|")
          for c in line.split("|")}


def ratios(text: str) -> list[str]:
  """The ``Rx (... A vs B)`` claims of a page whose figures are not table cells, or whose
  A / B does not round to R."""
  cells, wrong = _cells(text), []
  for m in RATIO.finditer(_prose(text)):
    ratio, a, b = m.groups()
    digits = len(ratio.partition(".")[2])
    if a not in cells or b not in cells or round(_value(a) / _value(b), digits) != float(ratio):
      wrong.append(m.group(0))
  return wrong


def test_the_ratio_parser():
  table = "| a | b |\n|---|---|\n| 8.1 s | 6.1 s |\n| 2.3 min | 51.7 s |\n"
  assert not ratios(table + "was 1.3x (digits, 8.1 s vs 6.1 s) to 2.7x (chars, 2.3 min vs\n"
                    "51.7 s) the student's")
  assert ratios(table + "was 1.6x (digits, 8.1 s vs 6.1 s)")  # The stale 1.6x.
  assert ratios(table + "was 1.3x (digits, 8.2 s vs 6.1 s)")  # A figure of no table.


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_ratios_in_prose_agree_with_the_pages_tables(page):
  wrong = ratios(_expand(page.read_text()))
  assert not wrong, f"{page.name}: ratios that the table's figures do not give: {wrong}"


def test_the_cpu_only_torch_install_is_one_command():
  """The README installs the torch extra from PyTorch's CPU index in one command (PyPI
  alone resolves `torch` to a CUDA build with nvidia-* packages on Linux), the CPU build
  of the tests' pinned torch satisfies the extra, and tests/requirements.txt names no
  index (a machine that cannot reach it stalls on every package)."""
  from packaging.requirements import Requirement

  cpu = "--extra-index-url https://download.pytorch.org/whl/cpu"
  readme = (ROOT / "README.md").read_text()
  commands = [l.strip() for l in readme.splitlines() if l.strip().startswith("pip install \".[torch]\"")]
  assert commands and all(cpu in c for c in commands), commands
  assert f"`PIP_EXTRA_INDEX_URL={cpu.split()[1]} bash launch/test.sh`" in readme
  pyproject = (ROOT / "pyproject.toml").read_text()
  extra = re.search(r"^torch = \[(.*)\]$", pyproject, re.M).group(1)
  torch_req = next(Requirement(r.strip(' "')) for r in extra.split(",")
                   if r.strip(' "').startswith("torch"))
  tests_reqs = (ROOT / "tests" / "requirements.txt").read_text()
  pinned = re.search(r"^torch==([\d.]+)$", tests_reqs, re.M).group(1)
  assert torch_req.specifier.contains(f"{pinned}+cpu"), (torch_req, pinned)
  assert not re.search(r"^\s*(-i|--index-url|--extra-index-url|-f|--find-links)\b", tests_reqs,
                       re.M)
