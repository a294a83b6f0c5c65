"""Path rules: ``((regex, action), ...)``; the first rule whose regex fully matches wins.

One engine for the three places that pick leaves by path: `InherSpec.rules` (what
happens to each kernel), the sharding rules (`sharding.resolve_rules`: how each leaf is
placed) and the weight-decay mask (`optim.decay_mask`: which leaves decay). Paths are
``/``-joined (``"block1/conv/kernel"``); a pattern must match the whole path. Patterns
are matched by RE2 where it accepts them (linear time), else by Python's ``re``.

One error format, ``{what}[{i}] ({pattern!r}): ...``, names the rule list and the rule.

Example:
  ```python
  rules = check_rules([(r".*head.*", "skip"), (".*", {"rank": 8})], "my rules")
  first_match(rules, "head/kernel")      # (0, 'skip')
  unmatched(rules, ["conv/kernel"])     # [0]: the head rule matched nothing
  ```
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

try:  # Linear-time matching; rules from files need it (see `spec.check_untrusted_rule`).
  import re2
except ImportError:  # pragma: no cover - pinned in requirements.txt.
  re2 = None


def re2_options():
  options = re2.Options()
  options.log_errors = False  # A pattern RE2 refuses falls back to `re` (in-code rules).
  return options


@functools.lru_cache(maxsize=4096)
def compiled(pattern: str):
  """RE2 when it accepts ``pattern``, else Python's ``re`` (lookarounds, backreferences)."""
  if re2 is not None:
    try:
      return re2.compile(pattern, options=re2_options())
    except re2.error:
      pass
  return re.compile(pattern)


def fullmatch(pattern: str, path: str) -> bool:
  """Whether rule ``pattern`` fully matches ``path`` (linear time for RE2 patterns)."""
  return compiled(pattern).fullmatch(path) is not None


def check_pattern(pattern: str, where: str) -> str:
  """``pattern`` if Python's ``re`` compiles it, else a ValueError naming ``where``."""
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{where}: invalid regex {pattern!r}: {e}") from None
  return pattern


def check_rules(rules: Any, what: str,
                action: Callable[[Any, str], Any] = lambda a, where: a) -> tuple[tuple[str, Any], ...]:
  """Validated rules as a tuple of ``(pattern, action(raw action, where))`` pairs.

  Args:
    rules: a sequence (not a string or mapping) of ``(regex, action)`` pairs.
    what: the rule list's name in errors, e.g. ``"InherSpec.rules"``.
    action: checks and normalises one action; ``where`` names the rule for its errors.

  Raises:
    TypeError: not a sequence of pairs with a string regex. ValueError: a regex that
      does not compile; whatever ``action`` raises.
  """
  if isinstance(rules, (str, bytes, Mapping)) or not isinstance(rules, Sequence):
    raise TypeError(f"{what} must be a sequence of (regex, action) pairs, got {rules!r}")
  out = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, Sequence) and not isinstance(rule, (str, bytes))
            and len(rule) == 2 and isinstance(rule[0], str)):
      raise TypeError(f"{what}[{i}] must be a (regex, action) pair, got {rule!r}")
    pattern = check_pattern(rule[0], f"{what}[{i}]")
    out.append((pattern, action(rule[1], f"{what}[{i}] ({pattern!r})")))
  return tuple(out)


def first_match(rules: Sequence[tuple[str, Any]], path: str) -> tuple[int | None, Any]:
  """``(index, action)`` of the first rule that fully matches ``path``, else ``(None, None)``."""
  for i, (pattern, action) in enumerate(rules):
    if fullmatch(pattern, path):
      return i, action
  return None, None


def unmatched(rules: Sequence[tuple[str, Any]], paths: Iterable[str]) -> list[int]:
  """Indices of the rules whose pattern fully matches none of ``paths``."""
  paths = list(paths)
  return [i for i, (pattern, _) in enumerate(rules)
          if not any(fullmatch(pattern, p) for p in paths)]


def warn_unmatched(rules: Sequence[tuple[str, Any]], paths: Iterable[str], what: str,
                   noun: str = "path", *, stacklevel: int = 2) -> None:
  """Warns once per rule that matches none of ``paths`` (a typo, or another model's rule)."""
  for i in unmatched(rules, paths):
    warnings.warn(f"{what}[{i}] ({rules[i][0]!r}) matches no {noun}", stacklevel=stacklevel + 1)
