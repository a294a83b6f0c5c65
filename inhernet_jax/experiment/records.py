"""The experiment's typed records: a method definition and a run's record.

`MethodDef` is one entry of ``config.method_defs`` (every field and its default, here
and nowhere else); `RunRecord` is what one ``(method, seed)`` run reports, in the layout
of ``results.json``'s ``"runs"``. Both are frozen dataclasses: a changed copy is
`dataclasses.replace` (`MethodDef.replace` also remembers the field as given). The
helpers at the end read a list of run records (plain dicts or RunRecords alike) for
`report` and `figures`.

Example:
  ```python
  md = MethodDef.from_config("inherit", config.method_defs.inherit)
  md.heads, md.recalibration_batches                 # 3, 32 (the default)
  record = RunRecord.from_json(json.load(f)["runs"][0])
  record.final_metric, record["final_metric"]        # attribute or key: the same value
  ```
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

KINDS = ("student", "inhernet")
INITS = ("svd", "random")  # An InherNet's init: the SVD, or the paper's ablation.
# InherNet methods re-estimate BatchNorm statistics unless ``recalibrate: False``
# (README, "BatchNorm re-estimation"), on this many training batches.
RECALIBRATE = True
RECALIBRATION_BATCHES = 32


@dataclasses.dataclass(frozen=True)
class MethodDef:
  """One ``config.method_defs.<name>``: how a student or an InherNet is built and trained.

  Common fields: ``kind`` (``"student"`` or ``"inhernet"``), ``label`` (the report's name;
  None: the method's key), ``loss`` (a `losses.LOSSES` name or ``"fitnet"``),
  ``loss_kwargs``, ``hint`` (FitNet: ``student_layer``, ``teacher_layer``, ``weight``) and
  ``optimizer`` (fields overriding ``config.optimizer``). A student: ``model`` and its
  ``kwargs``. An InherNet: ``rank`` (an int, a fraction, ``"params:<method>"`` or
  ``"student:<zoo model>"``),
  ``heads``, the layer ``preset``, ``init`` (``"svd"`` or the ``"random"`` ablation),
  ``variant`` (`InherSpec.variant`: ``"gated"``, or the ``"no_gate"`` / ``"symmetric"``
  ablations),
  ``svd`` (the `svd.METHODS` solver), ``data_aware`` truncation on
  ``calibration_batches`` training batches, ``allocation`` (``"uniform"`` or per-layer
  ``"greedy"`` at ``objective``), ``sweep`` (False: not expanded over ``config.sweep``),
  ``recalibrate`` BatchNorm statistics on ``recalibration_batches`` training batches, and
  ``init_key`` (the method whose key draws the gates: methods sharing it start alike).

  ``given`` names the fields the config set (in its order): `as_dict` returns those, the
  definition as written, which the run's checkpoint fingerprint holds.
  """
  kind: str
  label: str | None = None
  loss: str = "ce"
  loss_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  hint: Mapping[str, Any] | None = None
  optimizer: Mapping[str, Any] | None = None
  # A student.
  model: str | None = None
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # An InherNet.
  rank: int | float | str | None = None
  heads: int = 1
  preset: str = "default"
  init: str = "svd"
  variant: str = "gated"
  svd: str = "auto"
  data_aware: bool = False
  calibration_batches: int = 8
  allocation: str = "uniform"
  objective: str = "param_energy"  # budget.allocate's default too.
  sweep: bool = True
  recalibrate: bool = RECALIBRATE
  recalibration_batches: int = RECALIBRATION_BATCHES
  init_key: str | None = None
  given: tuple[str, ...] = dataclasses.field(default=(), repr=False, compare=False)

  @classmethod
  def fields(cls) -> tuple[str, ...]:
    """Every field a definition may set, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "given")

  @classmethod
  def default(cls, field: str) -> Any:
    """``field``'s default (KeyError for a field without one: ``kind``)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[field]
    if f.default is not dataclasses.MISSING:
      return f.default
    if f.default_factory is not dataclasses.MISSING:
      return f.default_factory()
    raise KeyError(f"MethodDef.{field} has no default")

  @classmethod
  def from_config(cls, name: str, node) -> MethodDef:
    """``config.method_defs.<name>`` (a ConfigDict or a dict) as a checked MethodDef.

    Raises:
      ValueError: an unknown field (named ``config.method_defs.<name>.<key>``, with the
        known ones), a kind not in `KINDS`, a student without a model, an InherNet
        without a rank or with an init other than ``"svd"`` / ``"random"``.
    """
    md = _plain(node)
    known = cls.fields()
    for key in md:
      if key not in known:
        raise ValueError(f"config.method_defs.{name}.{key}: unknown field; known: {sorted(known)}")
    kind = md.get("kind")
    if kind not in KINDS:
      raise ValueError(f"config.method_defs.{name}.kind must be one of {KINDS}, got {kind!r}")
    out = cls(**md, given=tuple(md))
    if kind == "student" and not out.model:
      raise ValueError(f"config.method_defs.{name}.model: a student needs a model name")
    if kind == "inhernet" and out.init not in INITS:
      raise ValueError(f"config.method_defs.{name}.init must be 'svd' or 'random', "
                       f"got {out.init!r}")
    if kind == "inhernet" and out.rank is None:
      raise ValueError(f"config.method_defs.{name}.rank: InherNet needs a rank (int, fraction, "
                       "'params:<method>' or 'student:<zoo model>')")
    return out

  def replace(self, **changes) -> MethodDef:
    """A copy with ``changes`` (`dataclasses.replace`), which now count as given."""
    given = self.given + tuple(k for k in changes if k not in self.given)
    return dataclasses.replace(self, **changes, given=given)

  def as_dict(self, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The fields the config gave (`given`), less ``exclude``, as a dict."""
    exclude = set(exclude)
    return {k: getattr(self, k) for k in self.given if k not in exclude}

  def label_or(self, key: str) -> str:
    """The report's label: ``label``, or ``key`` when none is given."""
    return key if self.label is None else self.label

  def __getitem__(self, field: str) -> Any:
    # ``md["rank"]``: code written against the dict form keeps reading the field.
    if field not in self.fields():
      raise KeyError(field)
    return getattr(self, field)


def _plain(node) -> dict:
  if node is None:
    return {}
  return node.to_dict() if hasattr(node, "to_dict") else dict(node)


@dataclasses.dataclass(frozen=True)
class RunRecord(Mapping):
  """What one ``(method, seed)`` run reports: an entry of ``results.json``'s ``"runs"``.

  ``method`` (a key shared by the seeds of one method), ``label``, ``kind``
  (``"teacher"``, ``"student"`` or ``"inhernet"``), ``loss``, ``seed``, ``rank`` /
  ``heads`` / ``init`` (InherNet only, else None), ``params``, ``flops`` (or None),
  ``metric_name``, ``higher_is_better``, ``metric_at_init`` (InherNet right after
  `inherit`, else None), ``final_metric``, ``best_metric``, ``epochs_to_scratch``,
  ``wall_s``, the per-epoch ``history`` (lists by key), InherNet's per-layer ``gates``
  and ``calibration_batches`` (``{"data_aware", "batch_stats"}`` counts).

  It also reads as a read-only mapping in that layout (``record["final_metric"]``,
  ``record.get("rank")``), so the report, and code written against the dict records,
  take it as they are. ``extra`` holds keys a results.json has beyond these fields (a
  newer or older writer's): `from_json` keeps them and `to_json` writes them back.
  """
  method: str
  label: str | None = None
  kind: str | None = None
  loss: str | None = None
  seed: int | None = None
  rank: int | float | str | None = None
  heads: int | None = None
  init: str | None = None
  params: int | None = None
  flops: float | None = None
  metric_name: str = "metric"
  higher_is_better: bool = True
  metric_at_init: float | None = None
  final_metric: float | None = None
  best_metric: float | None = None
  epochs_to_scratch: float | None = None
  wall_s: float | None = None
  history: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  gates: Mapping[str, Any] | None = None
  calibration_batches: Mapping[str, int] | None = None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

  def __post_init__(self):
    if self.label is None:  # The report's label falls back on the method key.
      object.__setattr__(self, "label", self.method)
    clash = sorted(set(self.extra) & set(self.keys_of_fields()))
    if clash:
      raise ValueError(f"RunRecord.extra repeats record fields {clash}")

  @classmethod
  def keys_of_fields(cls) -> tuple[str, ...]:
    """The record's fields in results.json's order (without ``extra``)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

  @classmethod
  def from_json(cls, run: Mapping[str, Any]) -> RunRecord:
    """A results.json run (or a dict record); keys beyond the fields go to ``extra``.

    Raises:
      ValueError: the run has no ``method``.
    """
    if "method" not in run:
      raise ValueError(f"a run record needs a 'method'; got keys {sorted(run)}")
    if isinstance(run, RunRecord):
      return run
    names = set(cls.keys_of_fields())
    known = {k: v for k, v in run.items() if k in names}
    return cls(**known, extra={k: v for k, v in run.items() if k not in names})

  def to_json(self) -> dict[str, Any]:
    """The results.json layout: the fields in order, then ``extra``'s keys (values as
    recorded: `report.write_json` makes NumPy values plain)."""
    return dict(self.items())

  # The read-only mapping: the fields, then ``extra``.
  def __getitem__(self, key: str) -> Any:
    if key in self.extra:
      return self.extra[key]
    if key == "extra" or key not in self.__dataclass_fields__:
      raise KeyError(key)
    return getattr(self, key)

  def __iter__(self) -> Iterator[str]:
    yield from self.keys_of_fields()
    yield from self.extra

  def __len__(self) -> int:
    return len(self.keys_of_fields()) + len(self.extra)

  def __setitem__(self, key, value):
    raise TypeError(f"a RunRecord is frozen: dataclasses.replace(record, {key}=...) "
                    "makes a changed copy")


# ---------------------------------------------------------- reading a list of records
def is_missing(value: Any) -> bool:
  """``None`` or a non-finite float: a value that did not happen (or diverged)."""
  if value is None:
    return True
  try:
    return not math.isfinite(float(value))
  except (TypeError, ValueError):
    return True


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
  """Mean, sample std (``ddof=1``) and count of the non-``None`` values.

  ``None`` (a method without an at-init metric, a seed that never reached a target) is
  dropped; NaN is kept and propagates, so a diverged seed shows instead of vanishing.
  """
  kept = np.asarray([float(v) for v in values if v is not None], np.float64)
  if kept.size == 0:
    return None, None, 0
  std = float(np.std(kept, ddof=1)) if kept.size > 1 else None
  return float(np.mean(kept)), std, int(kept.size)


def group_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
  """Runs by method, methods in order of first appearance, seeds sorted.

  Raises:
    ValueError: a method repeats a seed.
  """
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for run in runs:
    groups.setdefault(run["method"], []).append(run)
  for method, group in groups.items():
    seeds = [r.get("seed") for r in group]
    if len(set(seeds)) != len(seeds):
      raise ValueError(f"method {method!r} has duplicate seeds {seeds}")
    group.sort(key=lambda r: (r.get("seed") is None, r.get("seed")))
  return groups


def metric_info(runs: Sequence[Mapping[str, Any]]) -> tuple[str, bool]:
  """The runs' single ``(metric_name, higher_is_better)``.

  Raises:
    ValueError: no runs, or runs of several metrics.
  """
  if not runs:
    raise ValueError("no runs")
  infos = {(r.get("metric_name", "metric"), bool(r.get("higher_is_better", True)))
           for r in runs}
  if len(infos) != 1:
    raise ValueError(f"runs mix metrics {sorted(infos)}; one report per metric")
  return next(iter(infos))


def is_fraction(metric_name: str) -> bool:
  """An accuracy-like metric (its name contains ``"acc"``): a fraction shown in percent."""
  return "acc" in metric_name.lower()


__all__ = ["INITS", "KINDS", "MethodDef", "RECALIBRATE", "RECALIBRATION_BATCHES", "RunRecord",
           "group_runs", "is_fraction", "is_missing", "mean_std", "metric_info"]
