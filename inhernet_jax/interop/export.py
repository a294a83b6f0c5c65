"""Exports an inherited network: ``model.safetensors`` + ``spec.json``, and loads it back.

``model.safetensors`` holds the variables (``params`` and, for BatchNorm models,
``batch_stats``) under flat ``"/"``-joined keys (``params/layer1_0/conv1/down/kernel``),
in their own dtypes (bfloat16 included), readable by any safetensors reader
(``safetensors.numpy.load_file``, PyTorch, ...). ``spec.json`` is plain JSON:

```json
{"format": "inhernet_jax.interop.export", "version": 1,
 "spec": {"rank": 8, "heads": 3, "rules": [["stem/kernel", {"skip": true}]],
          "energy": null, "param_ratio": null, "method": "auto", ...},
 "metadata": {"model": "resnet50", ...}}
```

``spec`` has every field of `InherSpec` (written generically, so fields added later are
saved too), rules with their normalised actions as objects, or is null for a teacher;
``metadata`` is free JSON for the caller (the model's name and size, the source). A
file with fields this version does not know is refused rather than half read; fields it
lacks take their defaults (files written before a field existed).

Example:
  ```python
  export.save("out/", {"params": params, "batch_stats": stats}, spec, metadata={"model": "resnet50"})
  variables, spec = export.load("out/")
  student = models.create("resnet50", spec=spec)
  ```
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from inhernet_jax.decomposition import spec as spec_lib
from inhernet_jax.interop import checks
from inhernet_jax.common import utils
from inhernet_jax.decomposition.spec import InherSpec
from inhernet_jax.decomposition.transform import format_report

FORMAT = "inhernet_jax.interop.export"
VERSION = 1
WEIGHTS = "model.safetensors"
SPEC = "spec.json"
_KEYS = ("format", "version", "spec", "metadata")
MAX_RULES = 100_000  # A spec.json with more rules than any model has kernels is refused.
MAX_HEADS = 64  # The paper uses 1 to 3 heads; each head costs a rank x out matrix per layer.
MAX_RANK = 65_536  # Above any real layer's full rank (hidden sizes are at most 16k-64k).
# Integer sizes read from a spec.json, bounded before `inherit` allocates anything from
# them (heads=10**9 with skip_if_no_saving=false asked for 59.6 GiB): field -> bound.
SIZE_LIMITS = {"heads": MAX_HEADS, "rank": MAX_RANK, "oversample": MAX_RANK,
               "rank_multiple": MAX_RANK, "power_iters": 100, "stack": 8}
# JSON types of the InherSpec fields read from files ("number": int or float, not bool);
# fields not listed are left to InherSpec's own checks.
_FIELD_TYPES = {
    "rank": ("null", "number"), "heads": ("int",), "rules": ("list",),
    "energy": ("null", "number"), "param_ratio": ("null", "number"), "method": ("str",),
    "skip_if_no_saving": ("bool",), "data_aware": ("bool",), "damping": ("number",),
}
_ACTION_TYPES = {"skip": ("bool",), "data_aware": ("bool",), "heads": ("int",),
                 "stack": ("int",), "rank": ("number",), "fraction": ("number",),
                 "energy": ("number",), "param_ratio": ("number",)}


def _json_type(value) -> str:
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "bool"
  if isinstance(value, int):
    return "int"
  if isinstance(value, float):
    return "float"
  return {str: "str", list: "list", dict: "dict"}.get(type(value), type(value).__name__)


def _check_type(value, allowed: tuple[str, ...], where: str) -> None:
  kind = _json_type(value)
  ok = kind in allowed or (kind in ("int", "float") and "number" in allowed)
  if not ok:
    shown = json.dumps(value) if kind in ("null", "bool", "int", "float", "str") else kind
    raise TypeError(f"{where}: expected {' or '.join(allowed)}, got {kind} {shown}")


def _check_json_spec(data: Mapping) -> None:
  """JSON types of a spec read from a file (``true`` is not 1, ``"8"`` not 8), and its
  rules safe to match (`spec.check_untrusted_rule`)."""
  for name, allowed in _FIELD_TYPES.items():
    if name in data:
      _check_type(data[name], allowed, f"spec.{name}")
  for name, bound in SIZE_LIMITS.items():
    if name in data:
      _check_bound(data[name], bound, f"spec.{name}")
  rules = data.get("rules", [])
  if len(rules) > MAX_RULES:
    raise ValueError(f"spec.rules: {len(rules)} rules; at most {MAX_RULES} are accepted")
  for i, rule in enumerate(rules):
    where = f"spec.rules[{i}]"
    if not (isinstance(rule, list) and len(rule) == 2):
      raise TypeError(f"{where}: expected a [regex, action] pair, got {json.dumps(rule)[:80]}")
    pattern, action = rule
    spec_lib.check_untrusted_rule(pattern, where)
    _check_type(action, ("str", "number", "dict"), f"{where} action")
    if isinstance(action, dict):
      for key, value in action.items():
        if key in _ACTION_TYPES:
          _check_type(value, _ACTION_TYPES[key], f"{where}.{key}")
        if key in SIZE_LIMITS:
          _check_bound(value, SIZE_LIMITS[key], f"{where}.{key}")


def _check_bound(value, bound: int, where: str) -> None:
  """An integer size read from a file, at most ``bound`` (floats are fractions: checked
  by `InherSpec`)."""
  if isinstance(value, int) and not isinstance(value, bool) and value > bound:
    raise ValueError(f"{where}: {value} is beyond any real model; at most {bound:,} is "
                     "accepted from a file")


# ---------------------------------------------------------------------------- spec
def _jsonable(value: Any, where: str):
  """Tuples -> lists, recursively; anything JSON cannot hold exactly is refused.

  Stricter than `utils.jsonable` on purpose: a spec file must load back into the same
  `InherSpec` in any JSON reader, so NaN/Inf, NumPy values and non-string keys (which
  the lenient results writer converts) are errors here.
  """
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float):
    if not math.isfinite(value):
      raise ValueError(f"{where}: {value!r} has no JSON form")
    return value
  if isinstance(value, (tuple, list)):
    return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, Mapping):
    if not all(isinstance(k, str) for k in value):
      raise TypeError(f"{where}: JSON objects need string keys, got {list(value)!r}")
    return {k: _jsonable(v, f"{where}.{k}") for k, v in value.items()}
  raise TypeError(f"{where}: cannot write a {type(value).__name__} ({value!r}) to JSON")


def _tuples(value: Any):
  """JSON lists back to tuples (InherSpec must stay hashable); objects stay dicts."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def spec_to_json(spec: InherSpec) -> dict:
  """Every `InherSpec` field as plain JSON (rules: ``[regex, {action}]`` pairs)."""
  if not isinstance(spec, InherSpec):
    raise TypeError(f"expected an InherSpec, got {type(spec).__name__}")
  out = {}
  for field in dataclasses.fields(spec):
    value = getattr(spec, field.name)
    if field.name == "rules":  # Normalised actions are (key, value) pairs: an object reads better.
      value = [[pattern, dict(action)] for pattern, action in value]
    out[field.name] = _jsonable(value, f"InherSpec.{field.name}")
  return out


def spec_from_json(data: Mapping) -> InherSpec:
  """The `InherSpec` of `spec_to_json`'s output (equal to the original, hashable).

  Rules are matched in linear time and must be RE2 syntax (`spec.check_untrusted_rule`):
  this is the way specs come in from files.

  Raises:
    ValueError: a field `InherSpec` does not have (named), an unsafe rule.
    TypeError: a field of the wrong JSON type (named).
  """
  if not isinstance(data, Mapping):
    raise TypeError(f"a spec must be a JSON object, got {type(data).__name__}")
  _check_json_spec(data)
  known = {f.name for f in dataclasses.fields(InherSpec)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ValueError(f"unknown InherSpec fields {unknown} (written by a newer inhernet_jax?); "
                     f"known: {sorted(known)}")
  # Rules come back as (regex, {action}) pairs, which InherSpec normalises again.
  return InherSpec(**{k: _tuples(v) for k, v in data.items()})


def _spec_text(spec: InherSpec | None, metadata: Mapping | None) -> str:
  data = {"format": FORMAT, "version": VERSION,
          "spec": None if spec is None else spec_to_json(spec),
          "metadata": _jsonable(dict(metadata or {}), "metadata")}
  if data["spec"] is not None:  # Never write a file that `load_spec` would refuse.
    _check_json_spec(data["spec"])
  if checks.json_depth(data) > checks.MAX_JSON_DEPTH:
    raise ValueError(f"metadata nests deeper than {checks.MAX_JSON_DEPTH} levels; "
                     "load_spec would refuse the file")
  # One rule per line (a resolved spec has one per layer): placeholders, then each rule.
  rules = data["spec"]["rules"] if data["spec"] else []
  if rules:
    data["spec"]["rules"] = [f"\0rule{i}" for i in range(len(rules))]
  text = json.dumps(data, indent=2, allow_nan=False)
  for i, rule in enumerate(rules):
    text = text.replace(json.dumps(f"\0rule{i}"), json.dumps(rule, allow_nan=False), 1)
  return text + "\n"


def save_spec(path: str | os.PathLike, spec: InherSpec | None,
              metadata: Mapping | None = None) -> None:
  """Writes ``spec.json`` (see the module docstring); ``spec=None`` marks a teacher."""
  text = _spec_text(spec, metadata)
  utils.atomic_write(path, lambda f: f.write(text), "w")


def load_spec(path: str | os.PathLike) -> tuple[InherSpec | None, dict]:
  """``(spec, metadata)`` of a ``spec.json`` written by `save_spec`.

  Raises:
    FileNotFoundError: no such file. ValueError: not this format, unknown keys, a field
      of the wrong type or a size beyond `SIZE_LIMITS`, not UTF-8 or not JSON, nested
      deeper than `checks.MAX_JSON_DEPTH`, larger than `checks.MAX_JSON_BYTES`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {SPEC} at {path}")
  data = checks.read_json(path, ValueError)  # Bounded size and nesting, UTF-8, JSON.
  if not isinstance(data, dict) or data.get("format") != FORMAT:
    raise ValueError(f"{path}: not an inhernet_jax export spec (expected \"format\": {FORMAT!r})")
  version = data.get("version")
  if type(version) is not int:  # JSON true is not version 1.
    raise ValueError(f"{path}: \"version\" must be an integer, got {json.dumps(version)}")
  if version != VERSION:
    raise ValueError(f"{path}: version {version!r}, this inhernet_jax reads {VERSION}")
  if not isinstance(data.get("metadata") or {}, dict):
    raise ValueError(f"{path}: \"metadata\" must be an object, got {json.dumps(data['metadata'])[:80]}")
  unknown = sorted(set(data) - set(_KEYS))
  if unknown:
    raise ValueError(f"{path}: unknown keys {unknown}; known: {list(_KEYS)}")
  try:
    spec = None if data.get("spec") is None else spec_from_json(data["spec"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None
  return spec, dict(data.get("metadata") or {})


# ------------------------------------------------------------------------ variables
def flatten(variables: Mapping) -> dict[str, np.ndarray]:
  """``{"params": {"a": {"kernel": x}}}`` -> ``{"params/a/kernel": np.asarray(x)}``."""
  out = {}

  def visit(node, keys):
    if isinstance(node, Mapping):
      for k, v in node.items():
        if not isinstance(k, str) or not k or "/" in k:
          raise ValueError(f"{'/'.join(keys) or 'variables'}: key {k!r} cannot be exported "
                           "(keys must be non-empty strings without '/')")
        visit(v, (*keys, k))
    elif hasattr(node, "shape") and hasattr(node, "dtype"):
      array = np.asarray(jax.device_get(node))
      out["/".join(keys)] = array if array.flags.c_contiguous else array.copy(order="C")
    else:
      raise TypeError(f"{'/'.join(keys)}: expected an array, got {type(node).__name__}")

  visit(variables, ())
  return out


def check_weights(flat: Mapping[str, np.ndarray], where: str) -> None:
  """Every array floating-point and finite, or an error naming the first bad tensor.

  Raises:
    TypeError: an integer or boolean tensor (it would be cast silently).
    ValueError: NaN or Inf values (counted).
  """
  for key, array in flat.items():
    dtype = np.dtype(array.dtype)
    if not (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"):
      raise TypeError(f"{where}: {key} has dtype {dtype}; weights must be floating point "
                      "(an integer or boolean tensor would be cast silently)")
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(np.asarray(array, np.float32))))
    if bad:
      raise ValueError(f"{where}: {key} has {bad} NaN/Inf value(s) of {np.size(array)}")


def unflatten(flat: Mapping[str, Any]) -> dict:
  """The nested dict of `flatten`'s keys."""
  out: dict = {}
  for key in sorted(flat):
    *parents, leaf = key.split("/")
    node = out
    for k in parents:
      node = node.setdefault(k, {})
      if not isinstance(node, dict):
        raise ValueError(f"{key}: {k!r} is both an array and a prefix of other keys")
    node[leaf] = flat[key]
  return out


def save(directory: str | os.PathLike, variables: Mapping, spec: InherSpec | None, *,
         metadata: Mapping | None = None, overwrite: bool = False) -> None:
  """Writes ``directory/model.safetensors`` and ``directory/spec.json``.

  Args:
    directory: created if missing.
    variables: ``{"params": ...[, "batch_stats": ...]}`` (any collections) of the
      inherited network, or of the teacher with ``spec=None``. Arrays may be jax
      (sharded ones are gathered) or NumPy.
    spec: the `InherSpec` the params were inherited with (None: a teacher).
    metadata: free JSON kept in spec.json (the model's name and size, the source).
    overwrite: replace an existing export (else FileExistsError).
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    got = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
    raise ValueError(f"variables must be a dict of collections with 'params', got {got}")
  directory = os.fspath(directory)
  weights = os.path.join(directory, WEIGHTS)
  for path in (weights, os.path.join(directory, SPEC)):
    if os.path.exists(path) and not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True or choose another directory")
  flat = flatten(variables)
  check_weights(flat, "variables")
  text = _spec_text(spec, metadata)  # Everything checked before anything is written.
  os.makedirs(directory, exist_ok=True)
  import safetensors.numpy

  utils.atomic_write(weights, lambda f: f.write(safetensors.numpy.save(
      flat, metadata={"format": FORMAT, "version": str(VERSION)})), "wb")
  utils.atomic_write(os.path.join(directory, SPEC), lambda f: f.write(text), "w")


def load(directory: str | os.PathLike) -> tuple[dict, InherSpec | None]:
  """``(variables, spec)`` of an export: NumPy arrays, bit for bit as saved.

  Raises:
    FileNotFoundError: the directory lacks model.safetensors or spec.json (named).
    ValueError: a spec.json of another format or with unknown fields; NaN/Inf weights.
    TypeError: a non-floating weight (named).
  """
  directory = os.fspath(directory)
  weights = os.path.join(directory, WEIGHTS)
  spec, _ = load_spec(os.path.join(directory, SPEC))
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"no {WEIGHTS} at {weights}")
  import safetensors.numpy

  flat = safetensors.numpy.load_file(weights)
  check_weights(flat, weights)
  return unflatten(flat), spec


__all__ = ["FORMAT", "MAX_HEADS", "MAX_RANK", "SIZE_LIMITS", "SPEC", "VERSION", "WEIGHTS",
           "check_weights", "flatten", "load", "load_spec", "save",
           "save_spec", "spec_from_json", "spec_to_json", "unflatten"]


def save_report(directory: str | os.PathLike, rows: list[dict], title: str,
                notes: tuple[str, ...] = ()) -> str:
  """Writes an `inherit_report`'s rows as ``report.json`` and ``report.md`` (a heading,
  ``notes`` as paragraphs, the `format_report` table) in ``directory``; returns the table.

  Example:
      ```python
      params, rows = inherit(teacher_params, spec, return_report=True)
      print(export.save_report("/tmp/inh", rows, "resnet8 inherited", ("teacher: RUN",)))
      ```
  """
  text = format_report(rows)
  utils.write_json(os.path.join(directory, "report.json"), rows, indent=2)
  body = "".join(f"{n}\n\n" for n in notes)
  markdown = f"# {title}\n\n{body}```\n{text}\n```\n"
  utils.atomic_write(os.path.join(directory, "report.md"), lambda f: f.write(markdown), "w")
  return text
