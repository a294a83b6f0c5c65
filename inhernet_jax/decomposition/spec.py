"""`InherSpec`: which kernels are inherited, at which rank, with how many heads.

What the user asks for, nothing more: its fields, their validation, and which rule
matches a path. One immutable, hashable object shared by `inherit` (the pytree
transform) and the layers (`InherDense`, `InherConv`), both of which read it through
the one rank policy (`policy.layer_plan`), so that ``model.clone(spec=s).init(...)``
and ``inherit(teacher_params, s)`` agree on every layer's plan.

Per-path rules are data, matched with `fullmatch` against a kernel's path
(``"Block_0/Conv_1/kernel"``); the first matching rule wins (big_vision's
``tree_map_with_regex`` convention). Matching runs on RE2 (google-re2: linear time, no
catastrophic backtracking) for every pattern RE2 accepts, and on Python's ``re`` only for
in-code patterns that need it (lookarounds, backreferences). Rules read from files
(``spec.json``) must pass `check_untrusted_rule`: RE2 syntax, at most
`MAX_UNTRUSTED_RULE_CHARS` characters, so a hostile rule such as ``(.*)*Z`` costs
microseconds, not hours. An action is one of:

* ``"skip"``: keep the teacher layer as it is;
* an ``int``: a fixed rank; a ``float`` in (0, 1]: a fraction of the layer's full rank;
* a dict overriding any of ``rank``, ``heads``, ``energy``, ``param_ratio``,
  ``data_aware`` (and ``stack``: the number of leading layer axes of a scan-stacked
  kernel).

Data-aware inheritance (``data_aware=True``, globally or per rule) truncates each kernel
to minimise its output error on calibration inputs instead of its weight error (see
`svd.whitened_svd`); `inherit` then needs the input Grams,
``calibration=inhernet_jax.calibration.grams.input_grams(...)``. Shapes are unchanged, so the
layers ignore it.

Example:
  ```python
  spec = InherSpec(rank=32, heads=3, rules=(
      (r"stem/.*", "skip"),
      (r".*/attn/.*", {"rank": 64}),
      (r"head/kernel", "skip"),
  ))
  aware = InherSpec(rank=32, heads=3, data_aware=True, rules=((r"head/kernel", "skip"),))
  ```
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

from flax import struct

from inhernet_jax.common import rules as rules_lib
from inhernet_jax.decomposition import svd

MAX_UNTRUSTED_RULE_CHARS = 4096
# A plain literal (what `re.escape` writes, e.g. resolved specs' per-path rules): safe in
# any engine, so accepted from files even without RE2.
_LITERAL = re.compile(r"(?:\\[^A-Za-z0-9]|[^\\()\[\]{}*+?|^$.])*")

_ACTION_KEYS = ("skip", "rank", "fraction", "energy", "param_ratio", "heads", "stack", "data_aware")
POLICIES = ("rank", "fraction", "energy", "param_ratio")
# The inherited layer's form: the paper's (one shared down-projection, H gated heads) and
# its ablations: heads mixed with fixed equal weights (no gate), and one down-projection
# per head (symmetric). Plain low-rank is ``heads=1`` (no experts, no gate).
VARIANTS = ("gated", "no_gate", "symmetric")


def _check_rank(value: Any, where: str) -> int | float:
  """Validates a rank: int >= 1 or float fraction in (0, 1]."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(
        f"{where}: rank must be an int >= 1 or a float fraction in (0, 1], "
        f"got {type(value).__name__} {value!r}"
    )
  if isinstance(value, float) and not math.isfinite(value):
    raise ValueError(f"{where}: rank must be finite, got {value!r}")
  if isinstance(value, int) and value < 1:
    raise ValueError(f"{where}: rank must be >= 1, got {value}")
  if isinstance(value, float) and not 0.0 < value <= 1.0:
    raise ValueError(f"{where}: a fractional rank must be in (0, 1], got {value}")
  return value


def _check_unit(value: Any, name: str, where: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"{where}: {name} must be a float in (0, 1], got {value!r}")
  if not (math.isfinite(value) and 0.0 < value <= 1.0):
    raise ValueError(f"{where}: {name} must be in (0, 1], got {value!r}")
  return float(value)


def _check_int(value: Any, name: str, where: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{where}: {name} must be >= {minimum}, got {value}")
  return value


def _check_bool(value: Any, name: str, where: str) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f"{where}: {name} must be a bool, got {type(value).__name__} {value!r}")
  return value


def normalize_action(action: Any, where: str) -> tuple[tuple[str, Any], ...]:
  """Turns a rule action into a sorted tuple of ``(key, value)`` pairs (hashable)."""
  if isinstance(action, str):
    if action not in ("skip", "keep"):
      raise ValueError(f"{where}: a string action must be 'skip', got {action!r}")
    return (("skip", True),)
  if isinstance(action, Mapping):
    items = dict(action)
  elif isinstance(action, tuple) and all(isinstance(i, tuple) and len(i) == 2 for i in action):
    items = dict(action)  # Already normalised.
  elif isinstance(action, (int, float)) and not isinstance(action, bool):
    items = {"rank": action}
  else:
    raise TypeError(
        f"{where}: an action must be 'skip', an int rank, a float fraction or a dict, "
        f"got {type(action).__name__} {action!r}"
    )
  unknown = set(items) - set(_ACTION_KEYS)
  if unknown:
    raise ValueError(f"{where}: unknown action keys {sorted(unknown)}; known: {_ACTION_KEYS}")
  if "fraction" in items:
    fraction = _check_rank(items["fraction"], where)
    if not isinstance(fraction, float):
      raise TypeError(f"{where}: fraction must be a float in (0, 1], got {fraction!r}")
  if "rank" in items:
    rank = _check_rank(items.pop("rank"), where)
    if isinstance(rank, float) and "fraction" in items:
      raise ValueError(f"{where}: a float rank is a fraction; give rank or fraction, not both")
    items["fraction" if isinstance(rank, float) else "rank"] = rank
  for name in ("energy", "param_ratio"):
    if name in items:
      items[name] = _check_unit(items[name], name, where)
  if "heads" in items:
    _check_int(items["heads"], "heads", where, 1)
  if "stack" in items:
    _check_int(items["stack"], "stack", where, 0)
  if "skip" in items:
    items["skip"] = bool(items["skip"])
  if "data_aware" in items:
    _check_bool(items["data_aware"], "data_aware", where)
  if sum(k in items for k in POLICIES) > 1:
    raise ValueError(f"{where}: give at most one of {POLICIES}, got {sorted(items)}")
  return tuple(sorted(items.items()))



def check_untrusted_rule(pattern: Any, where: str) -> str:
  """A rule pattern read from a file, refused unless it is safe to match.

  Safe: a string of at most `MAX_UNTRUSTED_RULE_CHARS` characters that RE2 compiles
  (matched in time linear in the path; no backreferences or lookarounds), or, without
  RE2 installed, a plain literal (``re.escape``'s output).

  Raises:
    TypeError: not a string. ValueError: too long, or not RE2 syntax (named).
  """
  if not isinstance(pattern, str):
    raise TypeError(f"{where}: a rule pattern must be a string, got {type(pattern).__name__} "
                    f"{pattern!r}")
  if len(pattern) > MAX_UNTRUSTED_RULE_CHARS:
    raise ValueError(f"{where}: rule pattern of {len(pattern)} characters; at most "
                     f"{MAX_UNTRUSTED_RULE_CHARS} are accepted from a file")
  if rules_lib.re2 is None:
    if not _LITERAL.fullmatch(pattern):
      raise ValueError(f"{where}: rule {pattern!r} is a regex; regexes from files need the "
                       "linear-time engine google-re2 (pip install google-re2), only plain "
                       "(re.escape'd) paths are accepted without it")
    return pattern
  try:
    rules_lib.re2.compile(pattern, options=rules_lib.re2_options())
  except rules_lib.re2.error as e:
    raise ValueError(f"{where}: rule {pattern!r} is not accepted from a file: rules from "
                     f"files must be RE2 syntax (no backreferences or lookarounds), matched "
                     f"in linear time ({e})") from None
  return pattern


@struct.dataclass
class InherSpec:
  """How to inherit a teacher: a rank policy, heads, and per-path rules.

  Exactly one rank policy applies to each kernel (rules may override it):

  Attributes:
    rank: an int (fixed rank) or a float in (0, 1] (fraction of each layer's full rank).
    heads: number of gated expert up-projections ``H`` (>= 1).
    rules: ``((regex, action), ...)``, first full match wins; see the module docstring.
    energy: keep the smallest rank whose spectral energy is at least this fraction. Data
      dependent: `inhernet_jax.resolve` turns it into per-path ranks for the layers.
    param_ratio: the largest rank whose layer has at most this fraction of the teacher
      layer's parameters (heads and gate included).
    method: SVD method, ``"auto"`` (randomized for large kernels at a rank well below
      full, `svd.use_randomized`; exact otherwise), ``"exact"`` (full SVDs: the optimal
      truncation, slowest) or ``"randomized"`` (`svd.randomized_svd`).
    power_iters: power iterations of the randomized method (default
      `svd.POWER_ITERS` = 4: within 1% of the optimal error on every spectrum, below
      PiSSA's fast SVD; ``svd.FAST_POWER_ITERS`` = 2 is the documented faster setting,
      about 2.5% above optimal on flat spectra).
    oversample: extra subspace columns of the randomized method (default
      `svd.default_oversample`, ``max(16, rank // 4)``).
    rank_multiple: round every planned rank to a multiple of this (8, 16, 128: the
      tile sizes of GPU/TPU matmul units, where a thin rank-44 bottleneck runs no faster
      than rank 48): up for the fixed, fraction and energy policies (never below what
      they asked for), down for ``param_ratio`` (never above the budget); capped at the
      full rank (then the layer is kept, as any rank that saves nothing).
    skip_if_no_saving: keep a layer whose factorisation has at least the teacher's
      parameters (the demo's ``r >= min(m, n)`` check, by exact count). False factorises
      regardless, capping the rank at full rank (ablations, exactness checks).
    data_aware: truncate every factorised kernel for its output error on calibration
      inputs (`svd.whitened_svd`); rules may override it per path. Plans (ranks) do not
      change, only the factors: `inherit` needs ``calibration=`` Grams.
    damping: the data-aware ridge, ``damping * mean(diag G)`` added to each input Gram
      ``G`` (>= 0; a rank-deficient ``G`` needs > 0).
    variant: the layer's form (`VARIANTS`): ``"gated"`` (the paper's InherNet),
      ``"no_gate"`` (the paper's "without gate" ablation: heads mixed with fixed weights
      ``1/H``, no gate parameters) or ``"symmetric"`` (its "symmetric" ablation: one
      down-projection per head, each initialised from ``V_r^T``, H times the shared
      one's parameters; the gate reads the mean of the heads' bottlenecks). Every
      variant computes the rank-r truncation right after `inherit`.
  """

  rank: int | float | None = struct.field(pytree_node=False, default=None)
  heads: int = struct.field(pytree_node=False, default=1)
  rules: tuple = struct.field(pytree_node=False, default=())
  energy: float | None = struct.field(pytree_node=False, default=None)
  param_ratio: float | None = struct.field(pytree_node=False, default=None)
  method: str = struct.field(pytree_node=False, default="auto")
  power_iters: int = struct.field(pytree_node=False, default=svd.POWER_ITERS)
  oversample: int | None = struct.field(pytree_node=False, default=None)
  rank_multiple: int = struct.field(pytree_node=False, default=1)
  skip_if_no_saving: bool = struct.field(pytree_node=False, default=True)
  data_aware: bool = struct.field(pytree_node=False, default=False)
  damping: float = struct.field(pytree_node=False, default=svd.DAMPING)
  variant: str = struct.field(pytree_node=False, default="gated")

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"InherSpec.variant must be one of {VARIANTS}, got {self.variant!r}")
    if self.rank is not None:
      _check_rank(self.rank, "InherSpec.rank")
    if self.energy is not None:
      _check_unit(self.energy, "energy", "InherSpec.energy")
    if self.param_ratio is not None:
      _check_unit(self.param_ratio, "param_ratio", "InherSpec.param_ratio")
    given = [p for p in ("rank", "energy", "param_ratio") if getattr(self, p) is not None]
    if len(given) > 1:
      raise ValueError(f"InherSpec: give one of rank, energy, param_ratio, got {given}")
    _check_int(self.heads, "heads", "InherSpec.heads", 1)
    _check_bool(self.data_aware, "data_aware", "InherSpec.data_aware")
    if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)):
      raise TypeError(f"InherSpec.damping must be a float >= 0, got {self.damping!r}")
    if not (math.isfinite(self.damping) and self.damping >= 0):
      raise ValueError(f"InherSpec.damping must be finite and >= 0, got {self.damping!r}")
    _check_int(self.power_iters, "power_iters", "InherSpec.power_iters", 0)
    _check_int(self.rank_multiple, "rank_multiple", "InherSpec.rank_multiple", 1)
    if self.oversample is not None:
      _check_int(self.oversample, "oversample", "InherSpec.oversample", 0)
    if self.method not in svd.METHODS:
      raise ValueError(f"InherSpec.method must be one of {svd.METHODS}, got {self.method!r}")
    rules = rules_lib.check_rules(self.rules, "InherSpec.rules", normalize_action)
    object.__setattr__(self, "rules", rules)

  # Equality and hash also compare the type of ``rank``: rank=1 (one direction) and
  # rank=1.0 (full rank) would otherwise be equal specs, and a cache keyed on specs (a
  # jit static argument, functools.cache) would hand one the other's model.
  def _key(self):
    return (type(self.rank), *(getattr(self, f.name) for f in dataclasses.fields(self)))

  def __eq__(self, other):
    return type(other) is type(self) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  # ----------------------------------------------------------------------- matching
  def match(self, path: str) -> tuple[int | None, dict[str, Any]]:
    """Index and action of the first rule that fully matches ``path`` (or None, {})."""
    i, action = rules_lib.first_match(self.rules, path)
    return i, dict(action or {})

  def stack_axes(self, path: str) -> int | None:
    """Leading layer axes declared for ``path`` by a rule, or None."""
    return self.match(path)[1].get("stack")


def as_spec(rank: Any, heads: int | None = None, rules=None) -> InherSpec:
  """Builds an `InherSpec` from `inherit`'s ``rank`` argument (int, float or spec)."""
  if isinstance(rank, InherSpec):
    spec = rank
    changes = {}
    if heads is not None:
      changes["heads"] = heads
    if rules:
      changes["rules"] = tuple(rules) + spec.rules
    return spec.replace(**changes) if changes else spec
  _check_rank(rank, "inherit(rank=...)")
  return InherSpec(rank=rank, heads=1 if heads is None else heads, rules=tuple(rules or ()))
