"""Tests for `inhernet_jax.interop.export`: model.safetensors + spec.json, round trips and errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from inhernet_jax.interop import export
from inhernet_jax.decomposition.policy import layer_plan
from inhernet_jax.decomposition.spec import InherSpec

SPEC = InherSpec(rank=0.25, heads=3, method="exact", rules=(
    (r"stem/kernel", "skip"),
    (r"block_\d+/attn/.*", {"rank": 8, "heads": 2}),
    (r"blocks/mlp/fc1/kernel", {"stack": 1, "energy": 0.9}),
    (r"head/kernel", 0.5),
))


def _variables():
  rng = np.random.default_rng(0)
  return {
      "params": {
          "stem": {"kernel": rng.normal(size=(3, 3, 3, 8)).astype(np.float32)},
          "block_0": {"attn": {"query": {
              "down": {"kernel": jnp.asarray(rng.normal(size=(8, 2)), jnp.bfloat16)},
              "up": {"kernel": rng.normal(size=(2, 2, 8)).astype(ml_dtypes.bfloat16),
                     "bias": np.full((2, 8), -0.0, np.float32)}}}},
          "step": np.float32(7),  # A 0-d leaf.
      },
      "batch_stats": {"bn": {"mean": rng.normal(size=(8,)), "var": np.ones(8, np.float16)}},
  }


def _bits(x):
  x = np.asarray(x)
  return x.dtype, x.shape, x.tobytes()


def test_round_trip_is_exact(tmp_path):
  variables = _variables()
  export.save(tmp_path, variables, SPEC, metadata={"model": "vit_b16", "num_classes": 10})
  loaded, spec = export.load(tmp_path)
  assert spec == SPEC and hash(spec) == hash(SPEC)
  flat = export.flatten(loaded)
  want = {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
  assert sorted(flat) == sorted(want)
  for key in want:  # Bit for bit, dtypes (bfloat16, float16, float64) and shapes.
    assert _bits(flat[key]) == _bits(want[key]), key
  assert loaded["params"]["step"].shape == ()
  assert loaded["params"]["block_0"]["attn"]["query"]["down"]["kernel"].dtype == jnp.bfloat16
  assert export.load_spec(tmp_path / "spec.json")[1] == {"model": "vit_b16", "num_classes": 10}


def test_files_are_readable_without_jax(tmp_path):
  export.save(tmp_path, _variables(), SPEC)
  with open(tmp_path / "spec.json") as f:
    data = json.load(f)
  assert (data["format"], data["version"], data["metadata"]) == (export.FORMAT, export.VERSION, {})
  spec = data["spec"]
  assert set(spec) == {f.name for f in dataclasses.fields(InherSpec)}  # Every field, generically.
  assert (spec["rank"], spec["heads"], spec["method"], spec["energy"]) == (0.25, 3, "exact", None)
  assert spec["rules"] == [["stem/kernel", {"skip": True}],
                           [r"block_\d+/attn/.*", {"heads": 2, "rank": 8}],
                           ["blocks/mlp/fc1/kernel", {"energy": 0.9, "stack": 1}],
                           ["head/kernel", {"fraction": 0.5}]]
  weights = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  assert "params/block_0/attn/query/up/kernel" in weights and "batch_stats/bn/var" in weights
  assert weights["params/stem/kernel"].shape == (3, 3, 3, 8)


def test_teacher_export_and_spec_json_helpers(tmp_path):
  export.save(tmp_path, {"params": {"w": np.ones(2, np.float32)}}, None)
  variables, spec = export.load(tmp_path)
  assert spec is None and variables["params"]["w"].tolist() == [1.0, 1.0]
  assert export.spec_from_json(export.spec_to_json(SPEC)) == SPEC
  assert export.spec_from_json({"rank": 4}) == InherSpec(rank=4)  # Absent fields: defaults.


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="spec.json"):
    export.load(tmp_path)
  export.save(tmp_path, _variables(), SPEC)
  with pytest.raises(FileExistsError, match="model.safetensors"):
    export.save(tmp_path, _variables(), SPEC)
  export.save(tmp_path, {"params": {"w": np.zeros(1)}}, None, overwrite=True)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    export.load(tmp_path)

  def write(data):
    (tmp_path / "spec.json").write_text(json.dumps(data))
    return tmp_path / "spec.json"

  good = {"format": export.FORMAT, "version": 1, "spec": export.spec_to_json(SPEC), "metadata": {}}
  with pytest.raises(ValueError, match=r"unknown InherSpec fields \['sparsity'\]"):
    export.load_spec(write({**good, "spec": {**good["spec"], "sparsity": 0.5}}))
  with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
    export.load_spec(write({**good, "extra": 1}))
  with pytest.raises(ValueError, match="not an inhernet_jax export"):
    export.load_spec(write({"rank": 4, "heads": 2}))
  with pytest.raises(ValueError, match="version 2"):
    export.load_spec(write({**good, "version": 2}))
  with pytest.raises(ValueError, match=r"rules\[0\]"):  # InherSpec's own validation, named.
    export.load_spec(write({**good, "spec": {"rank": 4, "rules": [["a", {"bogus": 1}]]}}))
  with pytest.raises(ValueError, match="a/b"):
    export.save(tmp_path / "bad", {"params": {"a/b": np.zeros(1)}}, None)
  with pytest.raises(TypeError, match="params/w: expected an array"):
    export.save(tmp_path / "bad", {"params": {"w": [1.0]}}, None)
  with pytest.raises(ValueError, match="'params'"):
    export.save(tmp_path / "bad", {"w": np.zeros(1)}, None)
  with pytest.raises(TypeError, match="metadata.source"):
    export.save(tmp_path / "bad", {"params": {"w": np.zeros(1)}}, None, metadata={"source": object()})
  assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("bad, error, match", [
    (np.array([1, -2], np.int8), TypeError, "params/w has dtype int8"),
    (np.array([True, False]), TypeError, "params/w has dtype bool"),
    (np.array([1.0, np.nan, np.inf], np.float32), ValueError, "params/w has 2 NaN/Inf"),
])
def test_non_float_or_non_finite_weights_are_refused_both_ways(tmp_path, bad, error, match):
  with pytest.raises(error, match=match):
    export.save(tmp_path / "out", {"params": {"w": bad}}, None)
  assert not (tmp_path / "out").exists()
  # A file written by someone else: refused on load, naming the tensor.
  export.save(tmp_path / "in", {"params": {"w": np.zeros(2, np.float32)}}, None)
  safetensors.numpy.save_file({"params/w": bad}, str(tmp_path / "in" / "model.safetensors"))
  with pytest.raises(error, match=match):
    export.load(tmp_path / "in")


@pytest.mark.parametrize("change, match", [
    ({"version": True}, '"version" must be an integer, got true'),
    ({"version": "1"}, '"version" must be an integer'),
    ({"metadata": [1]}, '"metadata" must be an object'),
    ({"spec": {"rank": True}}, "spec.rank: expected null or number, got bool true"),
    ({"spec": {"rank": "8"}}, 'spec.rank: expected null or number, got str "8"'),
    ({"spec": {"rank": 4, "heads": 2.0}}, "spec.heads: expected int, got float"),
    ({"spec": {"rank": 4, "data_aware": 1}}, "spec.data_aware: expected bool, got int 1"),
    ({"spec": {"rank": 4, "skip_if_no_saving": "false"}}, "spec.skip_if_no_saving"),
    ({"spec": {"rank": 4, "rules": [["a", {"skip": "no"}]]}}, r"spec.rules\[0\].skip: expected bool"),
    ({"spec": {"rank": 4, "rules": ["a"]}}, r"spec.rules\[0\]: expected a \[regex, action\]"),
    ({"spec": {"rank": 4, "rules": [[1, "skip"]]}}, r"spec.rules\[0\]: a rule pattern must be a string"),
    ({"spec": {"rank": 4, "rules": [["(a)\\1", "skip"]]}}, "must be RE2 syntax"),
    ({"spec": {"rank": 4, "rules": [["a" * 5000, "skip"]]}}, "5000 characters"),
])
def test_spec_json_types_are_checked(tmp_path, change, match):
  data = {"format": export.FORMAT, "version": 1, "spec": {"rank": 4}, "metadata": {}, **change}
  (tmp_path / "spec.json").write_text(json.dumps(data))
  with pytest.raises(ValueError, match=match):
    export.load_spec(tmp_path / "spec.json")


def test_a_catastrophic_rule_from_a_file_costs_linear_time(tmp_path):
  """``(.*)*Z`` took 16 s on a 26-character path under `re` (doubling per character)."""
  import time

  data = {"format": export.FORMAT, "version": 1, "metadata": {},
          "spec": {"rank": 4, "rules": [["(.*)*Z", "skip"], ["(a|aa)+$", "skip"]]}}
  (tmp_path / "spec.json").write_text(json.dumps(data))
  spec, _ = export.load_spec(tmp_path / "spec.json")
  path = "a" * 5000 + "/kernel"  # Far past where backtracking would never end.
  t0 = time.perf_counter()
  for _ in range(10):
    assert spec.match(path) == (None, {})
    assert layer_plan(spec, path, 64, 64, use_bias=False).rank == 4
  assert time.perf_counter() - t0 < 5.0  # Measured: ~1 ms.
  assert spec.match("aaZ")[0] == 0 and spec.match("aaa")[0] == 1


def test_in_code_rules_keep_python_regexes():
  spec = InherSpec(rank=4, rules=((r"(?!head/).*kernel", "skip"),))  # A lookahead: not RE2.
  assert spec.match("stem/kernel")[0] == 0 and spec.match("head/kernel")[0] is None
  with pytest.raises(ValueError, match="must be RE2 syntax"):
    export.save_spec("/nonexistent/spec.json", spec)  # Refused before anything is written.
