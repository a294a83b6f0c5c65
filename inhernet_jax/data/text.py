"""English sentences available offline: the standard library's docstrings, or a text file.

`stdlib_sentences` reads the docstrings (module, class, function) of the chars corpus's
files (`corpus.CHARS_FILES`, the same pure-Python modules in CPython 3.11-3.13) with
`ast`, splits them into sentences and keeps the prose ones (`keep`: 30-200 characters,
a capital first letter, a full stop last, mostly letters; no doctest or code lines).
Held-out sentences come from other files than training ones (every ``holdout_every``-th
file), so near-duplicate docstrings do not leak between the two. `file_sentences` reads
any UTF-8 text file instead (one sentence per line, or prose split the same way).
`Sentences.sha256` identifies the text (it differs between Python versions).

Example:
  ```python
  data = stdlib_sentences()
  len(data.train), len(data.held_out), data.train[0]
  ```
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import pathlib
import re
import sysconfig

from inhernet_jax.data import corpus

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE = re.compile(r">>>|::|\.\.\.|[{}\[\]=<>_`*#|\\]|\w\(|\)\.")


@dataclasses.dataclass(frozen=True)
class Sentences:
  """Training and held-out sentences and where they came from."""

  train: tuple[str, ...]
  held_out: tuple[str, ...]
  source: str
  sha256: str

  def info(self) -> dict:
    return {"source": self.source, "train": len(self.train), "held_out": len(self.held_out),
            "sha256": self.sha256}


def keep(sentence: str) -> bool:
  """Prose, not code: 30-200 characters, capitalised, ending in '.', mostly letters."""
  if not (30 <= len(sentence) <= 200) or not sentence[0].isupper() or not sentence.endswith("."):
    return False
  if _CODE.search(sentence):
    return False
  letters = sum(c.isalpha() or c == " " for c in sentence)
  return letters >= 0.9 * len(sentence)


def split_sentences(text: str) -> list[str]:
  """Paragraphs (blank-line separated) joined and split at sentence ends."""
  out = []
  for para in re.split(r"\n\s*\n", text):
    para = " ".join(para.split())
    out.extend(s.strip() for s in _SPLIT.split(para) if s.strip())
  return out


def _docstrings(source: str) -> list[str]:
  tree = ast.parse(source)
  nodes = [tree] + [n for n in ast.walk(tree)
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
  return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _split(groups: list[list[str]], holdout_every: int, source: str, digest) -> Sentences:
  seen, train, held = set(), [], []
  for i, group in enumerate(groups):
    for s in group:
      if keep(s) and s not in seen:
        seen.add(s)
        (held if i % holdout_every == holdout_every - 1 else train).append(s)
  return Sentences(tuple(train), tuple(held), source, digest.hexdigest())


def stdlib_sentences(stdlib_dir: str | None = None, holdout_every: int = 5) -> Sentences:
  """Prose sentences of the docstrings of `corpus.CHARS_FILES`.

  Raises:
    FileNotFoundError: a file is missing (named), as `corpus.load_corpus`.
  """
  root = pathlib.Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
  digest, groups = hashlib.sha256(), []
  for rel in corpus.CHARS_FILES:
    path = root / rel
    if not path.is_file():
      raise FileNotFoundError(
          f"stdlib sentences: {rel} is missing from the standard library at {root}; give "
          "another text with config.data.source='file' and config.data.path=FILE")
    text = path.read_text(encoding="utf-8")
    digest.update(text.encode("utf-8"))
    groups.append([s for d in _docstrings(text) for s in split_sentences(d)])
  return _split(groups, holdout_every, f"stdlib docstrings ({root})", digest)


def file_sentences(path: str, holdout_every: int = 5, chunk: int = 20) -> Sentences:
  """Prose sentences of a UTF-8 text file (held out: every ``holdout_every``-th block of
  ``chunk`` lines).

  Raises:
    FileNotFoundError: naming ``config.data.path`` and the stdlib default.
  """
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(
        f"no text file at config.data.path={path!r}: give a UTF-8 English text (one sentence "
        "per line or prose), e.g. a Project Gutenberg book; or use the default "
        "config.data.source='stdlib' (the standard library's docstrings, always present)")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  digest = hashlib.sha256("\n".join(lines).encode("utf-8"))
  groups = [split_sentences("\n".join(lines[i:i + chunk])) for i in range(0, len(lines), chunk)]
  return _split(groups, holdout_every, f"file {path}", digest)


def get(source: str = "stdlib", path: str = "", holdout_every: int = 5) -> Sentences:
  """``source`` ``"stdlib"`` (`stdlib_sentences`) or ``"file"`` (`file_sentences`)."""
  if source == "stdlib":
    return stdlib_sentences(holdout_every=holdout_every)
  if source == "file":
    return file_sentences(path, holdout_every=holdout_every)
  raise ValueError(f"config.data.source={source!r}: expected 'stdlib' (the standard "
                   "library's docstrings) or 'file' (config.data.path: a UTF-8 text file)")
