"""The chars corpus: the Python standard library's own source as ASCII ids.

A fixed list of pure-Python modules present at the same paths in CPython 3.11 to 3.13
(`CHARS_FILES`), read from this interpreter's stdlib; ASCII code points are the ids
(vocabulary `CHARS_VOCAB`), every other character becomes `CHARS_UNKNOWN`; the last 10%
of each file is validation. The text differs between Python versions, so `Corpus.sha256`
identifies it. `inhernet_jax.data.pipeline` turns it into training and evaluation windows.

Example:
  ```python
  corpus = load_corpus()
  decode(corpus.train[:20]), corpus.sha256
  ```
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import sys
import sysconfig
from typing import Any

import numpy as np

# Pure-Python stdlib modules present (at these paths) in CPython 3.11, 3.12 and 3.13.
# Modules that became packages or shims in that range (zipfile, pathlib, datetime,
# decimal, sysconfig, re, warnings) or were removed (PEP 594) are left out.
CHARS_FILES = (
    "argparse.py", "ast.py", "bdb.py", "calendar.py", "cmd.py", "code.py", "codecs.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py",
    "difflib.py", "dis.py", "doctest.py", "enum.py", "fnmatch.py", "fractions.py",
    "functools.py", "getopt.py", "gettext.py", "glob.py", "gzip.py", "heapq.py",
    "hmac.py", "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py",
    "logging/__init__.py", "logging/handlers.py", "mailbox.py", "optparse.py", "pdb.py",
    "pickle.py", "pprint.py", "queue.py", "random.py", "sched.py", "shlex.py",
    "shutil.py", "smtplib.py", "socket.py", "statistics.py", "subprocess.py",
    "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "tokenize.py",
    "traceback.py", "typing.py", "uuid.py", "weakref.py",
)
CHARS_VOCAB = 128  # ASCII code points.
CHARS_UNKNOWN = 0  # The id of every non-ASCII character (NUL never occurs in source).
CHARS_VALID_FRACTION = 0.1  # The last 10% of each file's characters are validation.


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """The chars corpus: ASCII ids of the training and validation text.

  Attributes:
    files: the source files, relative to ``stdlib_dir``, in corpus order.
    file_chars: characters per file.
    train: uint8 ids of the first 90% of every file's characters, concatenated.
    valid: uint8 ids of the last 10% of every file's characters, concatenated.
    non_ascii: characters mapped to `CHARS_UNKNOWN`.
    sha256: hex digest of the files' text (UTF-8, in order): the corpus's identity,
      which differs between Python versions.
    stdlib_dir: where the files were read.
    python_version: the interpreter that read them.
  """

  files: tuple[str, ...]
  file_chars: tuple[int, ...]
  train: np.ndarray
  valid: np.ndarray
  non_ascii: int
  sha256: str
  stdlib_dir: str
  python_version: str

  def info(self) -> dict[str, Any]:
    """JSON-friendly provenance (everything but the ids)."""
    return {"files": list(self.files), "file_chars": list(self.file_chars),
            "train_chars": int(self.train.size), "valid_chars": int(self.valid.size),
            "vocab_size": CHARS_VOCAB, "unknown_id": CHARS_UNKNOWN,
            "non_ascii": self.non_ascii, "sha256": self.sha256,
            "stdlib_dir": self.stdlib_dir, "python_version": self.python_version}


def _code_points(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def encode(text: str) -> np.ndarray:
  """Text -> uint8 ids: ASCII code points; every other character -> `CHARS_UNKNOWN`."""
  points = _code_points(text)
  return np.where(points < CHARS_VOCAB, points, CHARS_UNKNOWN).astype(np.uint8)


def decode(ids: Any) -> str:
  """Ids -> text (`CHARS_UNKNOWN` comes back as NUL)."""
  return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("ascii")


@functools.lru_cache(maxsize=4)
def load_corpus(stdlib_dir: str | None = None) -> Corpus:
  """Reads the chars corpus (cached per directory).

  Args:
    stdlib_dir: the directory holding `CHARS_FILES`; default this interpreter's
      ``sysconfig.get_paths()["stdlib"]``.

  Returns:
    The `Corpus` (its id arrays are read-only).

  Raises:
    FileNotFoundError: a file of `CHARS_FILES` is missing; names it.
  """
  root = pathlib.Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
  digest = hashlib.sha256()
  train, valid, counts, non_ascii = [], [], [], 0
  for rel in CHARS_FILES:
    path = root / rel
    if not path.is_file():
      raise FileNotFoundError(
          f"chars corpus: {rel} is missing from the standard library at {root} (Python "
          f"{sys.version.split()[0]}); the corpus needs CPython 3.11-3.13 sources")
    # Universal newlines: the same text whatever line endings the install has.
    text = path.read_text(encoding="utf-8")
    digest.update(text.encode("utf-8"))
    ids = encode(text)
    non_ascii += int(np.count_nonzero(_code_points(text) >= CHARS_VOCAB))
    cut = len(ids) - int(len(ids) * CHARS_VALID_FRACTION)
    train.append(ids[:cut])
    valid.append(ids[cut:])
    counts.append(len(ids))
  train_ids, valid_ids = np.concatenate(train), np.concatenate(valid)
  train_ids.flags.writeable = valid_ids.flags.writeable = False
  return Corpus(files=CHARS_FILES, file_chars=tuple(counts), train=train_ids,
                valid=valid_ids, non_ascii=non_ascii, sha256=digest.hexdigest(),
                stdlib_dir=str(root), python_version=sys.version.split()[0])


def corpus_info(stdlib_dir: str | None = None) -> dict[str, Any]:
  """`Corpus.info` of `load_corpus` (files, character counts, sha256, ...)."""
  return load_corpus(stdlib_dir).info()
